"""Configs of the measurement algorithms: background, detection, cosmic rays, PSF, measurement and
aperture corrections.

The algorithm modules (background, detect, cosmicray, psf, measure, apcorr) import their configs
from here, under the same names. This module imports only :mod:`snakedrp.pexconfig`, the standard
library and other light modules, so that :mod:`snakedrp.config`, which every Snakefile parse and job
script imports, stays light.
"""
from __future__ import annotations

from dataclasses import dataclass

from snakedrp.pexconfig import Config, ConfigError, option
from snakedrp.repo.mask_planes import MASK_PLANES


@dataclass
class BackgroundConfig(Config):
    """Sky background model (sep / SExtractor mesh + bicubic spline)."""

    box_size: int = option(128, "Side of the background mesh boxes [pixel]", min=8)
    filter_size: int = option(3, "Median filter over this many mesh boxes (odd) in x and y [boxes]", min=1, max=15)
    filter_threshold: float = option(0.0, "Median-filter a box only if it differs from the median by more than this [image units]", min=0.0)
    ignored_mask_planes: list[str] = option(
        ["BAD", "SAT", "CR", "NO_DATA", "DETECTED"],
        "Mask planes whose pixels do not enter the background statistics")

    def validate(self) -> None:
        super().validate()
        unknown = [p for p in self.ignored_mask_planes if p not in MASK_PLANES]
        if unknown:
            raise ValueError(f"background.ignored_mask_planes: unknown mask plane(s) {unknown}; "
                             f"known: {list(MASK_PLANES)}")
        if self.filter_size % 2 == 0:
            raise ValueError(f"background.filter_size must be odd, got {self.filter_size}")


@dataclass
class DetectionConfig(Config):
    """Detection (PSF-matched filter + threshold) and deblending of sources."""

    threshold: float = option(5.0, "Detection threshold: S/N of a pixel of the PSF-filtered image [sigma]", min=0.5)
    min_area: int = option(5, "Minimum number of connected pixels above threshold in the filtered image [pixel]", min=1)
    filter_size: int = option(-1, "Side of the Gaussian matched-filter kernel [pixel]: odd for a fixed side, 0 for no filtering, -1 to scale it with the PSF (2 ceil(filter_half_width x sigma) + 1, at most filter_size_max)", min=-1, max=61)
    filter_half_width: float = option(1.0, "Half-side of the PSF-scaled filter in PSF sigmas: 1 keeps 90 % of the matched filter's S/N and lets the deblender split pairs ~4 sigma apart (1.5: 99 %, but such pairs merge; sep's cost grows with the side squared)", min=0.5, max=5.0)
    filter_size_max: int = option(31, "Largest side of the PSF-scaled filter [pixel, odd]", min=3, max=61)
    psf_sigma: float = option(2.0, "Filter (and centroid window) Gaussian sigma when the caller gives no PSF sigma [pixel]", min=0.3)
    deblend_nthresh: int = option(16, "Number of deblending sub-thresholds (SExtractor DEBLEND_NTHRESH)", min=1)
    deblend_cont: float = option(0.005, "Minimum flux fraction of a deblended child (DEBLEND_MINCONT); 1 disables deblending", min=0.0, max=1.0)
    clean: bool = option(False, "Remove detections that the wings of a brighter neighbour could explain (SExtractor CLEAN)? Off, as in the LSST stack: with real PSF wings it also removes faint real stars near bright ones (1.3\" seeing: S/N 8-15 stars found 90 -> 97 % on a normal CCD, 74 -> 89 % on a dense one without it, for 2-3 more unmatched detections)")
    clean_param: float = option(1.0, "Cleaning efficiency (SExtractor CLEAN_PARAM)", min=0.1)
    grow: int = option(2, "Grow the DETECTED mask around each footprint by this many pixels (square) [pixel]", min=0, max=50)
    detect_negative: bool = option(False, "Also detect negative sources and set DETECTED_NEGATIVE?")
    bad_mask_planes: list[str] = option(["BAD", "NO_DATA"], "Mask planes whose pixels are treated as missing (zero data, infinite noise)")
    max_window_shift: float = option(2.0, "Use the barycentre when the windowed centroid moves farther than this many PSF sigmas from it", min=0.1)
    pixel_stack: int = option(1_000_000, "sep's pixel buffer: max pixels of objects open at once (raise for huge objects)", min=300_000)

    def validate(self) -> None:
        super().validate()
        if self.filter_size > 0 and self.filter_size % 2 == 0:
            raise ValueError(f"detection.filter_size must be odd, 0 or -1, got {self.filter_size}")
        if self.filter_size_max % 2 == 0:
            raise ValueError(f"detection.filter_size_max must be odd, got {self.filter_size_max}")
        unknown = [p for p in self.bad_mask_planes if p not in MASK_PLANES]
        if unknown:
            raise ValueError(f"detection.bad_mask_planes: unknown mask plane(s) {unknown}")


@dataclass
class ResidualDetectionConfig(Config):
    """Second detection pass on the image with the PSF models of the measured point sources subtracted."""

    enabled: bool = option(True, "Look for sources hidden in the footprints of bright point sources, on the image with their PSF models subtracted (DAOPHOT-style)?")
    subtract_snr_min: float = option(30.0, "Subtract the PSF models of unresolved, unflagged sources above this PSF-flux S/N", min=1.0)
    model_error: float = option(0.1, "Relative error of a subtracted PSF model: (model_error x model)^2 is added to the variance of the residual, so that model mismatch in bright cores is not detected", min=0.0, max=1.0)
    n_passes: int = option(1, "Passes of subtraction and detection (a pass subtracts the sources the previous one found, and their refitted neighbours)", min=1, max=5)
    min_separation_fwhm: float = option(1.0, "A residual peak closer than this many PSF FWHM to an existing source is that source, not a new one", min=0.1, max=10.0)


@dataclass
class CosmicRayConfig(Config):
    """Cosmic-ray detection (PSF sharpness criterion) and repair (interpolation)."""

    min_sigma: float = option(6.0, "A cosmic-ray seed pixel exceeds this many sigma of its noise (background-subtracted)", min=1.0)
    min_signal: float = option(0.0, "A cosmic-ray seed pixel also exceeds this many electrons (0 = no such limit)", min=0.0)
    sharpness_sigma: float = option(2.5, "Noise allowance in the sharpness test [sigma] (LSST cond3_fac)", min=0.0)
    psf_ratio_factor: float = option(0.6, "Factor on the PSF's neighbour-to-peak ratio: < 1 keeps stars safe from a PSF model error (LSST cond3_fac2)", min=0.05, max=1.0)
    extend_sigma: float = option(3.0, "Neighbours of cosmic-ray pixels are tested down to this significance [sigma]", min=0.0)
    extend_sharpness_sigma: float = option(1.0, "Noise allowance [sigma] of the sharpness test for neighbours of cosmic-ray pixels", min=0.0)
    max_extend_iter: int = option(20, "Most extension passes (each adds the next ring of a track)", min=0)
    grow: int = option(1, "Grow the cosmic-ray mask by this many pixels (8-connected)", min=0, max=5)
    grow_max_sigma: float = option(3.0, "Growth adds pixels fainter than this [sigma], and brighter ones only if sharper than the PSF against their clean neighbours", min=0.0)
    grow_sharpness_sigma: float = option(1.5, "Noise allowance [sigma] when growth tests a brighter pixel against the median of its clean neighbours", min=0.0)
    source_sigma: float = option(5.0, "Growth never adds a faint pixel inside a smooth source this significant (PSF-weighted S/N without the cosmic-ray pixels): protects faint stars' cores", min=0.0)
    psf_grid: int = option(3, "Evaluate the PSF's neighbour ratios on an n x n grid over the CCD and use the smallest", min=1, max=10)
    bad_mask_planes: list[str] = option(["BAD", "SAT", "NO_DATA"], "Pixels in these planes, and pixels next to them, are never cosmic rays")
    interp_radius: int = option(2, "Repair: Gaussian-weighted mean of the clean pixels within this radius [pixel] (doubled if none)", min=1, max=10)
    max_cr_fraction: float = option(0.05, "Raise CosmicRayError if more than this fraction of the pixels are flagged (a wrong PSF or variance)", min=0.0, max=1.0)


@dataclass
class PsfConfig(Config):
    """PSF star selection (size–flux locus) and the spatially varying pixel-basis PSF model."""

    # --- star selection (snakedrp.meas.psf_select)
    snr_min: float = option(50.0, "Minimum S/N (flux / flux_err) of a PSF star candidate", min=1.0)
    max_candidates: int = option(600, "Measure the moments of at most this many of the highest-S/N candidates", min=10)
    moments_stamp_size: int = option(25, "Stamp side for the candidates' adaptive moments [pixel, odd]", min=9, max=101)
    fwhm_min: float = option(1.5, "Smallest plausible PSF FWHM [pixel]; smaller sources are artefacts", min=0.5)
    fwhm_max: float = option(20.0, "Largest plausible PSF FWHM [pixel]", min=1.0)
    locus_width: float = option(0.03, "Half-width in ln(size) of the local stellar clump among each candidate's neighbours (0.03 = +-3 %)", min=0.005, max=1.0)
    locus_nsigma: float = option(3.0, "Keep stars within this many robust sigmas of the fitted size and ellipticity surfaces", min=1.0)
    locus_min_width: float = option(0.005, "Floor on the accepted scatter in ln(size) about the size surface", min=0.0)
    ellipticity_min_width: float = option(0.01, "Floor on the accepted scatter of (e1, e2) about the ellipticity surface", min=0.0)
    isolation_flux_ratio: float = option(0.01, "A neighbour brighter than this fraction of a star's flux inside its kernel box (+1 FWHM) rejects the star", min=0.0)
    core_radius_fwhm: float = option(2.0, "A star with a masked pixel within this many FWHM of its centre is rejected", min=0.0)
    bad_mask_planes: list[str] = option(["BAD", "SAT", "CR", "INTRP", "EDGE", "NO_DATA", "SUSPECT"],
                                        "Mask planes that make a pixel unusable for PSF modelling")
    reserve_fraction: float = option(0.2, "Fraction of the selected stars reserved (not fitted) for validation", min=0.0, max=0.9)
    reserve_seed: int = option(1, "Seed of the reserved-star draw (the draw is deterministic for a given star list)", min=0)
    # --- the model (build_psf)
    kernel_size: int = option(0, "PSF kernel side [pixel, odd]; 0 = automatic: 2 * ceil(kernel_radius_fwhm * FWHM) + 1", min=0, max=151)
    kernel_radius_fwhm: float = option(3.0, "Automatic kernel half-size in units of the stars' FWHM", min=1.0, max=10.0)
    kernel_size_min: int = option(15, "Smallest automatic kernel side [pixel]", min=5)
    kernel_size_max: int = option(51, "Largest automatic kernel side [pixel]", min=5)
    degree: int = option(2, "Degree of the polynomial variation of every kernel pixel over the CCD", min=0, max=5)
    stars_per_term: float = option(4.0, "Lower the degree until there are at least this many fitted stars per polynomial term (a plane is kept with fewer when its predicted ellipticity noise is at most max_shape_noise)", min=1.0)
    max_shape_noise: float = option(0.004, "Lower a degree above 1 until the model's ellipticity noise predicted from the fitted stars' positions and S/N (2 / SNR per star), RMS over the CCD, is at most this", min=0.0)
    min_stars: int = option(8, "Fewest fitted (non-reserved) stars for a PSF model; fewer raises PsfError", min=1)
    max_stars: int = option(200, "Fit at most this many of the highest-S/N stars", min=1)
    n_iter: int = option(3, "Fit / clip iterations", min=1, max=20)
    clip_sigma: float = option(4.0, "Reject stars whose residual chi^2 is this many robust sigmas above the median", min=1.0)
    pixel_clip_sigma: float = option(5.0, "Ignore star pixels this many sigmas off the model (cosmic rays, neighbours)", min=2.0)
    resample_order: int = option(5, "Lanczos order of the stars' sub-pixel re-centring and of PixelPsf.draw (3 narrows a 3-px FWHM PSF by ~0.4 %)", choices=(3, 4, 5, 6, 7))
    model_error: float = option(0.02, "Fractional model error added to the pixel noise when clipping and weighting", min=0.0)

    def validate(self) -> None:
        super().validate()
        if self.kernel_size and self.kernel_size % 2 == 0:
            raise ConfigError(f"psf.kernel_size must be odd or 0 (automatic), got {self.kernel_size}")
        if self.moments_stamp_size % 2 == 0:
            raise ConfigError(f"psf.moments_stamp_size must be odd, got {self.moments_stamp_size}")
        if self.kernel_size_min > self.kernel_size_max:
            raise ConfigError("psf.kernel_size_min exceeds psf.kernel_size_max")
        if self.fwhm_min >= self.fwhm_max:
            raise ConfigError("psf.fwhm_min must be below psf.fwhm_max")


#: Pixel-flag columns and the mask planes that set them by default (LSST base_PixelFlags names).
DEFAULT_PIXEL_FLAGS: dict[str, list[str]] = {
    "edge": ["EDGE", "NO_DATA"],
    "interpolated": ["INTRP"],
    "saturated": ["SAT"],
    "cr": ["CR"],
    "bad": ["BAD"],
    "suspect": ["SUSPECT"],
}


@dataclass
class MeasureConfig(Config):
    """Source measurement: centroids, PSF/aperture/Kron fluxes, adaptive moments, pixel flags."""

    aperture_radii: list[float] = option([3.0, 4.5, 6.0, 9.0, 12.0], "Circular aperture radii [pixel]; each costs ~(r / 12)^2 x 0.06 s per 5000 sources (the calibration aperture, ~4 FWHM, is extra)")
    calib_aperture_fwhm: float = option(4.0, "Calibration aperture radius in units of the local PSF FWHM (the light beyond it is measured by the curve of growth, apcorr.cog_*)", min=0.5, max=20.0)
    psf_fit_radius: float = option(3.0, "Half-side of the PSF-fit box in PSF sigmas (the box also gives centroid errors)", min=1.0, max=10.0)
    psf_evaluation: str = option("auto", "PSF models: 'grid' = kernels on a grid over the CCD, bilinearly interpolated and Lanczos-3 shifted (vectorised, what PsfModel.draw does by default); 'draw' = psf.draw per source; 'auto' = 'draw' for models that override draw, else 'grid'", choices=("auto", "grid", "draw"))
    psf_grid_spacing: float = option(512.0, "Spacing of the grid on which the PSF kernel is evaluated for 'grid' [pixel]", min=16.0)
    calib_replace_neighbours: bool = option(True, "In the calibration aperture, replace other sources' footprint pixels by the source's PSF model (needs a segmentation)?")
    calib_replace_snr_min: float = option(20.0, "... only for sources above this PSF-flux S/N (fainter ones are noise-limited)", min=0.0)
    joint_blend_fit: bool = option(True, "Fit deblended children of one parent with overlapping fit boxes simultaneously?")
    max_centroid_shift: float = option(2.0, "Keep the input position if the windowed centroid moves farther than this many PSF sigmas", min=0.1)
    kron_factor: float = option(2.5, "Kron aperture = this x the Kron radius (SExtractor PHOT_AUTOPARAMS k)", min=0.5)
    kron_radius_limit: float = option(6.0, "Integrate the first moment for the Kron radius out to this many isophotal radii", min=1.0)
    kron_min_radius: float = option(3.5, "Kron apertures smaller than this radius are replaced by a circle of it [pixel]", min=0.5)
    shape_snr_min: float = option(20.0, "Adaptive moments only for sources above this PSF-flux S/N (HSM costs up to 0.5 ms on noise)", min=0.0)
    shape_stamp_size: int = option(25, "Side of the stamps for adaptive moments [pixel, odd]", min=9, max=201)
    shape_max_iterations: int = option(100, "Maximum HSM adaptive-moment iterations", min=5)
    bad_mask_planes: list[str] = option(["BAD", "SAT", "NO_DATA"], "Mask planes whose pixels carry no weight in fits and sums")
    pixel_flags: dict[str, list[str]] = option(DEFAULT_PIXEL_FLAGS, "flag_<name> (and flag_<name>_center) set by these mask planes in the footprint (the 3x3 centre box)")

    def validate(self) -> None:
        super().validate()
        planes = list(self.bad_mask_planes) + [p for v in self.pixel_flags.values() for p in v]
        unknown = sorted({p for p in planes if p not in MASK_PLANES})
        if unknown:
            raise ValueError(f"measure: unknown mask plane(s) {unknown}; known: {list(MASK_PLANES)}")
        if not self.aperture_radii or min(self.aperture_radii) <= 0:
            raise ValueError("measure.aperture_radii must be a non-empty list of positive radii")
        if self.shape_stamp_size % 2 == 0:
            raise ValueError("measure.shape_stamp_size must be odd")


@dataclass
class ApCorrConfig(Config):
    """Aperture correction from PSF flux to the calibration aperture."""

    degree: int = option(1, "Degree of the 2-D polynomial in (x, y) of the correction (0 = a constant)", min=0, max=4)
    snr_min: float = option(100.0, "Minimum PSF-flux S/N of the stars used", min=1.0)
    clip_sigma: float = option(3.0, "Clip stars this many sigma (errors scaled by the robust scatter) off the fit", min=1.0)
    n_iter: int = option(5, "Fit / clip iterations", min=1, max=20)
    min_stars: int = option(3, "Fewest stars for a fit; with fewer, the degree is lowered, and with no star at all ApCorrError is raised", min=1)
    stars_per_term: float = option(3.0, "Lower the degree until there are this many stars per polynomial term", min=1.0)
    error_floor: float = option(0.002, "Added in quadrature to each star's ratio error, so that a few very bright stars do not decide the fit alone", min=0.0)
    median_center: bool = option(True, "Shift the fit onto the weighted median of the residuals: faint neighbours only ever add light to the large aperture")


@dataclass
class ApertureLossConfig(Config):
    """Light beyond the calibration aperture, measured by the curve of growth of bright unresolved stars."""

    enabled: bool = option(True, "Measure the light beyond the calibration aperture and add it to the PSF fluxes (so that they are total fluxes)?")
    radius_max: float = option(2.5, "The curve of growth reaches out to this many calibration-aperture radii (2.5 x 4 FWHM = 10 FWHM)", min=1.1, max=10.0)
    radius_max_pixels: float = option(150.0, "... and at most this radius [pixel]", min=5.0)
    n_annuli: int = option(8, "Annuli of the curve of growth between the calibration aperture and its outer radius (logarithmic steps)", min=1, max=50)
    snr_min: float = option(200.0, "Fewest S/N of the calibration-aperture flux of a curve-of-growth star", min=1.0)
    max_stars: int = option(60, "Use at most this many of the brightest stars for the curve of growth", min=1)
    min_stars: int = option(3, "Fewest stars for a curve of growth; with fewer the aperture loss is 1 (and flagged)", min=1)
    tail_index: float = option(1.7, "Index g of the power-law wing of the curve of growth, C(inf) - C(r) ~ r**-g, fitted to each star's annuli with a local sky level and extrapolated beyond the last radius. Kolmogorov seeing alone gives 5/3, an Airy pattern alone 1; their convolution ~1.7 from 4 to 6 FWHM", min=0.5, max=5.0)
    loss_max: float = option(0.2, "A total / calibration-aperture flux farther than this from 1 is rejected as a failed curve of growth", min=0.0)
