"""Coadd assembly (assembleCoadd): weighted mean of the warps with artifact rejection.

Weights: ONE per warp, the inverse of the warp's sigma-clipped mean variance (as LSST), or with
``weighting = "psf"`` the inverse variance of its point-source flux (that times ``sum(P^2)`` of its
PSF): a visit of 1.3" seeing then counts as much as its point-source depth says, not as its sky,
and the coadd is deeper for stars and faint compact galaxies. Per-pixel
inverse-variance weights would include each star's own photon noise and bias every star faint
(30 mmag on the demo with SWarp's per-pixel weight maps; shared/recipes/peers.md). Warp pixels
in ``bad_mask_planes`` do not enter; the coadd variance is the propagated variance of the
weighted mean, ``sum w_i^2 V_i / (sum w_i)^2`` over the pixels used.

Artifact rejection in the manner of LSST's CompareWarp: each warp's reference is the per-pixel
median of the *other* warps (an artifact then does not lift its own reference); in each warp,
footprints of ``warp - reference`` above ``clip_threshold`` sigma (grown through the connected
pixels above ``clip_grow_threshold``) are candidates, and the decision is made per footprint
(:func:`classify_footprints`), not per pixel: an elongated footprint (a satellite trail) or one
peaking off the reference's sources (a missed cosmic ray, a ghost) is an artifact, excluded and
marked CLIPPED; a compact footprint peaking on a reference source (S/N of the PSF-smoothed
reference above ``protect_threshold``, grown by ``protect_grow``) is that source changed by the
seeing (star cores differ by factors of several between 0.5" and 1.3") or by variability, and is
kept. A faint trail breaks into pieces; those along the axis of a long one are the trail too
(:func:`trail_pieces`). Within an artifact footprint, reference-source pixels are clipped only
where the excess is far above what a seeing change could make (``protect_ratio``), so a trail is
removed over faint sources but not over a star's core. Where the other warps' coverage ends inside a star, their
reference lacks the core, and pieces of a wider-seeing warp's wing look like compact outliers off
every source: they are kept when they lie on a compact source of the warp's own image peaking
where the reference has no data (:func:`sources_beyond_reference`). A pixel that is an outlier
in more than ``clip_max_epochs`` warps is real (a variable region) and kept everywhere. A mask
(a bad column, a cosmic ray, a CCD edge) of the warp or of its reference beside a star cuts a
strip of a wide warp's wing off from the core; that strip may lie off the reference's protected
source and be elongated along the mask: it is kept when it touches the cut and lies on a compact
source of the warp's own image peaking on a reference source (:func:`sources_cut_by_mask`).
The reference's sources are found over all the other warps' data, under the warp's own masked
pixels too.

The coadd PSF (:class:`CoaddPsf`) is the weighted sum of the PSFs of every input covering a
pixel. Where a warp with data there was left out (its pixel masked by ``bad_mask_planes``, or
CLIPPED), the pixel holds the other warps' PSFs only and the model is not right: such coadd
pixels are marked INEXACT_PSF (as LSST), for measurements to avoid or flag.

Memory does not grow with the number of warps: a first pass reads each warp's variance (a
subsample) for its weight; the second pass reads a block of rows of every warp at a time, the
block height shrinking as the number of warps grows (``block_memory_mb``). Warps read with
:func:`open_warp` are read from their files a block at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

from snakedrp.coadd.coadd_psf import CoaddPsf
from snakedrp.coadd.config import AssembleConfig
from snakedrp.meas.detect import grow_mask
from snakedrp.repo.exposure import Exposure, mask_bit, mask_bits
from snakedrp.repo.psf_model import psf_from_hdu


#: A source of a warp's own image that keeps the outliers on it as a source the reference cannot see
#: (:func:`sources_beyond_reference`) has a second-moment axis ratio at most this (if at least
#: ``clip_min_length`` long): a star in its own image is round (a half star at a CCD edge ~2), while
#: a trail's piece between two cosmic-ray masks, 30 pixels long and 8 wide once smoothed, is ~4, too
#: short to be elongated by ``clip_elongation``. Not for :func:`sources_cut_by_mask`: there the
#: warp's own mask may cut a band through the star, which leaves it elongated in its own image.
OWN_SOURCE_ELONGATION = 2.5


@dataclass(frozen=True)
class AssembleResult:
    """Result of :func:`assemble_coadd`.

    Attributes
    ----------
    coadd : Exposure
        The coadd (``deepCoadd``): image and variance in units of the warps' zeropoint, mask with
        NO_DATA, CLIPPED, INEXACT_PSF and the propagated planes, ``psf`` a :class:`CoaddPsf`.
        INEXACT_PSF marks the pixels where at least one warp has data (not NO_DATA) but was left
        out (its pixel in ``bad_mask_planes`` or CLIPPED): there the coadd holds the other warps'
        PSFs only, and ``psf`` (the weighted sum of every covering input's PSF) is not exact.
    n_image : ndarray of int32, shape (ny, nx)
        Number of warps contributing to each pixel (``deepCoadd_nImage``).
    inputs : Table
        One row per input CCD (visit, ccd, weight) with the warp's clipped-mean variance and its
        number of clipped pixels.
    dropped : tuple of int
        Indices (into the warps given) of the warps left out because no pixel of theirs is usable
        (all masked or no data): such a warp must not stop the coadd of the others.
    """

    coadd: Exposure
    n_image: np.ndarray
    inputs: Table
    dropped: tuple[int, ...] = ()


class _SectionPlane:
    """A FITS image plane read a block of rows at a time (``plane[y0:y1]`` reads only those rows)."""

    def __init__(self, hdu: fits.ImageHDU, dtype):
        self._hdu = hdu
        self.shape = tuple(int(n) for n in hdu.shape)
        self.dtype = np.dtype(dtype)

    def __getitem__(self, index):
        return np.asarray(self._hdu.section[index], dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype or self.dtype)


def open_warp(path: str | Path) -> Exposure:
    """A warp whose image, mask and variance are read from ``path`` only when sliced (by rows).

    The file stays open while the Exposure lives; metadata, WCS and PSF are read at once.
    """
    hdul = fits.open(path, memmap=False, lazy_load_hdus=True)
    primary = hdul[0].header.copy()
    image_hdu = hdul["IMAGE"]
    wcs = WCS(image_hdu.header) if "CTYPE1" in image_hdu.header else None
    psf = psf_from_hdu(hdul["PSF"]) if "PSF" in hdul else None
    exposure = Exposure(image=_SectionPlane(image_hdu, np.float32), mask=_SectionPlane(hdul["MASK"], np.int32),
                        variance=_SectionPlane(hdul["VARIANCE"], np.float32), wcs=wcs, psf=psf,
                        zeropoint=primary.get("ZEROPT"), zeropoint_err=primary.get("ZEROPTER"), metadata=primary)
    exposure._hdul = hdul                # keeps the file open for the lazy planes
    return exposure


def _shape(warp: Exposure) -> tuple[int, int]:
    return tuple(int(n) for n in warp.image.shape)


def clipped_mean(values: np.ndarray, nsigma: float, n_iter: int) -> float:
    """Mean of ``values`` after iterative clipping at ``nsigma`` standard deviations about the mean."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    for _ in range(n_iter):
        mean, std = v.mean(), v.std()
        keep = np.abs(v - mean) <= nsigma * std
        if keep.all() or keep.sum() < 10:
            break
        v = v[keep]
    return float(v.mean())


def warp_variance(warp: Exposure, config: AssembleConfig, rows: int = 256) -> float:
    """Sigma-clipped mean variance of a warp's usable pixels (every ``weight_subsample``-th row and column)."""
    ny, nx = _shape(warp)
    step = int(config.weight_subsample)
    bad = mask_bits(*config.bad_mask_planes)
    chunks = []
    for y0 in range(0, ny, rows):
        var = np.asarray(warp.variance[y0:y0 + rows], np.float32)[::step, ::step]
        msk = np.asarray(warp.mask[y0:y0 + rows])[::step, ::step]
        chunks.append(var[((msk & bad) == 0) & np.isfinite(var) & (var > 0)])
    values = np.concatenate(chunks) if chunks else np.zeros(0)
    return clipped_mean(values, config.weight_clip_sigma, config.weight_clip_iter)


class _LeaveOneOutMedian:
    """Per-pixel medians over axis 0 of a stack (N, h, w), leaving out one entry at a time.

    One sort serves every entry. With the good values of a pixel sorted (``s``, NaN last, ``m``
    of them), the median of the others is read at two positions of ``s``: those of the median of
    ``m - 1`` values, each moved up by one where the left-out value ``v`` is not above it
    (``s[p] >= v``; which of equal values is left out does not change the rest), or, for an entry
    without data, those of the median of all ``m``. The four candidate values of the first case
    and the two of the second are gathered once, so that :meth:`without` only selects.
    """

    def __init__(self, stack: np.ndarray, good: np.ndarray):
        data = np.where(good, stack, np.float32(np.nan))
        # np.sort along the short axis 0 (no index array to gather through, no rank array)
        ordered = np.sort(data, axis=0)
        self.data = data
        self.count = good.sum(axis=0)
        self.good = good
        top = len(stack) - 1

        def at(position):
            index = np.minimum(np.clip(position, 0, None), top)[None]
            return np.take_along_axis(ordered, index, axis=0)[0]

        lo, hi = (self.count - 2) // 2, (self.count - 1) // 2          # median of m - 1 values
        self._lo, self._lo_up = at(lo), at(np.clip(lo, 0, None) + 1)
        self._hi, self._hi_up = at(hi), at(np.clip(hi, 0, None) + 1)
        self._lo_all, self._hi_all = at((self.count - 1) // 2), at(self.count // 2)   # median of m values

    def without(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Median of the good entries other than ``k`` and their number."""
        good = self.good[k]
        value = self.data[k]
        n_other = self.count - good
        a = np.where(good, np.where(self._lo < value, self._lo, self._lo_up), self._lo_all)
        b = np.where(good, np.where(self._hi < value, self._hi, self._hi_up), self._hi_all)
        return 0.5 * (a + b), n_other


class _LabelAxes(NamedTuple):
    """The labelled pixels of a label image, and per label of an index its centroid and principal axes.

    Attributes
    ----------
    yy, xx, lab : ndarray of int
        The labelled pixels (rows, columns) and their labels.
    n_labels : int
        Largest label + 1.
    mx, my : ndarray, shape (len(index),)
        Centroids [pixel].
    major, minor : ndarray, shape (len(index),)
        Second moments along the major and minor axes, each pixel a uniform square (+1/12);
        ``minor`` at least 1/12 [pixel^2].
    """

    yy: np.ndarray
    xx: np.ndarray
    lab: np.ndarray
    n_labels: int
    mx: np.ndarray
    my: np.ndarray
    major: np.ndarray
    minor: np.ndarray


def _label_axes(labels: np.ndarray, index: np.ndarray) -> _LabelAxes:
    """Per label of ``index``: its centroid and the variances along its principal axes (:class:`_LabelAxes`)."""
    # moments by bincount over the labelled pixels only (ndimage.sum_labels scans the whole block)
    yy, xx = np.nonzero(labels)
    lab = labels[yy, xx]
    n_labels = int(labels.max()) + 1
    count = np.maximum(np.bincount(lab, minlength=n_labels)[index], 1).astype(np.float64)

    def mean(values):
        return np.bincount(lab, weights=values, minlength=n_labels)[index] / count

    xf, yf = xx.astype(np.float64), yy.astype(np.float64)
    mx, my = mean(xf), mean(yf)
    cxx = mean(xf * xf) - mx**2 + 1 / 12
    cyy = mean(yf * yf) - my**2 + 1 / 12
    cxy = mean(xf * yf) - mx * my
    half_trace, root = 0.5 * (cxx + cyy), np.sqrt(0.25 * (cxx - cyy) ** 2 + cxy**2)
    return _LabelAxes(yy, xx, lab, n_labels, mx, my, half_trace + root, np.maximum(half_trace - root, 1 / 12))


def _label_moments(labels: np.ndarray, index: np.ndarray, z: np.ndarray, config: AssembleConfig,
                   elongation: float | None = None):
    """Per label of ``index``: whether it is elongated (a trail), where its peak and its centre of ``z`` are.

    Returns
    -------
    elongated : ndarray of bool, shape (len(index),)
        Second-moment axis ratio above ``elongation`` (default ``clip_elongation``) over at least
        ``clip_min_length`` pixels.
    peak_y, peak_x : ndarray of int, shape (len(index),)
        The pixel of each label's largest ``z``.
    centre_y, centre_x : ndarray of int, shape (len(index),)
        The pixel of each label's centroid weighted by ``z`` (its positive part; the unweighted
        centroid where it has none).
    """
    yy, xx, lab, n_labels, mx, my, major, minor = _label_axes(labels, index)
    xf, yf = xx.astype(np.float64), yy.astype(np.float64)
    length = np.sqrt(12 * major)                                  # a uniform bar's length [pixel]
    ratio_max = config.clip_elongation if elongation is None else elongation
    elongated = (np.sqrt(major / minor) > ratio_max) & (length >= config.clip_min_length)
    # each label's peak: the last pixel of its label in (label, z) order
    order = np.lexsort((z[yy, xx], lab))
    last = np.flatnonzero(np.r_[lab[order][1:] != lab[order][:-1], True])
    peak_y = np.zeros(n_labels, np.intp)
    peak_x = np.zeros(n_labels, np.intp)
    peak_y[lab[order][last]], peak_x[lab[order][last]] = yy[order][last], xx[order][last]
    weight = np.maximum(z[yy, xx], 0.0).astype(np.float64)
    total = np.bincount(lab, weights=weight, minlength=n_labels)[index]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.where(total > 0, np.bincount(lab, weights=weight * xf, minlength=n_labels)[index] / total, mx)
        cy = np.where(total > 0, np.bincount(lab, weights=weight * yf, minlength=n_labels)[index] / total, my)
    ny, nx = labels.shape
    centre_y = np.clip(np.rint(cy), 0, ny - 1).astype(np.intp)
    centre_x = np.clip(np.rint(cx), 0, nx - 1).astype(np.intp)
    return elongated, peak_y[index], peak_x[index], centre_y, centre_x


def _label_lengths(labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Per label of ``index``: its length, that of a uniform bar of the same major-axis second moment [pixel]."""
    return np.sqrt(12 * _label_axes(labels, index).major)


def classify_footprints(labels: np.ndarray, index: np.ndarray, z: np.ndarray, protect: np.ndarray,
                        config: AssembleConfig) -> np.ndarray:
    """Which outlier footprints of ``warp - reference`` are artifacts, decided per footprint.

    A footprint is an artifact when it is elongated (a satellite or aircraft trail: the ratio of
    the axes of its second moments above ``clip_elongation`` over at least ``clip_min_length``
    pixels), or when both its peak and its centre (``z``-weighted centroid) lie outside the
    reference's sources (a cosmic ray, a ghost, an asteroid). A compact footprint peaking or
    centred on a reference source is the source itself, changed by the seeing or by variability,
    and is kept whole: the ring of a wide star's wing about a sharp core peaks anywhere on the
    ring, possibly beyond the protected region, but is centred on the core.

    Parameters
    ----------
    labels : ndarray of int, shape (h, w)
        Footprint labels (0: none).
    index : ndarray of int
        The labels to classify.
    z : ndarray, shape (h, w)
        S/N of warp - reference.
    protect : ndarray of bool, shape (h, w)
        Pixels of the reference's sources.

    Returns
    -------
    ndarray of bool, shape (len(index),)
    """
    if len(index) == 0:
        return np.zeros(0, bool)
    elongated, peak_y, peak_x, centre_y, centre_x = _label_moments(labels, index, z, config)
    return elongated | (~protect[peak_y, peak_x] & ~protect[centre_y, centre_x])


def own_source_snr(image: np.ndarray, variance: np.ndarray, good: np.ndarray) -> np.ndarray:
    """S/N of a warp's own image smoothed at the PSF scale, its masked pixels filled by normalised convolution.

    The Gaussian (sigma 1.5 pixel) is applied to the usable pixels only and divided by the
    fraction of its weight on them, so that a source is not diluted next to masked pixels or the
    edge of the data; pixels with less than a quarter of the weight on usable pixels (inside a
    wide mask, beyond the data) get 0.

    Parameters
    ----------
    image, variance : ndarray, shape (h, w)
        The warp's rows.
    good : ndarray of bool, shape (h, w)
        The warp's usable pixels.

    Returns
    -------
    ndarray of float32, shape (h, w)
    """
    sigma = 1.5                                                     # the same PSF-scale smoothing [pixel]
    kernel_norm = 1.0 / (4 * np.pi * sigma**2)
    cover = ndimage.gaussian_filter(good.astype(np.float32), sigma, mode="nearest")
    safe = np.maximum(cover, 0.05)
    smooth = ndimage.gaussian_filter(np.where(good, image, 0.0).astype(np.float32), sigma, mode="nearest") / safe
    # the variance too by normalised convolution (a masked pixel's variance is not to be trusted)
    mean_var = ndimage.gaussian_filter(np.where(good, variance, 0.0).astype(np.float32), sigma, mode="nearest") / safe
    noise = np.sqrt(np.maximum(mean_var, 1e-30) * kernel_norm / safe)
    return np.where(cover >= 0.25, smooth / noise, 0.0).astype(np.float32)


def _own_sources(snr: np.ndarray, config: AssembleConfig, elongation: float | None = None):
    """The sources of a warp's own image: connected pixels of ``snr`` above ``protect_threshold``.

    Returns
    -------
    own : ndarray of int, shape (h, w)
        Source labels (0: none).
    components : ndarray of int
        The labels, 1 ... n (empty without a source; then the rest are empty too).
    elongated, peak_y, peak_x : ndarray, shape (len(components),)
        As :func:`_label_moments` gives them (``elongation``: its axis-ratio limit).
    """
    own, n_own = ndimage.label(snr > config.protect_threshold, structure=np.ones((3, 3), bool))
    components = np.arange(1, n_own + 1)
    if n_own == 0:
        empty = np.zeros(0, np.intp)
        return own, components, np.zeros(0, bool), empty, empty
    elongated, peak_y, peak_x, _, _ = _label_moments(own, components, snr, config, elongation)
    return own, components, elongated, peak_y, peak_x


def sources_beyond_reference(labels: np.ndarray, index: np.ndarray, image: np.ndarray, variance: np.ndarray,
                             good: np.ndarray, unseen: np.ndarray, config: AssembleConfig,
                             snr: np.ndarray | None = None) -> np.ndarray:
    """Which outlier footprints belong to a compact source of the warp itself that the reference cannot see.

    At the edge of the other warps' coverage the reference has a star's wing but not its core:
    the wing of a warp with worse seeing then stands out from the reference in pieces cut off
    from the core, each peaking off the reference's sources, and would be taken for cosmic rays.
    Such a piece is kept when it lies on a source of the warp's *own* image (PSF-smoothed S/N
    above ``protect_threshold``, grown by ``protect_grow``) that is compact and peaks where the
    reference has no data. Compact is judged more strictly than for the outlier footprints (axis
    ratio at most :data:`OWN_SOURCE_ELONGATION`): a star in its own image is round, while a trail's
    piece between two masks (cosmic rays) may be short enough to pass for compact as an outlier.

    Parameters
    ----------
    labels : ndarray of int, shape (h, w)
        Outlier footprint labels (0: none).
    index : ndarray of int
        The labels to test.
    image, variance : ndarray, shape (h, w)
        The warp's rows.
    good : ndarray of bool, shape (h, w)
        The warp's usable pixels.
    unseen : ndarray of bool, shape (h, w)
        Usable pixels of the warp where the reference has too few warps to be compared with.
    snr : ndarray, shape (h, w), optional
        :func:`own_source_snr` of the warp, if already computed.

    Returns
    -------
    ndarray of bool, shape (len(index),)
    """
    keep = np.zeros(len(index), bool)
    if len(index) == 0 or not unseen.any():
        return keep
    if snr is None:
        snr = own_source_snr(image, variance, good)
    snr = np.where(good, snr, 0.0)
    own, components, elongated, peak_y, peak_x = _own_sources(snr, config, OWN_SOURCE_ELONGATION)
    if len(components) == 0:
        return keep
    compact_unseen = np.zeros(len(components) + 1, bool)
    compact_unseen[components] = ~elongated & unseen[peak_y, peak_x]
    if not compact_unseen.any():
        return keep
    region = compact_unseen[own]
    if config.protect_grow:
        region = grow_mask(region, int(config.protect_grow))
    on_region = np.zeros(int(labels.max()) + 1, bool)
    on_region[np.unique(labels[region & (labels > 0)])] = True
    return on_region[index]


def sources_cut_by_mask(labels: np.ndarray, index: np.ndarray, cut: np.ndarray, protect: np.ndarray,
                        snr: np.ndarray, config: AssembleConfig) -> np.ndarray:
    """Which outlier footprints are pieces of a star's wing cut off by masked pixels.

    A bad column, a cosmic ray or a CCD edge beside a star, in a wide-seeing warp or in the sharp
    reference, cuts a strip of the wide wing off from the core. Against the sharp reference the
    strip is an outlier that may peak and be centred off the reference's protected source (whose
    own wing the mask cuts too) and may be elongated along the mask, so it would be taken for an
    artifact. It is the star's wing when the footprint touches the cut pixels and lies (at least
    half of its pixels) on a compact source of the warp's own image (:func:`own_source_snr` above
    ``protect_threshold``, the warp's masked pixels filled so that its mask does not split the
    source; grown by ``protect_grow``; not elongated by ``clip_elongation``) whose peak lies on a
    reference source. A trail stays an
    artifact: in the warp's own image it is an elongated source, alone or with the star it
    crosses, and most of its footprint lies off any star.

    Parameters
    ----------
    labels : ndarray of int, shape (h, w)
        Outlier footprint labels (0: none).
    index : ndarray of int
        The labels to test.
    cut : ndarray of bool, shape (h, w)
        Pixels where the warp and its reference are not compared: the warp's own masked pixels
        and those without data, and those where the reference has too few warps.
    protect : ndarray of bool, shape (h, w)
        Pixels of the reference's sources.
    snr : ndarray, shape (h, w)
        :func:`own_source_snr` of the warp.

    Returns
    -------
    ndarray of bool, shape (len(index),)
    """
    keep = np.zeros(len(index), bool)
    if len(index) == 0:
        return keep
    n_labels = int(labels.max()) + 1
    near_mask = grow_mask(cut, 2) & (labels > 0)                # the footprint touches (or nearly) a cut
    touching = np.zeros(n_labels, bool)
    touching[np.unique(labels[near_mask])] = True
    if not touching[index].any():
        return keep
    own, components, elongated, peak_y, peak_x = _own_sources(snr, config)
    if len(components) == 0:
        return keep
    n_own = len(components)
    star = np.zeros(n_own + 1, bool)
    star[components] = ~elongated & protect[peak_y, peak_x]
    if not star.any():
        return keep
    # each footprint's star: the star's own source (grown) under most of its pixels
    stars = np.where(star[own], own, 0)
    if config.protect_grow:
        stars = ndimage.grey_dilation(stars, size=2 * int(config.protect_grow) + 1)
    position = np.full(n_labels, -1, np.int64)
    position[index] = np.arange(len(index))
    yy, xx = np.nonzero(labels)
    pos = position[labels[yy, xx]]
    yy, xx, pos = yy[pos >= 0], xx[pos >= 0], pos[pos >= 0]
    size = np.bincount(pos, minlength=len(index))
    under = stars[yy, xx]
    pairs, count = np.unique(pos[under > 0] * (n_own + 1) + under[under > 0], return_counts=True)
    host = np.zeros(len(index), np.int64)
    best = np.zeros(len(index), np.int64)
    for key, c in zip(pairs, count):            # a few pairs: the footprints on stars
        i = key // (n_own + 1)
        if c > best[i]:
            best[i], host[i] = c, key % (n_own + 1)
    on_star = best >= 0.5 * np.maximum(size, 1)
    # a piece of the star's wing lies within the star's radius in its own image of its peak, and is
    # no longer than the star is wide; a trail passing by joins the star in the own image but
    # reaches farther out, and is longer
    radius = np.sqrt(np.bincount(own.ravel(), minlength=n_own + 1) / np.pi)[host]
    safe = np.maximum(size, 1)
    centre_y, centre_x = np.bincount(pos, weights=yy, minlength=len(index)) / safe, np.bincount(pos, weights=xx, minlength=len(index)) / safe
    host_peak = np.maximum(host - 1, 0)
    near = np.hypot(centre_y - peak_y[host_peak], centre_x - peak_x[host_peak]) <= radius
    short = _label_lengths(labels, index) <= 2 * radius
    return touching[index] & on_star & near & short


def trail_pieces(labels: np.ndarray, artifacts: np.ndarray, z: np.ndarray, config: AssembleConfig) -> np.ndarray:
    """Labels of the outlier pieces that lie along a long trail footprint (``trail_join_width``).

    Pixel by pixel a faint trail dips below ``clip_grow_threshold`` and falls into pieces; the
    long ones are trails (elongated), the short ones are too short to tell and a source near them
    keeps them. A trail is straight: every outlier footprint (above ``clip_grow_threshold``,
    seeded or not) whose pixels all lie within ``trail_join_width`` pixels of the axis of an
    artifact footprint elongated over ``trail_join_length`` pixels or more is part of it. A
    star's residual is wider than that and stays out; a cosmic ray is shorter.

    Parameters
    ----------
    labels : ndarray of int, shape (h, w)
        Outlier footprints (0: none).
    artifacts : ndarray of int
        The labels already judged artifacts.
    z : ndarray, shape (h, w)
        S/N of warp - reference.
    config : AssembleConfig

    Returns
    -------
    ndarray of int
        Labels to add (may repeat ``artifacts``).
    """
    if len(artifacts) == 0:
        return np.zeros(0, np.int64)
    axes = _label_axes(labels, artifacts)
    length = np.sqrt(12 * axes.major)
    elongated = (np.sqrt(axes.major / axes.minor) > config.clip_elongation) & (length >= config.trail_join_length)
    if not elongated.any():
        return np.zeros(0, np.int64)
    yy, xx, lab = axes.yy, axes.xx, axes.lab
    present = np.bincount(lab, minlength=axes.n_labels) > 0
    out = []
    for k in np.flatnonzero(elongated):
        mine = lab == artifacts[k]
        dx, dy = xx[mine] - axes.mx[k], yy[mine] - axes.my[k]
        angle = 0.5 * np.arctan2(2 * np.mean(dx * dy), np.mean(dx * dx) - np.mean(dy * dy))   # the major axis
        distance = np.abs((xx - axes.mx[k]) * np.sin(angle) - (yy - axes.my[k]) * np.cos(angle))
        widest = np.zeros(axes.n_labels)
        np.maximum.at(widest, lab, distance)
        out.append(np.flatnonzero((widest <= config.trail_join_width) & present))
    members = np.unique(np.concatenate(out))
    return members[members > 0]


def find_artifacts(image: np.ndarray, variance: np.ndarray, good: np.ndarray, config: AssembleConfig) -> np.ndarray:
    """Artifact pixels of each warp of a block (CompareWarp; see the module docstring).

    Each warp is compared with the median of the *other* warps, so that an artifact does not
    lift its own reference (a trail lifts a 5-warp median by ~0.4 sigma per pixel, enough for the
    smoothed reference to "protect" stretches of it).

    Parameters
    ----------
    image, variance : ndarray, float32, shape (n_warp, h, w)
        Rows of the warps (same zeropoint).
    good : ndarray of bool, shape (n_warp, h, w)
        Usable pixels.

    Returns
    -------
    ndarray of bool, shape (n_warp, h, w)
        Pixels to exclude as artifacts (CLIPPED).
    """
    n = image.shape[0]
    clipped = np.zeros(image.shape, bool)
    if n < config.clip_min_warps:
        return clipped
    medians = _LeaveOneOutMedian(image, good)
    inv_var = np.where(good, 1.0 / np.where(good, variance, 1.0), 0.0).astype(np.float32)
    inv_total = inv_var.sum(axis=0)
    sigma = 1.5                                                     # PSF-scale smoothing [pixel]
    kernel_norm = 1.0 / (4 * np.pi * sigma**2)                      # sum of the squared Gaussian weights
    structure = np.ones((3, 3), bool)
    for k in range(n):
        ref, n_other = medians.without(k)
        seen = n_other >= config.clip_min_warps - 1                  # the other warps have data
        use = good[k] & seen
        if not use.any():
            continue
        inv = inv_total - inv_var[k]
        # variance of a median of n ~ pi/2 that of the mean
        var_ref = np.where(inv > 0, (np.pi / 2) / np.where(inv > 0, inv, 1.0), np.inf).astype(np.float32)
        # the reference over all the other warps' data, under warp k's own masked pixels too: a
        # star whose core lies under warp k's mask is still a reference source around it
        ref = np.where(seen, ref, 0.0).astype(np.float32)
        diff = image[k] - ref
        z = np.where(use, diff / np.sqrt(variance[k] + var_ref), 0.0)
        seeds = z > config.clip_threshold
        if not seeds.any():
            continue
        labels, n_labels = ndimage.label(z > config.clip_grow_threshold, structure=structure)
        hit = np.unique(labels[seeds])
        hit = hit[hit > 0]
        # the reference's sources (PSF-smoothed S/N; the noise of the smoothing without the warps'
        # pixel correlations, which overstates the S/N: conservative); normalised convolution: next
        # to missing data (a CCD edge of the other warps) a source is not diluted by the zeros there
        cover = ndimage.gaussian_filter(seen.astype(np.float32), sigma, mode="nearest")
        smooth = ndimage.gaussian_filter(ref, sigma, mode="nearest") / np.maximum(cover, 0.05)
        protect = smooth * np.sqrt(np.maximum(cover, 0.05)) / np.sqrt(var_ref * kernel_norm) > config.protect_threshold
        if config.protect_grow:
            protect = grow_mask(protect, int(config.protect_grow))
        artifact = classify_footprints(labels, hit, z, protect, config)
        unseen = good[k] & ~seen
        own_snr = None
        if artifact.any() and unseen.any():
            own_snr = own_source_snr(image[k], variance[k], good[k])
            artifact[artifact] = ~sources_beyond_reference(labels, hit[artifact], image[k], variance[k], good[k],
                                                           unseen, config, snr=own_snr)
        if artifact.any() and not use.all():
            if own_snr is None:
                own_snr = own_source_snr(image[k], variance[k], good[k])
            artifact[artifact] = ~sources_cut_by_mask(labels, hit[artifact], ~use, protect, own_snr, config)
        if not artifact.any():
            continue
        lookup = np.zeros(n_labels + 1, bool)
        lookup[hit[artifact]] = True
        if config.trail_join_width > 0:
            lookup[trail_pieces(labels, hit[artifact], z, config)] = True
        footprint = lookup[labels]
        if config.clip_grow:
            footprint = grow_mask(footprint, int(config.clip_grow))
        # inside an artifact footprint, a reference source keeps the pixels where the excess could be
        # its own seeing residual (a star core under a trail); a faint source under a trail does not
        # (the reference less 3 sigma of its noise: a noise peak is no source's core; over the
        # protect_grow scale, which covers the seeing differences)
        local_max = ndimage.maximum_filter(ref - 3 * np.sqrt(var_ref), size=2 * int(config.protect_grow) + 1,
                                           mode="nearest")
        allowed = ~protect | (diff > config.protect_ratio * np.maximum(local_max, 0))
        clipped[k] = footprint & allowed & use
    # outliers in many epochs are real (variable or moving sources' regions), not artifacts
    if config.clip_max_epochs < n:
        persistent = clipped.sum(axis=0) > config.clip_max_epochs
        clipped &= ~persistent[None]
    return clipped


def psf_power(warp: Exposure) -> float:
    """Mean over a warp's input CCDs of ``sum(P**2)`` [1 / pixel], ``P`` the CCD's PSF on the patch grid at
    the centre of its valid region, normalised to sum 1: a point source's flux variance is the pixel
    variance over it. 1 for a warp without a :class:`CoaddPsf` (its weight is then the variance's)."""
    psf = warp.psf
    if not isinstance(psf, CoaddPsf) or not psf.inputs:
        return 1.0
    power = []
    for item in psf.inputs:
        x, y = np.mean(np.asarray(item.polygon, float), axis=0)
        kernel = psf.input_kernel(item, float(x), float(y))
        power.append(float(np.sum((kernel / kernel.sum()) ** 2)))
    return float(np.mean(power))


def _sum_over_warps(term, n: int) -> np.ndarray:
    """``term(0) + term(1) + ... + term(n - 1)``, added in that order (``term(k)``: an ``(h, w)`` array of warp ``k``)."""
    if n == 1:
        return np.array(term(0), copy=True)
    total = term(0) + term(1)                 # a new array: ``term`` may return stored planes
    for k in range(2, n):
        total += term(k)
    return total


def _block_height(n_warps: int, nx: int, config: AssembleConfig) -> int:
    bytes_per_pixel = 40                      # image, variance, mask, masks and temporaries per warp
    rows = int(config.block_memory_mb * 2**20 / max(1, n_warps * nx * bytes_per_pixel))
    return max(32, rows)


def assemble_coadd(warps: Sequence[Exposure], *, config: AssembleConfig | None = None) -> AssembleResult:
    """Coadd the warps of one patch and band.

    Parameters
    ----------
    warps : sequence of Exposure
        Warps on the same patch grid and zeropoint (from :func:`snakedrp.coadd.warp.warp_exposures`,
        or :func:`open_warp` to read them from disk a block of rows at a time). Each plane is only
        sliced by rows, twice (weights, then coadd).
    config : AssembleConfig

    Returns
    -------
    AssembleResult
    """
    config = config or AssembleConfig()
    config.validate()
    warps = list(warps)
    if not warps:
        raise ValueError("no warps to assemble")
    ny, nx = _shape(warps[0])
    zeropoints = {float(w.zeropoint) for w in warps if w.zeropoint is not None}
    if len(zeropoints) > 1:
        raise ValueError(f"warps have different zeropoints: {sorted(zeropoints)}")
    for w in warps:
        if _shape(w) != (ny, nx):
            raise ValueError(f"warps have different shapes: {_shape(w)} and {(ny, nx)}")

    # pass 1: one weight per warp; a warp without usable pixels is left out
    mean_var = np.array([warp_variance(w, config) for w in warps])
    usable = np.isfinite(mean_var) & (mean_var > 0)
    dropped = tuple(int(k) for k in np.flatnonzero(~usable))
    if not usable.any():
        raise ValueError(f"none of the {len(warps)} warps has a usable pixel (all masked or no data)")
    warps, mean_var = [w for w, ok in zip(warps, usable) if ok], mean_var[usable]
    n = len(warps)
    weights = 1.0 / mean_var
    if config.weighting == "psf":
        weights = weights * np.array([psf_power(w) for w in warps])

    # pass 2: blocks of rows of all warps
    image = np.full((ny, nx), np.nan, np.float32)
    variance = np.full((ny, nx), np.nan, np.float32)
    mask = np.zeros((ny, nx), np.int32)
    n_image = np.zeros((ny, nx), np.int32)
    n_clipped = np.zeros(n, np.int64)
    bad = np.int32(mask_bits(*config.bad_mask_planes))
    no_data = np.int32(mask_bit("NO_DATA"))
    inexact = np.int32(mask_bit("INEXACT_PSF"))
    propagate = [np.int32(mask_bit(p)) for p in config.propagate_mask_planes]
    height = _block_height(n, nx, config)
    overlap = int(config.block_overlap) if config.do_clip else 0
    w32 = weights.astype(np.float32)[:, None, None]
    for b0 in range(0, ny, height):
        b1 = min(ny, b0 + height)
        r0, r1 = max(0, b0 - overlap), min(ny, b1 + overlap)
        img = np.stack([np.asarray(w.image[r0:r1], np.float32) for w in warps])
        var = np.stack([np.asarray(w.variance[r0:r1], np.float32) for w in warps])
        msk = np.stack([np.asarray(w.mask[r0:r1], np.int32) for w in warps])
        good = ((msk & bad) == 0) & np.isfinite(img) & np.isfinite(var) & (var > 0)
        clipped = find_artifacts(img, var, good, config) if config.do_clip else np.zeros_like(good)
        core = slice(b0 - r0, b0 - r0 + (b1 - b0))
        img, var, msk, good, clipped = img[:, core], var[:, core], msk[:, core], good[:, core], clipped[:, core]
        n_clipped += clipped.sum(axis=(1, 2))
        use = good & ~clipped
        # sums over the warps one warp at a time, in warp order (as numpy sums over axis 0): no
        # (n_warp, h, w) temporaries
        sw = _sum_over_warps(lambda k: np.where(use[k], w32[k], np.float32(0.0)), n)
        has = sw > 0
        safe = np.where(has, sw, 1.0)
        sum_i = _sum_over_warps(lambda k: np.where(use[k], w32[k], np.float32(0.0)) * np.where(use[k], img[k], 0.0), n)
        image[b0:b1] = np.where(has, sum_i / safe, np.nan)
        sum_v = _sum_over_warps(lambda k: np.where(use[k], w32[k], np.float32(0.0)) ** 2 * np.where(use[k], var[k], 0.0), n)
        variance[b0:b1] = np.where(has, sum_v / safe**2, np.nan)
        n_image[b0:b1] = use.sum(axis=0)
        out = np.where(has, 0, no_data).astype(np.int32)
        out |= np.where(clipped.any(axis=0), np.int32(mask_bit("CLIPPED")), 0).astype(np.int32)
        # a warp with data left out (masked or clipped): the coadd PSF, the weighted sum of every
        # covering input's PSF, does not describe the pixel
        left_out = np.zeros((b1 - b0, nx), bool)
        for k in range(n):
            left_out |= ((msk[k] & no_data) == 0) & ~use[k]
        out |= np.where(left_out, inexact, 0).astype(np.int32)
        data_w = [np.where((msk[k] & no_data) == 0, w32[k], np.float32(0.0)) for k in range(n)]
        total = np.maximum(_sum_over_warps(data_w.__getitem__, n), np.float32(1e-30))
        present = np.bitwise_or.reduce(msk, axis=None)
        for bit in propagate:
            if not present & bit:                 # no warp has it in the block: its weight fraction is 0
                continue
            frac = _sum_over_warps(lambda k: np.where((msk[k] & bit) != 0, data_w[k], 0.0), n) / total
            out |= np.where(frac > config.mask_propagation_threshold, bit, 0).astype(np.int32)
        mask[b0:b1] = out

    psf_parts = [(w.psf, float(wt)) for w, wt in zip(warps, weights) if isinstance(w.psf, CoaddPsf)]
    psf = CoaddPsf.combine(psf_parts, warps[0].wcs) if psf_parts else None
    rows = []
    for k, w in enumerate(warps):
        visit = int(w.metadata.get("VISIT", -1))
        ccds = [i.ccd for i in w.psf.inputs] if isinstance(w.psf, CoaddPsf) else [-1]
        for ccd in ccds:
            rows.append(dict(visit=visit, ccd=ccd, weight=float(weights[k]), warp_variance=float(mean_var[k]),
                             n_clipped=int(n_clipped[k]), depth=float(w.metadata.get("DEPTH", np.nan))))
    inputs = _inputs_table(rows)
    metadata = fits.Header()
    first = warps[0].metadata
    for key in ("FILTER", "CAMERA"):
        if key in first:
            metadata[key] = (first[key], first.comments[key])
    metadata["NWARP"] = (n, "warps coadded")
    metadata["NCLIPPED"] = (int(n_clipped.sum()), "warp pixels clipped as artifacts")
    metadata["COADDWT"] = ("sum(psf^2)/clipped-mean variance per warp" if config.weighting == "psf"
                           else "1/clipped-mean variance per warp", "coadd weights")
    coadd = Exposure(image=image, mask=mask, variance=variance, wcs=warps[0].wcs, psf=psf,
                     zeropoint=zeropoints.pop() if zeropoints else None, zeropoint_err=0.0, metadata=metadata)
    return AssembleResult(coadd=coadd, n_image=n_image, inputs=inputs, dropped=dropped)


def _inputs_table(rows: list[dict]) -> Table:
    table = Table(rows=rows, names=("visit", "ccd", "weight", "warp_variance", "n_clipped", "depth"))
    described = {
        "visit": ("", "Visit of the input"),
        "ccd": ("", "CCD of the input"),
        "weight": ("", "Coadd weight of the visit's warp: 1 / its clipped-mean variance, times sum(psf^2) with assemble.weighting 'psf' [1 / flux units^2]"),
        "warp_variance": ("", "Clipped-mean variance of the warp [flux units^2 at the coadd zeropoint]"),
        "n_clipped": ("pix", "Pixels of the visit's warp clipped as artifacts"),
        "depth": ("mag", "Median 5-sigma point-source depth of the visit's input calexps"),
    }
    for name, (unit, description) in described.items():
        table[name].unit = unit or None
        table[name].description = description
    return table
