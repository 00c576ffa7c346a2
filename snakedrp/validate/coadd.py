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
from snakedrp.validate.single_frame import Metric

FWHM_PER_SIGMA = 2.3548


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
                 config: CoaddValidateConfig, offsets=(-90, -70, -50, -30, 30, 50, 70, 90)) -> Metric:
    """Mean coadd flux on the trail's pixels vs control strips (the trail mask shifted by ``offsets`` rows).

    Only pixels that at least two warps cover enter (``n_image`` plus the clipped warp): where the
    trail's visit is the only one, no rejection can tell the trail from the sky.
    """
    n_data = n_image + ((calexp.mask & mask_bit("CLIPPED")) != 0)
    usable = np.isfinite(calexp.image) & ((calexp.mask & mask_bit("NO_DATA")) == 0) & ~objects_mask & (n_data >= 2)

    def mean_on(m):
        m = m & usable
        return float(np.mean(calexp.image[m])) if m.sum() > 50 else np.nan

    on = mean_on(trail)
    control = []
    for dy in offsets:
        shifted = np.zeros_like(trail)
        if dy > 0:
            shifted[dy:] = trail[:-dy]
        else:
            shifted[:dy] = trail[-dy:]
        control.append(mean_on(shifted & ~trail))
    control = np.array([c for c in control if np.isfinite(c)])
    scatter = float(np.std(control, ddof=1)) if len(control) > 2 else np.nan
    value = abs(on - float(np.mean(control))) / scatter if np.isfinite(scatter) and scatter > 0 else np.nan
    return Metric("satellite trail residual", value, config.trail_nsigma_goal, "sigma", int((trail & usable).sum()))


def clipped_stars_figure(calexp: Exposure, objects: Table, band: str, fwhm: float, config: CoaddValidateConfig) -> Metric:
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
    return Metric(f"stars < {config.clipped_mag_max:g} mag with CLIPPED pixels", n_bad, 0, "", n)


def noise_figure(calexp: Exposure, config: CoaddValidateConfig) -> Metric:
    """Robust noise of empty pixels over the variance plane's prediction, before detect_coadd's rescaling [%]."""
    scale = float(calexp.metadata.get("VARSCALE", 1.0))
    var = calexp.variance / scale
    use = (calexp.mask == 0) & np.isfinite(calexp.image) & np.isfinite(var) & (var > 0)
    z = calexp.image[use] / np.sqrt(var[use])
    robust = 1.4826 * np.median(np.abs(z - np.median(z)))
    return Metric("coadd noise / variance prediction - 1", 100 * abs(robust - 1), config.noise_goal, "%", int(use.sum()))


def star_figures(calexp: Exposure, objects: Table, band: str, config: CoaddValidateConfig) -> list[Metric]:
    """PSF FWHM, positions and fluxes of bright isolated stars on the coadd vs model and truth."""
    ny, nx = calexp.shape
    psf = calexp.psf
    fwhm = float(psf.fwhm((nx - 1) / 2, (ny - 1) / 2))
    keep, x, y, mag = _bright_isolated_stars(objects, band, calexp.wcs, calexp.shape, fwhm, config)
    keep = keep[_usable(calexp, x[keep], y[keep], int(np.ceil(config.aperture_fwhm * fwhm)) + 1)]
    image = np.ascontiguousarray(np.nan_to_num(calexp.image), dtype=np.float32)
    var = np.ascontiguousarray(np.nan_to_num(calexp.variance, nan=0.0), dtype=np.float32)
    sigma = fwhm / FWHM_PER_SIGMA
    xw, yw, flag = sep.winpos(image, x[keep], y[keep], sigma)
    ok = (flag == 0) & (np.hypot(xw - x[keep], yw - y[keep]) < 1.0)
    keep, xw, yw = keep[ok], xw[ok], yw[ok]
    ra, dec = calexp.wcs.all_pix2world(xw, yw, 0)
    dra = (ra - np.asarray(objects["ra"], float)[keep]) * np.cos(np.deg2rad(dec)) * 3.6e6
    ddec = (dec - np.asarray(objects["dec"], float)[keep]) * 3.6e6
    astrometry = Metric("coadd star positions vs truth RMS", float(np.sqrt(np.mean(dra**2 + ddec**2))),
                        config.astrometry_rms_goal, "mas", len(keep))

    ratios, corrections, half = [], [], None
    for xc, yc in zip(xw, yw):
        stamp, x0, y0 = psf.draw(xc, yc)
        n = stamp.shape[0]
        data = image[y0:y0 + n, x0:x0 + n]
        s_data, s_model = kernel_moments(data)[0], kernel_moments(stamp)[0]
        ratios.append(s_model / s_data)
        yy, xx = np.mgrid[y0:y0 + n, x0:x0 + n]
        r = config.aperture_fwhm * fwhm
        # fraction of the model inside the aperture, pixel centres (sep's exact overlap on the stamp)
        inside, _, _ = sep.sum_circle(np.ascontiguousarray(stamp, np.float32), [xc - x0], [yc - y0], r, subpix=0)
        corrections.append(float(inside[0]) / float(stamp.sum()))
    ratios = np.array(ratios)
    fwhm_metric = Metric("coadd PSF model FWHM / star FWHM - 1", 100 * abs(np.nanmedian(ratios) - 1),
                         config.psf_fwhm_goal, "%", int(np.isfinite(ratios).sum()))
    flux, flux_err, _ = sep.sum_circle(image, xw, yw, config.aperture_fwhm * fwhm, var=var, subpix=0)
    total = flux / np.array(corrections)
    true_flux = 10 ** (-0.4 * (mag[keep] - float(calexp.zeropoint)))
    dmag = -2.5 * np.log10(total / true_flux)
    good = np.isfinite(dmag)
    flux_metric = Metric("bright-star coadd magnitude - truth", 1000 * abs(np.median(dmag[good])),
                         config.flux_bias_goal, "mmag", int(good.sum()))
    return [fwhm_metric, astrometry, flux_metric]


def measured_depth(calexp: Exposure, config: CoaddValidateConfig) -> float:
    """5-sigma point-source depth [AB mag] from PSF fluxes at random empty positions of the coadd."""
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
        if (calexp.mask[box] & bad).any():
            continue
        fluxes.append(float((k * calexp.image[box]).sum() / (k**2).sum()))
        if len(fluxes) >= config.n_depth_positions:
            break
    fluxes = np.array(fluxes)
    sigma = 1.4826 * np.median(np.abs(fluxes - np.median(fluxes)))
    return float(calexp.zeropoint) - 2.5 * np.log10(5 * sigma)


def depth_figure(calexp: Exposure, input_depths: np.ndarray, config: CoaddValidateConfig) -> Metric:
    """Measured coadd depth vs the prediction ``1 / sigma^2 = sum_i 1 / sigma_i^2`` from the inputs' 5-sigma depths."""
    depths = np.asarray(input_depths, float)
    predicted = 1.25 * np.log10(np.sum(10 ** (0.8 * depths)))
    measured = measured_depth(calexp, config)
    metric = Metric("coadd 5-sigma depth - prediction", abs(measured - predicted), config.depth_goal, "mag", len(depths))
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
