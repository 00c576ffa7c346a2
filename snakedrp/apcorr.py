"""Aperture correction: PSF flux → calibration-aperture flux, as a smooth function over the CCD.

(Placeholder written by the lead so the workflow can import; the PSF helper replaces it.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from .pexconfig import Config, option


@dataclass
class ApCorrConfig(Config):
    """Aperture correction from PSF flux to the calibration aperture (radius 4 x FWHM)."""

    degree: int = option(1, "Degree of the 2-D polynomial of the correction over the CCD", min=0, max=4)
    clip_sigma: float = option(3.0, "Clip stars farther than this many sigma from the fit", min=1.0)
    iterations: int = option(3, "Fit/clip iterations", min=1, max=20)
    min_stars: int = option(5, "Fewest stars for a fit; fewer gives a constant correction of 1", min=1)


@dataclass(frozen=True)
class ApCorrMap:
    """ratio(x, y) = sum c_ij u^i v^j with u, v the pixel position scaled to [-1, 1]."""

    coefficients: np.ndarray
    terms: tuple
    shape: tuple

    def evaluate(self, x, y) -> np.ndarray:
        u, v = _scaled(np.asarray(x, float), np.asarray(y, float), self.shape)
        return sum(c * u**i * v**j for c, (i, j) in zip(self.coefficients, self.terms)) + 0 * u


def _scaled(x, y, shape):
    ny, nx = shape
    return 2 * x / max(nx - 1, 1) - 1, 2 * y / max(ny - 1, 1) - 1


def fit_aperture_correction(x, y, psf_flux, psf_flux_err, ap_flux, ap_flux_err, *, shape, config=None) -> ApCorrMap:
    """Fit the ratio ap_flux / psf_flux over the CCD with clipping (weighted least squares)."""
    config = config or ApCorrConfig()
    ok = np.isfinite(psf_flux) & np.isfinite(ap_flux) & (psf_flux > 0)
    terms = tuple((i, j) for i in range(config.degree + 1) for j in range(config.degree + 1 - i))
    if ok.sum() < max(config.min_stars, len(terms)):
        return ApCorrMap(np.array([1.0] + [0.0] * (len(terms) - 1)), terms, tuple(shape))
    ratio = ap_flux / np.where(ok, psf_flux, 1)
    err = ratio * np.hypot(ap_flux_err / np.where(ok, ap_flux, 1), psf_flux_err / np.where(ok, psf_flux, 1))
    u, v = _scaled(np.asarray(x, float), np.asarray(y, float), shape)
    a = np.column_stack([u**i * v**j for i, j in terms])
    use = ok.copy()
    coef = np.zeros(len(terms))
    for _ in range(config.iterations):
        w = 1 / np.maximum(err[use], 1e-6)
        coef = np.linalg.lstsq(a[use] * w[:, None], ratio[use] * w, rcond=None)[0]
        resid = (ratio - a @ coef) / np.maximum(err, 1e-6)
        use = ok & (np.abs(resid) < config.clip_sigma * max(np.std(resid[use]), 1.0))
    return ApCorrMap(coef, terms, tuple(shape))
