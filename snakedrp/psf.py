"""PSF model interface, shared by characterization (which builds models) and measurement.

Every PSF model answers two questions at a pixel position ``(x, y)`` (zero-based, CCD pixel
coordinates): the PSF image there (``kernel``: odd-sized, centred on the central pixel, sum 1)
and the image of a point source at exactly ``(x, y)`` on the image's pixel grid (``draw``).
Models persist as a FITS HDU whose header names the model class in ``PSFTYPE``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from astropy.io import fits

_REGISTRY: dict[str, type["PsfModel"]] = {}


def register(cls):
    """Class decorator: make a PSF model class readable by :func:`psf_from_hdu`."""
    _REGISTRY[cls.__name__] = cls
    return cls


def psf_from_hdu(hdu: fits.BinTableHDU | fits.ImageHDU) -> "PsfModel":
    """Rebuild a PSF model written by :meth:`PsfModel.to_hdu`."""
    name = hdu.header["PSFTYPE"]
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

    @abstractmethod
    def to_hdu(self) -> fits.BinTableHDU | fits.ImageHDU:
        """The model as one FITS HDU with ``PSFTYPE`` and ``EXTNAME='PSF'`` in its header."""

    @classmethod
    @abstractmethod
    def from_hdu(cls, hdu) -> "PsfModel":
        """Inverse of :meth:`to_hdu`."""


def lanczos3(t: np.ndarray) -> np.ndarray:
    """Lanczos kernel of order 3 evaluated at offsets ``t`` (pixels)."""
    t = np.asarray(t, float)
    out = np.sinc(t) * np.sinc(t / 3.0)
    out[np.abs(t) >= 3.0] = 0.0
    return out


def shift_image(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Shift an image by ``(dx, dy)`` pixels (|d| <= 0.5) with separable Lanczos-3 resampling.

    Written here because scipy.ndimage.shift offers only spline interpolation, whose
    prefilter rings differently from the Lanczos kernel the rest of the pipeline uses.
    """
    offsets = np.arange(-3, 4)
    wx = lanczos3(offsets - dx)
    wy = lanczos3(offsets - dy)
    wx /= wx.sum()
    wy /= wy.sum()
    padded = np.pad(image, 3)
    ny, nx = image.shape
    # out[j, i] = sum_k w[k] * in[j, i - offsets[k]]: the source moves by +d.
    tmp = sum(w * padded[:, 3 - o: 3 - o + nx] for w, o in zip(wx, offsets))
    return sum(w * tmp[3 - o: 3 - o + ny, :] for w, o in zip(wy, offsets))


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
