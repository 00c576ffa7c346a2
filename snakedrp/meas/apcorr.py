"""Aperture correction: the ratio of calibration-aperture to PSF flux over the CCD.

PSF fluxes measure the flux inside the PSF model's kernel box with the model's shape; the
photometric calibration is tied to a large circular aperture. The correction
``apcorr(x, y) = calib_flux / psf_flux`` is fitted on bright PSF stars as a low-order 2-D
polynomial in (x, y) with clipping, and applied as ``psf_flux * apcorr(x, y)``.

The calibration aperture has radius ``measure.calib_aperture_fwhm * FWHM`` (default 4 FWHM). The
simulated PSF (a Moffat truncated at 4 FWHM) carries no flux beyond that radius, so there the
calibration aperture holds the whole flux of a star; on real data 4 FWHM holds all but a few
mmag of it, and the remainder is absorbed by the zeropoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from snakedrp.pexconfig import Config, option
from snakedrp.poly import poly_basis, poly_terms


@dataclass
class ApCorrConfig(Config):
    """Aperture correction from PSF flux to the calibration aperture."""

    degree: int = option(1, "Degree of the 2-D polynomial in (x, y) of the correction (0 = a constant)", min=0, max=4)
    snr_min: float = option(100.0, "Minimum PSF-flux S/N of the stars used", min=1.0)
    clip_sigma: float = option(3.0, "Clip stars this many sigma (errors scaled by the robust scatter) off the fit", min=1.0)
    n_iter: int = option(5, "Fit / clip iterations", min=1, max=20)
    min_stars: int = option(3, "Fewest stars for a fit; with fewer, the degree is lowered, and with no star at all ApCorrError is raised", min=1)
    stars_per_term: float = option(3.0, "Lower the degree until there are this many stars per polynomial term", min=1.0)
    error_floor: float = option(0.002, "Added in quadrature to each star's ratio error, so that a few very bright stars do not decide the fit alone", min=0.0)
    median_center: bool = option(True, "Shift the fit onto the weighted median of the residuals: faint neighbours only ever add light to the large aperture")


class ApCorrError(RuntimeError):
    """The aperture correction could not be fitted (no usable star); the message says why."""




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
