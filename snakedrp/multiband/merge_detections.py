"""The bands' coadd detections of one patch merged into one list of objects (mergeCoaddDetections).

All bands' coadds of a patch share its pixel grid, so peaks and footprints merge in pixels:

- peaks are taken band by band in priority order (reddest first, ``multiband.priority``); a
  later band's peak within ``min_new_peak`` of a merged peak is that object seen in one more
  band (``merge_peak_<band>`` set), farther it is a new object, kept at that band's position;
- the merged footprints are the union of the bands' DETECTED planes; a footprint holding
  several peaks is split between them by a watershed of the bands' summed S/N image
  (:func:`split_footprints`), which the measurement of every band then shares as its
  segmentation (each object's own pixels; its neighbours' are left out of its fits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy import ndimage

from snakedrp.multiband.config import MergeDetectionsConfig
from snakedrp.repo.exposure import mask_bits


@dataclass(frozen=True)
class MergeDetectionsResult:
    """Result of :func:`merge_detections`.

    Attributes
    ----------
    objects : Table
        ``deepCoadd_mergeDet``: one row per merged peak (an object), see :func:`merge_detections`.
    segmentation : ndarray of int32, shape (ny, nx)
        Object id of each footprint pixel (0: no footprint).
    """

    objects: Table
    segmentation: np.ndarray


def band_order(bands, priority) -> list[str]:
    """``bands`` in priority order: those in ``priority`` first, in its order, the rest reddest first."""
    bands = list(dict.fromkeys(bands))
    listed = [b for b in priority if b in bands]
    rest = sorted((b for b in bands if b not in priority), key=lambda b: -"ugrizy".find(b))
    return listed + rest


def merge_peaks(detections: dict[str, Table], priority, radius: float) -> Table:
    """Peaks of every band merged in priority order (see the module docstring).

    Parameters
    ----------
    detections : dict of str to Table
        ``deepCoadd_det`` of each band (``x``, ``y``, ``detection_snr``), keyed by band.
    priority : list of str
        Band priority (``multiband.priority``).
    radius : float
        ``min_new_peak`` on the patch grid [pixel].

    Returns
    -------
    Table
        ``x``, ``y`` (zero-based [pixel]: the position in the first band of the object),
        ``peak_band``, and per band ``merge_peak_<band>`` (bool) and ``detection_snr_<band>``
        (NaN where not a peak).
    """
    from scipy.spatial import cKDTree

    order = band_order(detections, priority)
    x, y, first = np.zeros(0), np.zeros(0), np.zeros(0, dtype="U8")
    peaks: dict[str, np.ndarray] = {}
    snrs: dict[str, np.ndarray] = {}
    for band in order:
        det = detections[band]
        bx, by = np.asarray(det["x"], float), np.asarray(det["y"], float)
        snr = np.asarray(det["detection_snr"], float)
        matched = np.full(len(bx), -1)
        if len(x) and len(bx):
            dist, index = cKDTree(np.column_stack([x, y])).query(np.column_stack([bx, by]))
            # strongest peaks claim their object first; a merged object takes one peak per band
            claimed: set[int] = set()
            for j in np.argsort(-snr, kind="stable"):
                if dist[j] <= radius and int(index[j]) not in claimed:
                    matched[j] = index[j]
                    claimed.add(int(index[j]))
        new = matched < 0
        n_old = len(x)
        x, y = np.r_[x, bx[new]], np.r_[y, by[new]]
        first = np.r_[first, np.full(int(new.sum()), band)]
        for b in peaks:
            peaks[b] = np.r_[peaks[b], np.zeros(int(new.sum()), bool)]
            snrs[b] = np.r_[snrs[b], np.full(int(new.sum()), np.nan)]
        peaks[band] = np.zeros(len(x), bool)
        snrs[band] = np.full(len(x), np.nan)
        rows = np.where(new, n_old + np.cumsum(new) - 1, matched)
        peaks[band][rows] = True
        snrs[band][rows] = snr
    out = Table()
    out["x"], out["y"] = x, y
    out["x"].unit = out["y"].unit = "pix"
    out["x"].description = "Peak x position (windowed centroid in the object's first band), zero-based on the patch grid"
    out["y"].description = "Peak y position (windowed centroid in the object's first band), zero-based on the patch grid"
    out["peak_band"] = first
    out["peak_band"].description = "The first band in priority order where the object is a detected peak"
    for band in order:
        out[f"merge_peak_{band}"] = peaks[band]
        out[f"merge_peak_{band}"].description = f"Detected as a peak on the {band}-band coadd"
        out[f"detection_snr_{band}"] = snrs[band]
        out[f"detection_snr_{band}"].description = f"Matched-filter S/N of the {band}-band peak (NaN: no peak)"
    return out


def split_footprints(footprints: np.ndarray, snr: np.ndarray, x, y, smoothing_sigma: float) -> np.ndarray:
    """Object id per pixel: each footprint shared out among the peaks inside it by a watershed of ``snr``.

    Parameters
    ----------
    footprints : ndarray of bool, shape (ny, nx)
        The merged footprints.
    snr : ndarray, shape (ny, nx)
        The image the watershed follows (the bands' summed S/N); smoothed by ``smoothing_sigma``.
    x, y : array_like
        Peak positions, zero-based [pixel]; peak k gets id k + 1.
    smoothing_sigma : float
        [pixel]; 0: none.

    Returns
    -------
    ndarray of int32, shape (ny, nx)
        0 outside the footprints and in footprints holding no peak.
    """
    from skimage.segmentation import watershed

    ny, nx = footprints.shape
    image = np.nan_to_num(np.asarray(snr, float))
    if smoothing_sigma > 0:
        image = ndimage.gaussian_filter(image, smoothing_sigma)
    markers = np.zeros((ny, nx), np.int32)
    ix = np.clip(np.floor(np.asarray(x, float) + 0.5).astype(int), 0, nx - 1)
    iy = np.clip(np.floor(np.asarray(y, float) + 0.5).astype(int), 0, ny - 1)
    inside = footprints[iy, ix]
    markers[iy[inside], ix[inside]] = np.flatnonzero(inside) + 1
    # flooding the negative image from the peaks, within the footprints: a footprint without a
    # peak (a band's footprint whose peak merged elsewhere) stays 0
    labels = watershed(-image, markers, mask=footprints) if inside.any() else markers
    return np.asarray(labels, np.int32)


def merge_detections(detections: dict[str, Table], masks: dict[str, np.ndarray], snr_images: dict[str, np.ndarray],
                     *, priority, pixel_scale: float, config: MergeDetectionsConfig | None = None,
                     wcs=None) -> MergeDetectionsResult:
    """Merge the bands' detections of one patch.

    Parameters
    ----------
    detections : dict of str to Table
        Each band's ``deepCoadd_det``, keyed by band (letters of ``multiband.priority``).
    masks : dict of str to ndarray of int, shape (ny, nx)
        Each band's ``deepCoadd_calexp`` mask plane (its DETECTED bit is the band's footprints).
    snr_images : dict of str to ndarray, shape (ny, nx)
        Each band's image / sqrt(variance) (NaN or 0 where no data).
    priority : list of str
        Band priority.
    pixel_scale : float
        Patch pixel scale [arcsec/pixel].
    config : MergeDetectionsConfig
    wcs : astropy.wcs.WCS, optional
        The patch WCS, for ``coord_ra``/``coord_dec``.

    Returns
    -------
    MergeDetectionsResult
        Its ``objects`` hold :func:`merge_peaks`' columns and ``id`` (= the segmentation value),
        ``parent`` (the footprint's id when it holds several objects, else 0), ``blend_nchild``,
        ``is_blended``, ``coord_ra``, ``coord_dec``; ``meta``: ``BANDS`` (the bands merged, in
        priority order, comma-separated), ``NEWPEAK`` (``min_new_peak`` [arcsec]).
    """
    config = config or MergeDetectionsConfig()
    config.validate()
    if not detections:
        raise ValueError("merge_detections needs the detections of at least one band")
    shapes = {m.shape for m in masks.values()} | {s.shape for s in snr_images.values()}
    if len(shapes) != 1:
        raise ValueError(f"the bands' coadds of one patch must share its grid; shapes {sorted(shapes)}")
    objects = merge_peaks(detections, priority, config.min_new_peak / pixel_scale)
    detected = np.int32(mask_bits("DETECTED"))
    footprints = np.zeros(next(iter(shapes)), bool)
    for mask in masks.values():
        footprints |= (mask & detected) != 0
    snr = sum(np.nan_to_num(np.asarray(s, float)) for s in snr_images.values())
    segmentation = split_footprints(footprints, snr, objects["x"], objects["y"], config.smoothing_sigma)
    n = len(objects)
    ids = np.arange(1, n + 1, dtype=np.int64)
    components, _ = ndimage.label(footprints)
    ny, nx = footprints.shape
    ix = np.clip(np.floor(np.asarray(objects["x"], float) + 0.5).astype(int), 0, nx - 1)
    iy = np.clip(np.floor(np.asarray(objects["y"], float) + 0.5).astype(int), 0, ny - 1)
    component = components[iy, ix]
    count = np.bincount(component, minlength=components.max() + 1)
    nchild = np.where(component > 0, count[component], 1)
    # a parent's id is past every object's, so that ids and parents never collide
    parent = np.where(nchild > 1, n + component, 0).astype(np.int64)
    objects.add_column(ids, name="id", index=0)
    objects["id"].description = "Object id (= its value in the merged footprints' segmentation)"
    columns = [("parent", parent, "Id of the footprint holding several objects (its parent), 0 if alone"),
               ("blend_nchild", np.where(nchild > 1, nchild, 0).astype(np.int32), "Objects in the parent footprint (0 if alone)"),
               ("is_blended", nchild > 1, "The object shares its merged footprint with others")]
    for name, values, description in columns:
        objects[name] = values
        objects[name].description = description
    if wcs is not None and n:
        ra, dec = wcs.all_pix2world(objects["x"], objects["y"], 0)
    else:
        ra = dec = np.full(n, np.nan)
    objects["coord_ra"], objects["coord_dec"] = np.asarray(ra, float), np.asarray(dec, float)
    objects["coord_ra"].unit = objects["coord_dec"].unit = "deg"
    objects["coord_ra"].description = "Right ascension of the peak position"
    objects["coord_dec"].description = "Declination of the peak position"
    objects.meta["BANDS"] = ",".join(band_order(detections, priority))
    objects.meta["NEWPEAK"] = config.min_new_peak
    return MergeDetectionsResult(objects=objects, segmentation=segmentation)
