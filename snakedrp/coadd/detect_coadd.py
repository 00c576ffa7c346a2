"""Coadd detection (detectCoaddSources): background, variance rescaling, 5-sigma detection.

The warps come from background-subtracted calexps, so the coadd's own background is small and
of large scale. A mesh background of every pixel would still take in the light of the stars'
wings (in a crowded field, enough to eat tens of mmag of a bright star's large-aperture flux), so,
as LSST's detection re-estimates its background once the sources are known, a first background
serves only a first detection; the background subtracted is then estimated again, on the coadd as
assembled, in large boxes, with every detected source masked by a disc reaching well into its wing
(:func:`background_mask`).

The warps' Lanczos resampling and the coadd's mean leave the variance plane a per-pixel
prediction that may differ from the noise actually seen (correlations, the calexps' own
variance scale). As LSST's ScaleVarianceTask does, the variance is rescaled to the noise
measured in empty pixels (undetected, unmasked), then sources are detected with the matched
filter of the coadd PSF's width; the peaks (with their footprint ids) are what the multi-band
merge needs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from astropy.table import Table

from snakedrp.coadd.config import DetectCoaddConfig
from snakedrp.meas.background import estimate_background, sky_mean_level
from snakedrp.meas.detect import detect_sources
from snakedrp.repo.exposure import Exposure, mask_bits

FWHM_PER_SIGMA = 2.3548


@dataclass(frozen=True)
class DetectCoaddResult:
    """Result of :func:`detect_coadd`.

    Attributes
    ----------
    calexp : Exposure
        ``deepCoadd_calexp``: background subtracted, variance rescaled, DETECTED set.
    detections : Table
        ``deepCoadd_det``: one row per peak (deblended child) with its footprint.
    variance_scale : float
        Factor the variance plane was multiplied by.
    """

    calexp: Exposure
    detections: Table
    variance_scale: float


def empty_pixel_variance_ratio(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, planes) -> float:
    """(robust scatter of image / sqrt(variance))^2 over the pixels in none of ``planes``.

    The robust scatter is 1.4826 x the median absolute deviation (sources left undetected and
    their wings do not pull it up as a standard deviation would). NaN without usable pixels.
    """
    bad = (mask & mask_bits(*planes)) != 0
    use = ~bad & np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if use.sum() < 100:
        return float("nan")
    z = image[use] / np.sqrt(variance[use])
    med = np.median(z)
    return float((1.4826 * np.median(np.abs(z - med))) ** 2)


def background_mask(sources: Table, shape: tuple[int, int], fwhm: float, config: DetectCoaddConfig) -> np.ndarray:
    """Pixels kept out of the refined background: a disc around each detected source.

    A source's disc has radius ``max(background_grow_factor x r, r + background_grow_fwhm x fwhm)``,
    at most ``background_grow_max_fwhm x fwhm``, where ``r`` is its footprint radius (the largest
    distance from the centroid to a side of the footprint box, plus half a pixel). The footprint of
    a brighter star reaches farther, so its disc does too, as far into the wing as its light stays
    a fair fraction of the footprint edge's.

    Parameters
    ----------
    sources : Table
        :func:`snakedrp.meas.detect.detect_sources` rows (``x``, ``y``, ``x_min``, ``x_max``,
        ``y_min``, ``y_max``, zero-based [pixel]).
    shape : tuple of int
        ``(ny, nx)`` of the image.
    fwhm : float
        Coadd PSF FWHM [pixel].
    config : DetectCoaddConfig

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    ny, nx = shape
    out = np.zeros(shape, bool)
    if len(sources) == 0:
        return out
    x, y = np.asarray(sources["x"], float), np.asarray(sources["y"], float)
    r = np.max([x - np.asarray(sources["x_min"]), np.asarray(sources["x_max"]) - x,
                y - np.asarray(sources["y_min"]), np.asarray(sources["y_max"]) - y], axis=0) + 0.5
    radius = np.minimum(np.maximum(config.background_grow_factor * r, r + config.background_grow_fwhm * fwhm),
                        config.background_grow_max_fwhm * fwhm)
    for xc, yc, rc in zip(x, y, radius):
        if not (np.isfinite(xc) and np.isfinite(yc)):
            continue
        x0, x1 = max(int(np.floor(xc - rc)), 0), min(int(np.ceil(xc + rc)) + 1, nx)
        y0, y1 = max(int(np.floor(yc - rc)), 0), min(int(np.ceil(yc + rc)) + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        dy2 = (np.arange(y0, y1) - yc)[:, None] ** 2
        dx2 = (np.arange(x0, x1) - xc)[None, :] ** 2
        out[y0:y1, x0:x1] |= dy2 + dx2 <= rc * rc
    return out


def detect_coadd(coadd: Exposure, *, config: DetectCoaddConfig | None = None) -> DetectCoaddResult:
    """Detect sources on a coadd.

    Parameters
    ----------
    coadd : Exposure
        ``deepCoadd`` from :func:`snakedrp.coadd.assemble.assemble_coadd` (NaN where NO_DATA),
        with a PSF model. Not modified.
    config : DetectCoaddConfig

    Returns
    -------
    DetectCoaddResult
    """
    config = config or DetectCoaddConfig()
    config.validate()
    image = np.array(coadd.image, np.float32)
    variance = np.array(coadd.variance, np.float32)
    mask = np.array(coadd.mask, np.int32)
    ny, nx = image.shape
    if coadd.psf is not None:
        fwhm = float(coadd.psf.fwhm((nx - 1) / 2, (ny - 1) / 2))
        sigma = fwhm / FWHM_PER_SIGMA
    else:
        sigma = config.detection.psf_sigma
    background = None
    if config.do_background:
        background = estimate_background(image, mask, config.background)
        first_image = image - background.evaluate()
    else:
        first_image = image
    first = detect_sources(first_image, variance, mask, config.detection, psf_sigma=sigma)
    refined = config.do_background and config.refine_background
    if refined:
        del first_image
        bg_mask = mask.copy()
        np.bitwise_or(bg_mask, np.int32(mask_bits("DETECTED")), out=bg_mask,
                      where=background_mask(first.sources, image.shape, sigma * FWHM_PER_SIGMA, config))
        background = estimate_background(image, bg_mask, config.refined_background)
        image -= background.evaluate()
        if config.subtract_sky_mean:
            # zero mean far from the footprints as detected (not the discs), as the calexps' zero
            # level: the light of undetected sources, which an aperture holds too; nearer, the
            # pixels hold the detected sources' wings, light of those sources, not sky
            footprints = (first.mask & np.int32(mask_bits("DETECTED"))) != 0
            level = sky_mean_level(image, variance, first.mask, config.detection.bad_mask_planes,
                                   footprints=footprints,
                                   exclude_radius=int(np.ceil(config.sky_mean_grow_fwhm * sigma * FWHM_PER_SIGMA)))
            del footprints
            image -= np.float32(level)
            background = replace(background, mesh=background.mesh + np.float32(level),
                                 global_background=background.global_background + level)
        del bg_mask
    else:
        image = first_image
    scale = 1.0
    if config.do_scale_variance:
        # the first detection's footprints: the robust scatter does not see the background's change
        ratio = empty_pixel_variance_ratio(image, variance, first.mask, config.scale_variance_bad_mask_planes)
        if np.isfinite(ratio) and ratio > 0:
            scale = ratio
            variance *= np.float32(scale)
    result = detect_sources(image, variance, mask, config.detection, psf_sigma=sigma) if scale != 1.0 or refined else first
    sources = result.sources
    det = Table()
    footprint = np.where(np.asarray(sources["parent"]) > 0, sources["parent"], sources["id"])
    columns = [
        ("id", np.asarray(sources["id"], np.int64), None, "Peak id (= its value in the segmentation)"),
        ("footprint_id", np.asarray(footprint, np.int64), None, "Id of the footprint holding the peak (its parent when deblended)"),
        ("x", np.asarray(sources["x"], float), "pix", "Windowed x centroid, zero-based on the patch grid"),
        ("y", np.asarray(sources["y"], float), "pix", "Windowed y centroid, zero-based on the patch grid"),
        ("x_peak", np.asarray(sources["x_peak"], np.int32), "pix", "Column of the peak pixel of the PSF-filtered image"),
        ("y_peak", np.asarray(sources["y_peak"], np.int32), "pix", "Row of the peak pixel of the PSF-filtered image"),
        ("peak_value", np.asarray(sources["peak"], float), None, "Highest pixel value of the footprint [coadd flux units, zeropoint ZEROPT]"),
        ("detection_snr", np.asarray(sources["detection_snr"], float), None, "Matched-filter point-source S/N at the peak"),
        ("npix", np.asarray(sources["npix"], np.int32), "pix", "Footprint pixels above threshold"),
        ("x_min", np.asarray(sources["x_min"], np.int32), "pix", "Footprint box: first column"),
        ("x_max", np.asarray(sources["x_max"], np.int32), "pix", "Footprint box: last column"),
        ("y_min", np.asarray(sources["y_min"], np.int32), "pix", "Footprint box: first row"),
        ("y_max", np.asarray(sources["y_max"], np.int32), "pix", "Footprint box: last row"),
    ]
    for name, values, unit, description in columns:
        det[name] = values
        det[name].unit = unit
        det[name].description = description
    if coadd.wcs is not None and len(det):
        ra, dec = coadd.wcs.all_pix2world(det["x"], det["y"], 0)
    else:
        ra = dec = np.full(len(det), np.nan)
    det["coord_ra"] = np.asarray(ra, float)
    det["coord_ra"].unit, det["coord_ra"].description = "deg", "Right ascension of the centroid"
    det["coord_dec"] = np.asarray(dec, float)
    det["coord_dec"].unit, det["coord_dec"].description = "deg", "Declination of the centroid"
    det.meta["THRESH"] = (config.detection.threshold, "detection threshold [filtered S/N]")
    det.meta["PSFSIG"] = (sigma, "matched-filter Gaussian sigma [pixel]")
    det.meta["VARSCALE"] = (scale, "variance plane multiplied by this")
    metadata = coadd.metadata.copy()
    metadata["VARSCALE"] = (scale, "variance rescaled to the empty-pixel noise")
    metadata["NDETECT"] = (len(det), "peaks detected")
    if background is not None:
        metadata["BGMEAN"] = (float(background.global_background), "mean background subtracted")
    calexp = replace(coadd, image=image, variance=variance, mask=result.mask, metadata=metadata)
    return DetectCoaddResult(calexp=calexp, detections=det, variance_scale=scale)
