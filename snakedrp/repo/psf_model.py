"""PSF models as an exposure carries them: the interface, the models and their FITS storage.

Every PSF model answers two questions at a pixel position ``(x, y)`` (zero-based, CCD pixel
coordinates): the PSF image there (``kernel``: odd-sized, centred on the central pixel, sum 1)
and the image of a point source at exactly ``(x, y)`` on the image's pixel grid (``draw``).
Models persist as a FITS HDU whose header names the model class in ``PSFTYPE``; a new model
class registers itself with :func:`register` so that :func:`psf_from_hdu` can read it.
Fitting a model to stars is :func:`snakedrp.meas.psf.build_psf`'s job.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from astropy.io import fits

from snakedrp.poly import poly_basis, poly_terms
from snakedrp.stamps import kernel_moments, shift_image, shift_one


_REGISTRY: dict[str, type["PsfModel"]] = {}


def register(cls):
    """Class decorator: make a PSF model class readable by :func:`psf_from_hdu`."""
    _REGISTRY[cls.__name__] = cls
    return cls


def psf_from_hdu(hdu: fits.BinTableHDU | fits.ImageHDU) -> "PsfModel":
    """Rebuild a PSF model written by :meth:`PsfModel.to_hdu`."""
    name = hdu.header["PSFTYPE"]
    if name not in _REGISTRY and "PSFMOD" in hdu.header:
        # a model defined by a later stage (e.g. the coadd PSF) names its module: importing it registers it
        import importlib

        importlib.import_module(str(hdu.header["PSFMOD"]))
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown PSF model type {name!r}; known: {sorted(_REGISTRY)}") from None
    return cls.from_hdu(hdu)


class PsfModel(ABC):
    """A PSF that can be evaluated anywhere on its CCD."""

    @abstractmethod
    def kernel(self, x: float, y: float) -> np.ndarray:
        """PSF image at ``(x, y)``: shape ``(n, n)``, ``n`` odd, centred at ``[n//2, n//2]``, sum 1."""

    def draw(self, x: float, y: float) -> tuple[np.ndarray, int, int]:
        """Image of a unit-flux point source at ``(x, y)`` on the image pixel grid.

        Returns ``(stamp, x0, y0)``: ``stamp[j, i]`` is the image pixel ``[y0 + j, x0 + i]``.
        The default shifts :meth:`kernel` by the sub-pixel offset with a Lanczos-3 kernel.
        """
        k = self.kernel(x, y)
        n = k.shape[0]
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        stamp = shift_image(k, x - ix, y - iy)
        return stamp, ix - n // 2, iy - n // 2

    def fwhm(self, x: float, y: float) -> float:
        """Gaussian-equivalent FWHM at ``(x, y)`` [pixel]: 2.3548 x the adaptive-moment sigma of the kernel."""
        return 2.3548 * kernel_moments(self.kernel(x, y))[0]

    @abstractmethod
    def to_hdu(self) -> fits.BinTableHDU | fits.ImageHDU:
        """The model as one FITS HDU with ``PSFTYPE`` and ``EXTNAME='PSF'`` in its header."""

    @classmethod
    @abstractmethod
    def from_hdu(cls, hdu) -> "PsfModel":
        """Inverse of :meth:`to_hdu`."""


@register
class GaussianPsf(PsfModel):
    """A circular Gaussian PSF of constant width; for tests and as a first guess.

    Parameters
    ----------
    sigma : float
        Gaussian sigma in pixels.
    size : int
        Odd kernel size in pixels.
    """

    def __init__(self, sigma: float, size: int = 25):
        if size % 2 == 0:
            raise ValueError("PSF kernel size must be odd")
        self.sigma = float(sigma)
        self.size = int(size)

    def _render(self, dx: float, dy: float) -> np.ndarray:
        r = np.arange(self.size) - self.size // 2
        # pixel-integrated Gaussian via the error function, so the sum is exact
        from scipy.special import erf

        s = self.sigma * np.sqrt(2.0)
        ex = 0.5 * (erf((r - dx + 0.5) / s) - erf((r - dx - 0.5) / s))
        ey = 0.5 * (erf((r - dy + 0.5) / s) - erf((r - dy - 0.5) / s))
        k = np.outer(ey, ex)
        return k / k.sum()

    def kernel(self, x, y):
        return self._render(0.0, 0.0)

    def draw(self, x, y):
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        n = self.size
        return self._render(x - ix, y - iy), ix - n // 2, iy - n // 2

    def to_hdu(self):
        hdu = fits.ImageHDU(self.kernel(0, 0).astype(np.float32), name="PSF")
        hdu.header["PSFTYPE"] = type(self).__name__
        hdu.header["SIGMA"] = (self.sigma, "Gaussian sigma [pixel]")
        return hdu

    @classmethod
    def from_hdu(cls, hdu):
        return cls(hdu.header["SIGMA"], hdu.data.shape[0])


# ---------------------------------------------------------------- the pixel-basis model
@register
class PixelPsf(PsfModel):
    """A PSF image whose every pixel is a polynomial in the CCD position.

    ``kernel(x, y) = sum_k coeffs[k] * u**i_k * v**j_k`` normalised to sum 1, with
    ``u = (x - x_center) / x_scale``, ``v = (y - y_center) / y_scale`` and the exponents of
    :func:`poly_terms`. The kernel's Gaussian-weighted centroid is its central pixel.

    Parameters
    ----------
    coeffs : ndarray, shape (n_terms, n, n)
        Polynomial coefficient images, ``n`` odd.
    degree : int
        Polynomial degree (``n_terms = (degree + 1) (degree + 2) / 2``).
    x_center, x_scale, y_center, y_scale : float
        Normalisation of the CCD position [pixel].
    n_stars : int
        Stars the model was fitted to (provenance).
    resample_order : int
        Lanczos order of the sub-pixel shifts in :meth:`draw` (the order the model was built with).
    """

    def __init__(self, coeffs: np.ndarray, degree: int, x_center: float, x_scale: float,
                 y_center: float, y_scale: float, n_stars: int = 0, resample_order: int = 5):
        # native, contiguous float64: a FITS-read (big-endian) cube then gives bit-identical kernels
        coeffs = np.ascontiguousarray(coeffs, dtype=np.float64)
        if coeffs.ndim != 3 or coeffs.shape[1] != coeffs.shape[2] or coeffs.shape[1] % 2 == 0:
            raise ValueError(f"coeffs must have shape (n_terms, n, n) with n odd, got {coeffs.shape}")
        if coeffs.shape[0] != len(poly_terms(degree)):
            raise ValueError(f"degree {degree} needs {len(poly_terms(degree))} terms, got {coeffs.shape[0]}")
        self.coeffs = coeffs
        self.degree = int(degree)
        self.x_center, self.x_scale = float(x_center), float(x_scale)
        self.y_center, self.y_scale = float(y_center), float(y_scale)
        self.n_stars = int(n_stars)
        self.resample_order = int(resample_order)

    @property
    def size(self) -> int:
        """Kernel side [pixel]."""
        return self.coeffs.shape[1]

    def basis(self, x, y) -> np.ndarray:
        """Polynomial basis at CCD positions ``x, y``: shape ``(len(x), n_terms)``."""
        u = (np.asarray(x, float) - self.x_center) / self.x_scale
        v = (np.asarray(y, float) - self.y_center) / self.y_scale
        return poly_basis(u, v, self.degree)

    def kernels(self, x, y) -> np.ndarray:
        """Kernels at many positions: shape ``(len(x), n, n)``, each summing to 1."""
        n = self.size
        k = (self.basis(x, y) @ self.coeffs.reshape(len(self.coeffs), -1)).reshape(-1, n, n)
        return k / k.sum(axis=(1, 2), keepdims=True)

    def kernel(self, x, y):
        # one position: the basis from Python floats (poly_basis costs ~20 us of numpy overhead)
        u = (float(x) - self.x_center) / self.x_scale
        v = (float(y) - self.y_center) / self.y_scale
        b = np.array([u**i * v**j for i, j in poly_terms(self.degree)])
        k = np.tensordot(b, self.coeffs, axes=1)
        return k / k.sum()

    def draw(self, x, y):
        """As :meth:`PsfModel.draw`, with the Lanczos-5 resampling the model was built with.

        Lanczos-3 narrows a 3-4 pixel FWHM star by up to 0.7 % (at half-pixel shifts); order 5 by
        < 0.2 %.
        """
        n = self.size
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        stamp = shift_one(self.kernel(x, y), x - ix, y - iy, order=self.resample_order)
        return stamp, ix - n // 2, iy - n // 2

    def to_hdu(self):
        hdu = fits.ImageHDU(self.coeffs, name="PSF")
        h = hdu.header
        h["PSFTYPE"] = (type(self).__name__, "PSF model class (snakedrp.repo.psf_model)")
        h["DEGREE"] = (self.degree, "polynomial degree of the pixel coefficients")
        h["XCENTER"] = (self.x_center, "u = (x - XCENTER) / XSCALE [pixel, 0-based]")
        h["XSCALE"] = (self.x_scale, "[pixel]")
        h["YCENTER"] = (self.y_center, "v = (y - YCENTER) / YSCALE [pixel, 0-based]")
        h["YSCALE"] = (self.y_scale, "[pixel]")
        h["NSTARS"] = (self.n_stars, "stars in the fit")
        h["RESAMPLE"] = (self.resample_order, "Lanczos order of sub-pixel shifts")
        h["TERMS"] = (" ".join(f"u{i}v{j}" for i, j in poly_terms(self.degree)), "plane k: u^i v^j")
        return hdu

    @classmethod
    def from_hdu(cls, hdu):
        h = hdu.header
        return cls(np.asarray(hdu.data, float), h["DEGREE"], h["XCENTER"], h["XSCALE"],
                   h["YCENTER"], h["YSCALE"], h.get("NSTARS", 0), h.get("RESAMPLE", 5))
