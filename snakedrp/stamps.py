"""Operations on small images (stamps and PSF kernels): Lanczos sub-pixel shifts, adaptive
moments, Gaussian-weighted centroids and cutouts. Arrays are indexed ``[y, x]``; offsets in pixels.

Shared by the PSF models (snakedrp.repo.psf_model), PSF fitting and measurement (snakedrp.meas).
"""
from __future__ import annotations

import numpy as np


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
    return StackShift(dx, dy, n, ny, nx, order).apply(stack)


class StackShift:
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


def cutouts(array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    """Stack of ``(2 half + 1)``-sided cutouts of ``array`` centred on integer pixels (all inside)."""
    # indexing a strided view of every window copies each cutout's rows whole: ~20 times faster
    # than indexing the array with a (n, side, side) grid of pixel indices
    side = 2 * half + 1
    ix, iy = np.asarray(ix), np.asarray(iy)
    if ix.size == 0:
        return np.empty((0, side, side), array.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(array, (side, side))
    return windows[iy - half, ix - half]


def padded_cutouts(array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int, fill) -> np.ndarray:
    """Stack of ``(2 half + 1)``-sided cutouts centred on integer pixels; ``fill`` off the image."""
    ny, nx = array.shape
    ix, iy = np.asarray(ix), np.asarray(iy)
    side = 2 * half + 1
    inside = (ix >= half) & (ix < nx - half) & (iy >= half) & (iy < ny - half)
    if inside.all():
        return cutouts(array, ix, iy, half)
    out = np.empty((len(ix), side, side), array.dtype)
    if inside.any():
        out[inside] = cutouts(array, ix[inside], iy[inside], half)
    edge = ~inside
    off = np.arange(-half, half + 1)
    yy = iy[edge, None] + off
    xx = ix[edge, None] + off
    part = array[np.clip(yy, 0, ny - 1)[:, :, None], np.clip(xx, 0, nx - 1)[:, None, :]]
    outside = ((yy < 0) | (yy >= ny))[:, :, None] | ((xx < 0) | (xx >= nx))[:, None, :]
    out[edge] = np.where(outside, fill, part)
    return out
