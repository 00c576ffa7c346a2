"""Coadd figures against the simulator's truth (the issue's "must show" list).

Each figure is a function of in-memory data (a coadd calexp, its PSF, truth tables) returning a
:class:`~snakedrp.validate.figures.Metric`:

- satellite trail gone: mean coadd flux on the trail's pixels (away from objects) vs. the same
  statistic on parallel control strips; pass within 3 sigma of the strips' scatter;
- no star brighter than ``clipped_mag_max`` with a CLIPPED pixel within 2 FWHM (of the coadd PSF
  at the star) of its centre, CLIPPED pixels on the simulated satellite trails not counted (the
  trail rightly rejected under a star is no damage to it);
- coadd noise in empty pixels vs. the variance plane's prediction (before detect_coadd's rescaling);
- coadd PSF model FWHM vs. the FWHM of bright isolated stars;
- star positions vs. truth (RMS of the offsets, mas);
- bright-star fluxes vs. truth: total fluxes measured on the coadd as the single frame calibrates
  them (calibration-aperture flux without the neighbours' footprints, plus the light beyond it
  from the covering inputs' curves of growth, with a local sky level fitted to the star's
  annuli), not from the PSF model, whose kernels are normalised within a finite box and so lack
  the wings;
- 5-sigma point-source depth (PSF-weighted fluxes at random empty positions, scaled to total flux
  with the bright stars of the same PSF mix) vs. the depth predicted from the inputs' depths, the
  coadd's weights and the inputs' PSFs on the coadd grid.

A patch holds regions covered by different sets of visits, and the coadd PSF differs between
them (a factor 2.6 in FWHM with 0.5" and 1.3" visits), so each star is measured with the PSF
mix that covers it (:class:`PsfMixes`): centroid window, aperture, curve of growth (the covering
inputs'), margins and radii. Stars with an INEXACT_PSF pixel near them (the model is
not the image's PSF there) or whose aperture crosses a change of the covering visits are left
out of the star figures.
"""
from __future__ import annotations

import numpy as np
import sep
from astropy.table import Table
from scipy import ndimage

from snakedrp.coadd.total_flux import PsfMixes, clean_aperture_flux, neighbour_segmentation, total_fluxes
from snakedrp.meas.detect import grow_mask
from snakedrp.validate.config import CoaddValidateConfig
from snakedrp.repo.exposure import Exposure, mask_bit, mask_bits
from snakedrp.stamps import kernel_moments
from snakedrp.validate.figures import Metric

FWHM_PER_SIGMA = 2.3548


def _bright_isolated_stars(objects: Table, band: str, wcs, shape, mixes: PsfMixes, config: CoaddValidateConfig):
    """True bright stars away from the edges and from brighter-than-+3-mag objects, with their PSF mix.

    The edge margin (4 local FWHM + 5 pixels, and the aperture plus 2 pixels) and the isolation
    radius (``isolation_fwhm`` local FWHM) follow the coadd PSF at each star, not at the patch
    centre: a patch's PSF changes by a factor of a few between regions of one visit and of two.

    Returns
    -------
    keep : ndarray of int
        Rows of ``objects``.
    x, y, mag : ndarray
        True positions [pixel, zero-based] and magnitudes of all objects.
    mix : list of PsfMix
        Per kept star.
    """
    mag = np.asarray(objects[f"mag_{band}"], float)
    x, y = wcs.all_world2pix(np.asarray(objects["ra"], float), np.asarray(objects["dec"], float), 0)
    ny, nx = shape
    star = np.asarray(objects["type"]).astype(str) == "star"
    lo, hi = config.star_mag_range
    inside = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
    pick = np.flatnonzero(star & inside & (mag > lo) & (mag < hi))
    near = np.arange(len(mag))
    keep, mix = [], []
    for k in pick:
        m = mixes.at(x[k], y[k])
        margin = max(4 * m.fwhm + 5, config.aperture_fwhm * m.widest_fwhm + 2)
        if not (margin < x[k] < nx - 1 - margin and margin < y[k] < ny - 1 - margin):
            continue
        d = np.hypot(x - x[k], y - y[k])
        other = (d < config.isolation_fwhm * m.fwhm) & (near != k) & (mag < mag[k] + 3.0)
        if not other.any():
            keep.append(k)
            mix.append(m)
    return np.array(keep, int), x, y, mag, mix


def _usable(calexp: Exposure, x, y, half, planes=("NO_DATA", "SAT", "BAD", "CLIPPED", "EDGE")) -> np.ndarray:
    """Whether the box of ``half`` pixels (one per star, or one for all) around each position has none of ``planes``."""
    bits = mask_bits(*planes)
    half = np.broadcast_to(np.asarray(half, int), np.shape(x))
    ok = []
    for xc, yc, h in zip(x, y, half):
        ix, iy = int(round(xc)), int(round(yc))
        box = calexp.mask[max(iy - h, 0):iy + h + 1, max(ix - h, 0):ix + h + 1]
        ok.append(box.size > 0 and not (box & bits).any())
    return np.array(ok, bool)


def _any_in_disc(plane: np.ndarray, x, y, radius) -> np.ndarray:
    """Whether any True pixel of ``plane`` (bool, shape (ny, nx)) lies within ``radius`` (per position) of each position."""
    ny, nx = plane.shape
    radius = np.broadcast_to(np.asarray(radius, float), np.shape(x))
    out = []
    for xc, yc, r in zip(x, y, radius):
        ix, iy, big = int(round(xc)), int(round(yc)), int(r) + 1
        y0, y1, x0, x1 = max(0, iy - big), min(ny, iy + big + 1), max(0, ix - big), min(nx, ix + big + 1)
        if y0 >= y1 or x0 >= x1:
            out.append(False)
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out.append(bool(plane[y0:y1, x0:x1][np.hypot(xx - ix, yy - iy) <= r].any()))
    return np.array(out, bool)


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
    Metric or None
        ``|trail - strips| / sigma``; None where the patch holds too few usable trail pixels
        (> 50) or control strips (3) to measure it (the trail only grazes the patch).
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
        return None
    scatter = float(np.std(control[:, 0], ddof=1))
    correlation = max(1.0, scatter / float(np.sqrt(np.mean(control[:, 1] ** 2))))
    sigma = np.hypot(correlation * on_err, scatter / np.sqrt(len(control)))
    value = abs(on - float(np.mean(control[:, 0]))) / sigma
    return Metric("satellite trail residual", value, config.trail_nsigma_goal, "sigma", n_pix)


def clipped_stars_figure(calexp: Exposure, objects: Table, band: str, config: CoaddValidateConfig,
                         trail: np.ndarray | None = None, mixes: PsfMixes | None = None):
    """Number of stars brighter than ``clipped_mag_max`` with a CLIPPED coadd pixel within 2 local FWHM.

    A clipped pixel near a star means artifact rejection took a warp's star light for an outlier
    (the star damaged). The radius is 2 FWHM of the coadd PSF at the star (:class:`PsfMixes`).
    CLIPPED pixels on ``trail`` (bool, shape (ny, nx): the simulated satellite trails of the
    inputs) are not counted, nor the clipped regions that come within ``trail_clip_margin``
    pixels of it: the trail's footprint reaches as far as its light stands out of the noise, and
    is grown (``assemble.clip_grow``); where a star's protection holes it, its pieces lie apart
    (at 1.5" seeing, 2-4 pixels off a 1.5-sigma strip, 15-23 pixels from three stars). There
    the trail visit's pixel was rightly rejected, under a star or not.
    """
    mixes = mixes or PsfMixes(calexp.psf)
    mag = np.asarray(objects[f"mag_{band}"], float)
    star = (np.asarray(objects["type"]).astype(str) == "star") & (mag < config.clipped_mag_max)
    x, y = calexp.wcs.all_world2pix(np.asarray(objects["ra"], float)[star], np.asarray(objects["dec"], float)[star], 0)
    ny, nx = calexp.shape
    clipped = (calexp.mask & mask_bit("CLIPPED")) != 0
    if trail is not None and clipped.any():
        labels, _ = ndimage.label(clipped, structure=np.ones((3, 3), bool))
        on_trail = np.unique(labels[clipped & grow_mask(trail, config.trail_clip_margin)])
        clipped &= ~np.isin(labels, on_trail[on_trail > 0])
    inside = np.isfinite(x) & np.isfinite(y) & (np.round(x) >= 0) & (np.round(x) < nx) & (np.round(y) >= 0) & (np.round(y) < ny)
    x, y = x[inside], y[inside]
    radius = np.array([2 * mixes.at(xc, yc).fwhm for xc, yc in zip(x, y)])
    n_bad = int(_any_in_disc(clipped, x, y, radius).sum())
    return Metric(f"stars < {config.clipped_mag_max:g} mag with CLIPPED pixels", n_bad, 0, "", len(x))


def noise_figure(calexp: Exposure, config: CoaddValidateConfig):
    """Robust noise of empty pixels over the variance plane's prediction, before detect_coadd's rescaling [%]."""
    scale = float(calexp.metadata.get("VARSCALE", 1.0))
    var = calexp.variance / scale
    use = (calexp.mask == 0) & np.isfinite(calexp.image) & np.isfinite(var) & (var > 0)
    z = calexp.image[use] / np.sqrt(var[use])
    robust = 1.4826 * np.median(np.abs(z - np.median(z)))
    return Metric("coadd noise / variance prediction - 1", 100 * abs(robust - 1), config.noise_goal, "%", int(use.sum()))


STAR_KEYS = ("fwhm_ratio", "dra", "ddec", "dmag", "x", "y", "total", "fwhm", "radius")


def _empty_stars() -> dict:
    out = {key: np.zeros(0) for key in STAR_KEYS}
    out.update(mix=np.zeros(0, dtype="U64"), inexact_psf=np.zeros(0, bool), mix_boundary=np.zeros(0, bool),
               in_region=np.zeros(0, bool))
    return out


def star_measurements(calexp: Exposure, objects: Table, band: str, config: CoaddValidateConfig,
                      region: np.ndarray | None = None, mixes: PsfMixes | None = None) -> dict:
    """Bright isolated stars on the coadd against the PSF model and truth, each with the PSF mix covering it.

    A patch holds regions covered by one visit and by several, and the coadd PSF differs between
    them (2.6x in FWHM with 0.5" and 1.3" visits), so every scale of a star's measurement comes
    from the coadd PSF at the star (:class:`PsfMixes`), not from the patch centre:

    - the centroid (``sep.winpos``) weights with a Gaussian of the local coadd FWHM;
    - the total flux is measured as the single frame calibrates it (the warps' zeropoint is the
      calexps' total-flux zeropoint): the flux within ``aperture_fwhm`` x the FWHM of the widest
      covering input at the star (so that the aperture holds the same fraction of each input's
      light, as each input's own calibration aperture does), the neighbours' footprints left
      out, and the light beyond it from the covering inputs' curves of growth, with a local sky
      level, fitted to the star's annuli (:func:`total_fluxes`). No truth enters the flux, and
      of the PSF model only the inputs' widths and weights: its kernels are normalised within a
      box of a few FWHM and lack the wings;
    - the edge margins and the isolation radius are in local FWHM.

    Two kinds of star are measured but flagged, and :func:`star_metrics` leaves them out (nor
    do they enter the depth figure's flux scale): ``inexact_psf``, an INEXACT_PSF coadd pixel within
    2 local FWHM (a warp with data was left out there, so the model is not the image's PSF);
    ``mix_boundary``, the set of covering visits changes within the aperture (the star's image
    is part one coadd PSF and part another, which no model at its centre describes).

    Parameters
    ----------
    region : ndarray of bool, shape (ny, nx), optional
        The pixels whose stars (by true position) count in the figures (``in_region``): the
        patch's inner box, so that stars of patch borders count once. The stars outside are
        measured too and enter the depth figure's PSF-flux scale of this patch (a set of
        covering visits may hold few stars inside).
    mixes : PsfMixes, optional
        The coadd PSF's mixes (a cache shared with the other figures of the patch).

    Returns
    -------
    dict of ndarray, one entry per star
        ``fwhm_ratio`` (model / star second-moment size), ``dra``, ``ddec`` [mas] (measured -
        true), ``dmag`` [mag] (total magnitude - truth; NaN when an input covering the star had
        no curve of growth), ``x``, ``y`` [pixel], ``total`` (total flux [coadd units]), ``fwhm``
        (local coadd FWHM [pixel]), ``radius`` (aperture radius [pixel]), ``mix`` (covering
        visits, ``+``-joined), ``inexact_psf`` and ``mix_boundary`` (bool, see above) and
        ``in_region`` (bool; all True without ``region``).
    """
    ny, nx = calexp.shape
    psf = calexp.psf
    mixes = mixes or PsfMixes(psf)
    keep, x, y, mag, mix = _bright_isolated_stars(objects, band, calexp.wcs, calexp.shape, mixes, config)
    if len(keep) == 0:
        return _empty_stars()
    fwhm = np.array([m.fwhm for m in mix])
    radius = config.aperture_fwhm * np.array([m.widest_fwhm for m in mix])
    label = np.array([m.label for m in mix], dtype="U64")
    ok = _usable(calexp, x[keep], y[keep], np.ceil(radius).astype(int) + 1)
    keep, fwhm, radius, label = keep[ok], fwhm[ok], radius[ok], label[ok]
    if len(keep) == 0:
        return _empty_stars()
    image = np.ascontiguousarray(np.nan_to_num(calexp.image), dtype=np.float32)
    var = np.ascontiguousarray(np.nan_to_num(calexp.variance, nan=0.0), dtype=np.float32)
    xw, yw, flag = sep.winpos(image, x[keep], y[keep], fwhm / FWHM_PER_SIGMA)
    ok = (flag == 0) & (np.hypot(xw - x[keep], yw - y[keep]) < 1.0)
    keep, xw, yw, fwhm, radius, label = keep[ok], xw[ok], yw[ok], fwhm[ok], radius[ok], label[ok]
    if len(keep) == 0:
        return _empty_stars()
    ra, dec = calexp.wcs.all_pix2world(xw, yw, 0)
    dra = ((ra - np.asarray(objects["ra"], float)[keep] + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(dec)) * 3.6e6
    ddec = (dec - np.asarray(objects["dec"], float)[keep]) * 3.6e6

    inexact = _any_in_disc((calexp.mask & mask_bit("INEXACT_PSF")) != 0, xw, yw, 2 * fwhm)
    angles = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
    boundary = np.array([any(mixes.visits(xc + r * np.cos(a), yc + r * np.sin(a)) != mixes.visits(xc, yc)
                             for a in angles) for xc, yc, r in zip(xw, yw, radius)], bool)

    segmentation, bad = neighbour_segmentation(calexp, config.detect_nsigma)
    ids = segmentation[np.round(yw).astype(int), np.round(xw).astype(int)]
    flux, flux_err = clean_aperture_flux(image, var, bad, segmentation, ids, xw, yw, radius)
    total = flux.copy()
    if config.curve_of_growth.enabled:
        total = total_fluxes(image, var, bad, segmentation, ids, xw, yw, radius, flux, flux_err, psf,
                             config.curve_of_growth, config.calib_aperture_fwhm)

    ratios = []
    for xc, yc in zip(xw, yw):
        stamp, x0, y0 = psf.draw(xc, yc)
        n = stamp.shape[0]
        inside = x0 >= 0 and y0 >= 0 and x0 + n <= nx and y0 + n <= ny
        ratios.append(kernel_moments(stamp)[0] / kernel_moments(image[y0:y0 + n, x0:x0 + n])[0] if inside else np.nan)
    true_flux = 10 ** (-0.4 * (mag[keep] - float(calexp.zeropoint)))
    with np.errstate(invalid="ignore", divide="ignore"):
        dmag = -2.5 * np.log10(total / true_flux)
    in_region = (np.ones(len(keep), bool) if region is None
                 else region[np.round(y[keep]).astype(int), np.round(x[keep]).astype(int)])
    return dict(fwhm_ratio=np.array(ratios), dra=dra, ddec=ddec, dmag=dmag, x=xw, y=yw, total=total, fwhm=fwhm,
                radius=radius, mix=label, inexact_psf=inexact, mix_boundary=boundary, in_region=in_region)


def measured(stars: dict, in_region: bool = True) -> np.ndarray:
    """The stars of :func:`star_measurements` that enter the figures (bool): neither ``inexact_psf`` nor ``mix_boundary``, and (``in_region``) in the region."""
    n = len(stars["dra"])
    flagged = np.zeros(n, bool)
    for key in ("inexact_psf", "mix_boundary"):
        if key in stars:
            flagged |= np.asarray(stars[key], bool)
    if in_region and "in_region" in stars:
        flagged |= ~np.asarray(stars["in_region"], bool)
    return ~flagged


def star_metrics(stars: dict, config: CoaddValidateConfig, label: str = "") -> list:
    """PSF FWHM, position and flux figures (Metrics) of :func:`star_measurements` output (possibly pooled).

    The flagged stars and those outside the region (:func:`measured`) are left out.
    """
    use = measured(stars)
    ratios, dmag = np.asarray(stars["fwhm_ratio"])[use], np.asarray(stars["dmag"])[use]
    dra, ddec = np.asarray(stars["dra"])[use], np.asarray(stars["ddec"])[use]
    good_r, good_m = np.isfinite(ratios), np.isfinite(dmag)
    n = len(dra)
    fwhm = 100 * abs(np.median(ratios[good_r]) - 1) if good_r.any() else np.nan
    astrometry = float(np.sqrt(np.mean(dra ** 2 + ddec ** 2))) if n else np.nan
    flux = 1000 * abs(np.median(dmag[good_m])) if good_m.any() else np.nan
    return [Metric(f"{label}coadd PSF model FWHM / star FWHM - 1", fwhm, config.psf_fwhm_goal, "%", int(good_r.sum())),
            Metric(f"{label}coadd star positions vs truth RMS", astrometry, config.astrometry_rms_goal, "mas", n),
            Metric(f"{label}bright-star coadd magnitude - truth", flux, config.flux_bias_goal, "mmag", int(good_m.sum()))]


def star_figures(calexp: Exposure, objects: Table, band: str, config: CoaddValidateConfig) -> list:
    """PSF FWHM, positions and fluxes of bright isolated stars on the coadd vs model and truth."""
    return star_metrics(star_measurements(calexp, objects, band, config), config)


def measured_depth(calexp: Exposure, config: CoaddValidateConfig, where: np.ndarray | None = None,
                   psf_ratio: float = 1.0, at: tuple[float, float] | None = None) -> float:
    """5-sigma point-source depth [AB mag] from PSF-weighted fluxes at random empty positions of the coadd.

    ``where`` (bool, shape (ny, nx)), if given, limits the positions' centres to those pixels
    (e.g. where every input covers the coadd, for a comparison with the inputs' depths).
    ``psf_ratio`` is the same estimator's flux over the total flux of bright stars
    (:func:`star_measurements`): the kernel, normalised within its box and placed at whole
    pixels, recovers less than a star's total flux, so its noise is divided by it to be a
    total-flux noise, as the inputs' depths are. The kernel is the coadd PSF at ``at``
    (default the patch centre), which should lie in ``where``. A position is empty when no
    DETECTED pixel lies within ``depth_clear_fwhm`` FWHM of it and its kernel box has no unusable
    pixel; NaN with fewer than ``depth_min_positions`` such positions.
    """
    ny, nx = calexp.shape
    psf = calexp.psf
    centre = at if at is not None else ((nx - 1) / 2, (ny - 1) / 2)
    k = psf.kernel(*centre)
    n = k.shape[0]
    h = n // 2
    radius = config.depth_clear_fwhm * psf.fwhm(*centre)
    clear = min(h, int(np.ceil(radius)))
    yy, xx = np.mgrid[-clear:clear + 1, -clear:clear + 1]
    disc = np.hypot(xx, yy) <= radius
    rng = np.random.default_rng(config.seed)
    # enough tries for a crowded patch, where most positions have a detection near them
    xs = rng.integers(h, nx - h, 40 * config.n_depth_positions)
    ys = rng.integers(h, ny - h, 40 * config.n_depth_positions)
    unusable = mask_bits("NO_DATA", "BAD", "SAT", "CLIPPED", "EDGE")
    detected = mask_bit("DETECTED")
    fluxes = []
    for xc, yc in zip(xs, ys):
        if where is not None and not where[yc, xc]:
            continue
        near = calexp.mask[yc - clear:yc + clear + 1, xc - clear:xc + clear + 1]
        if ((near & detected) != 0)[disc].any():
            continue
        box = np.s_[yc - h:yc + h + 1, xc - h:xc + h + 1]
        if (calexp.mask[box] & unusable).any():
            continue
        fluxes.append(float((k * calexp.image[box]).sum() / (k**2).sum()))
        if len(fluxes) >= config.n_depth_positions:
            break
    if len(fluxes) < config.depth_min_positions:
        return float("nan")
    fluxes = np.array(fluxes)
    sigma = 1.4826 * np.median(np.abs(fluxes - np.median(fluxes))) / psf_ratio
    return float(calexp.zeropoint) - 2.5 * np.log10(5 * sigma)


def predicted_depth(calexp: Exposure, visit_depths: dict, x: float, y: float) -> float:
    """5-sigma depth [AB mag] of the coadd's PSF-weighted flux at ``(x, y)``, from its inputs' depths.

    The coadd is ``sum_i w_i I_i / sum_i w_i`` with one weight per warp and input PSFs ``P_i``
    (on the coadd grid, from the coadd PSF model); the estimator weights pixels by the coadd PSF
    ``P``. Input ``i``'s pixel variance is ``s_i^2 = sigma_i^2 sum P_i^2`` (``sigma_i`` its
    5-sigma depth / 5), and ``sigma^2 = sum_i w_i^2 s_i^2 sum P^2 / (sum_i w_i sum P P_i)^2``. With
    equal PSFs and ``w_i = 1 / s_i^2`` it is ``1 / sigma^2 = sum_i 1 / sigma_i^2``; the weights
    of different seeing make the coadd shallower than that optimum. Resampling correlates the
    noise but keeps it on the PSF's scale, so the inputs' white-noise variances apply.
    """
    psf = calexp.psf
    items = [i for i in psf.covering(x, y) if int(i.visit) in visit_depths]
    if not items or not hasattr(psf, "input_kernel"):
        depths = np.array(list(visit_depths.values()), float)
        return float(1.25 * np.log10(np.sum(10 ** (0.8 * depths))))
    zp = float(calexp.zeropoint)
    kernels = [np.asarray(psf.input_kernel(i, x, y), float) for i in items]
    kernels = [k / k.sum() for k in kernels]
    coadd_kernel = sum(i.weight * k for i, k in zip(items, kernels))
    coadd_kernel = coadd_kernel / coadd_kernel.sum()
    sigma_i = np.array([10 ** (-0.4 * (visit_depths[int(i.visit)] - zp)) / 5 for i in items])
    w = np.array([i.weight for i in items], float)
    pixel_var = sigma_i**2 * np.array([np.sum(k**2) for k in kernels])
    signal = np.sum(w * np.array([np.sum(coadd_kernel * k) for k in kernels]))
    sigma = np.sqrt(np.sum(w**2 * pixel_var) * np.sum(coadd_kernel**2)) / signal
    return zp - 2.5 * np.log10(5 * sigma)


def psf_flux_ratio(calexp: Exposure, kernel: np.ndarray, x, y, total) -> float:
    """Median of the PSF-kernel-weighted flux (as :func:`measured_depth`, ``kernel`` at whole pixels) over the total flux of stars."""
    h = kernel.shape[0] // 2
    image = np.nan_to_num(calexp.image)
    ratios = []
    for xc, yc, f in zip(x, y, total):
        ix, iy = int(round(xc)), int(round(yc))
        box = image[max(iy - h, 0):iy + h + 1, max(ix - h, 0):ix + h + 1]
        if box.shape == kernel.shape and np.isfinite(f) and f > 0:
            ratios.append(float((kernel * box).sum() / (kernel**2).sum()) / f)
    return float(np.median(ratios)) if ratios else float("nan")


def depth_figure(calexp: Exposure, visit_depths: dict, stars: dict, config: CoaddValidateConfig,
                 where: np.ndarray | None = None, mixes: PsfMixes | None = None):
    """Measured coadd depth (:func:`measured_depth`) vs :func:`predicted_depth` from the inputs' depths.

    Both use the coadd PSF at the ``where`` pixel nearest the patch centre (where every input
    counts; the patch centre itself may lack one). The PSF-flux scale (:func:`psf_flux_ratio`)
    comes from the bright ``stars`` (:func:`star_measurements`, unflagged, in the patch's region
    or not) with the same set of covering visits as that position: the kernel's share of a star's total flux depends on the
    PSF, which differs between the patch's regions of one visit and of several.

    Returns
    -------
    metric, measured, predicted
        ``None, nan, nan`` without a star of that PSF mix to scale the PSF fluxes, or with too few
        empty positions (:func:`measured_depth`).
    """
    ny, nx = calexp.shape
    mixes = mixes or PsfMixes(calexp.psf)
    if where is not None and where.any():
        yy, xx = np.nonzero(where)
        k = int(np.argmin(np.hypot(xx - (nx - 1) / 2, yy - (ny - 1) / 2)))
        xc, yc = float(xx[k]), float(yy[k])
    else:
        xc, yc = (nx - 1) / 2, (ny - 1) / 2
    kernel = calexp.psf.kernel(xc, yc)
    same = measured(stars, in_region=False)
    if "mix" in stars:
        same &= np.asarray(stars["mix"]) == mixes.at(xc, yc).label
    x, y, total = (np.asarray(stars[key], float)[same] for key in ("x", "y", "total"))
    psf_ratio = psf_flux_ratio(calexp, kernel, x, y, total)
    if not np.isfinite(psf_ratio):
        return None, float("nan"), float("nan")
    predicted = predicted_depth(calexp, visit_depths, xc, yc)
    measured_mag = measured_depth(calexp, config, where, psf_ratio, at=(xc, yc))
    if not np.isfinite(measured_mag):
        return None, float("nan"), float("nan")
    metric = Metric("coadd 5-sigma depth - prediction", abs(measured_mag - predicted), config.depth_goal, "mag",
                     len(visit_depths))
    return metric, measured_mag, predicted


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
