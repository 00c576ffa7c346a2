"""Configs of the coadd stage: the sky map, warping, assembly, coadd detection.

The stage's config section (``CoaddConfig``, in :mod:`snakedrp.config`) gathers these classes.
:mod:`snakedrp.coadd.skymap`, ``warp``, ``assemble`` and ``detect_coadd`` import them from here.
This module imports only :mod:`snakedrp.pexconfig`, the standard library and other light modules,
so that :mod:`snakedrp.config`, which every Snakefile parse and job script imports, stays light.
"""
from __future__ import annotations

from dataclasses import dataclass

from snakedrp.meas.config import BackgroundConfig, DetectionConfig
from snakedrp.pexconfig import Config, ConfigError, option, subconfig
from snakedrp.repo.mask_planes import MASK_PLANES


def _check_planes(section: str, planes) -> None:
    unknown = [p for p in planes if p not in MASK_PLANES]
    if unknown:
        raise ValueError(f"{section}: unknown mask plane(s) {unknown}; known: {list(MASK_PLANES)}")


#: Projections a tract may use (FITS WCS codes).
PROJECTIONS = ("TAN", "STG")


@dataclass
class SkyMapConfig(Config):
    """The sky map of the deep coadds (makeSkyMap / makeDiscreteSkyMap)."""

    type: str = option("discrete", "discrete: one tract about the selected calexps; rings: fixed all-sky "
                       "tracts on declination rings (ids stable as visits are added)",
                       choices=("discrete", "rings"))
    projection: str = option("TAN", "Tract projection (FITS WCS code)", choices=PROJECTIONS)
    pixel_scale: float = option(0.0, "Coadd pixel scale [arcsec/pixel]; 0 = the camera's pixel scale",
                                min=0.0, max=60.0)
    patch_inner: int = option(2000, "Side of a patch's inner box [pixels] (patches are square)",
                              min=16, max=100000)
    patch_border: int = option(100, "Border around each patch's inner box [pixels]; neighbours overlap "
                               "by twice this", min=0, max=10000)
    margin: float = option(10.0, "discrete: margin added around the calexps' footprints [arcsec]",
                           min=0.0, max=3600.0)
    n_rings: int = option(120, "rings: number of declination rings between the polar caps", min=1, max=10000)
    tract_overlap: float = option(60.0, "rings: each tract's grid reaches this far beyond its cell on "
                                  "every side [arcsec]", min=0.0, max=18000.0)

    def validate(self) -> None:
        super().validate()
        if self.patch_border >= 2 * self.patch_inner:
            raise ConfigError(f"coadd.skymap.patch_border ({self.patch_border}) must be less than twice "
                              f"patch_inner ({self.patch_inner})")


@dataclass
class WarpConfig(Config):
    """Resampling of calexps onto a patch grid (makeCoaddTempExp / makeDirectWarp)."""

    kernel: str = option("lanczos3", "Resampling kernel of image and variance", choices=("lanczos3", "lanczos4", "lanczos5"))
    grid_spacing: int = option(16, "The exact pixel mapping is computed every this many output pixels and bilinearly interpolated in between [pixel]", min=1, max=128)
    edge_width: int = option(3, "Output pixels whose input position lies within this many pixels of the CCD border (but whose kernel is still inside) are marked EDGE [pixel]", min=0, max=50)
    conserve_flux: bool = option(True, "Multiply by the pixel-area ratio (Jacobian of the mapping), so that point-source fluxes are kept (the calexp zeropoint is for total flux)?")
    zeropoint: float = option(27.0, "Photometric zeropoint of the warps and coadds (AB mag of a source of total flux 1)", min=0.0, max=40.0)
    rows_per_block: int = option(128, "Output rows resampled at once (memory ~ rows x patch width x 100 bytes)", min=8)


@dataclass
class AssembleConfig(Config):
    """Inverse-variance weighted mean of the warps with artifact rejection (assembleCoadd, CompareWarp)."""

    bad_mask_planes: list[str] = option(["NO_DATA", "BAD", "SAT", "EDGE", "SUSPECT", "CR"],
                                        "Warp pixels in these mask planes do not enter the coadd")
    weighting: str = option("variance", "Weight of each warp: 'variance' = 1 / its clipped-mean variance (LSST's deepCoadd); 'psf' = sum(P^2) / that variance, the inverse variance of its point-source (PSF) flux, with P its PSF normalised to sum 1: the most point-source depth from visits of different seeing (0.5, 0.9 and 1.3\" visits: 0.07-0.13 mag deeper where all three cover), the coadd PSF nearer the best seeing", choices=("variance", "psf"))
    weight_clip_sigma: float = option(3.0, "Sigma clip of the warp's variance plane for its weight (weight = 1 / clipped-mean variance)", min=1.0)
    weight_clip_iter: int = option(3, "Clipping iterations of the weight's clipped mean", min=1, max=10)
    weight_subsample: int = option(4, "The weight's clipped mean uses every this many-th row and column of the warp", min=1, max=64)
    do_clip: bool = option(True, "Reject artifacts (CompareWarp): outlier footprints in warp - reference absent from the reference?")
    clip_threshold: float = option(5.0, "An outlier footprint needs a pixel of warp - reference above this S/N [sigma]", min=1.0)
    clip_grow_threshold: float = option(2.5, "An outlier footprint includes the connected pixels above this S/N [sigma]", min=0.5)
    trail_join_width: float = option(3.0, "Outlier footprints whose pixels all lie within this distance of the axis of a trail footprint (elongated over trail_join_length) are part of the trail: a faint trail's pixels dip below clip_grow_threshold one by one and break it into pieces too short to be elongated, which a source near them keeps [pixel]; 0: off", min=0.0, max=20.0)
    trail_join_length: float = option(60.0, "... a trail footprint that long at least (cosmic rays are shorter) [pixel]", min=1.0)
    clip_grow: int = option(2, "Grow each outlier footprint by this many pixels (square) [pixel]", min=0, max=20)
    clip_max_epochs: int = option(2, "A pixel that is an outlier in more than this many warps is real (a variable or moving source region) and not clipped", min=1)
    clip_min_warps: int = option(2, "Reject artifacts only where at least this many warps have data (with 2, the brighter one of a positive outlier pair is the artifact)", min=2)
    protect_threshold: float = option(5.0, "Reference sources: pixels where the reference, smoothed by a Gaussian of sigma 1.5 pixel, exceeds this S/N are never clipped [sigma]", min=0.5)
    protect_grow: int = option(4, "Grow the protected reference sources by this many pixels (covers seeing differences) [pixel]", min=0, max=50)
    clip_elongation: float = option(4.0, "An outlier footprint whose second-moment axis ratio exceeds this is an artifact (a trail) wherever it lies", min=1.0)
    clip_min_length: float = option(15.0, "... if it is at least this long (a uniform bar's length from its major-axis moment) [pixel]", min=1.0)
    protect_ratio: float = option(10.0, "Inside an artifact footprint, reference-source pixels are clipped only where the excess exceeds this x the maximum of the reference less 3 sigma of its noise within protect_grow pixels: star cores differ by < (seeing ratio)^2 - 1, ~6 for 0.5\" vs 1.3\", a trail over a faint source by far more", min=0.0)
    mask_propagation_threshold: float = option(0.5, "Set a mask plane in the coadd where the inputs having it carry more than this fraction of the weight", min=0.0, max=1.0)
    propagate_mask_planes: list[str] = option(["BAD", "SAT", "INTRP", "CR", "EDGE", "SUSPECT"],
                                              "Mask planes propagated from the warps to the coadd")
    block_memory_mb: float = option(256.0, "Pixel memory for one block of rows of all warps [MB]; the block height shrinks with the number of warps", min=16.0)
    block_overlap: int = option(16, "Rows shared by neighbouring blocks in the artifact search, so footprints cut by a block edge are still seen whole enough [pixel]", min=0, max=256)

    def validate(self) -> None:
        super().validate()
        _check_planes("assemble.bad_mask_planes", self.bad_mask_planes)
        _check_planes("assemble.propagate_mask_planes", self.propagate_mask_planes)
        if self.clip_grow_threshold > self.clip_threshold:
            raise ValueError("assemble.clip_grow_threshold must not exceed assemble.clip_threshold")


def _coadd_detection() -> DetectionConfig:
    # on a coadd the noise of a 5x5 matched filter is fine, but the PSF is wider: 9 px filter
    # no CLEAN, as the calexps' detection. It once moved the ci demo's HSC-I depth figure by
    # 0.06 mag: the calexps then kept a fifth of their fringes (a biased fringe fit), whose peaks
    # the footprints followed; with the fringes removed, with or without CLEAN differ by <= 0.006 mag
    return DetectionConfig(filter_size=9)


def _coadd_refined_background() -> BackgroundConfig:
    # the warps' calexps are background subtracted: what is left on the coadd is small and of the
    # scale of CCDs. Measured on the ci demo and base-hsc: 128-px boxes follow the calexps' residuals
    # better (an HSC patch's depth 0.025 mag deeper) but, in the crowded demo HSC-I, leave the
    # bright stars 2 mmag brighter after the validation's curve of growth (5.8 mmag, over its goal)
    return BackgroundConfig(box_size=512)


@dataclass
class DetectCoaddConfig(Config):
    """Coadd detection (detectCoaddSources): background, variance rescaling, 5-sigma detection with the coadd PSF."""

    do_background: bool = option(True, "Subtract a background before detection?")
    background: BackgroundConfig = subconfig(BackgroundConfig, "First coadd background model (sep), subtracted for a first detection (the final one too, without refine_background)")
    refine_background: bool = option(True, "Estimate the background subtracted from the coadd again, on the coadd as assembled, with the first detection's sources masked by discs reaching into their wings (a background of every pixel takes in the stars' wings and eats them: tens of mmag in a large aperture of a crowded field)?")
    background_grow_factor: float = option(2.0, "... each source's disc: this many times the source's footprint radius (the largest distance from its centroid to its footprint box's sides), so that a brighter star, with a wider footprint, is masked farther into its wing", min=1.0, max=10.0)
    background_grow_fwhm: float = option(2.0, "... and at least the footprint radius plus this many coadd PSF FWHM", min=0.0, max=20.0)
    background_grow_max_fwhm: float = option(30.0, "... and at most this many coadd PSF FWHM (a large blend's box does not blank a whole region)", min=1.0)
    subtract_sky_mean: bool = option(True, "... and subtract the mean left in the sky pixels far from every footprint of the first detection (sky_mean_grow_fwhm; the calexps' zero level, single_frame.characterize.subtract_sky_mean): the light of undetected sources, which an aperture holds too, once its neighbours' footprints are replaced")
    sky_mean_grow_fwhm: float = option(2.0, "subtract_sky_mean: the mean is over the pixels farther than this many coadd PSF FWHM from every footprint: nearer, they hold the detected sources' wings, which are no sky of an isolated star (with the pixels next to the footprints the coadd sat 0.006 flux units a pixel low, bright stars 8-11 mmag faint in 4-FWHM apertures of an HSC-I and a 1.5\" field)", min=0.0, max=10.0)
    refined_background: BackgroundConfig = subconfig(BackgroundConfig, "Refined coadd background model (sep), on the pixels outside the discs", default=_coadd_refined_background)
    do_scale_variance: bool = option(True, "Rescale the variance plane to the noise measured in empty (undetected, unmasked) pixels?")
    scale_variance_bad_mask_planes: list[str] = option(["DETECTED", "NO_DATA", "BAD", "SAT", "EDGE", "CLIPPED", "INTRP"],
                                                       "Pixels in these planes do not enter the noise measurement")
    detection: DetectionConfig = subconfig(DetectionConfig, "Detection on the coadd (matched filter: the coadd PSF's width)", default=_coadd_detection)

    def validate(self) -> None:
        super().validate()
        _check_planes("detect_coadd.scale_variance_bad_mask_planes", self.scale_variance_bad_mask_planes)
