"""Aperture correction and aperture loss: PSF fluxes onto the calibration aperture, then onto total flux.

PSF fluxes measure the flux inside the PSF model's kernel box with the model's shape; the
photometric calibration is tied to a large circular aperture. The correction
``apcorr(x, y) = calib_flux / psf_flux`` is fitted on bright PSF stars as a low-order 2-D
polynomial in (x, y) with clipping, and applied as ``psf_flux * apcorr(x, y)``.

The calibration aperture has radius ``measure.calib_aperture_fwhm * FWHM`` (default 4 FWHM). A
real PSF (atmosphere convolved with the diffraction of an obscured pupil, plus scattered light)
does not end there: about 1 % of a star's light lies beyond 4 FWHM, by an amount that changes
with the seeing. As in the LSST stack, that residual *aperture loss* is measured on the bright
stars of each CCD by a curve of growth (:func:`measure_aperture_loss`): annuli out to
``radius_max`` calibration radii, each star's fitted by a power-law wing plus a local sky level
(the background a crowded field leaves near bright stars, which also sits in the calibration
aperture), the median over stars of total / calibration-aperture flux. ``psf_flux * apcorr(x, y) * aperture_loss`` is then the star's
total flux, and the zeropoint fitted from those fluxes is that of total fluxes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from snakedrp.meas.config import ApCorrConfig, ApertureLossConfig
from snakedrp.poly import poly_basis, poly_terms


class ApCorrError(RuntimeError):
    """The aperture correction could not be fitted (no usable star); the message says why."""


@dataclass(frozen=True)
class ApertureLoss:
    """The light of a star beyond the calibration aperture, from the curve of growth of bright stars.

    Attributes
    ----------
    factor : float
        Total flux / calibration-aperture flux (1 when not measured).
    error : float
        1-sigma error of ``factor`` (scatter of the stars over sqrt(n), the tail's error included).
    measured : float
        Light between the calibration radius and the curve's last radius, as a fraction of the
        calibration-aperture flux.
    tail : float
        Extrapolated light beyond the last radius (same units).
    radius_max : float
        Median last radius of the curve [pixel].
    radii : ndarray
        Outer radii of the annuli in calibration-aperture radii.
    curve : ndarray
        Cumulative flux at ``radii`` / calibration-aperture flux (median curve of growth).
    n_stars : int
        Stars in the curve of growth (0: not measured, ``factor`` 1).
    sky : float
        Median correction of the calibration aperture for the local sky level around the stars
        (fraction of the calibration-aperture flux, included in ``factor``).
    stars : ndarray of int
        Indices, into the candidate arrays given to :func:`measure_aperture_loss`, of the stars
        whose total / calibration-aperture flux ratios ``factor`` is the median of.
    """

    factor: float
    error: float
    measured: float
    tail: float
    radius_max: float
    radii: np.ndarray
    curve: np.ndarray
    n_stars: int
    sky: float = 0.0
    stars: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def none(cls) -> "ApertureLoss":
        return cls(1.0, 0.0, 0.0, 0.0, 0.0, np.zeros(0), np.zeros(0), 0)

    def cards(self) -> list[tuple[str, object, str]]:
        """FITS header cards (key, value, comment) for the calexp and the src metadata."""
        return [("APLOSS", float(self.factor), "total / calib-aperture flux of stars (curve of growth)"),
                ("APLOSSER", float(self.error), "1-sigma error of APLOSS"),
                ("APLOSSMS", float(self.measured), "light measured beyond the calib aperture [fraction]"),
                ("APLOSSTL", float(self.tail), "extrapolated light beyond the curve's last radius"),
                ("APLOSSRM", float(self.radius_max), "last radius of the curve of growth [pixel]"),
                ("APLOSSSK", float(self.sky), "local-sky correction of the calib aperture (in APLOSS)"),
                ("APLOSSN", int(self.n_stars), "stars in the curve of growth (0: not measured)")]


def annulus_fluxes(data, var, bad, seg, ids, x, y, rin, rout):
    """Annulus fluxes and errors with other sources' footprints and bad pixels replaced by the annulus mean.

    sep masks by ``segmap``/``seg_id`` without correcting the area; the unmasked area comes from
    the same sums over an image of ones. NaN where less than 30 % of the annulus is usable.
    """
    import sep

    kw = dict(mask=bad, subpix=1)
    if seg is not None:
        kw.update(segmap=seg, seg_id=ids.astype(np.int32))
    flux, err, _ = sep.sum_circann(data, x, y, rin, rout, var=var, **kw)
    area, _, _ = sep.sum_circann(np.ones_like(data), x, y, rin, rout, **kw)
    full = np.pi * (rout**2 - rin**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(area > 0.3 * full, full / area, np.nan)
    return flux * scale, err * scale


def annulus_edges(calib_radius, config: ApertureLossConfig) -> np.ndarray:
    """Edges of the curve-of-growth annuli [pixel], shape (n_stars, n_annuli + 1): logarithmic steps from
    each star's calibration radius to ``radius_max`` of it, at most ``radius_max_pixels``."""
    r0 = np.asarray(calib_radius, float)
    r_out = np.minimum(config.radius_max * r0, config.radius_max_pixels)
    steps = np.linspace(0.0, 1.0, config.n_annuli + 1)
    return r0[:, None] * (r_out / r0)[:, None] ** steps[None, :]


def measure_aperture_loss(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, segmentation, ids, x, y,
                          calib_radius, calib_flux, calib_flux_err, config: ApertureLossConfig | None = None
                          ) -> ApertureLoss:
    """The residual aperture loss beyond the calibration aperture, by a curve of growth of bright stars.

    For the brightest ``max_stars`` stars with calibration-aperture S/N above ``snr_min``,
    the fluxes of ``n_annuli`` logarithmically spaced annuli from each star's calibration
    radius ``R`` out to ``radius_max R`` (at most ``radius_max_pixels``) are divided by its
    calibration flux ``f0``; other sources' footprint pixels and bad pixels are replaced by the
    annulus mean. Each star's annuli are fitted (weighted linear least squares) by a power-law
    wing, ``C(r) = 1 + L (1 - (r / R)**-g)`` with ``g = tail_index``, plus a local sky level
    ``s`` per pixel, which the background subtraction left (in a crowded field, the light of
    undetected neighbours and of wings beyond the footprints); the star's total flux over its
    calibration-aperture flux is ``1 + L - s pi R**2 / f0`` (the same sky level is in the
    aperture). The factor is the median over stars, robust to the neighbours left in one
    star's annuli. No radius is assumed to hold all the light.

    Parameters
    ----------
    image, variance : ndarray, shape (ny, nx)
        Background-subtracted image [electrons] and variance [electrons^2].
    bad : ndarray of bool, shape (ny, nx)
        Unusable pixels.
    segmentation : ndarray of int, shape (ny, nx), or None
        Footprints (value = source id).
    ids, x, y, calib_radius, calib_flux, calib_flux_err : array_like
        The candidate stars: footprint ids, zero-based centroids [pixel], calibration radii
        [pixel], calibration-aperture fluxes and errors [electrons].
    config : ApCorrConfig

    Returns
    -------
    ApertureLoss
        ``ApertureLoss.none()`` (factor 1, n_stars 0) with fewer than ``min_stars`` stars or a
        factor farther than ``loss_max`` from 1.
    """
    config = config or ApertureLossConfig()
    x, y = np.asarray(x, float), np.asarray(y, float)
    r0 = np.asarray(calib_radius, float)
    f0, e0 = np.asarray(calib_flux, float), np.asarray(calib_flux_err, float)
    ids = np.asarray(ids, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(x + y + r0 + f0 + e0) & (f0 > 0) & (f0 / e0 >= config.snr_min) & (r0 > 0)
    rows = np.flatnonzero(ok)
    rows = rows[np.argsort(-f0[rows], kind="stable")][: config.max_stars]
    if len(rows) < config.min_stars:
        return ApertureLoss.none()
    data = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(variance, dtype=np.float32)
    seg = None if segmentation is None else np.ascontiguousarray(segmentation, dtype=np.int32)
    edges = annulus_edges(r0[rows], config)
    fractions = np.empty((len(rows), config.n_annuli))
    errors = np.empty((len(rows), config.n_annuli))
    for k in range(config.n_annuli):
        f, e = annulus_fluxes(data, var, bad, seg, ids[rows], x[rows], y[rows], edges[:, k], edges[:, k + 1])
        fractions[:, k], errors[:, k] = f / f0[rows], e / f0[rows]
    good = np.isfinite(fractions).all(axis=1) & np.isfinite(errors).all(axis=1) & (errors > 0).all(axis=1)
    fractions, errors, edges, radius = fractions[good], errors[good], edges[good], r0[rows][good]
    rows = rows[good]
    n = len(fractions)
    if n < config.min_stars:
        return ApertureLoss.none()
    # per star, a weighted linear fit of its annuli: a power-law wing (loss beyond R, L) plus a local
    # sky level s: the global background is off by a fraction of an e- a pixel near the bright stars
    # of a crowded field (undetected neighbours, wings beyond footprints), which over a calibration
    # aperture of 4 FWHM at 1.5" seeing is a per cent of a bright star; the same level is taken out
    # of the calibration aperture. Each star's total / calib-aperture flux is 1 + L - s pi R^2 / f0.
    g = config.tail_index
    rel = edges / radius[:, None]
    wing = rel[:, :-1] ** -g - rel[:, 1:] ** -g                       # annulus share of L
    area = np.pi * (edges[:, 1:] ** 2 - edges[:, :-1] ** 2) / f0[rows][:, None]
    w = 1.0 / errors**2
    a11, a12, a22 = (w * wing * wing).sum(1), (w * wing * area).sum(1), (w * area * area).sum(1)
    b1, b2 = (w * wing * fractions).sum(1), (w * area * fractions).sum(1)
    det = a11 * a22 - a12**2
    with np.errstate(invalid="ignore", divide="ignore"):
        loss_i = (a22 * b1 - a12 * b2) / det
        sky_i = (a11 * b2 - a12 * b1) / det                           # [e- per pixel / f0]
    aperture_area = np.pi * radius**2 / f0[rows]
    total = 1.0 + loss_i - sky_i * aperture_area
    ok = np.isfinite(total)
    if ok.sum() < config.min_stars:
        return ApertureLoss.none()
    total, loss_i, sky_i, aperture_area, rows = total[ok], loss_i[ok], sky_i[ok], aperture_area[ok], rows[ok]
    fractions, area, edges, radius = fractions[ok], area[ok], edges[ok], radius[ok]
    n = len(total)
    # the median over stars: a neighbour's light left in one star's annuli moves that star alone
    factor = float(np.median(total))
    spread = 1.4826 * float(np.median(np.abs(total - factor)))
    error = 1.2533 * spread / np.sqrt(n)
    corrected = fractions - sky_i[:, None] * area
    curve = 1.0 + np.median(np.cumsum(corrected, axis=1), axis=0)
    measured = float(np.median(corrected.sum(axis=1)))
    tail = float(np.median(loss_i * rel[ok][:, -1] ** -g))
    sky_term = float(np.median(-sky_i * aperture_area))
    loss = factor - 1.0
    # below 1 is possible: the local sky the aperture holds can outweigh the light beyond it
    if not (abs(loss) <= config.loss_max) or not np.isfinite(loss):
        return ApertureLoss.none()
    radii = np.median(edges / radius[:, None], axis=0)[1:]
    return ApertureLoss(factor=factor, error=float(error), measured=measured, tail=tail,
                        radius_max=float(np.median(edges[:, -1])), radii=radii, curve=curve, n_stars=n,
                        sky=sky_term, stars=rows)


class ApCorrMap:
    """The aperture correction over a CCD: ``evaluate(x, y) = sum_k coeffs[k] u**i_k v**j_k``.

    ``u = (x - x_center) / x_scale``, ``v = (y - y_center) / y_scale`` and the exponents of
    :func:`snakedrp.poly.poly_terms`.

    Attributes
    ----------
    coeffs : ndarray, shape (n_terms,)
    degree : int
    x_center, x_scale, y_center, y_scale : float
        Position normalisation [pixel].
    error : float
        1-sigma uncertainty of the correction [fraction]: scatter of the used stars about the
        fit divided by sqrt(n_stars).
    scatter : float
        RMS scatter of the used stars' ratios about the fit (fraction).
    n_stars : int
        Stars in the final fit.
    """

    def __init__(self, coeffs, degree: int, x_center: float, x_scale: float, y_center: float,
                 y_scale: float, *, error: float = 0.0, scatter: float = 0.0, n_stars: int = 0):
        self.coeffs = np.asarray(coeffs, float)
        self.degree = int(degree)
        if len(self.coeffs) != len(poly_terms(self.degree)):
            raise ValueError(f"degree {degree} needs {len(poly_terms(degree))} coefficients, got {len(self.coeffs)}")
        self.x_center, self.x_scale = float(x_center), float(x_scale)
        self.y_center, self.y_scale = float(y_center), float(y_scale)
        self.error, self.scatter, self.n_stars = float(error), float(scatter), int(n_stars)

    def evaluate(self, x, y) -> np.ndarray:
        """Correction factor ``calib_flux / psf_flux`` at zero-based pixel positions (array in, array out)."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        b = poly_basis(((x - self.x_center) / self.x_scale).ravel(),
                       ((y - self.y_center) / self.y_scale).ravel(), self.degree)
        return (b @ self.coeffs).reshape(np.shape(x))

    def apply(self, x, y, psf_flux, psf_flux_err) -> tuple[np.ndarray, np.ndarray]:
        """Corrected ``(flux, flux_err)``; the map's own error is added in quadrature."""
        c = self.evaluate(x, y)
        flux = np.asarray(psf_flux, float) * c
        err = np.hypot(np.asarray(psf_flux_err, float) * c, flux * self.error)
        return flux, err

    def to_hdu(self) -> fits.ImageHDU:
        """One image HDU (``EXTNAME='APCORR'``): the coefficients, the normalisation in the header."""
        hdu = fits.ImageHDU(self.coeffs, name="APCORR")
        h = hdu.header
        h["DEGREE"] = (self.degree, "polynomial degree in (u, v)")
        h["XCENTER"] = (self.x_center, "u = (x - XCENTER) / XSCALE [pixel, 0-based]")
        h["XSCALE"] = (self.x_scale, "[pixel]")
        h["YCENTER"] = (self.y_center, "v = (y - YCENTER) / YSCALE [pixel, 0-based]")
        h["YSCALE"] = (self.y_scale, "[pixel]")
        h["TERMS"] = (" ".join(f"u{i}v{j}" for i, j in poly_terms(self.degree)), "coefficient k: u**i v**j")
        h["APCERR"] = (self.error, "1-sigma error of the correction")
        h["SCATTER"] = (self.scatter, "RMS of the stars about the fit")
        h["NSTARS"] = (self.n_stars, "stars in the fit")
        return hdu

    @classmethod
    def from_hdu(cls, hdu) -> "ApCorrMap":
        """Inverse of :meth:`to_hdu`."""
        h = hdu.header
        return cls(np.asarray(hdu.data, float), h["DEGREE"], h["XCENTER"], h["XSCALE"], h["YCENTER"],
                   h["YSCALE"], error=h.get("APCERR", 0.0), scatter=h.get("SCATTER", 0.0),
                   n_stars=h.get("NSTARS", 0))


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def fit_aperture_correction(x, y, psf_flux, psf_flux_err, ap_flux, ap_flux_err, *,
                            shape: tuple[int, int], config: ApCorrConfig | None = None) -> ApCorrMap:
    """Fit ``ap_flux / psf_flux`` over the CCD with clipping.

    Weighted least squares (ratio errors from the flux errors plus ``error_floor``) with
    clipping at ``clip_sigma`` (errors scaled by the robust scatter), then, with
    ``median_center``, the constant term moved onto the weighted median of the residuals: light
    of faint neighbours only ever raises the large aperture's flux, which biases a mean.

    Parameters
    ----------
    x, y : array_like
        Zero-based pixel positions of PSF stars.
    psf_flux, psf_flux_err : array_like
        PSF-model flux and its error [electrons].
    ap_flux, ap_flux_err : array_like
        Calibration-aperture flux (radius ``measure.calib_aperture_fwhm`` x FWHM) and its error [electrons].
    shape : (ny, nx)
        CCD shape; positions are normalised to [-1, 1] over it.
    config : ApCorrConfig

    Returns
    -------
    ApCorrMap

    Raises
    ------
    ApCorrError
        No star passes the S/N and finiteness cuts.
    """
    config = config or ApCorrConfig()
    x, y = np.asarray(x, float), np.asarray(y, float)
    pf, pe = np.asarray(psf_flux, float), np.asarray(psf_flux_err, float)
    af, ae = np.asarray(ap_flux, float), np.asarray(ap_flux_err, float)
    ny, nx = shape
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = af / pf
        err = np.hypot(np.abs(ratio) * np.hypot(ae / af, pe / pf), config.error_floor)
        ok = np.isfinite(x + y + ratio + err) & (pf > 0) & (af > 0) & (err > 0) & (pf / pe >= config.snr_min)
    if not ok.any():
        raise ApCorrError(f"no star for the aperture correction: none of {len(pf)} has finite fluxes and "
                          f"PSF S/N >= {config.snr_min:g}")
    x_center, x_scale = (nx - 1) / 2.0, max((nx - 1) / 2.0, 1.0)
    y_center, y_scale = (ny - 1) / 2.0, max((ny - 1) / 2.0, 1.0)
    u, v = (x - x_center) / x_scale, (y - y_center) / y_scale

    use = ok.copy()
    degree = config.degree
    for _ in range(config.n_iter):
        n = int(use.sum())
        degree = config.degree
        while degree > 0 and (n < config.stars_per_term * len(poly_terms(degree)) or n < config.min_stars):
            degree -= 1
        basis = poly_basis(u, v, degree)
        sw = 1.0 / err[use]
        coeffs = np.linalg.lstsq(basis[use] * sw[:, None], ratio[use] * sw, rcond=None)[0]
        z = (ratio - basis @ coeffs) / err
        # errors scaled by the robust scatter: the stars' ratio errors may be under-estimated
        scale = max(1.4826 * np.median(np.abs(z[use])), 1.0) if n > 2 else 1.0
        new = ok & (np.abs(z) < config.clip_sigma * scale)
        if new.sum() == 0 or (new == use).all():
            break
        use = new
    resid = (ratio - basis @ coeffs)[use]
    if config.median_center:
        # the constant term is the first basis function (1 everywhere)
        shift = _weighted_median(resid, 1.0 / err[use] ** 2)
        coeffs[0] += shift
        resid = resid - shift
    scatter = float(np.sqrt(np.mean(resid**2))) if use.sum() else 0.0
    w = 1.0 / err[use] ** 2
    # error of the mean correction: the larger of the formal error and the scatter over sqrt(n)
    error = max(float(np.sqrt(1.0 / w.sum())), scatter / np.sqrt(max(int(use.sum()), 1)))
    return ApCorrMap(coeffs, degree, x_center, x_scale, y_center, y_scale, error=error,
                     scatter=scatter, n_stars=int(use.sum()))
