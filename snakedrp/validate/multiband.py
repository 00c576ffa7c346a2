"""Multi-band object tables against the simulator's truth.

Each figure is computed on the primary rows (``detect_isPrimary``) of the tract object tables
and the true stars, bright (``star_mag_range`` in every band) and isolated (no object brighter
than the star + 3 mag within ``isolation_radius``), each matched to its nearest primary object:

- per band, the median of forced PSF magnitude - true total magnitude [mmag];
- per pair of bands adjacent in wavelength, the median of measured - true colour [mmag];
- the RMS of the reference positions about the true ones [mas], the stars whose reference-band
  centroid is flagged (masked pixels in its window, e.g. by a coverage edge) left out;
- the fraction of those stars matched by more than one primary object [%] (an overlap of
  patches or tracts counted twice).

As in the coadd validation, the magnitude, colour and position figures leave out the stars
whose footprint holds an INEXACT_PSF pixel in any band (a warp with data left out there: the
coadd PSF model is not the image's PSF).

Reported without a goal (:func:`colour_scatter`): per pair of bands and range of S/N, the robust
scatter of measured - true colour against the one the quoted errors predict.
"""
from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from snakedrp.validate.config import MultibandValidateConfig
from snakedrp.validate.figures import Metric

BAND_ORDER = "ugrizy"


def _unit_vectors(ra, dec) -> np.ndarray:
    ra, dec = np.deg2rad(np.asarray(ra, float)), np.deg2rad(np.asarray(dec, float))
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def _chord(arcsec: float) -> float:
    return 2.0 * np.sin(np.deg2rad(arcsec / 3600.0) / 2.0)


def isolated_bright_stars(objects: Table, bands, config: MultibandValidateConfig) -> np.ndarray:
    """Indices of the true stars bright in every band and without a brighter-than-+3-mag object near them."""
    lo, hi = config.star_mag_range
    star = np.char.strip(np.asarray(objects["type"]).astype(str)) == "star"
    bright = star.copy()
    for band in bands:
        mag = np.asarray(objects[f"mag_{band}"], float)
        bright &= (mag >= lo) & (mag <= hi)
    rows = np.flatnonzero(bright)
    if len(rows) == 0:
        return rows
    xyz = _unit_vectors(objects["ra"], objects["dec"])
    tree = cKDTree(xyz)
    keep = []
    for r, neighbours in zip(rows, tree.query_ball_point(xyz[rows], _chord(config.isolation_radius))):
        others = [j for j in neighbours if j != r]
        if not others or all(float(objects[f"mag_{b}"][j]) > float(objects[f"mag_{b}"][r]) + 3.0
                             for b in bands for j in others):
            keep.append(r)
    return np.asarray(keep, int)


def inexact_psf(table: Table, rows: np.ndarray, bands) -> np.ndarray:
    """Whether each of the object-table ``rows`` has an INEXACT_PSF pixel in its footprint in any band."""
    out = np.zeros(len(rows), bool)
    for band in bands:
        name = f"{band}_pixelFlags_inexact_psf"
        if name in table.colnames:
            out |= np.asarray(table[name], bool)[rows]
    return out


def match_stars(table: Table, objects: Table, rows: np.ndarray, radius: float):
    """Nearest primary object of each true star ``rows`` within ``radius`` [arcsec] (-1 if none), and how many lie within it."""
    if len(table) == 0 or len(rows) == 0:
        return np.full(len(rows), -1), np.zeros(len(rows), int)
    tree = cKDTree(_unit_vectors(table["coord_ra"], table["coord_dec"]))
    true_xyz = _unit_vectors(np.asarray(objects["ra"])[rows], np.asarray(objects["dec"])[rows])
    dist, index = tree.query(true_xyz)
    chord = _chord(radius)
    nearest = np.where(dist <= chord, index, -1)
    count = np.array([len(n) for n in tree.query_ball_point(true_xyz, chord)], int)
    return nearest, count


def colour_scatter(table: Table, objects: Table, bands, config: MultibandValidateConfig | None = None,
                   snr_edges=(100.0, 200.0, 400.0, 1000.0, 1e6)) -> list[dict]:
    """Per adjacent pair of bands and range of the fainter band's S/N: the robust scatter of measured - true colour [mmag] and the median quoted error [mmag].

    The stars are those of :func:`multiband_figures`. Returns one dict per (pair, range) with
    ``colour``, ``snr_min``, ``snr_max``, ``n``, ``scatter_mmag`` and ``quoted_mmag``.
    """
    config = config or MultibandValidateConfig()
    bands = sorted(dict.fromkeys(bands), key=BAND_ORDER.find)
    table = table[np.asarray(table["detect_isPrimary"], bool)] if "detect_isPrimary" in table.colnames else table
    rows = isolated_bright_stars(objects, bands, config)
    nearest, _ = match_stars(table, objects, rows, config.match_radius)
    rows, nearest = rows[nearest >= 0], nearest[nearest >= 0]
    keep = ~inexact_psf(table, nearest, bands)
    rows, nearest = rows[keep], nearest[keep]
    out = []
    for blue, red in zip(bands[:-1], bands[1:]):
        diff = np.zeros(len(rows))
        snr = np.full(len(rows), np.inf)
        for band, sign in ((blue, 1.0), (red, -1.0)):
            diff += sign * (np.asarray(table[f"{band}_psfMag"], float)[nearest] - np.asarray(objects[f"mag_{band}"], float)[rows])
            with np.errstate(invalid="ignore", divide="ignore"):
                s = np.asarray(table[f"{band}_psfFlux"], float)[nearest] / np.asarray(table[f"{band}_psfFluxErr"], float)[nearest]
            snr = np.minimum(snr, np.where(np.isfinite(s), s, -np.inf))
        err = np.hypot(np.asarray(table[f"{blue}_psfMagErr"], float)[nearest], np.asarray(table[f"{red}_psfMagErr"], float)[nearest])
        for lo, hi in zip(snr_edges[:-1], snr_edges[1:]):
            use = (snr >= lo) & (snr < hi) & np.isfinite(diff) & np.isfinite(err)
            d = diff[use]
            scatter = 1.4826 * float(np.median(np.abs(d - np.median(d)))) * 1e3 if use.sum() >= 3 else float("nan")
            quoted = float(np.median(err[use])) * 1e3 if use.any() else float("nan")
            out.append(dict(colour=f"{blue}-{red}", snr_min=float(lo), snr_max=float(hi), n=int(use.sum()),
                            scatter_mmag=scatter, quoted_mmag=quoted))
    return out


def multiband_figures(table: Table, objects: Table, bands, config: MultibandValidateConfig | None = None) -> list[Metric]:
    """The figures of the module docstring.

    Parameters
    ----------
    table : Table
        Primary rows of the tract object tables (``coord_ra``, ``coord_dec``, ``<band>_psfMag``,
        ``<band>_psfMagErr``, ``<band>_psfFlux``, ``<band>_psfFluxErr``, ``<band>_psfFlux_flag``).
    objects : Table
        The simulator's ``objects`` truth (``ra``, ``dec``, ``type``, ``mag_<band>``).
    bands : list of str
    config : MultibandValidateConfig

    Returns
    -------
    list of Metric
    """
    config = config or MultibandValidateConfig()
    bands = sorted(dict.fromkeys(bands), key=BAND_ORDER.find)
    table = table[np.asarray(table["detect_isPrimary"], bool)] if "detect_isPrimary" in table.colnames else table
    rows = isolated_bright_stars(objects, bands, config)
    nearest, count = match_stars(table, objects, rows, config.match_radius)
    matched = nearest >= 0
    rows, nearest, count = rows[matched], nearest[matched], count[matched]
    good = np.ones(len(rows), bool)
    for band in bands:
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.asarray(table[f"{band}_psfFlux"], float)[nearest] / np.asarray(table[f"{band}_psfFluxErr"], float)[nearest]
        good &= (snr >= config.snr_min) & ~np.asarray(table[f"{band}_psfFlux_flag"], bool)[nearest]
    good &= ~inexact_psf(table, nearest, bands)
    metrics = []
    dmag = {}
    for band in bands:
        dmag[band] = np.asarray(table[f"{band}_psfMag"], float)[nearest] - np.asarray(objects[f"mag_{band}"], float)[rows]
        value = abs(float(np.median(dmag[band][good]))) * 1e3 if good.any() else float("nan")
        metrics.append(Metric(f"{band}: |median forced PSF mag - true mag| of bright isolated stars", value,
                              config.flux_bias_goal, "mmag", int(good.sum())))
    for blue, red in zip(bands[:-1], bands[1:]):
        diff = dmag[blue] - dmag[red]
        err = np.hypot(np.asarray(table[f"{blue}_psfMagErr"], float)[nearest], np.asarray(table[f"{red}_psfMagErr"], float)[nearest])
        use = good & np.isfinite(diff) & (err > 0)
        bias = abs(float(np.median(diff[use]))) * 1e3 if use.any() else float("nan")
        metrics.append(Metric(f"{blue}-{red}: |median colour - true colour|", bias, config.colour_bias_goal, "mmag", int(use.sum())))
    good &= ~np.asarray(table["centroid_flag"], bool)[nearest]
    if good.any():
        ra, dec = np.asarray(table["coord_ra"], float)[nearest][good], np.asarray(table["coord_dec"], float)[nearest][good]
        tra, tdec = np.asarray(objects["ra"], float)[rows][good], np.asarray(objects["dec"], float)[rows][good]
        dra = ((ra - tra + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(tdec)) * 3.6e6
        ddec = (dec - tdec) * 3.6e6
        rms = float(np.sqrt(np.mean(dra**2 + ddec**2)))
    else:
        rms = float("nan")
    metrics.append(Metric("reference positions of bright isolated stars vs truth (RMS)", rms, config.astrometry_rms_goal,
                          "mas", int(good.sum())))
    duplicates = 100.0 * float(np.mean(count > 1)) if len(count) else float("nan")
    metrics.append(Metric("bright isolated stars matched by more than one primary object", duplicates,
                          config.duplicate_goal, "%", int(len(count))))
    return metrics
