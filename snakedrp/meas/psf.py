"""PSF model interface, shared by characterization (which builds models) and measurement.

Every PSF model answers two questions at a pixel position ``(x, y)`` (zero-based, CCD pixel
coordinates): the PSF image there (``kernel``: odd-sized, centred on the central pixel, sum 1)
and the image of a point source at exactly ``(x, y)`` on the image's pixel grid (``draw``).
Models persist as a FITS HDU whose header names the model class in ``PSFTYPE``.

Besides the interface this module holds the spatially varying pixel-basis model
(:class:`PixelPsf`, built by :func:`build_psf` from the stars that
:func:`snakedrp.meas.psf_select.select_psf_stars` picks; both are configured by :class:`PsfConfig`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table

from snakedrp.pexconfig import Config, ConfigError, option

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


def lanczos3(t: np.ndarray) -> np.ndarray:
    """Lanczos kernel of order 3 evaluated at offsets ``t`` (pixels)."""
    return lanczos(t, 3)


def lanczos(t: np.ndarray, order: int) -> np.ndarray:
    """Lanczos kernel of integer ``order`` evaluated at offsets ``t`` (pixels)."""
    t = np.asarray(t, float)
    out = np.sinc(t) * np.sinc(t / order)
    out[np.abs(t) >= order] = 0.0
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


# ---------------------------------------------------------------- moments and resampling helpers
def kernel_moments(kernel: np.ndarray) -> tuple[float, float, float]:
    """Adaptive (elliptical Gaussian-weighted) moments of an image: ``(sigma, e1, e2)``.

    ``sigma`` in pixels (``det(M)**0.25``), ``e1, e2`` the distortion ``(Mxx - Myy, 2 Mxy)/(Mxx + Myy)``,
    as GalSim's ``FindAdaptiveMom`` measures them; NaNs when the moments fail.
    """
    import galsim

    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(kernel, dtype=np.float64)),
                                     strict=False)
    if res.moments_status != 0:
        return float("nan"), float("nan"), float("nan")
    return float(res.moments_sigma), float(res.observed_shape.e1), float(res.observed_shape.e2)


def _shift_matrices(d: np.ndarray, n: int, order: int) -> np.ndarray:
    """Banded matrices ``M`` (shape (len(d), n, n)) with ``(M @ v)[i] = sum_o w_o v[i - o]``.

    ``w_o`` are the normalised Lanczos taps ``L(o - d)``, ``o = -order..order``.
    """
    offsets = np.arange(-order, order + 1)
    w = lanczos(offsets[None, :] - np.asarray(d, float)[:, None], order)
    w /= w.sum(axis=1, keepdims=True)
    m = np.zeros((len(w), n, n))
    for k, o in enumerate(offsets):
        i = np.arange(max(o, 0), min(n + o, n))
        m[:, i, i - o] = w[:, k, None]
    return m


def shift_stack(stack: np.ndarray, dx: np.ndarray, dy: np.ndarray, order: int = 3) -> np.ndarray:
    """Shift each image of ``stack`` (shape (n, ny, nx)) by its own ``(dx, dy)`` (|d| <= 1/2 pixel).

    Separable Lanczos resampling of the given ``order``; order 3 is :func:`shift_image`. Pixels
    within ``order`` of the border see zeros beyond it. The shift is a product with two banded
    matrices per image (BLAS is faster than one pass per tap).
    """
    stack = np.asarray(stack, float)
    n, ny, nx = stack.shape
    return _Shift(dx, dy, n, ny, nx, order).apply(stack)


class _Shift:
    """The banded matrices of one :func:`shift_stack`, kept to apply again (build_psf shifts the
    same stars by the same offsets many times) and applicable to sub-boxes of the input or output:
    rows and columns outside a box need not be computed, nor zeros outside it multiplied.
    """

    def __init__(self, dx, dy, n, ny, nx, order):
        self.mx = _shift_matrices(np.asarray(dx, float).reshape(n), nx, order)
        self.my = _shift_matrices(np.asarray(dy, float).reshape(n), ny, order)

    def apply(self, stack, out_box=slice(None), in_box=slice(None)):
        """Shifted ``stack``: rows and columns ``out_box`` of the output, from the input's ``in_box``
        (``stack`` is that box; the rest of the input is zero)."""
        my = self.my[:, out_box, in_box]
        mx = self.mx[:, out_box, in_box]
        return my @ stack @ mx.transpose(0, 2, 1)


def shift_one(image: np.ndarray, dx: float, dy: float, order: int = 3) -> np.ndarray:
    """:func:`shift_stack` for one image (scipy's 1-D correlations: faster for a single stamp)."""
    from scipy.ndimage import correlate1d

    offsets = np.arange(-order, order + 1)
    out = np.asarray(image, float)
    for axis, d in ((1, dx), (0, dy)):
        w = lanczos(offsets - d, order)
        # out[i] = sum_o w_o in[i - o]; correlate1d computes sum_k w'_k in[i + k - order]
        out = correlate1d(out, (w / w.sum())[::-1], axis=axis, mode="constant", cval=0.0)
    return out


def gaussian_centroid(stack: np.ndarray, sigma: float, *, n_iter: int = 8,
                      weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Circular-Gaussian-weighted centroids of a stack of stamps, iterated to the fixed point.

    Parameters
    ----------
    stack : ndarray, shape (n, ny, nx)
        Background-subtracted stamps; a source near the stamp centre ``(nx // 2, ny // 2)``.
    sigma : float
        Weight sigma [pixel]; about the PSF sigma. A symmetric weight centred on the source gives an
        unbiased centroid of any centrally symmetric profile.
    weights : ndarray, shape (n, ny, nx), optional
        0 for pixels to ignore (masked), 1 otherwise.

    Returns
    -------
    dx, dy : ndarray, shape (n,)
        Offsets from the stamp centre [pixel].
    """
    n, ny, nx = stack.shape
    yy = np.arange(ny) - ny // 2
    xx = np.arange(nx) - nx // 2
    data = np.asarray(stack, float) if weights is None else weights * stack
    dx, dy = np.zeros(n), np.zeros(n)
    for _ in range(n_iter):
        # the weight is separable: sum over x first (a matrix product per stamp), then over y
        gx = np.exp(-0.5 * ((xx - dx[:, None]) / sigma) ** 2)                    # (n, nx)
        gy = np.exp(-0.5 * ((yy - dy[:, None]) / sigma) ** 2)                    # (n, ny)
        rows = data @ np.stack([gx, gx * xx], axis=2)                           # (n, ny, 2)
        norm, sum_x = (gy[:, None, :] @ rows)[:, 0].T
        sum_y = np.einsum("ni,i,ni->n", gy, yy, rows[:, :, 0])
        ok = norm > 0
        new_dx = np.where(ok, sum_x / np.where(ok, norm, 1.0), dx)
        new_dy = np.where(ok, sum_y / np.where(ok, norm, 1.0), dy)
        # a faint or blended stamp can run away: keep every centroid within one pixel of the centre
        dx, dy = np.clip(new_dx, -1.0, 1.0), np.clip(new_dy, -1.0, 1.0)
    return dx, dy


# ---------------------------------------------------------------- polynomial basis in (x, y)
def poly_terms(degree: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of ``u**i * v**j`` for total degree <= ``degree``, ordered by degree then j.

    Degree 2 gives ``1, u, v, u^2, uv, v^2``; this order is the first axis of :class:`PixelPsf`'s
    coefficient cube.
    """
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def poly_basis(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """Basis values at normalised positions: shape ``(len(u), n_terms)``."""
    u = np.atleast_1d(np.asarray(u, float))
    v = np.atleast_1d(np.asarray(v, float))
    return np.stack([u**i * v**j for i, j in poly_terms(degree)], axis=-1)


class PsfError(RuntimeError):
    """The PSF could not be modelled (too few usable stars, ...); the message says why."""


# ---------------------------------------------------------------- configuration
@dataclass
class PsfConfig(Config):
    """PSF star selection (size–flux locus) and the spatially varying pixel-basis PSF model."""

    # --- star selection (snakedrp.meas.psf_select)
    snr_min: float = option(50.0, "Minimum S/N (flux / flux_err) of a PSF star candidate", min=1.0)
    max_candidates: int = option(600, "Measure the moments of at most this many of the highest-S/N candidates", min=10)
    moments_stamp_size: int = option(25, "Stamp side for the candidates' adaptive moments [pixel, odd]", min=9, max=101)
    fwhm_min: float = option(1.5, "Smallest plausible PSF FWHM [pixel]; smaller sources are artefacts", min=0.5)
    fwhm_max: float = option(20.0, "Largest plausible PSF FWHM [pixel]", min=1.0)
    locus_width: float = option(0.03, "Half-width in ln(size) of the local stellar clump among each candidate's neighbours (0.03 = +-3 %)", min=0.005, max=1.0)
    locus_nsigma: float = option(3.0, "Keep stars within this many robust sigmas of the fitted size and ellipticity surfaces", min=1.0)
    locus_min_width: float = option(0.005, "Floor on the accepted scatter in ln(size) about the size surface", min=0.0)
    ellipticity_min_width: float = option(0.01, "Floor on the accepted scatter of (e1, e2) about the ellipticity surface", min=0.0)
    isolation_flux_ratio: float = option(0.01, "A neighbour brighter than this fraction of a star's flux inside its kernel box (+1 FWHM) rejects the star", min=0.0)
    core_radius_fwhm: float = option(2.0, "A star with a masked pixel within this many FWHM of its centre is rejected", min=0.0)
    bad_mask_planes: list[str] = option(["BAD", "SAT", "CR", "INTRP", "EDGE", "NO_DATA", "SUSPECT"],
                                        "Mask planes that make a pixel unusable for PSF modelling")
    reserve_fraction: float = option(0.2, "Fraction of the selected stars reserved (not fitted) for validation", min=0.0, max=0.9)
    reserve_seed: int = option(1, "Seed of the reserved-star draw (the draw is deterministic for a given star list)", min=0)
    # --- the model (build_psf)
    kernel_size: int = option(0, "PSF kernel side [pixel, odd]; 0 = automatic: 2 * ceil(kernel_radius_fwhm * FWHM) + 1", min=0, max=151)
    kernel_radius_fwhm: float = option(3.0, "Automatic kernel half-size in units of the stars' FWHM", min=1.0, max=10.0)
    kernel_size_min: int = option(15, "Smallest automatic kernel side [pixel]", min=5)
    kernel_size_max: int = option(51, "Largest automatic kernel side [pixel]", min=5)
    degree: int = option(2, "Degree of the polynomial variation of every kernel pixel over the CCD", min=0, max=5)
    stars_per_term: float = option(4.0, "Lower the degree until there are at least this many fitted stars per polynomial term", min=1.0)
    min_stars: int = option(8, "Fewest fitted (non-reserved) stars for a PSF model; fewer raises PsfError", min=1)
    max_stars: int = option(200, "Fit at most this many of the highest-S/N stars", min=1)
    n_iter: int = option(3, "Fit / clip iterations", min=1, max=20)
    clip_sigma: float = option(4.0, "Reject stars whose residual chi^2 is this many robust sigmas above the median", min=1.0)
    pixel_clip_sigma: float = option(5.0, "Ignore star pixels this many sigmas off the model (cosmic rays, neighbours)", min=2.0)
    resample_order: int = option(5, "Lanczos order of the stars' sub-pixel re-centring and of PixelPsf.draw (3 narrows a 3-px FWHM PSF by ~0.4 %)", choices=(3, 4, 5, 6, 7))
    model_error: float = option(0.02, "Fractional model error added to the pixel noise when clipping and weighting", min=0.0)

    def validate(self) -> None:
        super().validate()
        if self.kernel_size and self.kernel_size % 2 == 0:
            raise ConfigError(f"psf.kernel_size must be odd or 0 (automatic), got {self.kernel_size}")
        if self.moments_stamp_size % 2 == 0:
            raise ConfigError(f"psf.moments_stamp_size must be odd, got {self.moments_stamp_size}")
        if self.kernel_size_min > self.kernel_size_max:
            raise ConfigError("psf.kernel_size_min exceeds psf.kernel_size_max")
        if self.fwhm_min >= self.fwhm_max:
            raise ConfigError("psf.fwhm_min must be below psf.fwhm_max")


def kernel_size_for(fwhm: float, config: PsfConfig) -> int:
    """Kernel side [pixel, odd] for stars of Gaussian-equivalent ``fwhm`` [pixel] (see ``PsfConfig.kernel_size``)."""
    if config.kernel_size:
        return int(config.kernel_size)
    size = 2 * int(np.ceil(config.kernel_radius_fwhm * fwhm)) + 1
    lo = config.kernel_size_min | 1
    hi = config.kernel_size_max if config.kernel_size_max % 2 else config.kernel_size_max - 1
    return int(np.clip(size, lo, hi))


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
        h["PSFTYPE"] = (type(self).__name__, "PSF model class (snakedrp.meas.psf)")
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
        Degree actually fitted (lowered when stars are few).
    fwhm : float
        Gaussian-equivalent FWHM of the model at the CCD centre [pixel].
    """

    psf: PixelPsf
    stars: Table
    stars_used: np.ndarray
    kernel_size: int
    degree: int
    fwhm: float


def _xy_columns(table: Table) -> tuple[np.ndarray, np.ndarray]:
    for xname, yname in (("x", "y"), ("x_centroid", "y_centroid")):
        if xname in table.colnames and yname in table.colnames:
            return np.asarray(table[xname], float), np.asarray(table[yname], float)
    raise KeyError(f"star table needs x, y (or x_centroid, y_centroid) columns; has {table.colnames}")


#: Flux columns tried, in order, for a source's S/N (and the selection's isolation test).
FLUX_COLUMNS = (("flux", "flux_err"), ("psf_flux", "psf_flux_err"), ("calib_flux", "calib_flux_err"),
                ("ap_flux", "ap_flux_err"))


def _flux_columns(table: Table) -> tuple[np.ndarray, np.ndarray]:
    for name, err in FLUX_COLUMNS:
        if name in table.colnames and err in table.colnames:
            return np.asarray(table[name], float), np.asarray(table[err], float)
    raise KeyError(f"source table needs one of the flux column pairs {FLUX_COLUMNS}; has {table.colnames}")


def _bad_bits(names) -> int:
    from snakedrp.repo.exposure import mask_bits  # lazy: exposure imports this module

    return mask_bits(*names)


def _cutouts(array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    """Stack of ``(2 half + 1)``-sided cutouts of ``array`` centred on integer pixels (all inside)."""
    off = np.arange(-half, half + 1)
    return array[(iy[:, None] + off)[:, :, None], (ix[:, None] + off)[:, None, :]]


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


def build_psf(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, stars: Table,
              config: PsfConfig | None = None) -> PsfResult:
    """Fit a :class:`PixelPsf` to the non-reserved stars of ``stars``.

    Each star is re-centred on its Gaussian-weighted centroid by Lanczos resampling (order
    ``config.resample_order``; the shift is iterated until the resampled star's centroid is the
    central pixel, since the resampling does not preserve the first moment exactly) and divided
    by its PSF-fit flux.
    Every kernel pixel is then a weighted least-squares polynomial in (x, y) across the stars,
    with model-based weights ``F^2 / (sky variance + F * model)`` (data-based weights would
    bias the fluxes). Star pixels far off the model (cosmic rays, neighbours) are replaced by
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
        a flux pair (optional, orders the stars by S/N; see :data:`FLUX_COLUMNS`), ``reserved`` (optional),
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
    x_all, y_all = _xy_columns(stars)
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
        flux_col, err_col = _flux_columns(stars)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = flux_col / err_col
        cand = cand[np.argsort(-np.nan_to_num(snr[cand], nan=-np.inf), kind="stable")]
    except KeyError:
        pass                                   # no fluxes: keep the table's order
    cand = cand[: config.max_stars]
    if len(cand) < config.min_stars:
        raise PsfError(f"only {len(cand)} usable PSF stars (need psf.min_stars = {config.min_stars}) "
                       f"out of {n_all} selected ({int(reserved.sum())} reserved)")
    degree = config.degree
    while degree > 0 and len(cand) < config.stars_per_term * len(poly_terms(degree)):
        degree -= 1

    bad_bits = _bad_bits(config.bad_mask_planes)
    raw = _cutouts(image, ix0[cand], iy0[cand], hs).astype(float)
    var = _cutouts(variance, ix0[cand], iy0[cand], hs).astype(float)
    bad = (_cutouts(mask, ix0[cand], iy0[cand], hs) & bad_bits) != 0
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
    to_centre = _Shift(-dx, -dy, n_cand, n_raw, n_raw, order)            # star -> kernel grid
    to_star = _Shift(dx, dy, n_cand, n_raw, n_raw, order)                # kernel grid -> star

    x_center, x_scale = (nx - 1) / 2.0, max((nx - 1) / 2.0, 1.0)
    y_center, y_scale = (ny - 1) / 2.0, max((ny - 1) / 2.0, 1.0)
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
    return PsfResult(psf=psf, stars=out, stars_used=used, kernel_size=size, degree=degree, fwhm=fwhm)


def __getattr__(name):
    # ``from snakedrp.meas.psf import select_psf_stars`` works; imported lazily since psf_select imports this module
    if name == "select_psf_stars":
        from snakedrp.meas.psf_select import select_psf_stars

        return select_psf_stars
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
