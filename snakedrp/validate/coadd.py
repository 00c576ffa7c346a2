"""Coadd figures against the simulator's truth (the issue's "must show" list).

Each figure is a function of in-memory data (a coadd calexp, its PSF, truth tables) returning a
:class:`~snakedrp.validate.single_frame.Metric`:

- satellite trail gone: mean coadd flux on the trail's pixels (away from objects) vs. the same
  statistic on parallel control strips; pass within 3 sigma of the strips' scatter;
- no star brighter than ``clipped_mag_max`` with a CLIPPED pixel within 2 FWHM of its centre;
- coadd noise in empty pixels vs. the variance plane's prediction (before detect_coadd's rescaling);
- coadd PSF model FWHM vs. the FWHM of bright isolated stars;
- star positions vs. truth (RMS of the offsets, mas);
- bright-star fluxes vs. truth (aperture flux corrected to total with the PSF model's curve of growth);
- 5-sigma point-source depth (PSF fluxes at random empty positions) vs. the depth predicted from
  the inputs' depths (``1 / sigma^2 = sum 1 / sigma_i^2``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep
from astropy.table import Table

from snakedrp.pexconfig import Config, option
from snakedrp.repo.exposure import Exposure, mask_bit, mask_bits
from snakedrp.stamps import kernel_moments

FWHM_PER_SIGMA = 2.3548


def _metric(*args):
    # imported here: single_frame's ValidateConfig holds CoaddValidateConfig (no import circle)
    from snakedrp.validate.single_frame import Metric

    return Metric(*args)


@dataclass
class CoaddValidateConfig(Config):
    """Accuracy goals of the coadds, checked against the simulator's truth."""

    trail_nsigma_goal: float = option(3.0, "Goal: |mean coadd flux on the trail - control strips| in units of the strips' scatter", min=0.0)
    clipped_mag_max: float = option(20.0, "Stars brighter than this [AB mag] must have no CLIPPED pixel within 2 FWHM", min=10.0)
    noise_goal: float = option(5.0, "Goal: |measured empty-pixel noise / variance-plane prediction - 1| [%]", min=0.0)
    psf_fwhm_goal: float = option(1.0, "Goal: |median model / star FWHM - 1| on bright isolated stars [%]", min=0.0)
    astrometry_rms_goal: float = option(10.0, "Goal: RMS of bright-star coadd positions vs truth [mas]", min=0.0)
    flux_bias_goal: float = option(5.0, "Goal: |median bright-star coadd magnitude - truth| [mmag]", min=0.0)
    depth_goal: float = option(0.2, "Goal: |measured - predicted 5-sigma point-source depth| [mag]", min=0.0)
    star_mag_range: list[float] = option([17.5, 21.0], "Magnitudes of the bright stars used [AB mag]")
    isolation_fwhm: float = option(6.0, "A star is isolated without a brighter-than-+3-mag object within this many FWHM", min=1.0)
    aperture_fwhm: float = option(3.0, "Aperture radius for the stars' fluxes [FWHM]", min=1.0)
    n_depth_positions: int = option(3000, "Random empty positions for the depth measurement", min=100)
    seed: int = option(1, "Seed of the random positions", min=0)


def _bright_isolated_stars(objects: Table, band: str, wcs, shape, fwhm: float, config: CoaddValidateConfig):
    mag = np.asarray(objects[f"mag_{band}"], float)
    x, y = wcs.all_world2pix(np.asarray(objects["ra"], float), np.asarray(objects["dec"], float), 0)
    ny, nx = shape
    margin = 4 * fwhm + 5
    inside = (x > margin) & (x < nx - 1 - margin) & (y > margin) & (y < ny - 1 - margin)
    star = np.asarray(objects["type"]).astype(str) == "star"
    lo, hi = config.star_mag_range
    pick = np.flatnonzero(star & inside & (mag > lo) & (mag < hi))
    near = np.arange(len(mag))
    keep = []
    radius = config.isolation_fwhm * fwhm
    for k in pick:
        d = np.hypot(x[near] - x[k], y[near] - y[k])
        other = (d < radius) & (near != k) & (mag[near] < mag[k] + 3.0)
        if not other.any():
            keep.append(k)
    keep = np.array(keep, int)
    return keep, x, y, mag


def _usable(calexp: Exposure, x, y, half: int, planes=("NO_DATA", "SAT", "BAD", "CLIPPED", "EDGE")) -> np.ndarray:
    bits = mask_bits(*planes)
    ok = []
    for xc, yc in zip(x, y):
        ix, iy = int(round(xc)), int(round(yc))
        box = calexp.mask[iy - half:iy + half + 1, ix - half:ix + half + 1]
        ok.append(box.size and not (box & bits).any())
    return np.array(ok, bool)


def trail_figure(calexp: Exposure, trail: np.ndarray, objects_mask: np.ndarray, n_image: np.ndarray,
                 config: CoaddValidateConfig, offsets=(-90, -70, -50, -30, 30, 50, 70, 90)):
    """Mean coadd flux on the trail's pixels against control strips (the trail mask shifted by ``offsets`` rows).

    The zero is the mean of the control strips (the local sky level of pixels away from objects,
    which background subtraction in a crowded field leaves slightly negative); the sigma is that
    of the difference: the trail mean's noise (from the variance plane, times the pixel
    correlation factor measured on the strips: their scatter over its variance-plane
    prediction, at least 1) and the strips' mean's. Only pixels that at least two warps cover
    enter (``n_image`` plus the clipped warp): where the trail's visit is the only one, no
    rejection can tell the trail from the sky.

    Returns
    -------
    Metric
        ``|trail - strips| / sigma``.
    """
    n_data = n_image + ((calexp.mask & mask_bit("CLIPPED")) != 0)
    usable = (np.isfinite(calexp.image) & np.isfinite(calexp.variance)
              & ((calexp.mask & mask_bit("NO_DATA")) == 0) & ~objects_mask & (n_data >= 2))

    def mean_on(m):
        m = m & usable
        if m.sum() <= 50:
            return np.nan, np.nan
        return float(np.mean(calexp.image[m])), float(np.sqrt(np.sum(calexp.variance[m])) / m.sum())

    on, on_err = mean_on(trail)
    control = []
    for dy in offsets:
        shifted = np.zeros_like(trail)
        if dy > 0:
            shifted[dy:] = trail[:-dy]
        else:
            shifted[:dy] = trail[-dy:]
        control.append(mean_on(shifted & ~trail))
    control = np.array([c for c in control if np.isfinite(c[0])]).reshape(-1, 2)
    n_pix = int((trail & usable).sum())
    if len(control) < 3 or not np.isfinite(on):
        return _metric("satellite trail residual", np.nan, config.trail_nsigma_goal, "sigma", n_pix)
    scatter = float(np.std(control[:, 0], ddof=1))
    correlation = max(1.0, scatter / float(np.sqrt(np.mean(control[:, 1] ** 2))))
    sigma = np.hypot(correlation * on_err, scatter / np.sqrt(len(control)))
    value = abs(on - float(np.mean(control[:, 0]))) / sigma
    return _metric("satellite trail residual", value, config.trail_nsigma_goal, "sigma", n_pix)


def clipped_stars_figure(calexp: Exposure, objects: Table, band: str, fwhm: float, config: CoaddValidateConfig):
    """Number of stars brighter than ``clipped_mag_max`` with a CLIPPED coadd pixel within 2 FWHM."""
    mag = np.asarray(objects[f"mag_{band}"], float)
    star = (np.asarray(objects["type"]).astype(str) == "star") & (mag < config.clipped_mag_max)
    x, y = calexp.wcs.all_world2pix(np.asarray(objects["ra"], float)[star], np.asarray(objects["dec"], float)[star], 0)
    ny, nx = calexp.shape
    clipped = (calexp.mask & mask_bit("CLIPPED")) != 0
    r = 2 * fwhm
    n_bad, n = 0, 0
    yy, xx = np.mgrid[-int(r) - 1:int(r) + 2, -int(r) - 1:int(r) + 2]
    disk = np.hypot(xx, yy) <= r
    for xc, yc in zip(x, y):
        ix, iy = int(round(xc)), int(round(yc))
        if not (0 <= ix < nx and 0 <= iy < ny):
            continue
        n += 1
        ys, xs = iy + yy[disk], ix + xx[disk]
        ok = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
        n_bad += bool(clipped[ys[ok], xs[ok]].any())
    return _metric(f"stars < {config.clipped_mag_max:g} mag with CLIPPED pixels", n_bad, 0, "", n)


def noise_figure(calexp: Exposure, config: CoaddValidateConfig):
    """Robust noise of empty pixels over the variance plane's prediction, before detect_coadd's rescaling [%]."""
    scale = float(calexp.metadata.get("VARSCALE", 1.0))
    var = calexp.variance / scale
    use = (calexp.mask == 0) & np.isfinite(calexp.image) & np.isfinite(var) & (var > 0)
    z = calexp.image[use] / np.sqrt(var[use])
    robust = 1.4826 * np.median(np.abs(z - np.median(z)))
    return _metric("coadd noise / variance prediction - 1", 100 * abs(robust - 1), config.noise_goal, "%", int(use.sum()))


def star_measurements(calexp: Exposure, objects: Table, band: str, config: CoaddValidateConfig,
                      region: np.ndarray | None = None) -> dict:
    """Bright isolated stars on the coadd against the PSF model and truth.

    Parameters
    ----------
    region : ndarray of bool, shape (ny, nx), optional
        Only stars whose true position falls in these pixels (e.g. the patch's inner box, so
        that stars of patch borders count once).

    Returns
    -------
    dict of ndarray
        ``fwhm_ratio`` (model / star second-moment size), ``dra``, ``ddec`` [mas] (measured -
        true), ``dmag`` [mag] (aperture magnitude corrected to total with the model - truth).
    """
    ny, nx = calexp.shape
    psf = calexp.psf
    fwhm = float(psf.fwhm((nx - 1) / 2, (ny - 1) / 2))
    keep, x, y, mag = _bright_isolated_stars(objects, band, calexp.wcs, calexp.shape, fwhm, config)
    if region is not None:
        keep = keep[region[np.round(y[keep]).astype(int), np.round(x[keep]).astype(int)]]
    keep = keep[_usable(calexp, x[keep], y[keep], int(np.ceil(config.aperture_fwhm * fwhm)) + 1)]
    image = np.ascontiguousarray(np.nan_to_num(calexp.image), dtype=np.float32)
    var = np.ascontiguousarray(np.nan_to_num(calexp.variance, nan=0.0), dtype=np.float32)
    sigma = fwhm / FWHM_PER_SIGMA
    empty = dict(fwhm_ratio=np.zeros(0), dra=np.zeros(0), ddec=np.zeros(0), dmag=np.zeros(0))
    if len(keep) == 0:
        return empty
    xw, yw, flag = sep.winpos(image, x[keep], y[keep], sigma)
    ok = (flag == 0) & (np.hypot(xw - x[keep], yw - y[keep]) < 1.0)
    keep, xw, yw = keep[ok], xw[ok], yw[ok]
    if len(keep) == 0:
        return empty
    ra, dec = calexp.wcs.all_pix2world(xw, yw, 0)
    dra = ((ra - np.asarray(objects["ra"], float)[keep] + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(dec)) * 3.6e6
    ddec = (dec - np.asarray(objects["dec"], float)[keep]) * 3.6e6

    ratios, corrections = [], []
    r = config.aperture_fwhm * fwhm
    for xc, yc in zip(xw, yw):
        stamp, x0, y0 = psf.draw(xc, yc)
        n = stamp.shape[0]
        data = image[y0:y0 + n, x0:x0 + n]
        s_data, s_model = kernel_moments(data)[0], kernel_moments(stamp)[0]
        ratios.append(s_model / s_data)
        # fraction of the model inside the aperture, pixel centres (as the data's sum below)
        inside, _, _ = sep.sum_circle(np.ascontiguousarray(stamp, np.float32), [xc - x0], [yc - y0], r, subpix=0)
        corrections.append(float(inside[0]) / float(stamp.sum()))
    flux, _, _ = sep.sum_circle(image, xw, yw, r, var=var, subpix=0)
    total = flux / np.array(corrections)
    true_flux = 10 ** (-0.4 * (mag[keep] - float(calexp.zeropoint)))
    with np.errstate(invalid="ignore", divide="ignore"):
        dmag = -2.5 * np.log10(total / true_flux)
    return dict(fwhm_ratio=np.array(ratios), dra=dra, ddec=ddec, dmag=dmag)


def star_metrics(stars: dict, config: CoaddValidateConfig, label: str = "") -> list:
    """PSF FWHM, position and flux figures (Metrics) of :func:`star_measurements` output (possibly pooled)."""
    ratios, dmag = stars["fwhm_ratio"], stars["dmag"]
    good_r, good_m = np.isfinite(ratios), np.isfinite(dmag)
    n = len(stars["dra"])
    fwhm = 100 * abs(np.median(ratios[good_r]) - 1) if good_r.any() else np.nan
    astrometry = float(np.sqrt(np.mean(stars["dra"] ** 2 + stars["ddec"] ** 2))) if n else np.nan
    flux = 1000 * abs(np.median(dmag[good_m])) if good_m.any() else np.nan
    return [_metric(f"{label}coadd PSF model FWHM / star FWHM - 1", fwhm, config.psf_fwhm_goal, "%", int(good_r.sum())),
            _metric(f"{label}coadd star positions vs truth RMS", astrometry, config.astrometry_rms_goal, "mas", n),
            _metric(f"{label}bright-star coadd magnitude - truth", flux, config.flux_bias_goal, "mmag", int(good_m.sum()))]


def star_figures(calexp: Exposure, objects: Table, band: str, config: CoaddValidateConfig) -> list:
    """PSF FWHM, positions and fluxes of bright isolated stars on the coadd vs model and truth."""
    return star_metrics(star_measurements(calexp, objects, band, config), config)


def measured_depth(calexp: Exposure, config: CoaddValidateConfig, where: np.ndarray | None = None) -> float:
    """5-sigma point-source depth [AB mag] from PSF fluxes at random empty positions of the coadd.

    ``where`` (bool, shape (ny, nx)), if given, limits the positions' centres to those pixels
    (e.g. where every input covers the coadd, for a comparison with the inputs' depths).
    """
    ny, nx = calexp.shape
    psf = calexp.psf
    k = psf.kernel((nx - 1) / 2, (ny - 1) / 2)
    n = k.shape[0]
    h = n // 2
    rng = np.random.default_rng(config.seed)
    xs = rng.integers(h, nx - h, 4 * config.n_depth_positions)
    ys = rng.integers(h, ny - h, 4 * config.n_depth_positions)
    bad = mask_bits("DETECTED", "NO_DATA", "BAD", "SAT", "CLIPPED", "EDGE")
    fluxes = []
    for xc, yc in zip(xs, ys):
        box = np.s_[yc - h:yc + h + 1, xc - h:xc + h + 1]
        if (where is not None and not where[yc, xc]) or (calexp.mask[box] & bad).any():
            continue
        fluxes.append(float((k * calexp.image[box]).sum() / (k**2).sum()))
        if len(fluxes) >= config.n_depth_positions:
            break
    fluxes = np.array(fluxes)
    sigma = 1.4826 * np.median(np.abs(fluxes - np.median(fluxes)))
    return float(calexp.zeropoint) - 2.5 * np.log10(5 * sigma)


def depth_figure(calexp: Exposure, input_depths: np.ndarray, config: CoaddValidateConfig,
                 where: np.ndarray | None = None):
    """Measured coadd depth vs the prediction ``1 / sigma^2 = sum_i 1 / sigma_i^2`` from the inputs' 5-sigma depths."""
    depths = np.asarray(input_depths, float)
    predicted = 1.25 * np.log10(np.sum(10 ** (0.8 * depths)))
    measured = measured_depth(calexp, config, where)
    metric = _metric("coadd 5-sigma depth - prediction", abs(measured - predicted), config.depth_goal, "mag", len(depths))
    return metric, measured, predicted


def input_depth(sky_e: float, read_noise_e: float, psf_image: np.ndarray, calexp_zp: float) -> float:
    """5-sigma PSF depth of one input [AB mag]: sky-limited ``sigma^2 = (sky + rn^2) / sum(psf^2)`` at the calexp zeropoint."""
    k = np.asarray(psf_image, float)
    k = k / k.sum()
    sigma = np.sqrt((sky_e + read_noise_e**2) / np.sum(k**2))
    return float(calexp_zp) - 2.5 * np.log10(5 * sigma)


def trail_pixels(visit_row, camera, wcs, shape, width_sigma: float = 1.5) -> np.ndarray:
    """Coadd pixels within ``width_sigma`` trail sigmas of the simulated satellite trail of a visit.

    The trail is drawn per CCD by :func:`snakedrp.simulate.render.satellite_trail` (a line on
    the focal plane); its CCD pixels go to the sky through the true mapping of the visit.
    """
    from snakedrp.simulate.render import satellite_trail

    ny, nx = shape
    out = np.zeros(shape, bool)
    for ccd in camera.ccd_ids:
        light = satellite_trail(visit_row, camera, ccd)
        if light is None:
            continue
        yy, xx = np.nonzero(light > float(visit_row["sat_peak"]) * np.exp(-0.5 * width_sigma**2))
        ra, dec = camera.pixel_to_sky(ccd, xx, yy, float(visit_row["ra"]), float(visit_row["dec"]),
                                      float(visit_row["rotation"]))
        x, y = wcs.all_world2pix(ra, dec, 0)
        ix, iy = np.round(x).astype(int), np.round(y).astype(int)
        ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        out[iy[ok], ix[ok]] = True
    return out


def objects_mask(objects: Table, band: str, wcs, shape, fwhm: float, mag_max: float = 25.0) -> np.ndarray:
    """Pixels near true objects: within (2 + 2 max(0, 22 - mag)) FWHM of each object brighter than ``mag_max``."""
    ny, nx = shape
    out = np.zeros(shape, bool)
    x, y = wcs.all_world2pix(np.asarray(objects["ra"], float), np.asarray(objects["dec"], float), 0)
    mag = np.asarray(objects[f"mag_{band}"], float)
    for xc, yc, m in zip(x, y, mag):
        if not m < mag_max:
            continue
        r = fwhm * (2 + 2 * max(0.0, 22 - m))
        ix, iy, big = int(round(xc)), int(round(yc)), int(r) + 1
        y0, y1, x0, x1 = max(0, iy - big), min(ny, iy + big + 1), max(0, ix - big), min(nx, ix + big + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] |= np.hypot(xx - xc, yy - yc) < r
    return out
