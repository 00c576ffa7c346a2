"""Source detection and deblending (sep, i.e. SExtractor's extraction and multi-threshold deblender).

The background-subtracted image is filtered with a Gaussian of the PSF's width (the matched
filter for point sources, truncated to ``filter_size`` pixels) and thresholded at
``threshold`` times the noise of the *filtered* image, so ``threshold`` is a point-source S/N.
Connected pixels above threshold form a parent footprint; sep's deblender splits it into
children, and those children are the rows of the output. Positions are windowed centroids
(SExtractor's XWIN/YWIN, Gaussian weight of the PSF's sigma), which for bright stars scatter
several times less than isophotal barycentres.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep
from astropy.table import Table
from scipy import ndimage

from .exposure import mask_bit, mask_bits
from .pexconfig import Config, option

#: Bits of the ``flags`` column: sep's extraction flags plus our own.
DETECTION_FLAGS: dict[str, int] = {
    "merged": int(sep.OBJ_MERGED),          # the object came out of the deblender
    "truncated": int(sep.OBJ_TRUNC),        # the footprint touches the image border
    "deblend_overflow": int(sep.OBJ_DOVERFLOW),
    "singular": int(sep.OBJ_SINGU),         # singular second moments
    "window_failed": 256,                   # x, y are the isophotal barycentre, not windowed
}


@dataclass
class DetectionConfig(Config):
    """Detection (PSF-matched filter + threshold) and deblending of sources."""

    threshold: float = option(5.0, "Detection threshold: S/N of a pixel of the PSF-filtered image [sigma]", min=0.5)
    min_area: int = option(5, "Minimum number of connected pixels above threshold in the filtered image [pixel]", min=1)
    filter_size: int = option(5, "Side of the Gaussian matched-filter kernel, odd; 0 for no filtering [pixel]", min=0, max=31)
    psf_sigma: float = option(2.0, "Filter (and centroid window) Gaussian sigma when the caller gives no PSF sigma [pixel]", min=0.3)
    deblend_nthresh: int = option(32, "Number of deblending sub-thresholds (SExtractor DEBLEND_NTHRESH)", min=1)
    deblend_cont: float = option(0.005, "Minimum flux fraction of a deblended child (DEBLEND_MINCONT); 1 disables deblending", min=0.0, max=1.0)
    clean: bool = option(True, "Remove spurious detections in the wings of bright objects (SExtractor CLEAN)?")
    clean_param: float = option(1.0, "Cleaning efficiency (SExtractor CLEAN_PARAM)", min=0.1)
    grow: int = option(2, "Grow the DETECTED mask around each footprint by this many pixels (square) [pixel]", min=0, max=50)
    detect_negative: bool = option(False, "Also detect negative sources and set DETECTED_NEGATIVE?")
    bad_mask_planes: list[str] = option(["BAD", "NO_DATA"], "Mask planes whose pixels are treated as missing (zero data, infinite noise)")
    max_window_shift: float = option(2.0, "Use the barycentre when the windowed centroid moves farther than this many PSF sigmas from it", min=0.1)
    pixel_stack: int = option(1_000_000, "sep's pixel buffer: max pixels of objects open at once (raise for huge objects)", min=300_000)

    def validate(self) -> None:
        super().validate()
        if self.filter_size and self.filter_size % 2 == 0:
            raise ValueError(f"detection.filter_size must be odd or 0, got {self.filter_size}")
        from .exposure import MASK_PLANES

        unknown = [p for p in self.bad_mask_planes if p not in MASK_PLANES]
        if unknown:
            raise ValueError(f"detection.bad_mask_planes: unknown mask plane(s) {unknown}")


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


def gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    """Normalised (sum 1) circular Gaussian of ``sigma`` pixels sampled on a ``size x size`` grid."""
    r = np.arange(size) - size // 2
    k = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sigma**2)
    return (k / k.sum()).astype(np.float32)


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


def _extract(data, var, bad, threshold, config, kernel, *, deblend=True):
    if kernel is not None:
        # sep's 'conv' mode (a 'matched' run would convolve the variance too, twice the time) compares
        # the filtered pixel with thresh * sqrt(var): rescale so the threshold is the filtered S/N.
        thresh = threshold * float(np.sqrt((kernel**2).sum()) / np.abs(kernel).sum())
    else:
        thresh = threshold
    sep.set_extract_pixstack(int(config.pixel_stack))
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


def _parents(segmentation: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Parent id (0 if the source was not split) and number of children of its parent, per source.

    sep does not report parents; a parent footprint is a connected (8-neighbour) region of the
    segmentation, since distinct parents never touch and children tile their parent.
    """
    labels, n_comp = ndimage.label(segmentation > 0, structure=np.ones((3, 3), bool))
    on = segmentation > 0
    comp = np.zeros(n + 1, np.int64)
    comp[segmentation[on]] = labels[on]
    comp = comp[1:]
    nchild = np.bincount(comp, minlength=n_comp + 1)[comp]
    blended = nchild > 1
    parent = np.zeros(n, np.int64)
    # parent ids follow the source ids: n + 1, n + 2, ... in order of first child
    _, first = np.unique(comp[blended], return_inverse=True)
    parent[blended] = n + 1 + first
    return parent, np.where(blended, nchild, 1)


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
        ``isophotal_flux``, ``a``, ``b``, ``theta``, ``flags`` (:data:`DETECTION_FLAGS`).
    """
    config = config or DetectionConfig()
    sigma = float(psf_sigma if psf_sigma is not None else config.psf_sigma)
    data = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(variance, dtype=np.float32)
    mask = np.asarray(mask)
    bad = (mask & mask_bits(*config.bad_mask_planes)) != 0
    usable = np.isfinite(data)
    usable &= var > 0
    usable &= var < np.inf                      # with var > 0: finite and positive
    bad |= ~usable
    del usable
    if bad.any():
        # the filter sees masked pixels' values (zeroed here); their variance sep ignores
        data = np.where(bad, np.float32(0.0), data)
    kernel = gaussian_kernel(sigma, config.filter_size) if config.filter_size else None

    objects, segmentation = _extract(data, var, bad, config.threshold, config, kernel)
    segmentation = segmentation.astype(np.int32, copy=False)
    n = len(objects)
    ids = np.arange(1, n + 1, dtype=np.int64)
    parent, nchild = _parents(segmentation, n)

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
    return DetectionResult(sources=table, segmentation=segmentation, mask=out_mask, n_negative=n_negative)
