"""Config sections of the single-frame stage: characterize, calibrate and processCcd (all three).

The algorithm modules (characterize, calibrate, process_ccd) import their configs from here, under
the same names. This module imports only :mod:`snakedrp.pexconfig`, the standard library and other
light modules, so that :mod:`snakedrp.config`, which every Snakefile parse and job script imports,
stays light.
"""
from __future__ import annotations

from dataclasses import dataclass

from snakedrp.calib.config import AstrometryConfig, PhotometryConfig
from snakedrp.isr.config import IsrConfig
from snakedrp.meas.config import (ApCorrConfig, ApertureLossConfig, BackgroundConfig, CosmicRayConfig,
                                  DetectionConfig, MeasureConfig, PsfConfig, ResidualDetectionConfig)
from snakedrp.pexconfig import Config, ConfigError, option, subconfig


@dataclass
class CharacterizeConfig(Config):
    """Characterize a science exposure: background, detection, PSF, cosmic rays, apcorr."""

    psf_fwhm_guess: float = option(4.5, "Starting PSF FWHM of the width estimate, and the first guess when it finds too few stars [pixel]", min=1.0, max=30.0)
    estimate_psf_width: bool = option(True, "Estimate the PSF width from the brightest unsaturated peaks before detection (matched filter, first-guess PSF)? Otherwise psf_fwhm_guess is used")
    psf_width_peak_snr: float = option(10.0, "Peaks of the PSF-width estimate: pixels above this S/N (brightest first, so a crowded CCD uses only its brightest; a sparse one in poor seeing needs the lower ones)", min=3.0)
    psf_width_n_peaks: int = option(60, "Peaks measured for the PSF-width estimate (brightest first)", min=5, max=1000)
    psf_width_min_fraction: float = option(0.6, "PSF stars are at least this fraction of the estimated PSF FWHM (raises psf.fwhm_min for the exposure)", min=0.1, max=1.0)
    refine_background: bool = option(True, "Estimate the background again once the sources are detected, with their footprints masked, and subtract the difference?")
    first_background_subsample: int = option(1, "With refine_background, estimate the first background (the one detection runs on) from every n-th row and column only (1: every pixel). The refined background, from every pixel, corrects its noise; 2 (a quarter of the pixels) saves ~0.1 s an HSC CCD, but the noisier first mesh changes the detections and the final background (by ~0.4 e- rms in a sparse test field), enough to move the zeropoint of a CCD with few calibration stars by several mmag", min=1, max=8)
    subtract_sky_mean: bool = option(True, "... and subtract the mean level left in the sky pixels far from every footprint (sky_mean_grow_fwhm): the light of undetected sources, and the low bias of the background's mode estimate on a Poisson sky (~0.4 e- a pixel), which a PSF fit sees as ~0.4 e- x 4 pi sigma^2 (~70 e-, 0.4 % of an S/N-40 star at 1.3\" seeing)")
    background_grow_fwhm: float = option(1.0, "... the footprints grown by this many PSF FWHM for that estimate (the wings beyond a footprint raise the background, more so in bad seeing)", min=0.0, max=10.0)
    sky_mean_grow_fwhm: float = option(2.0, "subtract_sky_mean: the mean is over the sky pixels farther than this many PSF FWHM from every footprint: nearer, the sky pixels hold the detected stars' wings (at 1.3\" seeing ~1.3 e- a pixel on average outside the footprints of a ci field, 80 % of their light), which are no background of an isolated star, and subtracting them took its PSF flux ~200 e- low (1 % at S/N 40). In a crowded field few pixels are that far (~7 % at 1.3\" in the dense condition), and none leaves the level at 0", min=0.0, max=10.0)
    do_cosmic_ray: bool = option(True, "Find and repair cosmic rays (uses the PSF model)?")
    do_apcorr: bool = option(True, "Fit the aperture correction from PSF flux to the calibration aperture?")
    background: BackgroundConfig = subconfig(BackgroundConfig, "Background model (sep)")
    detection: DetectionConfig = subconfig(DetectionConfig, "Detection of the sources: PSF stars are drawn from them, and calibration measures them (filter: the first-guess PSF)")
    measure: MeasureConfig = subconfig(MeasureConfig, "Measurement for PSF-star selection and of the PSF stars (icSrc)")
    psf: PsfConfig = subconfig(PsfConfig, "PSF star selection and the spatially varying PSF model")
    cosmic_ray: CosmicRayConfig = subconfig(CosmicRayConfig, "Cosmic-ray detection and repair")
    apcorr: ApCorrConfig = subconfig(ApCorrConfig, "Aperture correction")

    def validate(self) -> None:
        super().validate()
        step = self.first_background_subsample
        if self.refine_background and self.background.box_size % step:
            raise ConfigError(f"characterize.first_background_subsample ({step}) must divide "
                             f"characterize.background.box_size ({self.background.box_size})")


@dataclass
class CalibrateConfig(Config):
    """Calibrate a characterized exposure: detection, measurement, astrometry, photometry."""

    do_astrometry: bool = option(True, "Fit the WCS against the reference catalog?")
    do_photometry: bool = option(True, "Fit the photometric zeropoint against the reference catalog?")
    require_astrometry: bool = option(False, "Fail the exposure when the astrometric fit fails (requireAstrometry)? false: the calexp is written with the camera's WCS and no zeropoint, flagged WCSFAIL, and is left out of the coadds and the validation figures")
    refcat_margin: float = option(30.0, "Reference stars loaded out to this far beyond the CCD [arcsec]", min=0.0)
    star_size_max: float = option(1.15, "Unresolved if adaptive-moment size / PSF size is below this", min=1.0)
    recentre_apcorr: bool = option(True, "Move the aperture correction's constant term onto the median of calib_flux / psf_flux - apcorr over the stars of the aperture loss (robust to the neighbours in the calibration aperture of a crowded field; with the aperture loss, whose local-sky fit takes out the zero level of the same stars' apertures, apcorr x aperture loss is their total / PSF flux)?")
    recentre_snr_min: float = option(100.0, "... over the unresolved src stars above this PSF-flux S/N when the aperture loss has fewer than 3 stars", min=1.0)
    redetect: bool = option(False, "Detect again on the characterized exposure (with calibrate.detection and the PSF model's width) instead of measuring characterization's detections?")
    detection: DetectionConfig = subconfig(DetectionConfig, "Detection when calibrate detects: with redetect, or when CalibrateTask runs without detections")
    residual_detection: ResidualDetectionConfig = subconfig(ResidualDetectionConfig, "Second detection pass, on the image with the measured point sources' PSF models subtracted (the threshold and filter of calibrate.detection)")
    measure: MeasureConfig = subconfig(MeasureConfig, "Source measurement")
    aperture_loss: ApertureLossConfig = subconfig(ApertureLossConfig, "Light beyond the calibration aperture (curve of growth of bright stars)")
    astrometry: AstrometryConfig = subconfig(AstrometryConfig, "Reference matching and TAN-SIP fit")
    photometry: PhotometryConfig = subconfig(PhotometryConfig, "Zeropoint fit")


@dataclass
class ProcessCcdConfig(Config):
    """Single-frame processing: the isr, characterize and calibrate sections of the config tree."""

    isr: IsrConfig = subconfig(IsrConfig, "Instrument signature removal")
    characterize: CharacterizeConfig = subconfig(CharacterizeConfig, "Background, PSF, cosmic rays, apcorr")
    calibrate: CalibrateConfig = subconfig(CalibrateConfig, "Detection, measurement, astrometry, photometry")
