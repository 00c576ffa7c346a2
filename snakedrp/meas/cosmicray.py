"""Cosmic-ray detection and repair with the PSF sharpness criterion.

A pixel is a cosmic ray when it is significant and sharper than any star can be: along at
least one of the four directions through it (horizontal, vertical, two diagonals), the mean
of its two neighbours falls short of what the PSF allows even at the brightest point of a star,
allowing for noise (the criterion of LSST's ``findCosmicRays``, after Shimasaku & Lupton's
PHOTO). With ``p`` the pixel, ``m`` the neighbour mean, ``sigma`` their noise and ``r`` the PSF's
neighbour-to-peak ratio in that direction (its smallest over the CCD)::

    psf_ratio_factor * r * (p - sharpness_sigma * sigma_p) > m + sharpness_sigma * sigma_m

Written here rather than calling astroscrappy (LA-Cosmic), which needs ~10 s per HSC CCD on
one core against a 3 s budget for the whole CCD. The fast path:

1. one comparison over the image keeps pixels above ``min_sigma`` times the lowest noise;
2. the exact significance and sharpness tests run on those pixels only (fancy indexing);
3. the hits are extended: their neighbours above ``extend_sigma`` are tested again with the
   cosmic-ray pixels replaced by the median of their clean neighbours (this finds the rest of a
   track, whose pixels are not sharp along the track), until nothing is added;
4. the result grows by ``grow`` pixels into faint pixels (below ``grow_max_sigma``) and into
   pixels that stand out from their clean neighbours by more than the PSF allows (the charge-
   sharing edge of a track), so that a hit next to a star never spreads into the star's core.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from snakedrp.meas.config import CosmicRayConfig
from snakedrp.repo.psf_model import PsfModel


class CosmicRayError(RuntimeError):
    """Cosmic-ray detection went wrong (implausibly many cosmic-ray pixels)."""


@dataclass(frozen=True)
class CosmicRayResult:
    """Result of :func:`find_cosmic_rays`.

    Attributes
    ----------
    cr_mask : ndarray of bool, shape (ny, nx)
        True at cosmic-ray pixels (including the grown margin).
    n_cr : int
        Number of cosmic rays (8-connected groups of flagged pixels).
    n_pixels : int
        Number of flagged pixels.
    """

    cr_mask: np.ndarray
    n_cr: int
    n_pixels: int


def psf_neighbour_ratios(psf: PsfModel, shape: tuple[int, int], grid: int = 3) -> np.ndarray:
    """Smallest neighbour-pair-mean to peak ratios of the PSF over the CCD.

    Returns an array of 4 ratios for the directions (0, 1), (1, 0), (1, 1), (1, -1) in
    ``(dy, dx)``: ``(k[c + d] + k[c - d]) / (2 k[c])`` of the kernel centred on a pixel (the
    sharpest a star can look), minimised over a ``grid x grid`` set of CCD positions.
    """
    ny, nx = shape
    out = np.full(4, np.inf)
    for y in np.linspace(0, ny - 1, grid) if grid > 1 else [(ny - 1) / 2]:
        for x in np.linspace(0, nx - 1, grid) if grid > 1 else [(nx - 1) / 2]:
            k = psf.kernel(float(x), float(y))
            c = k.shape[0] // 2
            for i, (dy, dx) in enumerate(_DIRECTIONS):
                out[i] = min(out[i], 0.5 * (k[c + dy, c + dx] + k[c - dy, c - dx]) / k[c, c])
    return out


_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_TILE = 8                     # side of the tiles on which _box_sums works [pixel]


class _Pixels:
    """Flat views of an image's planes and the per-pixel tests of the steps, at given pixels only.

    The steps touch a few thousand pixels of a ~10^7-pixel CCD, so nothing here builds an image-
    sized array except ``cr`` (zero pages, written only at cosmic rays). Cosmic-ray pixels can
    carry a repaired value (:meth:`set_repaired`), which :meth:`work` returns in their place.
    """

    def __init__(self, image, mask, bits, *, variance=None, cr=None, dtype=np.float32):
        self.ny, self.nx = image.shape
        self.value = np.ascontiguousarray(image, dtype=dtype).ravel()
        self.var = None if variance is None else np.ascontiguousarray(variance, dtype=np.float32).ravel()
        self.mask = np.ascontiguousarray(mask).ravel()
        self.bits = bits
        self.cr = np.zeros(self.value.size, bool) if cr is None else np.ascontiguousarray(cr, dtype=bool).ravel()
        self._rep_idx = np.zeros(0, np.intp)
        self._rep_val = np.zeros(0, np.float32)

    def bad(self, j):
        """True where pixels ``j`` (flat) have a ``bad_mask_planes`` bit."""
        if not self.bits:
            return np.zeros(np.shape(j), bool)
        return (self.mask[j] & self.bits) != 0

    def usable(self, j):
        """True where pixels ``j`` are neither cosmic rays nor bad."""
        return ~(self.cr[j] | self.bad(j))

    def set_repaired(self, idx, values):
        """Give the cosmic-ray pixels ``idx`` (all of them) the values :meth:`work` returns."""
        order = np.argsort(idx)
        self._rep_idx, self._rep_val = idx[order], np.asarray(values, np.float32)[order]

    def work(self, j):
        """Pixel values at ``j``, with the repaired values at cosmic-ray pixels."""
        v = self.value[j]
        hit = self.cr[j]
        if hit.any():
            v[hit] = self._rep_val[np.searchsorted(self._rep_idx, j[hit])]
        return v


def _sharp(px, idx, ratios, config, k, *, repaired=False, skip_bad=False):
    """True where the pixels ``idx`` (flat) pass the sharpness test in at least one direction.

    ``k`` is the noise allowance [sigma]; with ``repaired`` the neighbours' values are the
    repaired ones (:meth:`_Pixels.work`); with ``skip_bad`` directions with a bad neighbour are not
    tested.
    """
    nx = px.nx
    values = px.work if repaired else px.value.__getitem__
    p = px.value[idx].astype(float)
    peak = p - k * np.sqrt(px.var[idx].astype(float))
    hit = np.zeros(len(idx), bool)
    for (dy, dx), r in zip(_DIRECTIONS, ratios):
        o = dy * nx + dx
        m = 0.5 * (values(idx + o) + values(idx - o))
        lhs = config.psf_ratio_factor * r * peak
        # the noise term is >= 0: only pixels that beat the bare mean need it (a small fraction)
        maybe = np.flatnonzero(lhs > m)
        a, b = idx[maybe] + o, idx[maybe] - o
        sm = 0.5 * np.sqrt(px.var[a].astype(float) + px.var[b])
        ok = lhs[maybe] > m[maybe] + k * sm
        if skip_bad:
            ok &= ~(px.bad(a) | px.bad(b))
        hit[maybe[ok]] = True
    return hit


def _neighbours(idx, nx):
    """Flat indices of the 8 neighbours of each of ``idx`` (may repeat)."""
    return np.concatenate([idx + dy * nx + dx for dy, dx in _NEIGHBOURS])


def _interior(idx, nx, ny):
    x, y = idx % nx, idx // nx
    return (x > 0) & (x < nx - 1) & (y > 0) & (y < ny - 1)


def _above(values, threshold, chunk=1 << 18):
    """Flat indices where ``values > threshold``, a block at a time (no image-sized temporary)."""
    parts = [np.flatnonzero(values[s:s + chunk] > threshold) + s for s in range(0, values.size, chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, np.intp)


def _clean_median(px, idx):
    """Median of the usable 8-neighbours of each flat index (0 where there are none).

    The median, not the mean: next to a track the clean neighbours mix sky with the track's
    not-yet-flagged edge, and a mean would hide that edge; at a star's core the median of the
    neighbours stays close to the star's level, which keeps the core safe.
    """
    j = idx[None, :] + np.array([dy * px.nx + dx for dy, dx in _NEIGHBOURS])[:, None]
    # np.nanmedian along an axis of 8 is slow; sorting puts the NaNs (unusable) last instead
    stack = np.sort(np.where(px.usable(j), px.value[j], np.nan), axis=0)
    count = len(_NEIGHBOURS) - np.isnan(stack).sum(axis=0)
    cols = np.arange(len(idx))
    lo, hi = stack[np.maximum(count - 1, 0) // 2, cols], stack[count // 2 - (count == 0), cols]
    return np.where(count > 0, 0.5 * (lo + hi), 0.0).astype(np.float32)


def _psf_sigma(psf: PsfModel, shape) -> float:
    from snakedrp.stamps import kernel_moments

    s = kernel_moments(psf.kernel((shape[1] - 1) / 2, (shape[0] - 1) / 2))[0]
    return float(s) if np.isfinite(s) else 1.5


def _box_sums(px, idx, radius, fields, kernels):
    """Separable weighted sums over the ``(2 radius + 1)^2`` box around each of the pixels ``idx``.

    For each field ``f`` and 1-d kernel ``k`` (length ``2 radius + 1``), returns per pixel ``p``
    the sum of ``k[dy] k[dx] f(p + (dy, dx))``. ``fields(j, inside)`` gives the field values at
    flat pixels ``j`` (any shape; ``inside`` False where off the image, ``j`` 0 there).

    Computed on small tiles around the pixels (``_TILE`` square, plus the box margin), one banded
    matrix product per axis: the pixels come in clumps (a track and its ring) whose boxes
    overlap, so this does far less work than gathering every pixel's box.
    """
    nx, ny, t = px.nx, px.ny, _TILE
    y, x = np.divmod(idx, nx)
    ntx = (nx - 1) // t + 1
    keys, which = np.unique((y // t) * ntx + x // t, return_inverse=True)
    y0, x0 = (keys // ntx) * t - radius, (keys % ntx) * t - radius
    side = t + 2 * radius
    off = np.arange(side)
    yy, xx = y0[:, None, None] + off[:, None], x0[:, None, None] + off
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    j = np.where(inside, yy * nx + xx, 0)
    # tile-local output position of each pixel (the sums come out transposed, [tile, x, y])
    at = (which, x - x0[which] - radius, y - y0[which] - radius)
    band = np.arange(side)[:, None] - np.arange(t) - radius          # dx of input column, output column
    out = []
    for f, k in zip(fields(j, inside), kernels):
        w = np.where(np.abs(band) <= radius, np.asarray(k, float)[np.clip(band + radius, 0, 2 * radius)], 0.0)
        rows = np.asarray(f, float) @ w                                 # [tile, y, x]: summed along x
        out.append((rows.transpose(0, 2, 1) @ w)[at])                   # [tile, x, y]: and along y
    return out


def _smooth_snr(px, idx, sigma):
    """S/N of the PSF-like (Gaussian, ``sigma``) weighted sum of the usable pixels around each index.

    A measure of whether a pixel sits in a significant smooth source (a star, a galaxy) once the
    cosmic-ray pixels are left out. The box is ``2 * sigma`` (2 to 5 pixels) in radius.
    """
    if len(idx) == 0:
        return np.zeros(0)
    radius = int(min(max(np.ceil(2 * sigma), 2), 5))
    g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)

    def fields(j, inside):
        ok = inside & px.usable(j)
        return np.where(ok, px.value[j], 0.0), np.where(ok, px.var[j], 0.0)

    total, noise = _box_sums(px, idx, radius, fields, (g, g * g))
    return total / np.sqrt(np.maximum(noise, 1e-30))


def count_groups(flat_idx: np.ndarray, nx: int) -> int:
    """Number of 8-connected groups among flat pixel indices of an image ``nx`` wide."""
    idx = np.unique(flat_idx)
    if len(idx) == 0:
        return 0
    rows, cols = [], []
    x = idx % nx
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        j = idx + dy * nx + dx
        pos = np.searchsorted(idx, j)
        pos = np.minimum(pos, len(idx) - 1)
        same = (idx[pos] == j) & (x + dx >= 0) & (x + dx < nx)
        rows.append(np.nonzero(same)[0])
        cols.append(pos[same])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(len(idx), len(idx)))
    return int(connected_components(graph, directed=False)[0])


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, psf: PsfModel,
                     config: CosmicRayConfig | None = None) -> CosmicRayResult:
    """Find cosmic-ray pixels (see the module docstring for the criterion and the fast path).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image [electrons].
    variance : ndarray, shape (ny, nx)
        Per-pixel variance [electrons^2], including the sources' Poisson noise.
    mask : ndarray of int, shape (ny, nx)
        Bit mask; ``config.bad_mask_planes`` pixels and their neighbours are never flagged.
    psf : PsfModel
        The PSF model; its sharpest neighbour-to-peak ratios bound what a star can look like.
    config : CosmicRayConfig

    Returns
    -------
    CosmicRayResult

    Raises
    ------
    CosmicRayError
        More than ``config.max_cr_fraction`` of the pixels flagged.
    """
    from snakedrp.repo.exposure import mask_bits

    config = config or CosmicRayConfig()
    ny, nx = image.shape
    px = _Pixels(image, mask, mask_bits(*config.bad_mask_planes) if config.bad_mask_planes else 0,
                 variance=variance)
    value, var, cr = px.value, px.var, px.cr
    ratios = psf_neighbour_ratios(psf, (ny, nx), config.psf_grid)

    # 1. cheap pass: above min_sigma times a low quantile of the noise (a scalar threshold)
    sample = var[:: max(len(var) // 20000, 1)]
    sample = sample[sample > 0]
    floor = float(np.quantile(sample, 0.01)) if sample.size else 0.0
    threshold = max(config.min_sigma * np.sqrt(floor), config.min_signal)
    idx = _above(value, threshold)
    idx = idx[_interior(idx, nx, ny)]

    # 2. exact significance and sharpness on the candidates, away from bad pixels
    p = value[idx]
    keep = (p > config.min_sigma * np.sqrt(np.maximum(var[idx], 0))) & (p > config.min_signal)
    idx = idx[keep]
    seeds = idx[_sharp(px, idx, ratios, config, config.sharpness_sigma)]
    if px.bits:
        near_bad = px.bad(seeds)
        for dy, dx in _NEIGHBOURS:
            near_bad |= px.bad(seeds + dy * nx + dx)
        seeds = seeds[~near_bad]

    # 3. extension: re-test the neighbours of cosmic-ray pixels with those pixels repaired
    cr[seeds] = True
    all_cr = seeds
    new = seeds
    for _ in range(config.max_extend_iter):
        if len(new) == 0:
            break
        px.set_repaired(all_cr, _clean_median(px, all_cr))
        cand = np.unique(_neighbours(new, nx))
        cand = cand[~cr[cand] & _interior(cand, nx, ny)]
        cand = cand[~px.bad(cand)]
        sig = value[cand] > config.extend_sigma * np.sqrt(np.maximum(var[cand], 0))
        cand = cand[sig]
        new = cand[_sharp(px, cand, ratios, config, config.extend_sharpness_sigma, repaired=True, skip_bad=True)]
        cr[new] = True
        all_cr = np.concatenate([all_cr, new])

    # 4. grow: into faint pixels that are not part of a significant smooth source, and into
    #    brighter ones that stand out from their clean neighbours by more than a star could (a
    #    track's charge-sharing edge); a star's core pixel next to a hit does neither. Border
    #    pixels' flat neighbours wrap: grow from interior ones.
    r_min = config.psf_ratio_factor * float(ratios.min())
    psf_sigma = _psf_sigma(psf, (ny, nx))
    for _ in range(config.grow):
        ring = np.unique(_neighbours(all_cr[_interior(all_cr, nx, ny)], nx))
        ring = ring[~cr[ring]]
        ring = ring[~px.bad(ring)]
        bright_level = config.grow_max_sigma * np.sqrt(np.maximum(var[ring], 0))
        faint = ring[value[ring] < bright_level]
        faint = faint[_smooth_snr(px, faint, psf_sigma) < config.source_sigma]
        bright = ring[(value[ring] >= bright_level) & _interior(ring, nx, ny)]
        allowance = config.grow_sharpness_sigma * np.sqrt(np.maximum(var[bright], 0))
        bright = bright[r_min * (value[bright] - allowance) > _clean_median(px, bright)]
        ring = np.concatenate([faint, bright])
        cr[ring] = True
        all_cr = np.concatenate([all_cr, ring])

    # every step adds only pixels not yet flagged, so all_cr has no repeats
    n_pixels = len(all_cr)
    if n_pixels > config.max_cr_fraction * ny * nx:
        raise CosmicRayError(f"{n_pixels} cosmic-ray pixels ({100 * n_pixels / (ny * nx):.1f} % of the image, "
                             f"limit cosmic_ray.max_cr_fraction = {config.max_cr_fraction}): "
                             "is the variance plane or the PSF wrong?")
    return CosmicRayResult(cr_mask=cr.reshape(ny, nx), n_cr=count_groups(all_cr, nx), n_pixels=n_pixels)


def repair_cosmic_rays(image: np.ndarray, mask: np.ndarray, cr_mask: np.ndarray,
                       psf: PsfModel | None = None,
                       config: CosmicRayConfig | None = None, *,
                       in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate over cosmic-ray pixels and set their CR mask bit.

    As in the LSST stack, the CR plane itself marks these interpolated pixels (INTRP is left to
    defects and saturation).

    Each flagged pixel becomes the Gaussian-weighted mean (sigma: the PSF's, 1.5 pixels without a
    PSF) of the clean pixels (neither cosmic ray nor ``config.bad_mask_planes``) within
    ``config.interp_radius``, or twice that where there are none, or 0 (the background).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image [electrons]; not modified unless ``in_place``.
    mask : ndarray of int, shape (ny, nx)
        Bit mask; not modified unless ``in_place``.
    cr_mask : ndarray of bool, shape (ny, nx)
        From :func:`find_cosmic_rays`.
    psf : PsfModel, optional
    config : CosmicRayConfig
    in_place : bool
        Repair ``image`` and ``mask`` themselves (only the cosmic-ray pixels change) instead of
        copies: saves two image-sized copies when the caller owns the arrays.

    Returns
    -------
    image, mask : ndarray
        Repaired copies, or ``image`` and ``mask`` themselves with ``in_place``.
    """
    from snakedrp.repo.exposure import mask_bit, mask_bits

    config = config or CosmicRayConfig()
    ny, nx = image.shape
    out = image if in_place else np.array(image, copy=True)
    new_mask = mask if in_place else np.array(mask, copy=True)
    flat = np.flatnonzero(cr_mask)            # far faster than a 2-d np.nonzero
    if len(flat) == 0:
        return out, new_mask
    ys, xs = np.divmod(flat, nx)
    sigma = _psf_sigma(psf, (ny, nx)) if psf is not None else 1.5
    # only the cosmic-ray pixels' neighbourhoods are read; out[cr] is written after all reads
    px = _Pixels(image, mask, mask_bits(*config.bad_mask_planes) if config.bad_mask_planes else 0,
                 cr=cr_mask, dtype=None)
    repaired = np.zeros(len(flat))
    todo = np.arange(len(flat))

    def fields(j, inside):
        ok = inside & px.usable(j)
        return np.where(ok, px.value[j], 0.0), ok

    for radius in (config.interp_radius, 2 * config.interp_radius):
        # the pixel itself is a cosmic ray, hence never usable: the box need not leave it out
        g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        total, weight = _box_sums(px, flat[todo], radius, fields, (g, g))
        done = weight > 0
        repaired[todo[done]] = total[done] / weight[done]
        todo = todo[~done]
        if len(todo) == 0:
            break
    out[ys, xs] = repaired                    # 0 (the background) where no clean pixel was found
    new_mask[ys, xs] |= mask_bit("CR")
    return out, new_mask
