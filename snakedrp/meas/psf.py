"""PSF modelling: fit the spatially varying pixel-basis model (:class:`~snakedrp.repo.psf_model.PixelPsf`)
to the stars that :func:`snakedrp.meas.psf_select.select_psf_stars` picks; both are configured by
:class:`PsfConfig`. The model classes and their storage live in :mod:`snakedrp.repo.psf_model`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from snakedrp.meas.columns import flux_columns, xy_columns
from snakedrp.meas.config import PsfConfig
from snakedrp.poly import poly_basis, poly_terms
from snakedrp.repo.exposure import mask_bits
from snakedrp.repo.psf_model import PixelPsf
from snakedrp.stamps import StackShift, cutouts, gaussian_centroid, shift_stack


class PsfError(RuntimeError):
    """The PSF could not be modelled (too few usable stars, ...); the message says why."""


# ---------------------------------------------------------------- configuration


def kernel_size_for(fwhm: float, config: PsfConfig) -> int:
    """Kernel side [pixel, odd] for stars of Gaussian-equivalent ``fwhm`` [pixel] (see ``PsfConfig.kernel_size``)."""
    if config.kernel_size:
        return int(config.kernel_size)
    size = 2 * int(np.ceil(config.kernel_radius_fwhm * fwhm)) + 1
    lo = config.kernel_size_min | 1
    hi = config.kernel_size_max if config.kernel_size_max % 2 else config.kernel_size_max - 1
    return int(np.clip(size, lo, hi))


@dataclass(frozen=True)
class PsfResult:
    """Result of :func:`build_psf`.

    Attributes
    ----------
    psf : PixelPsf
    stars : Table
        The input star table with ``psf_used`` (fitted, not clipped, not reserved),
        ``psf_x_centroid``, ``psf_y_centroid`` (the centroids the stars were registered on) and
        ``psf_chi2`` (reduced chi^2 of the star about the final model; NaN where not fitted).
    stars_used : ndarray of bool, shape (len(stars),)
        Same as ``stars['psf_used']``.
    kernel_size : int
    degree : int
        Degree actually fitted (lowered when stars are few, faint or leave part of the CCD empty).
    fwhm : float
        Gaussian-equivalent FWHM of the model at the CCD centre [pixel].
    shape_noise : float
        The model's ellipticity noise predicted from the candidate stars for ``degree``, RMS
        over the CCD (:func:`predicted_shape_noise`); NaN when the stars have no fluxes.
    """

    psf: PixelPsf
    stars: Table
    stars_used: np.ndarray
    kernel_size: int
    degree: int
    fwhm: float
    shape_noise: float = float("nan")


def _masked_median(values: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Per row of ``values`` (n, m), the median of the ``use`` entries (of all where none is used).

    Sorting with the unused entries as NaN (which sort last) and picking the middle of the used
    ones: one vectorised pass instead of a median per row.
    """
    count = use.sum(axis=1)
    use = np.where(count[:, None] > 0, use, True)
    count = use.sum(axis=1)
    s = np.sort(np.where(use, values, np.nan), axis=1)
    rows = np.arange(len(values))
    return 0.5 * (s[rows, (count - 1) // 2] + s[rows, count // 2])


def _solve_pixels(data: np.ndarray, weight: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Per-pixel weighted least squares of ``data ~ basis @ coeffs``.

    data, weight : (n_star, n_pix); basis : (n_star, n_terms) -> coeffs (n_terms, n_pix).
    """
    n_terms = basis.shape[1]
    outer = (basis[:, :, None] * basis[:, None, :]).reshape(len(basis), -1)      # (n_star, T*T)
    normal = (weight.T @ outer).reshape(-1, n_terms, n_terms)                     # (n_pix, T, T)
    rhs = (weight * data).T @ basis                                               # (n_pix, T)
    ridge = 1e-10 * np.trace(normal, axis1=1, axis2=2)[:, None, None] + 1e-300
    normal = normal + ridge * np.eye(n_terms)
    return np.linalg.solve(normal, rhs[:, :, None])[:, :, 0].T


def predicted_shape_noise(u: np.ndarray, v: np.ndarray, snr: np.ndarray, degree: int, n_grid: int = 11) -> float:
    """Statistical ellipticity error of a degree-``degree`` spatial fit to stars, RMS over the CCD.

    Each star's ellipticity (distortion) is taken to have the error ``2 / snr``; the error of
    the weighted least-squares polynomial at a position is propagated from these and averaged
    (in quadrature) over an ``n_grid`` x ``n_grid`` grid spanning the CCD, so positions far from
    any star (extrapolated corners, a half of the CCD without stars) count as much as the
    well-covered ones.

    Parameters
    ----------
    u, v : ndarray
        Star positions normalised to the CCD, ``(x - x_center) / x_scale`` (the CCD spans -1 to 1).
    snr : ndarray
        The stars' flux S/N; non-finite or non-positive values carry no weight.
    degree : int
        Total degree of the polynomial.
    n_grid : int
        Grid points per axis.

    Returns
    -------
    float
        RMS predicted error of the model's e1 (or e2) [dimensionless]; ``inf`` if the stars
        cannot constrain the polynomial (too few, or all on one line).
    """
    weight = np.where(np.isfinite(snr) & (snr > 0), np.nan_to_num(snr) / 2.0, 0.0) ** 2
    basis = poly_basis(u, v, degree)
    normal = (basis * weight[:, None]).T @ basis
    g = np.linspace(-1.0, 1.0, n_grid)
    gu, gv = np.meshgrid(g, g)
    grid = poly_basis(gu.ravel(), gv.ravel(), degree)
    # an eigenvalue at round-off level of the largest: a direction the stars do not constrain
    eig = np.linalg.eigvalsh(normal)
    if not eig[-1] > 0 or eig[0] <= 1e-12 * eig[-1]:
        return float("inf")
    var = np.einsum("gt,gt->g", grid, np.linalg.solve(normal, grid.T).T)
    return float(np.sqrt(np.mean(np.maximum(var, 0.0))))


def build_psf(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, stars: Table,
              config: PsfConfig | None = None) -> PsfResult:
    """Fit a :class:`PixelPsf` to the non-reserved stars of ``stars``.

    Each star is re-centred on its Gaussian-weighted centroid by Lanczos resampling (order
    ``config.resample_order``; the shift is iterated until the resampled star's centroid is the
    central pixel, since the resampling does not preserve the first moment exactly) and divided
    by its PSF-fit flux.
    Every kernel pixel is then a weighted least-squares polynomial in (x, y) across the stars,
    of degree ``config.degree``, lowered until there are ``config.stars_per_term`` stars per
    term and, above degree 1, until the ellipticity noise the stars' positions and S/N predict
    for the model (RMS over the CCD, :func:`predicted_shape_noise`) is at most
    ``config.max_shape_noise`` (a plane is also kept with fewer stars per term when its
    predicted noise is within that limit); with model-based weights ``F^2 / (sky variance + F * model)``
    (data-based weights would bias the fluxes). Star pixels far off the model (cosmic rays, neighbours) are replaced by
    the model and get no weight; stars whose chi^2 is an outlier are dropped; fluxes are re-fitted
    with the new model and the fit repeated ``n_iter`` times.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image [electrons].
    variance : ndarray, shape (ny, nx)
        Per-pixel variance [electrons^2].
    mask : ndarray of int, shape (ny, nx)
        Bit mask; pixels with any of ``config.bad_mask_planes`` are not used.
    stars : Table
        From :func:`snakedrp.meas.psf_select.select_psf_stars`: ``x, y`` (or ``x_centroid, y_centroid``),
        a flux pair (optional, orders the stars by S/N; see :data:`snakedrp.meas.columns.FLUX_COLUMNS`), ``reserved`` (optional),
        ``moments_sigma`` (optional, first-guess PSF sigma [pixel]).
    config : PsfConfig

    Raises
    ------
    PsfError
        Fewer than ``config.min_stars`` usable stars.
    """
    config = config or PsfConfig()
    image = np.asarray(image)
    ny, nx = image.shape
    n_all = len(stars)
    x_all, y_all = xy_columns(stars, order=(("x", "y"), ("x_centroid", "y_centroid")))
    reserved = np.asarray(stars["reserved"], bool) if "reserved" in stars.colnames else np.zeros(n_all, bool)
    if "moments_sigma" in stars.colnames and np.isfinite(stars["moments_sigma"]).any():
        sigma0 = float(np.nanmedian(np.asarray(stars["moments_sigma"], float)))
    else:
        sigma0 = 2.0
    size = kernel_size_for(2.3548 * sigma0, config)
    half = size // 2
    order = config.resample_order
    pad = order                               # Lanczos support
    hs = half + pad + 1                       # raw stamp half-size: the centroid may move a pixel

    ix0 = np.floor(x_all + 0.5).astype(int)
    iy0 = np.floor(y_all + 0.5).astype(int)
    inside = (ix0 - hs >= 0) & (ix0 + hs < nx) & (iy0 - hs >= 0) & (iy0 + hs < ny) & np.isfinite(x_all + y_all)
    cand = np.nonzero(inside & ~reserved)[0]
    try:
        flux_col, err_col = flux_columns(stars)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = flux_col / err_col
        cand = cand[np.argsort(-np.nan_to_num(snr[cand], nan=-np.inf), kind="stable")]
    except KeyError:
        snr = None                             # no fluxes: keep the table's order
    cand = cand[: config.max_stars]
    if len(cand) < config.min_stars:
        raise PsfError(f"only {len(cand)} usable PSF stars (need psf.min_stars = {config.min_stars}) "
                       f"out of {n_all} selected ({int(reserved.sum())} reserved)")
    x_center, x_scale = (nx - 1) / 2.0, max((nx - 1) / 2.0, 1.0)
    y_center, y_scale = (ny - 1) / 2.0, max((ny - 1) / 2.0, 1.0)
    u_cand, v_cand = (x_all[cand] - x_center) / x_scale, (y_all[cand] - y_center) / y_scale

    def shape_noise(d: int) -> float:
        return predicted_shape_noise(u_cand, v_cand, snr[cand], d) if snr is not None else float("nan")

    # few stars, faint ones or stars leaving part of the CCD empty: the quadratic and higher terms
    # would fit their noise, worst where the polynomial is extrapolated. A plane is kept whatever
    # its noise when there are stars_per_term stars per term, and with fewer (8-11 stars: a sparse
    # CCD) when its predicted noise is within the limit: the PSF size varies over a CCD by 1-3 %,
    # which a constant model turns into PSF-flux errors of the same size.
    def too_free(d: int) -> bool:
        few = len(cand) < config.stars_per_term * len(poly_terms(d))
        if d == 1:
            return few and not shape_noise(1) <= config.max_shape_noise
        return few or shape_noise(d) > config.max_shape_noise

    degree = config.degree
    while degree > 0 and too_free(degree):
        degree -= 1

    bad_bits = mask_bits(*config.bad_mask_planes)
    raw = cutouts(image, ix0[cand], iy0[cand], hs).astype(float)
    var = cutouts(variance, ix0[cand], iy0[cand], hs).astype(float)
    bad = (cutouts(mask, ix0[cand], iy0[cand], hs) & bad_bits) != 0
    bad |= ~np.isfinite(raw) | ~(var > 0)
    raw[bad] = 0.0
    ring = np.hypot(*np.meshgrid(np.arange(-hs, hs + 1), np.arange(-hs, hs + 1))) > half
    sky_var = _masked_median(var.reshape(len(var), -1), (ring & ~bad).reshape(len(var), -1))

    # sub-pixel centroids: Gaussian-weighted, then re-checked on the resampled star
    good = (~bad).astype(float)
    dx, dy = gaussian_centroid(raw, sigma0, weights=good)
    for _ in range(2):
        shifted = shift_stack(raw, -dx, -dy, order)
        rx, ry = gaussian_centroid(shifted, sigma0, weights=good, n_iter=3)
        dx, dy = dx + rx, dy + ry
    # move each star's stamp so that |offset| <= 0.5
    sx, sy = np.round(dx).astype(int), np.round(dy).astype(int)
    if (sx | sy).any():
        for k in np.nonzero(sx | sy)[0]:
            raw[k] = np.roll(raw[k], (-sy[k], -sx[k]), axis=(0, 1))
            var[k] = np.roll(var[k], (-sy[k], -sx[k]), axis=(0, 1))
            bad[k] = np.roll(bad[k], (-sy[k], -sx[k]), axis=(0, 1))
        dx, dy = dx - sx, dy - sy
    xc = ix0[cand] + sx + dx
    yc = iy0[cand] + sy + dy
    box = slice(pad + 1, pad + 1 + size)
    inner = np.s_[:, box, box]                                            # the kernel box in a raw stamp
    n_cand, n_raw = len(cand), 2 * hs + 1
    to_centre = StackShift(-dx, -dy, n_cand, n_raw, n_raw, order)            # star -> kernel grid
    to_star = StackShift(dx, dy, n_cand, n_raw, n_raw, order)                # kernel grid -> star

    basis = poly_basis((xc - x_center) / x_scale, (yc - y_center) / y_scale, degree)

    # first pass: box-sum fluxes and a robust (median) constant model
    centred = to_centre.apply(raw, out_box=box)
    flux = centred.sum(axis=(1, 2))
    good_flux = flux > 0
    norm = centred / np.where(good_flux, flux, 1.0)[:, None, None]
    coeffs = np.zeros((len(poly_terms(degree)), size, size))
    coeffs[0] = np.median(norm[good_flux], axis=0)
    use = good_flux.copy()
    chi2 = np.full(len(cand), np.nan)
    pixel_bad = bad.copy()

    for it in range(config.n_iter):
        model = basis @ coeffs.reshape(len(coeffs), -1)
        model = model.reshape(-1, size, size)
        model /= model.sum(axis=(1, 2), keepdims=True)
        # the model at each star's sub-pixel position, in the raw stamp frame
        pred = to_star.apply(model, in_box=box)
        # PSF-fit flux with model-based weights
        # (in-place steps and einsum sums: these stacks are large, temporaries cost)
        wfit = np.maximum(pred, 0)
        wfit *= np.maximum(flux, 0)[:, None, None]
        wfit += sky_var[:, None, None]
        np.divide(1.0, wfit, out=wfit)
        wfit[pixel_bad] = 0.0
        wpred = np.multiply(wfit, pred, out=wfit)                            # weight x model
        flux = np.einsum("nij,nij->n", wpred, raw) / np.maximum(np.einsum("nij,nij->n", wpred, pred), 1e-300)
        # pixels far off the model (cosmic rays, neighbours) and their 8 neighbours are not used
        scaled = flux[:, None, None] * pred
        # the first model is spatially constant: allow for the PSF's variation over the CCD
        err = config.model_error if it > 0 else max(config.model_error, 0.25)
        noise = np.maximum(scaled, 0)
        noise += sky_var[:, None, None]
        noise += (err * scaled) ** 2
        np.sqrt(noise, out=noise)
        outlier = np.abs(raw - scaled) > config.pixel_clip_sigma * noise
        grown = outlier.copy()
        grown[:, 1:, :] |= outlier[:, :-1, :]
        grown[:, :-1, :] |= outlier[:, 1:, :]
        grown[:, :, 1:] |= outlier[:, :, :-1]
        grown[:, :, :-1] |= outlier[:, :, 1:]
        pixel_bad = bad | grown
        filled = np.where(pixel_bad, scaled, raw)
        fpos = np.where(flux > 0, flux, 1.0)
        data = to_centre.apply(filled, out_box=box) / fpos[:, None, None]
        weight = fpos[:, None, None] ** 2 / (sky_var[:, None, None] + fpos[:, None, None] * np.maximum(model, 0)
                                             + (config.model_error * fpos[:, None, None] * model) ** 2)
        # a bad raw pixel taints the resampled pixel at the same place (the shift is < 1/2 pixel)
        weight = np.where(pixel_bad[inner], 0.0, weight)
        # stars: reduced chi^2 about the current model; clip outliers (not below min_stars)
        resid = (data - model) ** 2 * weight
        n_good = np.maximum((weight > 0).sum(axis=(1, 2)), 1)
        chi2 = resid.sum(axis=(1, 2)) / n_good
        use = (flux > 0) & np.isfinite(chi2)
        if it > 0:
            med = np.median(chi2[use])
            mad = 1.4826 * np.median(np.abs(chi2[use] - med))
            clip = use & (chi2 > med + config.clip_sigma * max(mad, 1e-3 * med))
            if use.sum() - clip.sum() >= config.min_stars:
                use &= ~clip
        if use.sum() < config.min_stars:
            raise PsfError(f"only {int(use.sum())} PSF stars left after clipping (need psf.min_stars = "
                           f"{config.min_stars})")
        new = _solve_pixels(data[use].reshape(use.sum(), -1), weight[use].reshape(use.sum(), -1), basis[use])
        coeffs = new.reshape(-1, size, size)

    psf = PixelPsf(coeffs, degree, x_center, x_scale, y_center, y_scale, n_stars=int(use.sum()),
                   resample_order=order)
    out = stars.copy()
    used = np.zeros(n_all, bool)
    used[cand[use]] = True
    out["psf_used"] = used
    for name, values in (("psf_x_centroid", xc), ("psf_y_centroid", yc), ("psf_chi2", chi2)):
        col = np.full(n_all, np.nan)
        col[cand] = values
        out[name] = col
    fwhm = psf.fwhm(x_center, y_center)
    return PsfResult(psf=psf, stars=out, stars_used=used, kernel_size=size, degree=degree, fwhm=fwhm,
                     shape_noise=shape_noise(degree))
