"""CharacterizeTask: background, detection, PSF, cosmic rays, aperture correction.

The order follows the LSST CharacterizeImageTask: subtract a first background, estimate the PSF
width from the brightest unsaturated peaks (:func:`snakedrp.meas.detect.estimate_psf_sigma`, so
the matched filter and the first-guess PSF follow the seeing; ``psf_fwhm_guess`` only seeds it),
detect sources, re-estimate the background with their footprints (grown by
``background_grow_fwhm``) masked and subtract the mean left in the sky pixels farther than
``sky_mean_grow_fwhm`` from every footprint (:func:`sky_mean_level`: the light of undetected
sources and the low bias of a mode-type background on a Poisson sky, without the detected
stars' wings),
measure them with a Gaussian first-guess PSF of that width, select PSF stars on the size–flux locus
(no smaller than ``psf_width_min_fraction`` of the estimate, so that cosmic rays cannot form the
locus of a sparse field; reserving a fraction for validation), build the spatially varying PSF model, find and repair
cosmic rays with that PSF, re-measure the PSF stars with the model and fit the aperture
correction from PSF flux to the calibration aperture (the light beyond it, the aperture loss,
is measured by calibration on every bright star). Unlike the LSST stack, the detection runs
once, at the science threshold: the detections that turn out to be cosmic rays are dropped after
the repair (:func:`snakedrp.meas.detect.remove_cosmic_ray_detections`) and calibration measures the
rest, which saves a second pass over the image.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from astropy.table import Table

from snakedrp.meas.apcorr import ApCorrMap, fit_aperture_correction
from snakedrp.meas.background import Background, estimate_background, sky_mean_level
from snakedrp.meas.cosmicray import find_cosmic_rays, repair_cosmic_rays
from snakedrp.meas.detect import (DetectionResult, detect_sources, estimate_psf_sigma, grow_mask,
                                  remove_cosmic_ray_detections, unusable_pixels)
from snakedrp.repo.exposure import Exposure, mask_bit
from snakedrp.meas.measure import measure_sources
from snakedrp.single_frame.config import CharacterizeConfig
from snakedrp.meas.psf import PsfError, build_psf
from snakedrp.repo.psf_model import GaussianPsf
from snakedrp.meas.psf_select import select_psf_stars


class CharacterizeError(RuntimeError):
    """Characterization failed (no PSF stars, ...); the message says why."""


@dataclass(frozen=True)
class CharacterizeResult:
    """What characterization produces.

    Attributes
    ----------
    exposure : Exposure
        Background-subtracted, cosmic rays repaired, CR and DETECTED mask planes set, with ``psf``.
    background : Background
        The subtracted background (the calexpBackground product).
    psf_sources : Table
        icSrc: the bright sources, with ``psf_candidate``, ``psf_used`` and ``reserved`` flags.
    apcorr : ApCorrMap or None
        Ratio of calibration-aperture to PSF flux over the CCD.
    n_cosmic_rays : int
    psf_sigma_estimate : float
        PSF sigma [pixel] the detection filter used (from the bright peaks, or the guess).
    detections : DetectionResult
        The sources detected, without those that were cosmic rays (segmentation and DETECTED mask
        plane included), for :class:`snakedrp.single_frame.calibrate.CalibrateTask` to measure.
    """

    exposure: Exposure
    background: Background
    psf_sources: Table
    apcorr: ApCorrMap | None
    n_cosmic_rays: int
    detections: DetectionResult
    psf_sigma_estimate: float = float("nan")


class CharacterizeTask:
    """Characterize an ISR-corrected exposure (see the module docstring for the steps)."""

    ConfigClass = CharacterizeConfig

    def __init__(self, config: CharacterizeConfig | None = None):
        self.config = config or CharacterizeConfig()
        self.config.validate()

    def run(self, exposure: Exposure, *, overwrite: bool = False) -> CharacterizeResult:
        """Characterize ``exposure``; return a new, characterized exposure.

        ``exposure`` is not modified unless ``overwrite``: then its float32 image becomes the
        characterized one (background subtracted, cosmic rays repaired), which saves a copy of
        it, for a caller that no longer needs the ISR image (ProcessCcdTask).

        Raises
        ------
        CharacterizeError
            No usable sources or PSF stars; the message names visit and ccd.
        """
        cfg = self.config
        where = f"visit {exposure.metadata.get('VISIT', '?')} ccd {exposure.metadata.get('CCD', '?')}"
        image = exposure.image.astype(np.float32, copy=not overwrite)
        variance = exposure.variance

        # with a refined background, the RMS is the refined one's
        background = estimate_background(image, exposure.mask, cfg.background, rms=not cfg.refine_background,
                                         subsample=cfg.first_background_subsample if cfg.refine_background else 1)
        image -= background.evaluate()

        sigma0 = cfg.psf_fwhm_guess / 2.3548
        psf_config = cfg.psf
        if cfg.estimate_psf_width:
            estimate = estimate_psf_sigma(image, variance, exposure.mask, fallback=sigma0,
                                          peak_snr=cfg.psf_width_peak_snr, n_peaks=cfg.psf_width_n_peaks)
            sigma0 = estimate.sigma
            if estimate.n_locus:
                # in a sparse field the cosmic rays (not yet found) can outnumber the bright stars and
                # form the smallest-size clump the star selection looks for: sources much smaller than
                # the estimated PSF are not stars
                psf_config = replace(cfg.psf, fwhm_min=max(cfg.psf.fwhm_min,
                                                           cfg.psf_width_min_fraction * 2.3548 * sigma0))
        guess = GaussianPsf(sigma0)
        detections = detect_sources(image, variance, exposure.mask, cfg.detection, psf_sigma=guess.sigma)
        if len(detections.sources) == 0:
            raise CharacterizeError(f"{where}: no source above {cfg.detection.threshold} sigma "
                                    "(empty field, or every pixel masked)")
        if cfg.refine_background:
            # the first background saw every source: with the detections masked, the light of the
            # sources no longer raises it (in a crowded field by a few e- a pixel, which in a large
            # aperture is a few per cent of a bright star)
            grow = int(np.ceil(cfg.background_grow_fwhm * 2.3548 * sigma0))
            footprints = detections.segmentation > 0
            bg_mask = detections.mask
            if grow > cfg.detection.grow:
                bg_mask = bg_mask.copy()
                np.bitwise_or(bg_mask, bg_mask.dtype.type(mask_bit("DETECTED")), out=bg_mask,
                              where=grow_mask(footprints, grow))
            refined = estimate_background(image, bg_mask, cfg.background)
            del bg_mask
            image -= refined.evaluate()
            level = 0.0
            if cfg.subtract_sky_mean:
                # far from the footprints: nearer, the sky pixels hold the detected stars' wings, which
                # are light of those stars (the aperture loss adds it to them), not an isolated star's sky
                level = sky_mean_level(image, variance, detections.mask, cfg.detection.bad_mask_planes,
                                       footprints=footprints,
                                       exclude_radius=int(np.ceil(cfg.sky_mean_grow_fwhm * 2.3548 * sigma0)))
                image -= np.float32(level)
            del footprints
            background = replace(background, mesh=background.mesh + refined.mesh + np.float32(level),
                                 mesh_rms=refined.mesh_rms,
                                 global_background=background.global_background + refined.global_background + level,
                                 global_rms=refined.global_rms)
        # only what star selection uses (PSF fluxes and pixel flags, at detection's windowed
        # centroids): the PSF stars are measured in full below, with the model
        # measured twice: before and after the cosmic-ray repair, which changes only CR pixels
        bad = unusable_pixels(image, variance, detections.mask, cfg.measure.bad_mask_planes)
        sources = measure_sources(image, variance, detections.mask, detections.sources, guess, cfg.measure,
                                  segmentation=detections.segmentation, footprints=detections.sources,
                                  bad=bad, minimal=True)
        try:
            stars = select_psf_stars(sources, image, detections.mask, psf_config)
            psf_result = build_psf(image, variance, detections.mask, stars, cfg.psf)
        except PsfError as err:
            raise CharacterizeError(f"{where}: {err}") from None
        psf = psf_result.psf

        n_cr = 0
        mask = detections.mask                   # the input mask plus the DETECTED plane
        if cfg.do_cosmic_ray:
            cr = find_cosmic_rays(image, variance, mask, psf, cfg.cosmic_ray)
            # both are this task's to change (the image copied above, or the caller's to overwrite; the
            # mask made by detect_sources)
            image, mask = repair_cosmic_rays(image, mask, cr.cr_mask, psf, cfg.cosmic_ray, in_place=True)
            n_cr = cr.n_cr
            detections = remove_cosmic_ray_detections(detections, image, variance, mask, cfg.detection,
                                                      psf_sigma=guess.sigma)

        # icSrc: the PSF stars re-measured with the model (their fluxes feed the aperture correction)
        psf_sources = measure_sources(image, variance, mask, psf_result.stars, psf, cfg.measure,
                                      segmentation=detections.segmentation, footprints=detections.sources,
                                      bad=None if "CR" in cfg.measure.bad_mask_planes else bad)
        for name in ("psf_candidate", "psf_used", "reserved", "moments_sigma", "moments_e1", "moments_e2"):
            psf_sources[name] = psf_result.stars[name]
        apcorr = None
        if cfg.do_apcorr:
            t = psf_sources[np.asarray(psf_sources["psf_used"], bool)]
            apcorr = fit_aperture_correction(
                np.asarray(t["x_centroid"]), np.asarray(t["y_centroid"]),
                np.asarray(t["psf_flux"]), np.asarray(t["psf_flux_err"]),
                np.asarray(t["calib_flux"]), np.asarray(t["calib_flux_err"]),
                shape=image.shape, config=cfg.apcorr)
        metadata = exposure.metadata.copy()
        metadata["PSFSIG0"] = (float(sigma0), "PSF sigma of the detection filter (bright-peak estimate) [pixel]")
        out = replace(exposure, image=image, mask=mask, psf=psf, metadata=metadata)
        return CharacterizeResult(exposure=out, background=background, psf_sources=psf_sources,
                                  apcorr=apcorr, n_cosmic_rays=n_cr, detections=replace(detections, mask=mask),
                                  psf_sigma_estimate=float(sigma0))
