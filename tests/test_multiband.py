"""The multi-band stage on two synthetic coadds of one patch: merge, measurement, reference band, forced photometry, object table."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from snakedrp.coadd.coadd_psf import CellCachedPsf, CoaddPsf, CoaddPsfInput
from snakedrp.coadd.config import DetectCoaddConfig
from snakedrp.coadd.detect_coadd import detect_coadd
from snakedrp.multiband.config import MeasureCoaddConfig, MergeDetectionsConfig, MergeMeasurementsConfig
from snakedrp.multiband.measure_coadd import measure_coadd
from snakedrp.multiband.merge_detections import band_order, merge_detections, merge_peaks, split_footprints
from snakedrp.multiband.merge_measurements import merge_measurements, reference_bands
from snakedrp.multiband.object_table import njy_per_unit, patch_object_table, tract_object_table
from snakedrp.repo.exposure import Exposure
from snakedrp.repo.psf_model import GaussianPsf

N = 400
ZEROPOINT = 30.0
NOISE = 0.5
SIGMA = {"r": 1.6, "i": 1.3}          # PSF sigma of each band's coadd [pixel]
PIXEL_SCALE = 0.168                   # [arcsec/pixel]
INNER = (50, 50, 300, 300)            # the patch's inner box (x0, y0, nx, ny)


def _wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [N / 2, N / 2]
    wcs.wcs.cd = np.array([[-PIXEL_SCALE, 0.0], [0.0, PIXEL_SCALE]]) / 3600
    return wcs


def _stars():
    """True stars: a grid of bright ones (r - i from -0.2 to 0.8), a close pair, and one seen in r only."""
    rng = np.random.default_rng(11)
    xy = [(x, y) for y in range(40, 380, 40) for x in range(40, 380, 40)]
    xy = np.array(xy, float) + rng.uniform(-0.5, 0.5, (len(xy), 2))
    mag_i = rng.uniform(18.5, 20.5, len(xy))
    colour = rng.uniform(-0.2, 0.8, len(xy))
    pair = np.array([[196.3, 221.6], [206.1, 224.2]])    # 10 px apart: one footprint, two objects
    lone = np.array([[61.2, 358.7]])                     # r only: far too faint in i for a peak
    xy = np.vstack([xy, pair, lone])
    mag_i = np.r_[mag_i, 19.0, 20.0, 29.0]
    colour = np.r_[colour, 0.3, 0.1, -6.0]
    return xy, {"i": mag_i, "r": mag_i + colour}


@pytest.fixture(scope="module")
def patch():
    wcs = _wcs()
    box = np.array([[-0.5, -0.5], [N - 0.5, -0.5], [N - 0.5, N - 0.5], [-0.5, N - 0.5]])
    xy, mags = _stars()
    rng = np.random.default_rng(5)
    calexps, dets = {}, {}
    for band in ("r", "i"):
        # a Gaussian has no light beyond its calibration aperture: aperture wing 0
        psf = CoaddPsf(wcs, [CoaddPsfInput(1, 0, 1.0, GaussianPsf(SIGMA[band], 41), wcs, box, 0.0)])
        image = rng.normal(0.0, NOISE, (N, N))
        model = CellCachedPsf(psf)
        for (x, y), mag in zip(xy, mags[band]):
            stamp, x0, y0 = model.draw(x, y)
            n = stamp.shape[0]
            image[y0:y0 + n, x0:x0 + n] += 10 ** (-0.4 * (mag - ZEROPOINT)) * stamp
        coadd = Exposure(image.astype(np.float32), np.zeros((N, N), np.int32), np.full((N, N), NOISE**2, np.float32),
                         wcs=wcs, psf=psf, zeropoint=ZEROPOINT)
        result = detect_coadd(coadd, config=DetectCoaddConfig(do_background=False, do_scale_variance=False))
        calexps[band], dets[band] = result.calexp, result.detections
    snr = {b: c.image / np.sqrt(c.variance) for b, c in calexps.items()}
    merged = merge_detections(dets, {b: c.mask for b, c in calexps.items()}, snr, priority=["i", "r"],
                              pixel_scale=PIXEL_SCALE, wcs=wcs)
    return dict(calexps=calexps, dets=dets, merged=merged, xy=xy, mags=mags)


def _nearest(table, xy, xcol="x", ycol="y"):
    d = np.hypot(np.asarray(table[xcol], float)[None, :] - xy[:, 0, None],
                 np.asarray(table[ycol], float)[None, :] - xy[:, 1, None])
    return d.argmin(axis=1), d.min(axis=1)


def test_band_order_puts_the_priority_bands_first():
    assert band_order(["g", "r", "i", "N921"], ["i", "r"])[:2] == ["i", "r"]
    assert band_order(["g", "z"], ["i", "r"]) == ["z", "g"]


def test_merge_peaks_takes_each_bands_peak_once_within_the_radius():
    i = Table(dict(x=[10.0, 50.0], y=[10.0, 50.0], detection_snr=[100.0, 20.0]))
    r = Table(dict(x=[10.8, 11.2, 90.0], y=[10.0, 10.0, 90.0], detection_snr=[80.0, 30.0, 15.0]))
    out = merge_peaks({"r": r, "i": i}, ["i", "r"], radius=2.0)
    # object 1: i's peak, r's stronger peak merged into it; r's second peak near it is an object of its own
    assert len(out) == 4
    assert list(out["peak_band"]) == ["i", "i", "r", "r"]
    assert out["x"][0] == 10.0 and out["merge_peak_i"][0] and out["merge_peak_r"][0]
    assert out["detection_snr_r"][0] == 80.0
    assert not out["merge_peak_r"][1] and np.isnan(out["detection_snr_r"][1])
    assert out["x"][2] == 11.2 and out["x"][3] == 90.0 and not out["merge_peak_i"][2:].any()


def test_split_footprints_follows_the_valley_and_leaves_unseeded_footprints_out():
    yy, xx = np.mgrid[0:40, 0:80]
    image = 100 * np.exp(-((xx - 20) ** 2 + (yy - 20) ** 2) / 18.0) + 20 * np.exp(-((xx - 36) ** 2 + (yy - 20) ** 2) / 18.0)
    footprints = image > 1.0
    footprints[5:8, 60:65] = True                       # a footprint without a peak
    labels = split_footprints(footprints, image, [20.0, 36.0], [20.0, 20.0], 0.0)
    assert labels[20, 20] == 1 and labels[20, 36] == 2
    # each side of the valley between them (nearer the faint star) is its star's
    valley = 20 + int(np.argmin(image[20, 20:37]))
    assert 28 < valley < 34
    assert (labels[20, 20:valley] == 1).all() and (labels[20, valley + 1:37] == 2).all()
    assert (labels[5:8, 60:65] == 0).all() and (labels[~footprints] == 0).all()


def test_merged_objects_are_the_true_stars_once_each(patch):
    merged, xy = patch["merged"], patch["xy"]
    objects = merged.objects
    rows, dist = _nearest(objects, xy)
    visible = np.arange(len(xy))
    assert (dist[visible] < 1.0).all()
    assert len(set(rows)) == len(xy) == len(objects)
    seg = merged.segmentation
    ix, iy = np.round(objects["x"]).astype(int), np.round(objects["y"]).astype(int)
    assert (seg[iy, ix] == objects["id"]).all()
    pair = rows[-3:-1]
    assert objects["is_blended"][pair].all() and objects["parent"][pair[0]] == objects["parent"][pair[1]] > len(objects)
    assert (objects["blend_nchild"][pair] >= 2).all()
    lone = rows[-1]
    assert objects["peak_band"][lone] == "r" and not objects["merge_peak_i"][lone]
    assert objects["peak_band"][rows[0]] == "i"        # the reddest band first: its position


@pytest.fixture(scope="module")
def catalogs(patch):
    config = MeasureCoaddConfig()
    objects, seg = patch["merged"].objects, patch["merged"].segmentation
    meas = {b: measure_coadd(c, objects, seg, config=config) for b, c in patch["calexps"].items()}
    reference = merge_measurements(objects, meas, ["i", "r"])
    forced = {b: measure_coadd(c, objects, seg, config=config, reference=reference) for b, c in patch["calexps"].items()}
    return dict(meas=meas, reference=reference, forced=forced)


def test_reference_band_is_the_priority_band_with_a_good_peak(patch, catalogs):
    objects, reference = patch["merged"].objects, catalogs["reference"]
    rows, _ = _nearest(objects, patch["xy"])
    assert (reference["ref_band"][rows[:-1]] == "i").all()
    assert reference["ref_band"][rows[-1]] == "r"
    assert reference["merge_measurement_r"][rows[-1]] and not reference["merge_measurement_i"][rows[-1]]
    i_rows = rows[:-1]
    assert np.allclose(reference["x_centroid"][i_rows], catalogs["meas"]["i"]["x_centroid"][i_rows])


def test_reference_band_switches_to_a_much_better_band_and_falls_back_to_a_peak():
    objects = Table(dict(id=[1, 2, 3], merge_peak_i=[True, True, False], merge_peak_r=[True, False, True]))

    def meas(snr):
        return Table(dict(id=[1, 2, 3], psf_flux=np.asarray(snr, float), psf_flux_err=np.ones(3),
                          psf_flux_flag=np.zeros(3, bool)))

    bands = reference_bands(objects, {"i": meas([5.0, 4.0, 9.0]), "r": meas([9.0, 4.5, 20.0])}, ["i", "r"],
                            MergeMeasurementsConfig(min_snr=10.0, min_snr_diff=3.0))
    # 1: neither band reaches 10, r exceeds i by 4 > 3; 2: r only 0.5 better, i the first peak band;
    # 3: r has S/N 20 and a peak
    assert list(bands) == ["r", "i", "r"]


def test_forced_photometry_measures_at_the_reference_positions(patch, catalogs):
    reference = catalogs["reference"]
    for band, table in catalogs["forced"].items():
        assert table.meta["FORCED"]
        assert np.array_equal(table["x_centroid"], reference["x_centroid"])
        assert np.array_equal(table["y_centroid"], reference["y_centroid"])
        assert not np.any(table["centroid_flag"])
    free = catalogs["meas"]["r"]
    assert not np.array_equal(free["x_centroid"], reference["x_centroid"])


def test_forced_psf_magnitudes_and_colours_match_the_truth(patch, catalogs):
    """Total magnitudes to 3 mmag and colours to 3 mmag (median of ~60 stars at S/N > 100)."""
    objects = patch["merged"].objects
    rows, _ = _nearest(objects, patch["xy"])
    bright = rows[:-3]
    dmag = {}
    for band, table in catalogs["forced"].items():
        assert table.meta["APCORRN"] >= 20
        assert np.isfinite(table["psf_apcorr"]).all()
        dmag[band] = np.asarray(table["psf_mag"])[bright] - patch["mags"][band][:-3]
        assert abs(np.median(dmag[band])) < 0.003, band
    assert abs(np.median(dmag["r"] - dmag["i"])) < 0.003


def test_without_a_curve_of_growth_the_psf_fluxes_are_nan_and_flagged(patch):
    calexp = patch["calexps"]["r"]
    psf = CoaddPsf(calexp.psf.coadd_wcs, [CoaddPsfInput(i.visit, i.ccd, i.weight, i.psf, i.wcs, i.polygon, np.nan)
                                          for i in calexp.psf.inputs], calexp.psf.size)
    from dataclasses import replace

    table = measure_coadd(replace(calexp, psf=psf), patch["merged"].objects, patch["merged"].segmentation)
    assert np.isnan(table["psf_flux"]).all() and table["psf_apcorr_flag"].all()


def test_object_table_has_nanojansky_fluxes_and_one_primary_row_per_object(patch, catalogs):
    table = patch_object_table(catalogs["reference"], catalogs["forced"], tract=3, patch="1,2", inner_bbox=INNER)
    assert njy_per_unit(31.4) == pytest.approx(1.0)
    scale = njy_per_unit(ZEROPOINT)
    assert np.allclose(table["r_psfFlux"], catalogs["forced"]["r"]["psf_flux"] * scale, equal_nan=True)
    assert np.allclose(table["i_psfMag"], catalogs["forced"]["i"]["psf_mag"], equal_nan=True)
    assert table["r_psfFlux"].unit == "nJy" and table["r_psfFlux"].description
    x0, y0, nx, ny = INNER
    inside = (table["x"] >= x0 - 0.5) & (table["x"] < x0 + nx - 0.5) & (table["y"] >= y0 - 0.5) & (table["y"] < y0 + ny - 0.5)
    assert np.array_equal(table["detect_isPrimary"], inside) and 0 < inside.sum() < len(table)
    assert len(set(table["objectId"])) == len(table) and (table["objectId"] >> 42 == 3).all()
    tract = tract_object_table([table, table[:0]])
    assert len(tract) == inside.sum() and tract["detect_isPrimary"].all()
    none = table.copy()
    none["detect_isPrimary"] = False
    assert len(tract_object_table([none])) == 0 and tract_object_table([none]).colnames == table.colnames


def test_merge_needs_one_grid():
    with pytest.raises(ValueError, match="share its grid"):
        merge_detections({"r": Table(dict(x=[1.0], y=[1.0], detection_snr=[10.0]))},
                         {"r": np.zeros((10, 10), np.int32)}, {"r": np.zeros((12, 10))}, priority=["r"],
                         pixel_scale=0.2, config=MergeDetectionsConfig())


# ------------------------------------------------------------------ the ci demo's multi-band products
@pytest.mark.workflow
def test_demo_multiband_validation_passes_every_goal(ci_repo, capsys):
    import json

    report = json.loads((ci_repo / "rerun/ci/validation/multiband.json").read_text())
    lines = [f"{'PASS' if m['passed'] else 'FAIL'} {m['name']}: {m['value']:.4g} {m['unit']} (goal {m['goal']}, n={m['n']})"
             for m in report["metrics"]]
    lines += [f"{s['colour']} S/N {s['snr_min']:g}-{s['snr_max']:g}: scatter {s['scatter_mmag']:.1f} mmag, quoted "
              f"{s['quoted_mmag']:.1f} mmag (n={s['n']}; no goal)" for s in report["colour_scatter"]]
    with capsys.disabled():
        print("\n[ci multi-band validation: rerun/ci/validation/multiband.json]", *lines, sep="\n")
    names = " ".join(m["name"] for m in report["metrics"])
    for figure in ("r: |median forced PSF mag", "i: |median forced PSF mag", "r-i: |median colour", "reference positions",
                   "more than one primary"):
        assert figure in names, figure
    assert report["strict"] is True and report["passed"] and report["missed"] == []
    assert all(m["n"] >= 100 for m in report["metrics"])


@pytest.mark.workflow
def test_demo_object_tables_hold_each_object_once(ci_repo):
    import pyarrow.parquet as pq

    merged = ci_repo / "rerun/ci/deepCoadd-results/merged"
    tract = Table.read(merged / "0" / "objectTable-0.fits")
    patches = [Table.read(p) for p in sorted(merged.glob("0/*/objectTable-0-*.fits"))]
    assert len(patches) == 9
    assert len(tract) == sum(int(p["detect_isPrimary"].sum()) for p in patches) > 1000
    assert len(set(tract["objectId"])) == len(tract) and tract["detect_isPrimary"].all()
    assert set(tract["refBand"]) <= {"r", "i"} and (tract["refBand"] == "i").sum() > len(tract) / 3
    for name in tract.colnames:
        assert tract[name].description, name
    for band in ("r", "i"):
        assert tract[f"{band}_psfFlux"].unit == "nJy" and tract[f"{band}_psfMag"].unit == "mag"
        assert np.isfinite(tract[f"{band}_psfFlux"]).mean() > 0.95
    parquet = pq.read_table(merged / "0" / "objectTable-0.parq")
    assert parquet.num_rows == len(tract)
    assert np.array_equal(parquet.column("objectId").to_numpy(), np.asarray(tract["objectId"]))
    assert parquet.schema.field("r_psfFlux").metadata[b"unit"] == b"nJy"
