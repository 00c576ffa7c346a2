"""PSF star selection on the size–flux stellar locus.

Stars are the tight clump of the smallest adaptive-moment sizes among bright sources; because
the PSF size and shape vary over the CCD, the locus is a low-order surface in (x, y), fitted
with clipping to the clump and applied with an S/N-dependent tolerance. Stars must then have
clean cores, a full kernel box on the CCD and no bright neighbour in it. A seeded fraction is
reserved for validation and not fitted.
"""
from __future__ import annotations

import galsim
import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from snakedrp.meas.columns import flagged, flux_columns, xy_columns
from snakedrp.meas.psf import PsfConfig, PsfError, kernel_size_for
from snakedrp.poly import poly_basis
from snakedrp.repo.exposure import mask_bits
from snakedrp.stamps import cutouts

_PILOT = 32                   # stamps measured from HSM's default first guess of the size


def measure_moments(image: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray,
                    size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adaptive moments (GalSim HSM) of sources on ``size``-sided stamps.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image.
    bad : ndarray of bool, shape (ny, nx)
        Pixels to ignore.
    x, y : ndarray
        Zero-based positions; stamps must lie inside the image.

    Returns
    -------
    sigma, e1, e2 : ndarray
        ``det(M)**0.25`` [pixel] and the distortion; NaN where the moments fail.
    """
    half = size // 2
    ix = np.floor(np.asarray(x) + 0.5).astype(int)
    iy = np.floor(np.asarray(y) + 0.5).astype(int)
    return _stamp_moments(cutouts(image, ix, iy, half), cutouts(bad, ix, iy, half))


def _stamp_moments(stamps: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`measure_moments` of a stack of stamps ``(n, size, size)`` and their bad-pixel flags."""
    stamps = np.ascontiguousarray(stamps, dtype=np.float64)
    # HSM's weight image (1 = use) rather than badpix, which it would convert on every call; the
    # stamps are built here, so GalSim's private unchecked constructors are safe (as in measure.py)
    weight = (~np.asarray(bad, bool)).astype(np.int32)
    bounds = galsim.BoundsI(1, stamps.shape[2], 1, stamps.shape[1])
    out = np.full((3, len(stamps)), np.nan)
    guess = 5.0                               # HSM's default starting size [pixel]
    for k in range(len(stamps)):
        if k == _PILOT:
            # start the rest from the typical size of the first stamps (the brightest sources,
            # mostly stars): HSM then needs fewer iterations (~15 % of the time) to converge
            pilot = out[0, :_PILOT]
            guess = float(np.median(pilot[np.isfinite(pilot)])) if np.isfinite(pilot).any() else guess
        res = galsim.hsm.FindAdaptiveMom(galsim._Image(stamps[k], bounds, None),
                                         weight=galsim._Image(weight[k], bounds, None), guess_sig=guess,
                                         strict=False, check=False)
        if res.moments_status == 0:
            out[:, k] = res.moments_sigma, res.observed_shape.e1, res.observed_shape.e2
    return out[0], out[1], out[2]


def _fit_surface(x, y, values, errors, keep, nsigma, shape, n_iter=5):
    """Clipped polynomial surface of ``values`` over the CCD, first fitted to the ``keep`` rows.

    The rows are then re-chosen among all with ``|values - fit| < nsigma * s * errors``, ``s >= 1``
    the robust scatter of the normalised residuals of the rows in the previous fit. The degree
    is 2, or less when rows are few. Returns the fitted values at every row.
    """
    ny, nx = shape
    u, v = (x - (nx - 1) / 2) / max((nx - 1) / 2, 1), (y - (ny - 1) / 2) / max((ny - 1) / 2, 1)
    fit = np.full(len(values), np.median(values[keep]))
    for _ in range(n_iter):
        degree = 2 if keep.sum() >= 24 else (1 if keep.sum() >= 9 else 0)
        basis = poly_basis(u, v, degree)
        sw = 1.0 / errors[keep]
        coef = np.linalg.lstsq(basis[keep] * sw[:, None], values[keep] * sw, rcond=None)[0]
        fit = basis @ coef
        z = (values - fit) / errors
        scale = max(1.4826 * np.median(np.abs(z[keep])), 1.0)
        new = np.abs(z) < nsigma * scale
        if new.sum() < 3 or (new == keep).all():
            break
        keep = new
    return fit


def _local_locus(x, y, ls, width, n_neighbours=24, min_count=3):
    """Per source, ln(size) of the smallest-size clump of >= ``min_count`` sources among its neighbours.

    PSF stars near each other share one size, galaxies only are larger and artefacts are few, so
    the smallest well-populated size among a source's ``n_neighbours`` nearest is the local
    stellar locus; no global model of the PSF size over the CCD is needed yet.
    """
    k = min(n_neighbours, len(ls))
    _, near = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=k)
    v = np.sort(ls[np.atleast_2d(near).reshape(len(ls), k)], axis=1)            # (n, k), rows sorted
    # per row and value: how many of the row's values lie within +-width of it
    count = ((v[:, None, :] <= (v + width)[:, :, None]).sum(axis=2)
             - (v[:, None, :] < (v - width)[:, :, None]).sum(axis=2))
    enough = count >= min(min_count, k)
    first = np.where(enough.any(axis=1), enough.argmax(axis=1), 0)
    rows = np.arange(len(ls))
    # the values within +-width of the clump's smallest member are a run of the sorted row
    run = np.abs(v - v[rows, first][:, None]) <= width
    n_run, start = run.sum(axis=1), run.argmax(axis=1)
    return 0.5 * (v[rows, start + (n_run - 1) // 2] + v[rows, start + n_run // 2])


def _any_bad_within(mask: np.ndarray, bits: int, ix: np.ndarray, iy: np.ndarray, radius: int) -> np.ndarray:
    """True where a pixel with any of ``bits`` lies within ``radius`` of ``(ix, iy)`` (off the image: not bad)."""
    off = np.arange(-radius, radius + 1)
    disk = off[:, None] ** 2 + off[None, :] ** 2 <= radius**2
    yy, xx = iy[:, None, None] + off[:, None], ix[:, None, None] + off
    ny, nx = mask.shape
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx) & disk
    values = mask[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)]
    return (((values & bits) != 0) & inside).any(axis=(1, 2))


def select_psf_stars(sources: Table, image: np.ndarray, mask: np.ndarray,
                     config: PsfConfig | None = None) -> Table:
    """Pick PSF stars from a source table and reserve a fraction of them.

    Parameters
    ----------
    sources : Table
        Detected sources: ``x, y`` (or ``x_centroid, y_centroid``; zero-based pixels), a flux
        pair (the first of :data:`snakedrp.meas.columns.FLUX_COLUMNS` present: ``flux, flux_err``, else
        ``psf_flux``/``calib_flux``/``ap_flux`` and their ``_err``; electrons). A True boolean
        column named ``flag*`` excludes a source.
    image : ndarray, shape (ny, nx)
        Background-subtracted image [electrons].
    mask : ndarray of int, shape (ny, nx)
        Bit mask; ``config.bad_mask_planes`` mark unusable pixels.
    config : PsfConfig

    Returns
    -------
    Table
        The selected rows of ``sources`` (input order) plus ``source_index`` (row in
        ``sources``), ``moments_sigma`` [pixel], ``moments_e1``, ``moments_e2`` (adaptive
        moments), ``psf_candidate`` (True) and ``reserved`` (held out of the PSF fit).

    Raises
    ------
    PsfError
        No stellar locus can be found (too few bright, unflagged sources).
    """
    config = config or PsfConfig()
    ny, nx = image.shape
    x, y = xy_columns(sources, order=(("x", "y"), ("x_centroid", "y_centroid")))
    flux, flux_err = flux_columns(sources)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / flux_err
    mask = np.asarray(mask)
    bad_bits = mask_bits(*config.bad_mask_planes)
    ms = config.moments_stamp_size
    hm = ms // 2
    ix = np.floor(x + 0.5)
    iy = np.floor(y + 0.5)
    ok = np.isfinite(x + y + snr) & (flux_err > 0) & (snr >= config.snr_min) & ~flagged(sources)
    ok &= (ix - hm >= 0) & (ix + hm < nx) & (iy - hm >= 0) & (iy + hm < ny)
    cand = np.nonzero(ok)[0]
    cand = cand[np.argsort(-snr[cand], kind="stable")][: config.max_candidates]
    # the mask is only read on the candidates' stamps, not over the whole image
    cix, ciy = ix[cand].astype(int), iy[cand].astype(int)
    bad_stamps = (cutouts(mask, cix, ciy, hm) & bad_bits) != 0
    # a saturated or defective core spoils the moments; such sources cannot be PSF stars anyway
    core = bad_stamps[:, hm, hm]
    cand, bad_stamps = cand[~core], bad_stamps[~core]

    sigma, e1, e2 = _stamp_moments(cutouts(image, ix[cand].astype(int), iy[cand].astype(int), hm), bad_stamps)
    good = np.isfinite(sigma) & (sigma > config.fwhm_min / 2.3548) & (sigma < config.fwhm_max / 2.3548)
    cand, sigma, e1, e2 = cand[good], sigma[good], e1[good], e2[good]
    if len(cand) < 5:
        raise PsfError(f"no stellar locus: only {len(cand)} unflagged sources with S/N >= {config.snr_min:g} "
                       f"and measurable sizes (of {len(sources)} sources)")

    # the stellar locus: first the local smallest-size clump, then smooth surfaces over the CCD
    ls = np.log(sigma)
    local = _local_locus(x[cand], y[cand], ls, config.locus_width)
    members = np.abs(ls - local) < config.locus_width

    # the locus as surfaces in (x, y), with S/N-dependent tolerances (size error ~ 1/SNR)
    s = snr[cand]
    err_ls = np.hypot(config.locus_min_width, 1.0 / s)
    err_e = np.hypot(config.ellipticity_min_width, 2.0 / s)
    xs, ys = x[cand], y[cand]
    fit_ls = _fit_surface(xs, ys, ls, err_ls, members, config.locus_nsigma, (ny, nx))
    star = np.abs(ls - fit_ls) < config.locus_nsigma * err_ls
    if star.sum() >= 5:
        fit_e1 = _fit_surface(xs, ys, e1, err_e, star, config.locus_nsigma, (ny, nx))
        fit_e2 = _fit_surface(xs, ys, e2, err_e, star, config.locus_nsigma, (ny, nx))
        star &= (np.abs(e1 - fit_e1) < config.locus_nsigma * err_e) & (np.abs(e2 - fit_e2) < config.locus_nsigma * err_e)
    if star.sum() == 0:
        raise PsfError("no stars on the stellar locus")

    # clean core, whole kernel box (plus the resampling margin) on the CCD, no bright neighbour
    fwhm = 2.3548 * float(np.median(sigma[star]))
    half = kernel_size_for(fwhm, config) // 2
    margin = half + config.resample_order + 1          # what build_psf cuts out around a star
    sel = cand[star]
    isx, isy = ix[sel].astype(int), iy[sel].astype(int)
    keep = (isx - margin >= 0) & (isx + margin < nx) & (isy - margin >= 0) & (isy + margin < ny)
    rc = max(int(np.ceil(config.core_radius_fwhm * fwhm)), 1)
    test = np.nonzero(keep)[0]
    keep[test[_any_bad_within(mask, bad_bits, isx[test], isy[test], rc)]] = False
    reach = half + fwhm
    finite = np.isfinite(x + y)
    tree = cKDTree(np.column_stack([x[finite], y[finite]]))
    index = np.nonzero(finite)[0]
    test = np.nonzero(keep)[0]
    if len(test):
        found = tree.query_ball_point(np.column_stack([x[sel[test]], y[sel[test]]]), np.sqrt(2) * reach)
        owner = np.repeat(np.arange(len(test)), [len(f) for f in found])
        near = index[np.concatenate(found).astype(int)]
        i = sel[test][owner]
        brighter = ((near != i) & (np.abs(x[near] - x[i]) <= reach) & (np.abs(y[near] - y[i]) <= reach)
                    & (np.nan_to_num(flux[near], nan=np.inf) > config.isolation_flux_ratio * flux[i]))
        keep[test[np.bincount(owner[brighter], minlength=len(test)) > 0]] = False
    chosen = np.sort(sel[keep])
    order = np.argsort(cand)
    rows = order[np.searchsorted(cand[order], chosen)]

    out = sources[chosen]
    out["source_index"] = chosen
    out["moments_sigma"] = sigma[rows]
    out["moments_e1"] = e1[rows]
    out["moments_e2"] = e2[rows]
    out["psf_candidate"] = np.ones(len(out), bool)
    reserved = np.zeros(len(out), bool)
    n_reserve = int(round(config.reserve_fraction * len(out)))
    if n_reserve:
        rng = np.random.default_rng(config.reserve_seed)
        reserved[rng.choice(len(out), n_reserve, replace=False)] = True
    out["reserved"] = reserved
    return out
