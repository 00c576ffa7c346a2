"""Validation of single-frame processing against the simulator's truth.

Each metric compares a pipeline product with what the simulator rendered, and carries its
goal; :func:`check_goals` lists the failures. Matching between measured and true sources is by
nearest neighbour in pixel coordinates of the same exposure.

Calibration is told apart from noise: the WCS error is the distance between the fitted and the
true pixel-to-sky mapping on a grid over each CCD (no centroid noise in it), shown next to the
centroid scatter of bright stars and the scatter their S/N predicts; the photometric
calibration error is the median per CCD of calibrated PSF magnitudes of bright isolated stars
minus their true total magnitudes; completeness is counted at an expected matched-filter S/N
computed with the true PSF. A missed goal is reported; only ``strict`` makes it fail the job
(:func:`finish`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from snakedrp.repo.exposure import Exposure, mask_bit
from snakedrp.validate.config import ValidateConfig
from snakedrp.validate.figures import Metric
from snakedrp.meas.columns import flagged
from snakedrp.stamps import kernel_moments


def match_sources(x_meas, y_meas, x_true, y_true, radius: float):
    """Indices ``(i_meas, i_true)`` of nearest-neighbour matches within ``radius`` pixels."""
    if len(x_meas) == 0 or len(x_true) == 0:
        return np.array([], int), np.array([], int)
    tree = cKDTree(np.column_stack([x_meas, y_meas]))
    dist, idx = tree.query(np.column_stack([x_true, y_true]), distance_upper_bound=radius)
    ok = np.isfinite(dist)
    return idx[ok], np.nonzero(ok)[0]


def isolated(x, y, flux, radius: float, flux_ratio: float) -> np.ndarray:
    """True where no other object within ``radius`` pixels has more than ``flux_ratio`` x the flux."""
    tree = cKDTree(np.column_stack([x, y]))
    pairs = tree.query_pairs(radius, output_type="ndarray")
    ok = np.ones(len(x), bool)
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        ok[i[flux[j] > flux_ratio * flux[i]]] = False
        ok[j[flux[i] > flux_ratio * flux[j]]] = False
    return ok


def _isolated(truth: Table, config: "ValidateConfig") -> np.ndarray:
    return isolated(np.asarray(truth["x"], float), np.asarray(truth["y"], float), np.asarray(truth["flux"], float),
                    config.isolation_radius, config.isolation_flux_ratio)


def astrometric_errors_mas(src: Table, truth: Table, objects: Table, config: ValidateConfig, *,
                           isolated_only: bool = True) -> np.ndarray:
    """Sky separation (mas) between measured and true positions of matched bright, unflagged stars.

    With ``isolated_only``, stars blended with another object (see ``isolation_*``) are left out.
    """
    im, it = match_sources(src["x_centroid"], src["y_centroid"], truth["x"], truth["y"], config.match_radius)
    snr = np.asarray(src["psf_flux"])[im] / np.asarray(src["psf_flux_err"])[im]
    keep = _is_star(truth)[it] & (snr > config.astrometry_snr_min)
    if isolated_only:
        keep &= _isolated(truth, config)[it]
    keep &= ~flagged(src, also=("centroid_flag",))[im] & ~np.asarray(truth["saturated"], bool)[it]
    im, it = im[keep], it[keep]
    by_id = {int(i): k for k, i in enumerate(objects["id"])}
    rows = np.array([by_id[int(i)] for i in truth["id"][it]], int)
    ra_t, dec_t = np.asarray(objects["ra"])[rows], np.asarray(objects["dec"])[rows]
    ra_m, dec_m = np.asarray(src["coord_ra"])[im], np.asarray(src["coord_dec"])[im]
    dra = ((ra_m - ra_t + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(dec_t))
    return np.hypot(dra, dec_m - dec_t) * 3.6e6


def wcs_errors_mas(calexp: Exposure, true_pixel_to_sky, grid=(8, 16)) -> np.ndarray:
    """Distances [mas] between the fitted WCS and the true pixel-to-sky mapping on a grid over the CCD.

    ``true_pixel_to_sky(x, y)`` (zero-based pixels) returns the true ``(ra, dec)`` [deg].
    """
    ny, nx = calexp.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, int(grid[0])), np.linspace(0, ny - 1, int(grid[1])))
    gx, gy = gx.ravel(), gy.ravel()
    ra_f, dec_f = calexp.wcs.all_pix2world(gx, gy, 0)
    ra_t, dec_t = (np.asarray(v, float) for v in true_pixel_to_sky(gx, gy))
    dra = ((ra_f - ra_t + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(dec_t))
    return np.hypot(dra, dec_f - dec_t) * 3.6e6


def expected_centroid_scatter_mas(src: Table, truth: Table, config: "ValidateConfig", pixel_scale: float,
                                  psf_sigma: float) -> np.ndarray:
    """Expected 2-D centroid error [mas] of the stars of :func:`astrometric_errors_mas`: ``2 sigma / (S/N)``.

    For a Gaussian PSF of ``sigma`` pixels and background-limited optimal centroiding each axis
    scatters by ``sqrt(2) sigma / (S/N)``; the 2-D RMS is ``sqrt(2)`` times that.
    """
    im, it = match_sources(src["x_centroid"], src["y_centroid"], truth["x"], truth["y"], config.match_radius)
    snr = np.asarray(src["psf_flux"])[im] / np.asarray(src["psf_flux_err"])[im]
    keep = _is_star(truth)[it] & (snr > config.astrometry_snr_min) & _isolated(truth, config)[it]
    keep &= ~flagged(src, also=("centroid_flag",))[im] & ~np.asarray(truth["saturated"], bool)[it]
    return 2.0 * psf_sigma / snr[keep] * pixel_scale * 1000.0


def photometric_errors_mmag(src: Table, truth: Table, true_mag, config: "ValidateConfig") -> np.ndarray:
    """Calibrated ``psf_mag`` minus the true total magnitude [mmag] of bright, isolated, unflagged stars.

    ``true_mag(ids)`` returns the true total AB magnitudes of truth ids in the exposure's band.
    """
    if "psf_mag" not in src.colnames:
        return np.array([])
    iso = _isolated(truth, config)
    im, it = match_sources(src["x_centroid"], src["y_centroid"], truth["x"], truth["y"], config.match_radius)
    snr = np.asarray(src["psf_flux"])[im] / np.asarray(src["psf_flux_err"])[im]
    keep = _is_star(truth)[it] & iso[it] & (snr > config.photometry_snr_min)
    keep &= ~flagged(src, also=("centroid_flag",))[im] & ~np.asarray(truth["saturated"], bool)[it]
    mags = np.asarray(true_mag(np.asarray(truth["id"])[it[keep]]), float)
    return (np.asarray(src["psf_mag"], float)[im[keep]] - mags) * 1000.0


def _is_star(truth: Table) -> np.ndarray:
    # FITS string columns come back as bytes
    return np.char.strip(np.asarray(truth["type"]).astype(str)) == "star"


def psf_flux_ratios(src: Table, truth: Table, config: ValidateConfig) -> np.ndarray:
    """measured/true PSF flux of matched, isolated, unflagged bright stars."""
    iso = _isolated(truth, config)
    im, it = match_sources(src["x_centroid"], src["y_centroid"], truth["x"], truth["y"], config.match_radius)
    snr = np.asarray(src["psf_flux"])[im] / np.asarray(src["psf_flux_err"])[im]
    keep = _is_star(truth)[it] & iso[it] & (snr > config.psf_flux_snr_min)
    keep &= ~flagged(src, also=("centroid_flag",))[im] & ~np.asarray(truth["saturated"], bool)[it]
    return np.asarray(src["psf_flux"])[im[keep]] / np.asarray(truth["flux"])[it[keep]]


def completeness(src: Table, truth: Table, calexp: Exposure, config: ValidateConfig, true_neff=None):
    """(n_detected, n_total) of isolated true stars whose expected PSF S/N is in ``completeness_band``.

    The band (8-15 by default) is wider above the target than below: completeness rises with S/N,
    so the band's figure is a little above the value exactly at S/N 10 — the price of a sample
    large enough that one star is not 8 % (the report gives the binomial error). A detection within
    ``match_radius`` or ``completeness_match_fwhm`` PSF FWHM (whichever is larger) counts.

    The expected S/N is that of optimal PSF photometry (the matched filter) of a point source:
    ``F / sqrt(F + n_eff var_sky)`` with the true flux ``F``, the calexp variance at the star and
    the effective area ``n_eff = 1 / sum(psf**2)`` of the *true* PSF there (``true_neff(x, y)``;
    without it, of the PSF model).
    """
    x, y, flux = (np.asarray(truth[c], float) for c in ("x", "y", "flux"))
    ny, nx = calexp.shape
    inside = (x > 10) & (x < nx - 11) & (y > 10) & (y < ny - 11)
    ix, iy = np.clip(np.round(x).astype(int), 0, nx - 1), np.clip(np.round(y).astype(int), 0, ny - 1)
    bad = mask_bit("BAD") | mask_bit("SAT") | mask_bit("NO_DATA") | mask_bit("EDGE")
    clean = (calexp.mask[iy, ix] & bad) == 0
    sky_var = np.asarray(calexp.variance[iy, ix], float)
    if true_neff is not None:
        neff = np.asarray(true_neff(x, y), float)
    else:
        neff = np.array([1.0 / np.sum(calexp.psf.kernel(float(xi), float(yi)) ** 2) for xi, yi in zip(x, y)])
    snr = flux / np.sqrt(np.maximum(flux, 0) + neff * sky_var)
    target = config.completeness_snr
    lo, hi = (float(v) * target for v in config.completeness_band)
    sel = _is_star(truth) & inside & clean & _isolated(truth, config) & (snr >= lo) & (snr < hi)
    radius = config.match_radius
    if calexp.psf is not None:
        ny, nx = calexp.shape
        fwhm = 2.3548 * float(np.nan_to_num(kernel_moments(calexp.psf.kernel(nx / 2.0, ny / 2.0))[0], nan=0.0))
        radius = max(radius, config.completeness_match_fwhm * fwhm)
    im, it = match_sources(src["x_centroid"], src["y_centroid"], x[sel], y[sel], radius)
    return len(it), int(sel.sum())


def cosmic_ray_recovery(calexp: Exposure, cr_truth: np.ndarray, truth: Table, psf_sigma: float,
                        config: ValidateConfig):
    """Cosmic-ray pixel recovery and the number of true star cores taken for cosmic rays.

    ``cr_truth`` is the simulator's deposited cosmic-ray charge (e-) or a 0/1 mask; a pixel
    counts when its deposit exceeds ``cr_min_signal`` sigma of the calexp noise there (a 0/1
    mask counts every flagged pixel), and when it is not BAD/SAT/NO_DATA.
    """
    cr_flag = (calexp.mask & mask_bit("CR")) != 0
    unusable = (calexp.mask & (mask_bit("BAD") | mask_bit("SAT") | mask_bit("NO_DATA"))) != 0
    if cr_truth.dtype == np.uint8 or cr_truth.max() <= 1:
        real = cr_truth > 0
    else:
        real = cr_truth > config.cr_min_signal * np.sqrt(np.maximum(calexp.variance, 1e-12))
    real &= ~unusable
    recovered = int((cr_flag & real).sum())
    # star cores: the 3x3 pixels around every true, unsaturated star bright enough to have a core
    stars = _is_star(truth) & ~np.asarray(truth["saturated"], bool)
    ny, nx = calexp.shape
    ix = np.round(np.asarray(truth["x"])[stars]).astype(int)
    iy = np.round(np.asarray(truth["y"])[stars]).astype(int)
    peak = np.asarray(truth["flux"])[stars] / (2 * np.pi * psf_sigma**2)
    ok = (ix > 1) & (ix < nx - 2) & (iy > 1) & (iy < ny - 2)
    ok &= peak > 5 * np.sqrt(np.median(calexp.variance))
    # a false detection is a group of CR-flagged pixels (8-connected) holding no real CR pixel;
    # the mask grown around a real hit that touches a star is not the star taken for a CR
    groups, n_groups = ndimage.label(cr_flag, structure=np.ones((3, 3)))
    real_groups = np.unique(groups[cr_flag & (cr_truth > 0)])
    false_flag = cr_flag & ~np.isin(groups, real_groups)
    cores_hit = 0
    for cx, cy in zip(ix[ok], iy[ok]):
        if false_flag[cy - 1:cy + 2, cx - 1:cx + 2].any():
            cores_hit += 1
    return recovered, int(real.sum()), cores_hit, int(ok.sum())


def psf_shape_errors(calexp: Exposure, psf_sources: Table, true_psf_image) -> tuple[np.ndarray, np.ndarray]:
    """Relative FWHM errors and (e1, e2) errors of the PSF model at the reserved PSF stars.

    ``true_psf_image(x, y, shape)`` returns the true PSF (with the pixel) drawn centred on a
    stamp of ``shape``; model and truth are both measured with GalSim adaptive moments.
    """
    rows = psf_sources[np.asarray(psf_sources["reserved"], bool)]
    dsize, de = [], []
    for x, y in zip(rows["x_centroid"], rows["y_centroid"]):
        model = calexp.psf.kernel(float(x), float(y))
        truth = true_psf_image(float(x), float(y), model.shape)
        sm, e1m, e2m = kernel_moments(model)
        st, e1t, e2t = kernel_moments(truth)
        if not np.isfinite([sm, st]).all():
            continue
        dsize.append(sm / st - 1.0)
        de.append((e1m - e1t, e2m - e2t))
    return np.asarray(dsize), np.asarray(de).reshape(-1, 2)


def rms(values) -> float:
    values = np.asarray(values, float)
    return float(np.sqrt(np.mean(values**2))) if values.size else float("nan")


def check_goals(metrics: list[Metric]) -> list[Metric]:
    """The metrics that miss their goal."""
    return [m for m in metrics if not m.passed]


@dataclass
class ExposureFigures:
    """Raw figures of one (visit, ccd), combined over exposures by :func:`summarize`."""

    visit: int
    ccd: int
    astrometry_mas: np.ndarray
    astrometry_all_mas: np.ndarray
    astrometry_expected_mas: np.ndarray
    wcs_mas: np.ndarray
    photometry_mmag: np.ndarray
    zeropoint_error_mmag: float
    psf_size_errors: np.ndarray
    psf_e_errors: np.ndarray
    cr_recovered: int
    cr_total: int
    star_cores_flagged: int
    star_cores: int
    completeness_found: int
    completeness_total: int
    psf_flux_ratios: np.ndarray


def validate_exposure(calexp: Exposure, src: Table, psf_sources: Table, truth: Table, objects: Table,
                      cr_truth: np.ndarray, true_zeropoint: float, true_psf_image, config: ValidateConfig, *,
                      true_pixel_to_sky=None, true_mag=None, true_neff=None, pixel_scale: float = float("nan")
                      ) -> ExposureFigures:
    """Every figure of one processed CCD against the simulator's truth.

    ``true_psf_image(x, y, shape)`` draws the true PSF (with the pixel) centred on a stamp;
    ``true_pixel_to_sky(x, y)`` gives the true (ra, dec) [deg] of zero-based pixels;
    ``true_mag(ids)`` the true total magnitudes of truth ids; ``true_neff(x, y)`` the effective
    area of the true PSF [pixel]; ``pixel_scale`` [arcsec/pixel] converts the expected centroid
    scatter. Figures whose truth function is not given are empty.
    """
    ny, nx = calexp.shape
    psf_sigma = float(np.nan_to_num(kernel_moments(calexp.psf.kernel(nx / 2.0, ny / 2.0))[0], nan=2.0))
    # isolation in units of the seeing: 10 pixels is 2.5 FWHM at the demo's seeing, 1.1 FWHM at 1.5"
    config = replace(config, isolation_radius=max(config.isolation_radius, config.isolation_fwhm * 2.3548 * psf_sigma))
    dsize, de = psf_shape_errors(calexp, psf_sources, true_psf_image)
    cr_rec, cr_tot, cores_hit, cores = cosmic_ray_recovery(calexp, cr_truth, truth, psf_sigma, config)
    found, total = completeness(src, truth, calexp, config, true_neff)
    zp_err = (float(calexp.zeropoint) - true_zeropoint) * 1000.0 if calexp.zeropoint is not None else float("nan")
    wcs = (wcs_errors_mas(calexp, true_pixel_to_sky, config.wcs_grid) if true_pixel_to_sky is not None
           else np.array([]))
    phot = photometric_errors_mmag(src, truth, true_mag, config) if true_mag is not None else np.array([])
    return ExposureFigures(
        visit=int(calexp.metadata.get("VISIT", -1)), ccd=int(calexp.metadata.get("CCD", -1)),
        astrometry_mas=astrometric_errors_mas(src, truth, objects, config),
        astrometry_all_mas=astrometric_errors_mas(src, truth, objects, config, isolated_only=False),
        astrometry_expected_mas=expected_centroid_scatter_mas(src, truth, config, pixel_scale, psf_sigma),
        wcs_mas=wcs, photometry_mmag=phot,
        zeropoint_error_mmag=zp_err, psf_size_errors=dsize, psf_e_errors=de,
        cr_recovered=cr_rec, cr_total=cr_tot, star_cores_flagged=cores_hit, star_cores=cores,
        completeness_found=found, completeness_total=total,
        psf_flux_ratios=psf_flux_ratios(src, truth, config))


def _concat(arrays) -> np.ndarray:
    arrays = [np.asarray(a, float).ravel() for a in arrays]
    return np.concatenate(arrays) if arrays else np.array([])


def summarize(figures: list[ExposureFigures], config: ValidateConfig) -> list[Metric]:
    """The validation metrics over all exposures, each with its goal."""
    wcs = _concat(f.wcs_mas for f in figures)
    phot = np.array([np.median(f.photometry_mmag) if len(f.photometry_mmag) else np.nan for f in figures])
    n_phot = sum(len(f.photometry_mmag) for f in figures)
    dsize = _concat(f.psf_size_errors for f in figures)
    de = np.concatenate([f.psf_e_errors for f in figures]) if figures else np.zeros((0, 2))
    ratios = _concat(f.psf_flux_ratios for f in figures)
    cr_rec, cr_tot = sum(f.cr_recovered for f in figures), sum(f.cr_total for f in figures)
    found, total = sum(f.completeness_found for f in figures), sum(f.completeness_total for f in figures)
    cores_hit = sum(f.star_cores_flagged for f in figures)
    bias = -2.5 * np.log10(np.median(ratios)) * 1000.0 if ratios.size else float("nan")
    # a CCD without a single bright isolated star has no figure and is left out; none at all is a miss
    phot_max = float(np.nanmax(np.abs(phot))) if np.isfinite(phot).any() else float("nan")
    return [
        Metric("WCS error RMS vs the true pixel-to-sky mapping (grid over each CCD)", rms(wcs),
               config.astrometry_rms_goal, "mas", wcs.size),
        Metric("max per-CCD photometric calibration error (median psf_mag - true total mag, bright isolated stars)",
               phot_max, config.photometry_goal, "mmag", n_phot),
        Metric("PSF FWHM RMS error at reserved stars", rms(dsize) * 100.0, config.psf_fwhm_goal, "%", dsize.size),
        Metric("PSF e1 RMS error at reserved stars", rms(de[:, 0]), config.psf_e_goal, "", len(de)),
        Metric("PSF e2 RMS error at reserved stars", rms(de[:, 1]), config.psf_e_goal, "", len(de)),
        Metric("cosmic-ray pixel recovery", 100.0 * cr_rec / max(cr_tot, 1), config.cr_recovery_goal, "%", cr_tot,
               higher_is_better=True),
        Metric("true star cores taken for cosmic rays", float(cores_hit), 0.0, "stars",
               sum(f.star_cores for f in figures)),
        Metric(f"src completeness of isolated stars at S/N {config.completeness_snr:g}",
               100.0 * found / max(total, 1), config.completeness_goal, "%", total, higher_is_better=True),
        Metric("|median PSF-flux bias| of bright stars", abs(bias), config.psf_flux_bias_goal, "mmag", ratios.size),
    ]


def information(figures: list[ExposureFigures]) -> dict:
    """Figures without a goal: centroid scatter and its expectation, zeropoints vs truth, per-CCD values."""
    astro = _concat(f.astrometry_mas for f in figures)
    expected = _concat(f.astrometry_expected_mas for f in figures)
    all_stars = _concat(f.astrometry_all_mas for f in figures)
    return {
        "centroid_scatter_rms_mas": rms(astro),
        "centroid_scatter_expected_rms_mas": rms(expected),
        "centroid_scatter_n": int(astro.size),
        "astrometric_rms_all_bright_stars_mas": rms(all_stars),
        "wcs_error_max_mas": float(np.max(_concat(f.wcs_mas for f in figures))) if figures else float("nan"),
        "wcs_error_rms_mas_per_ccd": {f"{f.visit}-{f.ccd}": rms(f.wcs_mas) for f in figures},
        "photometric_error_mmag_per_ccd": {
            f"{f.visit}-{f.ccd}": float(np.median(f.photometry_mmag)) if len(f.photometry_mmag) else float("nan")
            for f in figures},
        "zeropoint_errors_mmag": {f"{f.visit}-{f.ccd}": float(f.zeropoint_error_mmag) for f in figures},
        "completeness_binomial_error_percent": binomial_error_percent(
            sum(f.completeness_found for f in figures), sum(f.completeness_total for f in figures)),
    }


def binomial_error_percent(found: int, total: int) -> float:
    """1-sigma binomial error of the fraction ``found / total`` [%] (Wilson score interval, half-width)."""
    if total <= 0:
        return float("nan")
    p, z = found / total, 1.0
    half = z * np.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / (1 + z**2 / total)
    return float(100.0 * half)


class ValidationFailed(RuntimeError):
    """A figure missed its goal and ``validation.strict`` is set; the message lists the misses."""


def finish(metrics: list[Metric], config: ValidateConfig, info: dict | None = None) -> dict:
    """The validation report (metrics with ``passed``, the misses, the information figures).

    A missed goal is marked in the report (``missed``) and does not stop a user's run; with
    ``config.strict`` (tests, CI) it raises.

    Raises
    ------
    ValidationFailed
        ``config.strict`` and at least one metric missed its goal.
    """
    failed = check_goals(metrics)
    report = {"metrics": [dict(name=m.name, value=float(m.value), goal=float(m.goal), unit=m.unit, n=int(m.n),
                               passed=bool(m.passed)) for m in metrics],
              "missed": [m.line() for m in failed], "strict": bool(config.strict)}
    report.update(info or {})
    if failed and config.strict:
        raise ValidationFailed("validation: goal(s) missed: " + "; ".join(m.line() for m in failed))
    return report
