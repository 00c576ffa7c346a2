"""CalibrateTask: deep detection, measurement, astrometric and photometric calibration.

As in the LSST CalibrateTask: detect at 5 sigma on the characterized exposure, deblend,
measure (centroids, apertures, PSF and Kron fluxes, shapes, flags), apply the aperture
correction, match to the reference catalog and fit a TAN-SIP WCS, then fit the zeropoint from
matched unresolved stars and add calibrated magnitudes and sky coordinates to the catalog.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from astropy.table import Table

from .apcorr import ApCorrMap
from .astrometry import AstrometryConfig, match_and_fit
from .detect import DetectionConfig, detect_sources
from .exposure import Exposure
from .measure import MeasureConfig, calibrate_fluxes, measure_sources
from .pexconfig import Config, option, subconfig
from .photometry import PhotometryConfig, fit_zeropoint


class CalibrateError(RuntimeError):
    """Calibration failed (no sources, no reference stars, ...); the message says why."""


@dataclass
class CalibrateConfig(Config):
    """Calibrate a characterized exposure: detection, measurement, astrometry, photometry."""

    do_astrometry: bool = option(True, "Fit the WCS against the reference catalog?")
    do_photometry: bool = option(True, "Fit the photometric zeropoint against the reference catalog?")
    refcat_margin: float = option(30.0, "Reference stars loaded out to this far beyond the CCD [arcsec]", min=0.0)
    star_size_max: float = option(1.15, "Unresolved if adaptive-moment size / PSF size is below this", min=1.0)
    detection: DetectionConfig = subconfig(DetectionConfig, "Detection at the science threshold (5 sigma)")
    measure: MeasureConfig = subconfig(MeasureConfig, "Source measurement")
    astrometry: AstrometryConfig = subconfig(AstrometryConfig, "Reference matching and TAN-SIP fit")
    photometry: PhotometryConfig = subconfig(PhotometryConfig, "Zeropoint fit")


@dataclass(frozen=True)
class CalibrateResult:
    """exposure (with fitted ``wcs`` and ``zeropoint``), sources (src), matches (srcMatch)."""

    exposure: Exposure
    sources: Table
    matches: Table | None
