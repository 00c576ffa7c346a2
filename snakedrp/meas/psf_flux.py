"""PSF model images at source positions and PSF-fit fluxes, for all sources at once.

PSF fluxes are unweighted least-squares amplitudes of the unit-flux PSF model (normalised over
the whole kernel), as LSST's PsfFlux: per-pixel variance weights would bias bright stars low.
Children of one deblended parent whose fit boxes overlap are fitted simultaneously.
Stamps are stacks indexed ``[source, y, x]``; positions zero-based pixels.
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from snakedrp.repo.psf_model import PsfModel
from snakedrp.stamps import kernel_moments, shift_stack


class PsfGrid:
    """The PSF kernel on a regular grid of CCD positions, for vectorised models and widths."""

    def __init__(self, psf: PsfModel, shape: tuple[int, int], spacing: float):
        ny, nx = shape
        self.gx = np.linspace(0.0, nx - 1.0, max(2, int(math.ceil((nx - 1) / spacing)) + 1))
        self.gy = np.linspace(0.0, ny - 1.0, max(2, int(math.ceil((ny - 1) / spacing)) + 1))
        kernels = np.array([[psf.kernel(x, y) for x in self.gx] for y in self.gy], float)
        self.kernels = kernels                                   # (n_gy, n_gx, n, n)
        sig = np.array([[kernel_moments(k)[0] for k in row] for row in kernels])
        if not np.isfinite(sig).all():
            fallback = np.nanmedian(sig) if np.isfinite(sig).any() else 2.0
            sig = np.where(np.isfinite(sig), sig, fallback)
        self.sigma_nodes = sig

    #: grids made by :meth:`of`, per PSF model (weakly held) and (shape, spacing)
    _made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, psf: PsfModel, shape: tuple[int, int], spacing: float) -> "PsfGrid":
        """``PsfGrid(psf, shape, spacing)``, made once per model while the model lives.

        A CCD's PSF model measures the image several times (characterization's PSF stars, the
        passes of calibration), and the kernels and adaptive moments at the nodes, ~15 ms on an
        HSC CCD, are the same each time: PSF models are not modified once made, nor is a grid.
        """
        key = (tuple(int(s) for s in shape), float(spacing))
        try:
            grids = cls._made.setdefault(psf, {})
        except TypeError:  # a model that cannot be hashed or weakly referenced
            return cls(psf, shape, spacing)
        if key not in grids:
            grids[key] = cls(psf, shape, spacing)
        return grids[key]

    def _bilinear(self, x, y):
        fx = np.interp(x, self.gx, np.arange(len(self.gx)))
        fy = np.interp(y, self.gy, np.arange(len(self.gy)))
        i0 = np.clip(np.floor(fx).astype(int), 0, len(self.gx) - 2)
        j0 = np.clip(np.floor(fy).astype(int), 0, len(self.gy) - 2)
        tx, ty = fx - i0, fy - j0
        corners = [(j0, i0, (1 - ty) * (1 - tx)), (j0, i0 + 1, (1 - ty) * tx),
                   (j0 + 1, i0, ty * (1 - tx)), (j0 + 1, i0 + 1, ty * tx)]
        return corners

    def sigma(self, x, y) -> np.ndarray:
        """Adaptive-moment sigma of the PSF at ``(x, y)`` [pixel]."""
        return sum(w * self.sigma_nodes[j, i] for j, i, w in self._bilinear(x, y))

    def models(self, xc, yc, ix, iy, half: int) -> np.ndarray:
        """Unit-flux PSF images of sources at ``(xc, yc)`` on the boxes ``[iy +- half, ix +- half]``: (N, s, s)."""
        n = self.kernels.shape[-1]
        size = 2 * half + 1
        big = size + 6                                           # Lanczos-3 support on both sides
        pad = max(0, (big - n + 1) // 2)
        kernels = np.pad(self.kernels, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else self.kernels
        c = kernels.shape[-1] // 2
        sub = kernels[:, :, c - half - 3: c + half + 4, c - half - 3: c + half + 4]
        stack = sum(w[:, None, None] * sub[j, i] for j, i, w in self._bilinear(xc, yc))
        shifted = shift_stack(stack, xc - ix, yc - iy)
        return shifted[:, 3:-3, 3:-3]


def place_centred(stamps: np.ndarray, half: int) -> np.ndarray:
    """Centred stamps (N, n, n) cut or zero-padded to (N, 2 half + 1, 2 half + 1) about their centre."""
    n = stamps.shape[-1]
    c = n // 2
    if n >= 2 * half + 1:
        return stamps[:, c - half: c + half + 1, c - half: c + half + 1]
    p = half - c
    return np.pad(stamps, ((0, 0), (p, p), (p, p)))


def draw_psf_models(psf: PsfModel, xc, yc, ix, iy, half: int) -> np.ndarray:
    """:meth:`PsfModel.draw` per source, placed on the boxes ``[iy +- half, ix +- half]``.

    The two models of this package that override ``draw`` are drawn in bulk with the same
    arithmetic (a per-source Python loop costs ~0.1 ms a source): :class:`GaussianPsf` (its
    pixel-integrated Gaussian) and :class:`PixelPsf` (its Lanczos-``resample_order`` shift of the
    kernel, cropped to the box plus the Lanczos support before shifting).
    """
    from snakedrp.repo.psf_model import GaussianPsf, PixelPsf

    size = 2 * half + 1
    n_src = len(xc)
    xc, yc = np.asarray(xc, float), np.asarray(yc, float)
    if type(psf) is GaussianPsf and n_src:
        from scipy.special import erf

        r = np.arange(psf.size) - psf.size // 2
        s = psf.sigma * np.sqrt(2.0)
        dx = (xc - np.floor(xc + 0.5))[:, None]
        dy = (yc - np.floor(yc + 0.5))[:, None]
        ex = 0.5 * (erf((r - dx + 0.5) / s) - erf((r - dx - 0.5) / s))
        ey = 0.5 * (erf((r - dy + 0.5) / s) - erf((r - dy - 0.5) / s))
        k = ey[:, :, None] * ex[:, None, :]
        k /= k.sum(axis=(1, 2), keepdims=True)
        return place_centred(k, half)
    if type(psf) is PixelPsf and n_src:
        order = psf.resample_order
        kernels = psf.kernels(xc, yc)
        # box pixels see taps up to `order` pixels away: crop the kernel to the box plus that
        # margin before shifting (draw shifts the whole kernel, zero beyond it, then cuts the box)
        m = min(half + order, psf.size // 2)
        dx = xc - np.floor(xc + 0.5)
        dy = yc - np.floor(yc + 0.5)
        shifted = shift_stack(place_centred(kernels, m), dx, dy, order=order)
        return np.ascontiguousarray(place_centred(shifted, half))
    out = np.zeros((n_src, size, size))
    for k in range(len(xc)):
        stamp, x0, y0 = psf.draw(float(xc[k]), float(yc[k]))
        bx, by = ix[k] - half, iy[k] - half
        sy0, sx0 = max(by, y0), max(bx, x0)
        sy1, sx1 = min(by + size, y0 + stamp.shape[0]), min(bx + size, x0 + stamp.shape[1])
        if sy1 > sy0 and sx1 > sx0:
            out[k, sy0 - by: sy1 - by, sx0 - bx: sx1 - bx] = stamp[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0]
    return out


# ---------------------------------------------------------------- PSF fluxes
def psf_fit(data, var, good, model):
    """Unweighted linear least-squares amplitude of ``model`` (N, s, s) over ``good`` pixels.

    Unweighted (as LSST's PsfFlux): variance-plane weights include the source's own photon noise,
    which correlates with the data and biases bright fluxes low.
    """
    pm = model * good
    norm = (pm * model).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = (pm * data).sum(axis=(1, 2)) / norm
        err = np.sqrt((pm**2 * var).sum(axis=(1, 2))) / norm
        resid = (data - flux[:, None, None] * model) ** 2 / np.where(var > 0, var, np.inf)
        chi2 = (resid * good).sum(axis=(1, 2)) / np.maximum(good.sum(axis=(1, 2)) - 1, 1)
    return flux, err, chi2, norm


def joint_psf_fits(groups, data, var, bad_img, seg, ids, models, ix, iy, half):
    """Simultaneous PSF amplitudes of each group of blended children: {row: (flux, err)}."""
    ny, nx = data.shape
    size = 2 * half + 1
    out = {}
    for rows in groups:
        x0 = max(int(ix[rows].min()) - half, 0)
        y0 = max(int(iy[rows].min()) - half, 0)
        x1 = min(int(ix[rows].max()) + half + 1, nx)
        y1 = min(int(iy[rows].max()) + half + 1, ny)
        d = data[y0:y1, x0:x1].astype(float)
        v = var[y0:y1, x0:x1].astype(float)
        s = seg[y0:y1, x0:x1]
        good = ~bad_img[y0:y1, x0:x1] & ((s == 0) | np.isin(s, ids[rows]))
        m = np.zeros((len(rows), y1 - y0, x1 - x0))
        for k, r in enumerate(rows):
            bx, by = ix[r] - half, iy[r] - half
            sy0, sx0 = max(by, y0), max(bx, x0)
            sy1, sx1 = min(by + size, y1), min(bx + size, x1)
            m[k, sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = models[r, sy0 - by: sy1 - by, sx0 - bx: sx1 - bx]
        mg = m[:, good]
        a = mg @ mg.T
        try:
            ainv = np.linalg.inv(a)
        except np.linalg.LinAlgError:
            continue
        flux = ainv @ (mg @ d[good])
        cov = ainv @ ((mg * v[good]) @ mg.T) @ ainv
        for k, r in enumerate(rows):
            out[int(r)] = (float(flux[k]), float(np.sqrt(max(cov[k, k], 0.0))))
    return out


def blend_groups(parent, ix, iy, half) -> list[np.ndarray]:
    """Rows of children of one parent whose fit boxes overlap, linked transitively (>= 2 rows each)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    rows = np.nonzero(parent > 0)[0]
    if len(rows) < 2:
        return []
    pts = np.column_stack([ix[rows], iy[rows]]).astype(float)
    pairs = cKDTree(pts).query_pairs(2 * half + 1, p=np.inf, output_type="ndarray")
    if len(pairs) == 0:
        return []
    pairs = pairs[parent[rows[pairs[:, 0]]] == parent[rows[pairs[:, 1]]]]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(rows), len(rows)))
    n_comp, labels = connected_components(graph, directed=False)
    counts = np.bincount(labels, minlength=n_comp)
    order = np.argsort(labels, kind="stable")
    splits = np.split(order, np.cumsum(counts)[:-1])
    return [rows[s] for s in splits if len(s) > 1]


def psf_model_image(psf: PsfModel, shape: tuple[int, int], x, y, flux, *, half: int | None = None,
                    grid_spacing: float = 512.0, stamps: dict | None = None) -> np.ndarray:
    """Image of point sources: the sum of ``flux`` x the unit-flux PSF model at ``(x, y)``.

    Parameters
    ----------
    psf : PsfModel
    shape : (ny, nx)
        Image shape [pixel].
    x, y : array_like
        Zero-based source positions [pixel].
    flux : array_like
        PSF-model amplitudes [electrons] (``psf_flux`` before any aperture correction).
    half : int, optional
        Half-side of each model box [pixel]; default the PSF kernel's half-side.
    grid_spacing : float
        Grid of :class:`PsfGrid` for models without their own ``draw`` [pixel].
    stamps : dict, optional
        Unit-flux model stamps already drawn, by ``(x, y, half)``; the missing ones are drawn and
        added. A CCD's calibration subtracts the models of mostly the same sources at the same
        positions several times, and drawing them is most of the cost. Use one dict per PSF model
        and image shape.

    Returns
    -------
    ndarray of float32, shape (ny, nx)
    """
    ny, nx = shape
    x, y, flux = (np.asarray(v, float) for v in (x, y, flux))
    ok = np.isfinite(x + y + flux)
    x, y, flux = x[ok], y[ok], flux[ok]
    if not len(x):
        return np.zeros((ny, nx), np.float32)
    if half is None:
        half = psf.kernel(nx / 2.0, ny / 2.0).shape[0] // 2
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)

    def draw(rows):
        if type(psf).draw is PsfModel.draw:
            return PsfGrid.of(psf, shape, grid_spacing).models(x[rows], y[rows], ix[rows], iy[rows], half)
        return draw_psf_models(psf, x[rows], y[rows], ix[rows], iy[rows], half)

    if stamps is None:
        models = draw(slice(None))
    else:
        keys = [(a, b, half) for a, b in zip(x.tolist(), y.tolist())]
        missing = np.array([k for k, key in enumerate(keys) if key not in stamps], np.int64)
        if len(missing):
            for k, stamp in zip(missing.tolist(), draw(missing)):
                stamps[keys[k]] = stamp
        models = np.stack([stamps[key] for key in keys])
    values = models * flux[:, None, None]
    # each box added where it lies on the image, in turn, in float64 so that overlapping boxes
    # add up as a scatter-add would and are rounded once: a few microseconds a box, where
    # np.bincount over the whole image also makes an index array of every box pixel
    acc = np.zeros((ny, nx))
    side = 2 * half + 1
    y0s, x0s = iy - half, ix - half
    for k, (y0, x0) in enumerate(zip(y0s.tolist(), x0s.tolist())):
        sy, sx = max(0, -y0), max(0, -x0)
        ey, ex = min(side, ny - y0), min(side, nx - x0)
        if ey > sy and ex > sx:
            acc[y0 + sy:y0 + ey, x0 + sx:x0 + ex] += values[k, sy:ey, sx:ex]
    return acc.astype(np.float32)
