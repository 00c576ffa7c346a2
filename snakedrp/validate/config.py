"""Configs of validation against truth (single frame, coadds) and of the survey (SRD) metrics.

The algorithm modules (metrics, coadd, single_frame) import their configs from here, under the same
names. This module imports only :mod:`snakedrp.pexconfig`, the standard library and other light
modules, so that :mod:`snakedrp.config`, which every Snakefile parse and job script imports, stays
light.
"""
from __future__ import annotations

from dataclasses import dataclass

from snakedrp.meas.config import ApertureLossConfig
from snakedrp.pexconfig import Config, option, subconfig


#: LSST SRD (LPM-17) specifications: (minimum, design, stretch); lower is better for every one.
SRD_SPECS = {
    "PA1": (8.0, 5.0, 3.0),
    "PF1": (20.0, 10.0, 5.0),
    "PA2": (15.0, 15.0, 10.0),
    "AM1": (20.0, 10.0, 5.0),
    "AF1": (20.0, 10.0, 5.0),
    "AD1": (40.0, 20.0, 10.0),
}


LEVELS = ("minimum", "design", "stretch")


@dataclass
class MetricsConfig(Config):
    """Survey (SRD) metrics from the pipeline's own src catalogs: PA1, PF1/PA2, AM1, AF1/AD1."""

    enabled: bool = option(True, "Compute the SRD metrics in the validate target")
    goal_level: str = option("design", "SRD level a metric must reach to pass", choices=LEVELS)
    strict: bool = option(False, "A missed metric fails the job? (survey metrics are reported with their marks; validation.strict gates the figures against truth)")
    match_radius: float = option(1.0, "Radius for matching sources across visits [arcsec]", min=0.01)
    snr_min: float = option(50.0, "Minimum PSF-flux S/N (median over a star's visits) of the stars used", min=1.0)
    max_extendedness: float = option(0.5, "Stars: median src extendedness below this (adaptive-moment size vs PSF)", min=0.0, max=1.0)
    min_visits: int = option(2, "A star must be matched in at least this many visits", min=2)
    n_shuffles: int = option(50, "Random draws of visit pairs for PA1 (validate_drp numRandomShuffles)", min=1)
    seed: int = option(12345, "Seed of the random visit pairs (the metrics are reproducible)")
    min_stars: int = option(20, "Fewest matched stars for PA1/PF1/PA2 (fewer: not computed)", min=2)
    am1_distance: float = option(5.0, "AM1 star-pair separation D [arcmin]", min=0.1)
    am_width: float = option(2.0, "Full width of the separation annulus around D [arcmin] (validate_drp: 2)", min=0.01)
    min_pairs: int = option(20, "Fewest star pairs for AM1/AF1/AD1 (fewer: not computed)", min=1)
    bright_snr_min: float = option(500.0, "Also report PA1 of the stars above this median S/N (PA1@SNR..., no SRD spec; 0: never)", min=0.0)
    small_field_distance: float = option(2.0, "When AM1 cannot be computed, also report AM@D at this D [arcmin] (not AM1; 0: never)", min=0.0)
    pa1_spec: list[float] = option(list(SRD_SPECS["PA1"]), "PA1 spec [mmag]: minimum, design, stretch")
    pf1_spec: list[float] = option(list(SRD_SPECS["PF1"]), "PF1 spec [%]: minimum, design, stretch")
    pa2_spec: list[float] = option(list(SRD_SPECS["PA2"]), "PA2 spec [mmag]: minimum, design, stretch")
    am1_spec: list[float] = option(list(SRD_SPECS["AM1"]), "AM1 spec [mas]: minimum, design, stretch")
    af1_spec: list[float] = option(list(SRD_SPECS["AF1"]), "AF1 spec [%]: minimum, design, stretch")
    ad1_spec: list[float] = option(list(SRD_SPECS["AD1"]), "AD1 spec [mas]: minimum, design, stretch")

    def validate(self) -> None:
        super().validate()
        for name in ("pa1", "pf1", "pa2", "am1", "af1", "ad1"):
            spec = getattr(self, f"{name}_spec")
            if len(spec) != 3 or not spec[0] >= spec[1] >= spec[2]:
                raise ValueError(f"metrics.{name}_spec must be [minimum, design, stretch] with minimum >= "
                                 f"design >= stretch (lower is better), got {spec}")

    def spec(self, name: str) -> dict[str, float]:
        """``{minimum, design, stretch}`` of metric ``name`` (e.g. ``"PA1"``)."""
        return dict(zip(LEVELS, (float(v) for v in getattr(self, f"{name.lower()}_spec"))))


@dataclass
class CoaddValidateConfig(Config):
    """Accuracy goals of the coadds, checked against the simulator's truth."""

    trail_nsigma_goal: float = option(3.0, "Goal: |mean coadd flux on the trail - control strips| in units of the strips' scatter", min=0.0)
    clipped_mag_max: float = option(20.0, "Stars brighter than this [AB mag] must have no CLIPPED pixel within 2 FWHM of the coadd PSF at the star (CLIPPED pixels on the simulated satellite trails, the trail rightly rejected, not counted)", min=10.0)
    trail_clip_margin: int = option(5, "CLIPPED regions within this many pixels of a simulated trail's 1.5-sigma strip are the trail's (its footprint beyond the strip, grown by assemble.clip_grow, and holed by the stars' protection), not a star's damage [pixel]", min=0, max=50)
    noise_goal: float = option(5.0, "Goal: |measured empty-pixel noise / variance-plane prediction - 1| [%]", min=0.0)
    psf_fwhm_goal: float = option(1.0, "Goal: |median model / star FWHM - 1| on bright isolated stars [%]", min=0.0)
    astrometry_rms_goal: float = option(10.0, "Goal: RMS of bright-star coadd positions vs truth [mas]", min=0.0)
    flux_bias_goal: float = option(5.0, "Goal: |median bright-star coadd magnitude - truth| [mmag]", min=0.0)
    depth_goal: float = option(0.2, "Goal: |measured - predicted 5-sigma point-source depth| [mag]", min=0.0)
    star_mag_range: list[float] = option([17.5, 21.0], "Magnitudes of the bright stars used [AB mag]")
    isolation_fwhm: float = option(6.0, "A star is isolated without a brighter-than-+3-mag object within this many FWHM of the coadd PSF at the star", min=1.0)
    aperture_fwhm: float = option(4.0, "Calibration-aperture radius of the stars' total fluxes [FWHM of the widest input PSF covering the star, so that it holds the same fraction of each input's light], as measure.calib_aperture_fwhm; the light beyond it comes from the covering inputs' curves of growth (at least calib_aperture_fwhm)", min=1.0)
    detect_nsigma: float = option(1.5, "Footprints of the neighbours left out of the stars' apertures and curve of growth: pixels above this many sigma [sigma]", min=0.5)
    curve_of_growth: ApertureLossConfig = subconfig(ApertureLossConfig, "The stars' annuli beyond the aperture (n_annuli, radius_max, radius_max_pixels) and the wing's power law (tail_index), as the calexps' measure.aperture_loss; the light beyond the aperture comes from the inputs' curves of growth (enabled: false gives aperture fluxes)")
    calib_aperture_fwhm: float = option(4.0, "The calexps' calibration-aperture radius [FWHM] (measure.calib_aperture_fwhm), where their curves of growth start", min=0.5, max=20.0)
    n_depth_positions: int = option(3000, "Random empty positions for the depth measurement", min=100)
    depth_clear_fwhm: float = option(3.0, "A depth position is empty when no DETECTED pixel lies within this many coadd-PSF FWHM of it (a single visit's PSF kernel reaches 3 FWHM) and no unusable pixel in its kernel box, whose side is that of the widest input's kernel: a crowded patch has few such boxes free of detections", min=0.5)
    depth_min_positions: int = option(300, "With fewer empty positions than this (a very crowded patch), no depth figure", min=10)
    seed: int = option(1, "Seed of the random positions", min=0)


@dataclass
class MultibandValidateConfig(Config):
    """Accuracy goals of the multi-band object tables, checked against the simulator's truth."""

    star_mag_range: list[float] = option([17.5, 21.0], "Magnitudes of the bright stars used, in every band [AB mag]")
    snr_min: float = option(100.0, "... with a forced PSF-flux S/N of at least this in every band", min=1.0)
    isolation_radius: float = option(5.0, "A star is isolated without an object brighter than it + 3 mag (in the band of the figure, or any band for colours) within this radius [arcsec]", min=0.0)
    match_radius: float = option(0.5, "Primary objects within this radius of a true star are its matches [arcsec]", min=0.01)
    flux_bias_goal: float = option(5.0, "Goal: |median forced PSF magnitude - true total magnitude| of the bright isolated stars, each band [mmag]", min=0.0)
    colour_bias_goal: float = option(5.0, "Goal: |median measured - true colour| of the bright isolated stars, each pair of bands adjacent in wavelength [mmag]", min=0.0)
    astrometry_rms_goal: float = option(10.0, "Goal: RMS of the bright isolated stars' reference positions vs truth [mas]", min=0.0)
    duplicate_goal: float = option(0.5, "Goal: bright isolated stars matched by more than one primary object (a patch or tract overlap counted twice) [%]", min=0.0, max=100.0)


@dataclass
class ValidateConfig(Config):
    """Accuracy goals of single-frame processing, checked against the simulator's truth."""

    enabled: bool = option(True, "Run validation when the repository has simulator truth")
    strict: bool = option(False, "Fail the validation job when a figure misses its goal (tests and CI); otherwise the report marks it and the run goes on")
    match_radius: float = option(1.5, "Radius for matching measured to true sources [pixel]", min=0.1)
    astrometry_snr_min: float = option(50.0, "S/N above which stars enter the centroid scatter (reported with its expectation from their S/N)", min=1.0)
    wcs_grid: list[int] = option([8, 16], "Grid (nx, ny) of points over each CCD where the fitted WCS is compared with the true mapping")
    astrometry_rms_goal: float = option(10.0, "Goal: RMS distance between the fitted and the true pixel-to-sky mapping on the grid, over all CCDs [mas]", min=0.0)
    photometry_snr_min: float = option(100.0, "PSF S/N above which isolated stars enter the photometric calibration error", min=1.0)
    photometry_goal: float = option(5.0, "Goal: max over CCDs of |median(calibrated psf_mag - true total mag)| of bright isolated stars [mmag]", min=0.0)
    psf_fwhm_goal: float = option(1.0, "Goal: RMS relative PSF FWHM error at reserved stars [%]", min=0.0)
    psf_e_goal: float = option(0.005, "Goal: RMS PSF ellipticity (e1, e2) error at reserved stars", min=0.0)
    cr_recovery_goal: float = option(95.0, "Goal: fraction of true cosmic-ray pixels flagged CR [%]", min=0.0, max=100.0)
    cr_min_signal: float = option(5.0, "A true CR pixel counts if its deposit exceeds this many sigma of the noise", min=0.0)
    completeness_snr: float = option(10.0, "S/N at which completeness is measured", min=1.0)
    completeness_band: list[float] = option([0.8, 1.5], "... counted over the stars whose expected S/N is between these multiples of completeness_snr (8-15 at S/N 10: one CCD of two visits holds ~12 isolated stars within +-20 %, so one miss was 8 %; the band keeps the threshold, 5, well below)")
    completeness_goal: float = option(90.0, "Goal: src completeness of isolated stars at that S/N [%]", min=0.0, max=100.0)
    psf_flux_snr_min: float = option(100.0, "S/N above which stars enter the PSF-flux bias", min=1.0)
    psf_flux_bias_goal: float = option(5.0, "Goal: |median PSF-flux bias| of bright stars [mmag]", min=0.0)
    isolation_radius: float = option(10.0, "A true star is isolated if no other object within this radius [pixel] (or isolation_fwhm PSF FWHM, whichever is larger) ...", min=0.0)
    isolation_fwhm: float = option(2.5, "... or within this many PSF FWHM (10 pixels at the demo's 4-pixel FWHM; 22 at 1.5\" seeing, where 10 pixels is 1.1 FWHM)", min=0.0)
    completeness_match_fwhm: float = option(0.3, "Completeness matches a true star to a detection within match_radius or this many PSF FWHM, whichever is larger (5 sigma of the centroid error of an S/N-10 star)", min=0.0)
    isolation_flux_ratio: float = option(0.05, "... has more than this fraction of its flux (blends have no single true position)", min=0.0)
    coadd: CoaddValidateConfig = subconfig(CoaddValidateConfig, "Accuracy goals of the coadds (validate_coadd)")
    multiband: MultibandValidateConfig = subconfig(MultibandValidateConfig, "Accuracy goals of the multi-band object tables (validate_multiband)")
