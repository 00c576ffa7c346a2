"""Configs of the multi-band stage: merged detections, coadd measurement, reference band, forced photometry.

The stage's config section (``MultibandConfig``, in :mod:`snakedrp.config`) gathers these classes.
This module imports only :mod:`snakedrp.pexconfig`, the standard library and other light modules,
so that :mod:`snakedrp.config`, which every Snakefile parse and job script imports, stays light.
"""
from __future__ import annotations

from dataclasses import dataclass

from snakedrp.meas.config import DEFAULT_PIXEL_FLAGS, ApCorrConfig, ApertureLossConfig, MeasureConfig
from snakedrp.pexconfig import Config, ConfigError, option, subconfig

#: LSST's merge priority: reddest first (i, r, then the others), as mergeCoaddDetections.priorityList.
DEFAULT_PRIORITY = ["i", "r", "z", "y", "g", "u"]


@dataclass
class MergeDetectionsConfig(Config):
    """Peaks and footprints of every band's coadd detection merged into one list of objects (mergeCoaddDetections)."""

    min_new_peak: float = option(1.0, "A peak of a band later in the priority list is a new object only if it lies farther than this from every peak already merged; nearer, it is that object seen in one more band [arcsec] (LSST minNewPeak)", min=0.0, max=10.0)
    smoothing_sigma: float = option(1.0, "Footprints holding several peaks are split between them by a watershed of the bands' summed S/N image smoothed by a Gaussian of this sigma [pixel]", min=0.0, max=10.0)


def _coadd_measurement() -> MeasureConfig:
    # the coadd PSF changes where an input's region ends: each source's model is drawn at its
    # position (psf_evaluation 'draw', from kernels cached per cell and set of covering inputs);
    # a 512-pixel kernel grid would interpolate across such edges. The grid still gives each
    # source's PSF width (centroid window, calibration aperture): 128 pixels keeps it local.
    # A coadd's own planes flag too: CLIPPED (an artifact rejected from a warp) and INEXACT_PSF
    # (the coadd PSF model is not the image's PSF there), as LSST's pixelFlags_clipped/inexact_psf
    flags = dict(DEFAULT_PIXEL_FLAGS, clipped=["CLIPPED"], inexact_psf=["INEXACT_PSF"])
    return MeasureConfig(psf_evaluation="draw", psf_grid_spacing=128.0, pixel_flags=flags)


def _coadd_apcorr() -> ApCorrConfig:
    # a constant over the patch: the ratio changes in steps where the covering inputs change, not
    # in gradients, and a plane fitted to 40-80 point sources of 4-5 % scatter each (the total
    # flux's noise in its wide aperture) moved one field's patches by 1-8 mmag against 0-5 flat
    return ApCorrConfig(degree=0, snr_min=100.0)


@dataclass
class MeasureCoaddConfig(Config):
    """Measurement on one band's coadd of every merged object (measureCoaddSources; forcedPhotCoadd at fixed positions)."""

    measurement: MeasureConfig = subconfig(MeasureConfig, "The measurement algorithms (as the calexps')", default=_coadd_measurement)
    do_apcorr: bool = option(True, "Scale PSF fluxes to total fluxes with the coadd's aperture correction, measured on its bright point sources (below)?")
    apcorr: ApCorrConfig = subconfig(ApCorrConfig, "Fit of total flux / PSF flux of the bright point sources over the patch", default=_coadd_apcorr)
    apcorr_max_stars: int = option(200, "At most this many point sources (the brightest) enter the aperture correction (each costs a curve of growth, ~20 ms)", min=3)
    apcorr_size_tolerance: float = option(0.08, "A point source for the aperture correction: adaptive-moment size within this fraction of the PSF model's", min=0.0, max=1.0)
    aperture_fwhm: float = option(4.0, "Calibration-aperture radius of the point sources' total fluxes [FWHM of the widest input PSF covering the source, so that it holds the same fraction of each input's light as the calexps' calibration aperture]", min=1.0, max=20.0)
    neighbour_nsigma: float = option(1.5, "Neighbours' footprints left out of the total-flux aperture and annuli: pixels above this many sigma (deeper than detection, into the wings) [sigma]", min=0.5)
    curve_of_growth: ApertureLossConfig = subconfig(ApertureLossConfig, "The annuli beyond the aperture fitted with the inputs' curves of growth and a local sky (as the calexps' measure.aperture_loss)")
    calib_aperture_fwhm: float = option(4.0, "The calexps' calibration-aperture radius [FWHM] (single_frame measure.calib_aperture_fwhm), where the inputs' curves of growth start", min=0.5, max=20.0)


@dataclass
class MergeMeasurementsConfig(Config):
    """Choice of each object's reference band (mergeCoaddMeasurements)."""

    min_snr: float = option(10.0, "The first band in priority order where the object is a detected peak with an unflagged PSF flux of at least this S/N is its reference band (LSST minSN)", min=0.0)
    min_snr_diff: float = option(3.0, "Without such a band, the band of highest PSF S/N is the reference if that S/N exceeds the priority band's by more than this (LSST minSNDiff); else the first band where it is a peak", min=0.0)


@dataclass
class MultibandConfig(Config):
    """Multi-band processing of the coadds: merge, measure, reference band, forced photometry, object table."""

    enabled: bool = option(True, "Build the multi-band object catalogs (and, with truth, their validation) in the default target (rule all)? Needs coadd.enabled")
    priority: list[str] = option(list(DEFAULT_PRIORITY), "Band priority, first = most trusted (peaks, positions, shapes), as LSST's priorityList; bands not listed come last, bluest last")
    merge: MergeDetectionsConfig = subconfig(MergeDetectionsConfig, "Merge of the bands' detections (mergeCoaddDetections)")
    measure: MeasureCoaddConfig = subconfig(MeasureCoaddConfig, "Measurement on each band's coadd, free (measureCoaddSources) and at the reference positions (forcedPhotCoadd)")
    merge_measurements: MergeMeasurementsConfig = subconfig(MergeMeasurementsConfig, "Reference band per object (mergeCoaddMeasurements)")

    def validate(self) -> None:
        super().validate()
        if len(set(self.priority)) != len(self.priority):
            raise ConfigError(f"multiband.priority lists a band twice: {self.priority}")
