"""Source detection and deblending (sep, i.e. SExtractor's extraction and multi-threshold deblender).

The background-subtracted image is filtered with a Gaussian of the PSF's width (the matched
filter for point sources; by default its side scales with the PSF, ``filter_half_width`` sigmas
each side, see :func:`detection_kernel`) and thresholded at
``threshold`` times the noise of the *filtered* image, so ``threshold`` is a point-source S/N.
Connected pixels above threshold form a parent footprint; sep's deblender splits it into
children, and those children are the rows of the output. Positions are windowed centroids
(SExtractor's XWIN/YWIN, Gaussian weight of the PSF's sigma), which for bright stars scatter
several times less than isophotal barycentres.

A second pass, :func:`detect_in_residual`, detects on the image with the bright point sources'
PSF models subtracted: the faint stars in their wings, which the deblender never splits off
(its smallest child is ``deblend_cont`` of the whole blend), become children of their footprints.

The PSF width the filter needs comes from the exposure itself: :func:`estimate_psf_sigma` takes
the adaptive moments of the brightest unsaturated peaks (a pass over the pixels above a high
threshold, no filtering and no extraction) and returns the size of the stellar locus among them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sep
from astropy.table import Table
from scipy import ndimage

from snakedrp.repo.exposure import mask_bit, mask_bits
from snakedrp.meas.columns import append_rows
from snakedrp.meas.config import DetectionConfig, ResidualDetectionConfig

#: Bits of the ``flags`` column: sep's extraction flags plus our own.
DETECTION_FLAGS: dict[str, int] = {
    "merged": int(sep.OBJ_MERGED),          # the object came out of the deblender
    "truncated": int(sep.OBJ_TRUNC),        # the footprint touches the image border
    "deblend_overflow": int(sep.OBJ_DOVERFLOW),
    "singular": int(sep.OBJ_SINGU),         # singular second moments
    "window_failed": 256,                   # x, y are the isophotal barycentre, not windowed
}


@dataclass(frozen=True)
class DetectionResult:
    """What :func:`detect_sources` finds.

    Attributes
    ----------
    sources : Table
        One row per (deblended) source; columns listed in :func:`detect_sources`.
    segmentation : ndarray of int32, shape (ny, nx)
        Footprints: pixel value = the ``id`` of the source owning it, 0 for sky.
    mask : ndarray of int32, shape (ny, nx)
        Copy of the input mask with DETECTED (and DETECTED_NEGATIVE) replaced by this detection.
    n_negative : int
        Number of negative detections (0 unless ``detect_negative``).
    """

    sources: Table
    segmentation: np.ndarray
    mask: np.ndarray
    n_negative: int = 0


def unusable_pixels(data: np.ndarray, var: np.ndarray, mask: np.ndarray, planes) -> np.ndarray:
    """Boolean image: pixels in mask ``planes``, with non-finite data, or without a positive finite variance."""
    bad = (mask & mask_bits(*planes)) != 0
    positive = np.greater(var, 0)                # False also for NaN
    np.logical_or(bad, ~positive, out=bad)
    # non-finite values are rare: test first, mark only if there are any
    if not np.isfinite(var).all():
        bad |= ~np.isfinite(var)
    if not np.isfinite(data).all():
        bad |= ~np.isfinite(data)
    return bad


def gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    """Normalised (sum 1) circular Gaussian of ``sigma`` pixels sampled on a ``size x size`` grid."""
    r = np.arange(size) - size // 2
    k = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sigma**2)
    return (k / k.sum()).astype(np.float32)


def detection_kernel(sigma: float, config: "DetectionConfig") -> np.ndarray | None:
    """The matched filter of a detection: a Gaussian of ``sigma`` pixels, or None without filtering.

    Its side is ``config.filter_size`` when positive, else (``-1``) ``2 ceil(filter_half_width sigma) + 1``
    capped at ``filter_size_max`` (and at least 3), so the filter follows the seeing.
    """
    if config.filter_size == 0:
        return None
    if config.filter_size > 0:
        size = int(config.filter_size)
    else:
        size = min(2 * int(math.ceil(config.filter_half_width * float(sigma))) + 1, int(config.filter_size_max))
        size = max(size, 3)
    return gaussian_kernel(float(sigma), size)


@dataclass(frozen=True)
class PsfSizeEstimate:
    """The PSF width :func:`estimate_psf_sigma` found.

    Attributes
    ----------
    sigma : float
        Adaptive-moment (Gaussian-equivalent) sigma of the stellar locus [pixel]; the fallback
        when too few stars were measured.
    n_peaks : int
        Unsaturated peaks whose moments were measured.
    n_locus : int
        Of them, those in the densest size interval (the stars); 0 when the fallback was used.
    """

    sigma: float
    n_peaks: int
    n_locus: int


def estimate_psf_sigma(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, *, fallback: float,
                       peak_snr: float = 10.0, n_peaks: int = 60, stamp_size: int = 41, sigma_min: float = 0.6,
                       min_stars: int = 5, max_ellipticity: float = 0.5,
                       bad_mask_planes=("BAD", "SAT", "NO_DATA", "EDGE", "SUSPECT")) -> PsfSizeEstimate:
    """Quick PSF width of an exposure from the adaptive moments of its brightest unsaturated peaks.

    Local maxima among the pixels above ``peak_snr`` times their noise (no filtering: one pass
    over the pixels) with no masked pixel in their 5x5 box are taken brightest first, up to
    ``n_peaks``, one per object: a peak within half a stamp of a brighter one tried is a
    secondary maximum of the same object (a cosmic-ray track, a bright star's wing) or a blend,
    and is skipped. GalSim adaptive moments on ``stamp_size`` stamps (other peaks of the stamp not
    masked, so blends come out large) give a size each; sizes with a distortion ``|e|`` above
    ``max_ellipticity`` (axis ratio below ~0.58 at 0.5: cosmic-ray tracks, trails; no PSF is
    that elongated) are dropped. Bright stars share one size, galaxies and blends are larger,
    cosmic rays smaller: the size is the median of the densest third of the sizes above
    ``sigma_min`` (the shortest interval of ln size holding a third of them).

    Parameters
    ----------
    image, variance : ndarray, shape (ny, nx)
        Background-subtracted image [electrons] and its variance [electrons^2].
    mask : ndarray of int, shape (ny, nx)
    fallback : float
        Returned sigma [pixel] when fewer than ``min_stars`` sizes are measured.

    Returns
    -------
    PsfSizeEstimate
    """
    import galsim

    data = np.asarray(image)
    ny, nx = data.shape
    # the mask is looked at only around the peaks tried: no image-sized pass for it
    mask = np.asarray(mask)
    bad_bits = mask_bits(*bad_mask_planes)
    # a block of rows at a time: no image-sized temporaries
    rows = 256
    above = []
    with np.errstate(invalid="ignore"):
        for s in range(0, ny, rows):
            block = data[s:s + rows] > peak_snr * np.sqrt(np.maximum(variance[s:s + rows], 0))
            above.append(np.flatnonzero(block) + s * nx)
    iy, ix = np.divmod(np.concatenate(above), nx)
    inner = (ix >= 2) & (ix < nx - 2) & (iy >= 2) & (iy < ny - 2)
    iy, ix = iy[inner], ix[inner]
    value = data[iy, ix]
    peak = np.ones(iy.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                peak &= value >= data[iy + dy, ix + dx]
    iy, ix, value = iy[peak], ix[peak], value[peak]
    order = np.argsort(-value, kind="stable")
    half = stamp_size // 2
    sizes = []
    tried_x, tried_y = [], []
    for k in order:
        if len(sizes) >= n_peaks or len(tried_x) >= 4 * n_peaks:
            break
        y, x = int(iy[k]), int(ix[k])
        if (mask[y - 2:y + 3, x - 2:x + 3] & bad_bits).any():
            continue
        if tried_x and np.any((np.abs(np.subtract(tried_x, x)) <= half) & (np.abs(np.subtract(tried_y, y)) <= half)):
            continue
        tried_x.append(x)
        tried_y.append(y)
        y0, y1, x0, x1 = max(y - half, 0), min(y + half + 1, ny), max(x - half, 0), min(x + half + 1, nx)
        stamp = np.where((mask[y0:y1, x0:x1] & bad_bits) != 0, 0.0, data[y0:y1, x0:x1]).astype(np.float64)
        res = galsim.hsm.FindAdaptiveMom(galsim.Image(stamp), guess_sig=max(float(fallback), 1.0),
                                         guess_centroid=galsim.PositionD(x - x0 + 1, y - y0 + 1), strict=False)
        if (res.moments_status == 0 and res.moments_sigma > sigma_min
                and res.observed_shape.e <= max_ellipticity):
            sizes.append(float(res.moments_sigma))
    if len(sizes) < min_stars:
        return PsfSizeEstimate(float(fallback), len(sizes), 0)
    s = np.sort(np.log(sizes))
    k = max(min_stars // 2 + 1, len(s) // 3)
    widths = s[k - 1:] - s[:len(s) - k + 1]
    i = int(np.argmin(widths))
    return PsfSizeEstimate(float(np.exp(np.median(s[i:i + k]))), len(sizes), k)


def grow_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean image by a ``(2 radius + 1)``-sided square (separable shifts; faster than ndimage here)."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for s in range(1, radius + 1):
            if s >= n:
                break
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - s), slice(s, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _extract(data, var, bad, threshold, config, kernel, *, deblend=True, pixel_stack=None):
    if kernel is not None:
        # sep's 'conv' mode (a 'matched' run would convolve the variance too, twice the time) compares
        # the filtered pixel with thresh * sqrt(var): rescale so the threshold is the filtered S/N.
        thresh = threshold * float(np.sqrt((kernel**2).sum()) / np.abs(kernel).sum())
    else:
        thresh = threshold
    sep.set_extract_pixstack(int(config.pixel_stack if pixel_stack is None else pixel_stack))
    try:
        return sep.extract(
            data, thresh, var=var, mask=bad, minarea=config.min_area, filter_kernel=kernel,
            filter_type="conv", deblend_nthresh=config.deblend_nthresh,
            deblend_cont=config.deblend_cont if deblend else 1.0,
            clean=config.clean if deblend else False, clean_param=config.clean_param,
            segmentation_map=True)
    except Exception as exc:  # sep raises a bare Exception on internal errors
        raise RuntimeError(f"sep.extract failed ({exc}); if the pixel buffer overflowed, raise "
                           f"detection.pixel_stack (now {config.pixel_stack}) or check the background") from exc


def _extract_in_windows(residual, variance, mask, model, boxes, owners, seg, config, rcfg, kernel, *,
                        winpos_reach: int, max_rounds: int = 5):
    """sep extraction of the residual in one window around each box of ``boxes`` (half-open
    ``y0, y1, x0, x1``), keeping the objects whose peak lies in that box's footprint (segmentation
    value ``owners[k]``): the objects the whole-image extraction finds there.

    A residual detection is kept only with its peak in a subtracted footprint, so only the
    footprints' boxes, grown, need extracting (a quarter of an HSC CCD, in ~100 µs a window with
    sep's pixel buffer sized to the window). An object is what the whole-image extraction finds
    when its connected region above threshold, and that region's neighbours, see exactly filtered
    pixels, i.e. stay ``kernel half + 1`` pixels from the window's inner edges (those that are not
    the image's), and when the window holds the pixels ``sep.winpos`` reads around its barycentre
    (``winpos_reach``); a window where an object of its footprint fails that is grown and extracted
    again, and after ``max_rounds`` it is the whole image. (sep's cleaning, which merges an object
    into a close, brighter neighbour, sees only the window's objects.)

    Returns
    -------
    None when nothing is found, else ``(objects, window, index, rseg, data, var_eff, bad, origin)``:
    the kept sep objects of every window in full-image coordinates, the window of each and its row
    in that window's list (its segmentation value - 1); and per window its segmentation,
    bad-zeroed data, effective variance, unusable pixels and ``(y0, x0)``.
    """
    ny, nx = seg.shape
    half = 0 if kernel is None else kernel.shape[0] // 2
    zone = half + 1
    eight = np.ones((3, 3), bool)
    bits = mask_bits(*config.bad_mask_planes, "SAT")
    me = np.float32(rcfg.model_error)

    def run(win):
        y0, y1, x0, x1 = win
        sl = (slice(y0, y1), slice(x0, x1))
        data = np.ascontiguousarray(residual[sl], dtype=np.float32)
        var = np.ascontiguousarray(variance[sl], dtype=np.float32)
        var_eff = var + (me * np.asarray(model[sl], np.float32)) ** 2
        # saturated cores and bleed trails are no model's light; unusable_pixels, without its
        # whole-image shortcuts, which cost more than they save on a small window
        bad = (np.asarray(mask[sl]) & bits) != 0
        bad |= ~(var > 0) | ~np.isfinite(var) | ~np.isfinite(data)
        if bad.any():
            data = np.where(bad, np.float32(0.0), data)
        # sep allocates its whole pixel buffer on every call: a window needs no more than its pixels
        objects, rseg = _extract(data, var_eff, bad, config.threshold, config, kernel,
                                 pixel_stack=min(int(config.pixel_stack), max(data.size, 300)))
        return objects, rseg, data, var_eff, bad

    def claimed(win, objects, owner):
        y0, y1, x0, x1 = win
        if owner is None:
            return np.ones(len(objects), bool)
        return seg[objects["ycpeak"].astype(np.int64) + y0, objects["xcpeak"].astype(np.int64) + x0] == owner

    def safe(win, objects, rseg, mine) -> bool:
        if not mine.any():
            return True
        y0, y1, x0, x1 = win
        h, w = y1 - y0, x1 - x0
        lo_y, hi_y = (zone if y0 > 0 else 0), (h - zone if y1 < ny else h)
        lo_x, hi_x = (zone if x0 > 0 else 0), (w - zone if x1 < nx else w)
        labels, _ = ndimage.label(rseg > 0, structure=eight)
        edge = np.ones((h, w), bool)
        edge[lo_y:hi_y, lo_x:hi_x] = False
        touching = np.unique(labels[edge & (labels > 0)])
        ypk, xpk = objects["ycpeak"][mine].astype(np.int64), objects["xcpeak"][mine].astype(np.int64)
        if np.isin(labels[ypk, xpk], touching).any():
            return False
        xb, yb, r = objects["x"][mine], objects["y"][mine], winpos_reach
        return bool(np.all(((xb - r >= 0) | (x0 == 0)) & ((xb + r <= w - 1) | (x1 == nx))
                           & ((yb - r >= 0) | (y0 == 0)) & ((yb + r <= h - 1) | (y1 == ny))))

    parts, windows, index, rseg_of, data_of, var_of, bad_of, origin = [], [], [], [], [], [], [], []
    owners = [None] * len(boxes) if owners is None else [int(o) for o in owners]
    for (by0, by1, bx0, bx1), owner in zip(np.asarray(boxes, np.int64), owners):
        grow = zone + winpos_reach
        for attempt in range(max_rounds + 1):
            win = ((max(int(by0) - grow, 0), min(int(by1) + grow, ny), max(int(bx0) - grow, 0), min(int(bx1) + grow, nx))
                   if attempt < max_rounds else (0, ny, 0, nx))
            objects, rseg, data, var_eff, bad = run(win)
            mine = claimed(win, objects, owner) if len(objects) else np.zeros(0, bool)
            if safe(win, objects, rseg, mine):
                break
            grow *= 2
        if not mine.any():
            continue
        y0, x0 = win[0], win[2]
        o = objects[mine]
        for name in ("x", "xcpeak", "xpeak", "xmin", "xmax"):
            o[name] += x0
        for name in ("y", "ycpeak", "ypeak", "ymin", "ymax"):
            o[name] += y0
        windows.append(np.full(len(o), len(origin)))
        index.append(np.flatnonzero(mine))
        parts.append(o)
        rseg_of.append(rseg)
        data_of.append(data)
        var_of.append(var_eff)
        bad_of.append(bad)
        origin.append((y0, x0))
    if not parts:
        return None
    return (np.concatenate(parts), np.concatenate(windows), np.concatenate(index), rseg_of, data_of, var_of,
            bad_of, origin)


def _parents(segmentation: np.ndarray, objects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parent id (0 if the source was not split) and number of children of its parent, per source.

    sep does not report parents; a parent footprint is a connected (8-neighbour) region of the
    segmentation, since distinct parents never touch and children tile their parent. Only the
    children sep flags as merged can share a parent, so connectivity is labelled only inside the
    boxes around clusters of their bounding boxes (a whole-image label costs ~70 ms on an HSC CCD).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(objects)
    parent = np.zeros(n, np.int64)
    nchild = np.ones(n, np.int64)
    rows = np.nonzero((objects["flag"] & sep.OBJ_MERGED) != 0)[0]
    if len(rows) < 2:
        return parent, nchild
    ny, nx = segmentation.shape
    x0 = np.maximum(objects["xmin"][rows].astype(np.int64) - 1, 0)
    x1 = np.minimum(objects["xmax"][rows].astype(np.int64) + 2, nx)
    y0 = np.maximum(objects["ymin"][rows].astype(np.int64) - 1, 0)
    y1 = np.minimum(objects["ymax"][rows].astype(np.int64) + 2, ny)
    # touching children have overlapping grown boxes: cluster the boxes, then label each cluster's box
    order = np.argsort(x0, kind="stable")
    pairs = []
    for a_pos, a in enumerate(order):
        for b in order[a_pos + 1:]:
            if x0[b] >= x1[a]:
                break
            if y0[b] < y1[a] and y0[a] < y1[b]:
                pairs.append((a, b))
    if not pairs:
        return parent, nchild
    pairs = np.asarray(pairs)
    m = len(rows)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(m, m))
    n_clusters, cluster = connected_components(graph, directed=False)
    group = np.full(m, -1, np.int64)
    n_groups = 0
    eight = np.ones((3, 3), bool)
    for c in range(n_clusters):
        members = np.nonzero(cluster == c)[0]
        if len(members) < 2:
            continue
        bx0, bx1 = x0[members].min(), x1[members].max()
        by0, by1 = y0[members].min(), y1[members].max()
        labels, _ = ndimage.label(segmentation[by0:by1, bx0:bx1] > 0, structure=eight)
        # every child owns its peak pixel, so the label there is its parent footprint
        px = objects["xpeak"][rows[members]].astype(np.int64) - bx0
        py = objects["ypeak"][rows[members]].astype(np.int64) - by0
        _, local = np.unique(labels[py, px], return_inverse=True)
        group[members] = n_groups + local
        n_groups += int(local.max()) + 1
    counts = np.bincount(group[group >= 0], minlength=n_groups)
    blended = (group >= 0) & (counts[np.maximum(group, 0)] > 1)
    # parent ids follow the source ids: n + 1, n + 2, ... in order of first child
    sel = rows[blended]
    _, first, inverse = np.unique(group[blended], return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    parent[sel] = n + 1 + rank[inverse]
    nchild[sel] = counts[group[blended]]
    return parent, nchild


def _filtered_snr(data, var, bad, xs, ys, kernel) -> np.ndarray:
    """S/N of the kernel-filtered image at pixels ``(xs, ys)``: sum(k d) / sqrt(sum(k^2 v)), masked pixels left out.

    With the Gaussian PSF kernel this is the matched-filter S/N that ``threshold`` is compared with.
    """
    if kernel is None:
        kernel = np.ones((1, 1), np.float32)
    half = kernel.shape[0] // 2
    ny, nx = data.shape
    off = np.arange(-half, half + 1)
    yy = np.clip(ys[:, None] + off, 0, ny - 1)[:, :, None]
    xx = np.clip(xs[:, None] + off, 0, nx - 1)[:, None, :]
    good = ~bad[yy, xx]
    k = kernel.astype(float)
    signal = (k * np.where(good, data[yy, xx], 0.0)).sum(axis=(1, 2))
    noise = np.sqrt((k**2 * np.where(good, var[yy, xx], 0.0)).sum(axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(noise > 0, signal / noise, np.nan)


def remove_cosmic_ray_detections(detections: DetectionResult, image: np.ndarray, variance: np.ndarray,
                                 mask: np.ndarray, config: DetectionConfig | None = None, *,
                                 psf_sigma: float | None = None) -> DetectionResult:
    """Drop the detections that were cosmic rays, once they are found and repaired.

    A detection is a cosmic ray when its filtered peak pixel is CR-masked and, on the repaired
    image, the PSF-filtered S/N within a PSF sigma of it falls below the detection threshold. Its footprint pixels
    go back to sky in the segmentation (so they do not count as a neighbour of anything), the
    surviving children of a split parent are recounted, and the rest of the detection is kept:
    one detection pass serves characterization and calibration (the LSST stack detects twice).

    Parameters
    ----------
    detections : DetectionResult
        From :func:`detect_sources` on the image before cosmic-ray repair.
    image, variance : ndarray, shape (ny, nx)
        The repaired, background-subtracted image [electrons] and its variance [electrons^2].
    mask : ndarray of int, shape (ny, nx)
        Mask with the CR plane set.
    config : DetectionConfig
        The configuration the detection ran with (threshold, filter, bad planes).
    psf_sigma : float, optional
        The filter's Gaussian sigma the detection used [pixel]; default ``config.psf_sigma``.

    Returns
    -------
    DetectionResult
        The kept sources (ids unchanged, so they still match the segmentation), a segmentation
        without the dropped footprints, and ``mask`` with its DETECTED plane unchanged.
    """
    config = config or DetectionConfig()
    sources = detections.sources
    if len(sources) == 0:
        return detections
    sigma = float(psf_sigma if psf_sigma is not None else config.psf_sigma)
    xpk = np.asarray(sources["x_peak"], np.int64)
    ypk = np.asarray(sources["y_peak"], np.int64)
    on_cr = (np.asarray(mask)[ypk, xpk] & mask_bit("CR")) != 0
    suspects = np.nonzero(on_cr)[0]
    if len(suspects) == 0:
        return detections
    kernel = detection_kernel(sigma, config)
    image, variance, mask = np.asarray(image), np.asarray(variance), np.asarray(mask)
    # the best filtered S/N within a PSF sigma of the peak: a star hit by a cosmic ray keeps its
    # detection even when the hit, not the star's centre, was the filtered image's peak
    reach = int(math.ceil(sigma))
    # the unusable pixels only where the filter reaches around the suspects (unusable_pixels is
    # pixel by pixel), not over the whole image
    ny, nx = image.shape
    r = reach + (0 if kernel is None else kernel.shape[0] // 2)
    bad = np.zeros((ny, nx), bool)
    for y, x in zip(ypk[suspects], xpk[suspects]):
        box = (slice(max(int(y) - r, 0), min(int(y) + r + 1, ny)), slice(max(int(x) - r, 0), min(int(x) + r + 1, nx)))
        bad[box] = unusable_pixels(image[box], variance[box], mask[box], config.bad_mask_planes)
    snr = np.full(len(suspects), -np.inf)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dx * dx + dy * dy <= reach * reach:
                snr = np.fmax(snr, _filtered_snr(image, variance, bad, xpk[suspects] + dx, ypk[suspects] + dy, kernel))
    drop = suspects[~(snr >= config.threshold)]
    if len(drop) == 0:
        return detections
    segmentation = detections.segmentation.copy()
    for r in drop:
        box = (slice(int(sources["y_min"][r]), int(sources["y_max"][r]) + 1),
               slice(int(sources["x_min"][r]), int(sources["x_max"][r]) + 1))
        cut = segmentation[box]
        cut[cut == sources["id"][r]] = 0
    keep = np.ones(len(sources), bool)
    keep[drop] = False
    kept = sources[keep]
    parent = np.asarray(kept["parent"])
    counts = np.bincount(parent, minlength=1)
    nchild = np.where(parent > 0, counts[parent], 1)
    kept["parent"][:] = np.where(nchild > 1, parent, 0)
    kept["blend_nchild"][:] = nchild
    kept["is_blended"][:] = nchild > 1
    return DetectionResult(sources=kept, segmentation=segmentation, mask=detections.mask,
                           n_negative=detections.n_negative)


def detect_sources(image: np.ndarray, variance: np.ndarray, mask: np.ndarray,
                   config: DetectionConfig | None = None, *, psf_sigma: float | None = None) -> DetectionResult:
    """Detect and deblend sources on a background-subtracted image.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image [electrons].
    variance : ndarray, shape (ny, nx)
        Per-pixel variance [electrons^2]; the threshold is relative to it, pixel by pixel.
    mask : ndarray of int, shape (ny, nx)
        LSST bit mask. Pixels with ``config.bad_mask_planes`` (or non-finite data or non-positive
        variance) count as missing. Not modified: the result carries an updated copy.
    config : DetectionConfig
    psf_sigma : float, optional
        PSF Gaussian sigma [pixel] for the matched filter and the centroid window; default
        ``config.psf_sigma``.

    Returns
    -------
    DetectionResult
        ``sources`` columns: ``id`` (= segmentation value), ``parent`` (0 unless deblended; parent
        ids are ``n_sources + 1, ...`` and are not rows), ``blend_nchild``, ``is_blended``, ``x``,
        ``y`` (zero-based, windowed), ``x_barycentre``, ``y_barycentre``, ``npix``, ``peak``,
        ``isophotal_flux``, ``detection_snr``, ``x_peak``, ``y_peak`` (filtered-image peak pixel),
        ``x_min``, ``x_max``, ``y_min``, ``y_max`` (footprint box, inclusive), ``a``, ``b``,
        ``theta``, ``flags`` (:data:`DETECTION_FLAGS`).
    """
    config = config or DetectionConfig()
    sigma = float(psf_sigma if psf_sigma is not None else config.psf_sigma)
    data = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(variance, dtype=np.float32)
    mask = np.asarray(mask)
    bad = unusable_pixels(data, var, mask, config.bad_mask_planes)
    if bad.any():
        # the filter sees masked pixels' values (zeroed here); their variance sep ignores
        data = np.where(bad, np.float32(0.0), data)
    kernel = detection_kernel(sigma, config)

    objects, segmentation = _extract(data, var, bad, config.threshold, config, kernel)
    segmentation = segmentation.astype(np.int32, copy=False)
    n = len(objects)
    ids = np.arange(1, n + 1, dtype=np.int64)
    parent, nchild = _parents(segmentation, objects)

    xb, yb = objects["x"].astype(float), objects["y"].astype(float)
    flags = objects["flag"].astype(np.int32)
    if n:
        xw, yw, wflag = sep.winpos(data, xb, yb, sigma, mask=bad, subpix=1)
    else:
        xw, yw, wflag = xb.copy(), yb.copy(), np.zeros(0, np.int16)
    ny, nx = data.shape
    ok = (wflag == 0) & np.isfinite(xw) & np.isfinite(yw)
    ok &= np.hypot(xw - xb, yw - yb) < config.max_window_shift * sigma
    ix = np.clip(np.floor(np.nan_to_num(xw) + 0.5).astype(int), 0, nx - 1)
    iy = np.clip(np.floor(np.nan_to_num(yw) + 0.5).astype(int), 0, ny - 1)
    ok &= segmentation[iy, ix] == ids            # a faint child's window must not slide onto its sibling
    x = np.where(ok, xw, xb)
    y = np.where(ok, yw, yb)
    flags = flags | np.where(ok, 0, DETECTION_FLAGS["window_failed"]).astype(np.int32)

    xpk = objects["xcpeak"].astype(np.int32)
    ypk = objects["ycpeak"].astype(np.int32)
    snr = _filtered_snr(data, var, bad, xpk, ypk, kernel)

    out_mask = mask.astype(np.int32, copy=True)
    out_mask &= ~np.int32(mask_bits("DETECTED", "DETECTED_NEGATIVE"))
    np.bitwise_or(out_mask, np.int32(mask_bit("DETECTED")), out=out_mask, where=grow_mask(segmentation > 0, config.grow))
    n_negative = 0
    if config.detect_negative:
        neg_objects, neg_seg = _extract(-data, var, bad, config.threshold, config, kernel, deblend=False)
        n_negative = len(neg_objects)
        np.bitwise_or(out_mask, np.int32(mask_bit("DETECTED_NEGATIVE")), out=out_mask,
                      where=grow_mask(neg_seg > 0, config.grow))

    table = Table()
    columns = [
        ("id", ids, "", "Source id; equals the source's value in the segmentation image"),
        ("parent", parent, "", "Id of the parent footprint the deblender split (0: not blended); parent ids are not rows"),
        ("blend_nchild", nchild.astype(np.int32), "", "Number of sources the parent footprint was split into (1: not blended)"),
        ("is_blended", nchild > 1, "", "The source is a deblended child of a larger footprint"),
        ("x", x, "pix", "Windowed x centroid (column), zero-based (barycentre where the window failed)"),
        ("y", y, "pix", "Windowed y centroid (row), zero-based (barycentre where the window failed)"),
        ("x_barycentre", xb, "pix", "Isophotal barycentre x, zero-based"),
        ("y_barycentre", yb, "pix", "Isophotal barycentre y, zero-based"),
        ("npix", objects["npix"].astype(np.int32), "pix", "Number of footprint pixels above threshold in the filtered image"),
        ("peak", objects["peak"].astype(float), "electron", "Highest unfiltered pixel value in the footprint"),
        ("isophotal_flux", objects["flux"].astype(float), "electron", "Sum of unfiltered pixel values above threshold"),
        ("detection_snr", snr, "", "Peak S/N of the PSF-filtered image (the matched-filter point-source S/N)"),
        ("x_peak", xpk, "pix", "Column of the filtered image's peak pixel"),
        ("y_peak", ypk, "pix", "Row of the filtered image's peak pixel"),
        ("x_min", objects["xmin"].astype(np.int32), "pix", "First column of the footprint"),
        ("x_max", objects["xmax"].astype(np.int32), "pix", "Last column of the footprint"),
        ("y_min", objects["ymin"].astype(np.int32), "pix", "First row of the footprint"),
        ("y_max", objects["ymax"].astype(np.int32), "pix", "Last row of the footprint"),
        ("a", objects["a"].astype(float), "pix", "Isophotal semi-major axis (rms along the major axis)"),
        ("b", objects["b"].astype(float), "pix", "Isophotal semi-minor axis (rms along the minor axis)"),
        ("theta", objects["theta"].astype(float), "rad", "Position angle of the major axis from +x towards +y"),
        ("flags", flags, "", "Detection flag bits: " + ", ".join(f"{k}={v}" for k, v in DETECTION_FLAGS.items())),
    ]
    for name, values, unit, description in columns:
        table[name] = values
        table[name].unit = unit
        table[name].description = description
    table.meta["THRESH"] = (config.threshold, "detection threshold [filtered S/N]")
    table.meta["PSFSIG"] = (sigma, "filter and window Gaussian sigma [pixel]")
    table.meta["FILTSIZE"] = (0 if kernel is None else int(kernel.shape[0]), "matched-filter side [pixel]")
    return DetectionResult(sources=table, segmentation=segmentation, mask=out_mask, n_negative=n_negative)


def detect_in_residual(residual: np.ndarray, variance: np.ndarray, mask: np.ndarray, model: np.ndarray,
                       detections: DetectionResult, subtracted_ids, config: DetectionConfig | None = None,
                       residual_config: ResidualDetectionConfig | None = None, *,
                       psf_sigma: float, windowed: bool = True) -> tuple[DetectionResult, np.ndarray]:
    """Sources hidden in the footprints of brighter point sources, found on a PSF-subtracted image.

    sep's deblender splits a footprint only into children holding a fraction ``deblend_cont``
    of its flux, so a faint star in the wings of a bright one (1-4 FWHM away) stays part of
    it. With the bright point sources' PSF models subtracted (``residual = image - model``) it is
    a peak of its own: the residual is detected with the same filter and threshold, its variance
    raised by ``(model_error x model)^2`` so that the models' mismatch in bright cores does not
    count; a residual detection is kept when its peak lies in the footprint of a subtracted
    source (``subtracted_ids``) and it is at least ``min_separation_fwhm`` PSF FWHM from every
    existing source. Each kept detection takes the pixels of its residual footprint that belonged
    to that footprint (or to the sky) and becomes a child of the footprint's parent.

    Parameters
    ----------
    residual, variance : ndarray, shape (ny, nx)
        Background- and model-subtracted image [electrons], variance of the image [electrons^2].
    mask : ndarray of int, shape (ny, nx)
    model : ndarray, shape (ny, nx)
        The subtracted PSF models [electrons].
    detections : DetectionResult
        The first pass (ids 1..n in row order).
    subtracted_ids : array_like of int
        Ids of the sources whose models were subtracted.
    config, residual_config : DetectionConfig, ResidualDetectionConfig
    psf_sigma : float
        PSF Gaussian sigma of the filter and the centroid window [pixel].
    windowed : bool
        Extract only in windows around the subtracted footprints (:func:`_extract_in_windows`;
        ~4 times faster on an HSC CCD) rather than over the whole image; the sources found are the
        same, their columns equal but for rounding and, rarely, a pixel more or less in the
        footprint of a deblended child (an HSC CCD: one of 53).

    Returns
    -------
    (DetectionResult, ndarray of int)
        The detections with the new sources appended (ids ``n + 1, ...`` in the order of their
        peaks, row then column; parent ids renumbered
        after the new ids, ``flags`` of the new rows with ``merged``) and the rows of the new sources.
    """
    from scipy.spatial import cKDTree

    config = config or DetectionConfig()
    rcfg = residual_config or ResidualDetectionConfig()
    old = detections.sources
    n = len(old)
    none = (detections, np.zeros(0, np.int64))
    if n == 0:
        return none
    sigma = float(psf_sigma)
    seg = detections.segmentation
    ny, nx = seg.shape
    kernel = detection_kernel(sigma, config)
    subtracted = np.isin(np.asarray(old["id"], np.int64), np.asarray(subtracted_ids, np.int64))
    if windowed:
        boxes = np.column_stack([np.asarray(old[c], np.int64)[subtracted] for c in ("y_min", "y_max", "x_min", "x_max")])
        boxes[:, [1, 3]] += 1                                             # half-open
        owners = np.asarray(old["id"], np.int64)[subtracted]
    else:
        boxes, owners = np.array([[0, ny, 0, nx]], np.int64), None
    found = _extract_in_windows(residual, variance, mask, model, boxes, owners, seg, config, rcfg, kernel,
                                winpos_reach=int(math.ceil((4.0 + config.max_window_shift) * sigma)) + 1)
    if found is None:
        return none
    objects, window, index, rseg_of, data_of, var_of, bad_of, origin = found
    xpk = objects["xcpeak"].astype(np.int64)
    ypk = objects["ycpeak"].astype(np.int64)
    owner = seg[ypk, xpk]
    keep = np.isin(owner, np.asarray(subtracted_ids, np.int64)) & (owner > 0)
    xb, yb = objects["x"].astype(float), objects["y"].astype(float)
    # the window around the barycentre that sep.winpos reads, and the filter around the peak, lie
    # inside the object's own extraction window (see _extract_in_windows)
    xw, yw, wflag = xb.copy(), yb.copy(), np.zeros(len(xb), np.int16)
    snr = np.full(len(xb), np.nan)
    for w in np.unique(window[keep]):
        r = np.flatnonzero(keep & (window == w))
        y0, x0 = origin[w]
        xw[r], yw[r], wflag[r] = sep.winpos(data_of[w], xb[r] - x0, yb[r] - y0, sigma, mask=bad_of[w], subpix=1)
        xw[r] += x0
        yw[r] += y0
        snr[r] = _filtered_snr(data_of[w], var_of[w], bad_of[w], xpk[r] - x0, ypk[r] - y0, kernel)
    ok = (wflag == 0) & np.isfinite(xw) & np.isfinite(yw) & (np.hypot(xw - xb, yw - yb) < config.max_window_shift * sigma)
    x, y = np.where(ok, xw, xb), np.where(ok, yw, yb)
    if keep.any():
        dist = np.full(len(xb), -np.inf)
        dist[keep], _ = cKDTree(np.column_stack([np.asarray(old["x"], float), np.asarray(old["y"], float)])).query(
            np.column_stack([x[keep], y[keep]]))
        keep &= dist >= rcfg.min_separation_fwhm * 2.3548 * sigma
        keep &= snr >= config.threshold
    # in the order of the peaks (row, then column), whatever the windows were
    rows = np.flatnonzero(keep)
    rows = rows[np.lexsort((xpk[rows], ypk[rows]))]
    if len(rows) == 0:
        return none
    segmentation = seg.copy()
    old_ids = np.asarray(old["id"], np.int64)
    old_parent = np.asarray(old["parent"], np.int64)
    # new ids after every id and parent id in use (cosmic-ray removal leaves gaps in the ids)
    new_ids = max(int(old_ids.max()), int(old_parent.max())) + 1 + np.arange(len(rows))
    x_min, x_max = objects["xmin"][rows].astype(np.int32), objects["xmax"][rows].astype(np.int32)
    y_min, y_max = objects["ymin"][rows].astype(np.int32), objects["ymax"][rows].astype(np.int32)
    for k, r in enumerate(rows):
        box = (slice(int(y_min[k]), int(y_max[k]) + 1), slice(int(x_min[k]), int(x_max[k]) + 1))
        cut = segmentation[box]
        w = window[r]
        y0, x0 = origin[w]
        local = rseg_of[w][box[0].start - y0: box[0].stop - y0, box[1].start - x0: box[1].stop - x0]
        take = (local == index[r] + 1) & ((cut == owner[r]) | (cut == 0))
        cut[take] = new_ids[k]
        cut[ypk[r] - box[0].start, xpk[r] - box[1].start] = new_ids[k]   # the peak is always its own

    # parents: a new source joins its owner's parent, or forms one with the owner
    parent = np.concatenate([old_parent, np.zeros(len(rows), np.int64)])
    row_of = {int(i): k for k, i in enumerate(old_ids)}
    owner_row = np.array([row_of[int(i)] for i in owner[rows]], np.int64)
    fresh = -(owner_row + 1)                                              # provisional: one per owner
    for k, orow in enumerate(owner_row):
        if parent[orow] == 0:
            parent[orow] = fresh[k]
        parent[n + k] = parent[orow]
    # renumber: parent ids follow the source ids, in order of first child
    blended = parent != 0
    values, first, inverse = np.unique(parent[blended], return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    n_total = n + len(rows)
    parent[blended] = int(new_ids.max()) + 1 + rank[inverse]
    counts = np.bincount(parent)
    nchild = np.where(parent > 0, counts[parent], 1)

    new = Table()
    flags = DETECTION_FLAGS["merged"] | np.where(ok[rows], 0, DETECTION_FLAGS["window_failed"])
    values_new = {
        "id": new_ids, "x": x[rows], "y": y[rows], "x_barycentre": xb[rows], "y_barycentre": yb[rows],
        "npix": objects["npix"][rows].astype(np.int32), "peak": objects["peak"][rows].astype(float),
        "isophotal_flux": objects["flux"][rows].astype(float), "detection_snr": snr[rows],
        "x_peak": xpk[rows].astype(np.int32), "y_peak": ypk[rows].astype(np.int32),
        "x_min": x_min, "x_max": x_max, "y_min": y_min, "y_max": y_max,
        "a": objects["a"][rows].astype(float), "b": objects["b"][rows].astype(float),
        "theta": objects["theta"][rows].astype(float), "flags": flags.astype(np.int32),
    }
    for name in old.colnames:
        if name in values_new:
            new[name] = np.asarray(values_new[name]).astype(old[name].dtype)
        elif name not in ("parent", "blend_nchild", "is_blended"):
            new[name] = np.zeros(len(rows), old[name].dtype)
    new["parent"] = np.zeros(len(rows), old["parent"].dtype)
    new["blend_nchild"] = np.zeros(len(rows), old["blend_nchild"].dtype)
    new["is_blended"] = np.zeros(len(rows), bool)
    table = append_rows(old, new[old.colnames])
    table["parent"][:] = parent
    table["blend_nchild"][:] = nchild
    table["is_blended"][:] = nchild > 1
    table.meta.update(old.meta)
    table.meta["NRESID"] = (len(rows), "sources found on the PSF-subtracted image")
    out_mask = detections.mask.copy()
    out_mask[segmentation >= new_ids[0]] |= np.int32(mask_bit("DETECTED"))
    return (DetectionResult(sources=table, segmentation=segmentation, mask=out_mask, n_negative=detections.n_negative),
            np.arange(n, n_total))
