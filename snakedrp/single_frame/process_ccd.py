"""ProcessCcdTask: ISR → characterize → calibrate on one CCD (the LSST processCcd.py).

From Python, as in the seed notebook::

    from snakedrp.repo.butler import Butler
    from snakedrp.single_frame.process_ccd import ProcessCcdTask, ProcessCcdConfig
    butler = Butler("data/ci_repo", rerun="ci")
    config = ProcessCcdConfig()
    config.isr.do_flat = False
    task = ProcessCcdTask(config)
    result = task.run_data_id(butler, visit=903334, ccd=0)
    result.calexp.image, result.calexp.psf.kernel(500, 1000), result.sources["psf_mag"]
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from astropy.table import Table
from threadpoolctl import threadpool_limits

from snakedrp.meas.apcorr import ApCorrMap
from snakedrp.meas.background import Background
from snakedrp.single_frame.calibrate import CalibrateTask
from snakedrp.repo.camera import Camera
from snakedrp.single_frame.characterize import CharacterizeTask
from snakedrp.repo.exposure import Exposure
from snakedrp.isr.isr import IsrTask
from snakedrp.single_frame.config import ProcessCcdConfig
from snakedrp.repo.raw import RawFrame, check_raw
from snakedrp.repo.refcat import load_refcat


@dataclass(frozen=True)
class ProcessCcdResult:
    """The single-frame products (LSST dataset names in brackets).

    Attributes
    ----------
    calexp : Exposure
        Calibrated exposure [calexp]: background-subtracted image, mask, variance, PSF, WCS,
        zeropoint.
    sources : Table
        Source catalog [src].
    psf_sources : Table
        Bright sources used for the PSF, with ``reserved`` flags [icSrc].
    background : Background
        Subtracted background [calexpBackground].
    matches : Table or None
        Reference matches [srcMatch].
    apcorr : ApCorrMap or None
        Aperture correction.
    n_cosmic_rays : int
    unusable_amplifiers : dict of str to str
        Amplifiers ISR found without signal (name → reason), masked NO_DATA in the calexp.
    """

    calexp: Exposure
    sources: Table
    psf_sources: Table
    background: Background
    matches: Table | None
    apcorr: ApCorrMap | None
    n_cosmic_rays: int
    unusable_amplifiers: dict[str, str] = field(default_factory=dict)


def refcat_circle(wcs, shape: tuple[int, int], margin_arcsec: float) -> tuple[float, float, float]:
    """``(ra, dec, radius)`` [deg]: the circle about a CCD's centre (from its WCS) through its
    farthest corner, grown by ``margin_arcsec``; the sky whose reference stars the CCD loads."""
    ny, nx = shape
    xs = np.array([0, nx - 1, nx - 1, 0, (nx - 1) / 2.0])
    ys = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2.0])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    ra0, dec0 = ra[-1], dec[-1]
    cosd = np.cos(np.deg2rad(dec0))
    dist = np.hypot(((ra[:4] - ra0 + 180) % 360 - 180) * cosd, dec[:4] - dec0)
    return float(ra0), float(dec0), float(dist.max() + margin_arcsec / 3600.0)


def refcat_for_exposure(directory, wcs, shape: tuple[int, int], margin_arcsec: float) -> Table:
    """Reference stars within :func:`refcat_circle`; reads only the refcat shards that touch it."""
    return load_refcat(directory, *refcat_circle(wcs, shape, margin_arcsec))


class ProcessCcdTask:
    """Run ISR, characterization and calibration on one raw CCD frame."""

    ConfigClass = ProcessCcdConfig

    def __init__(self, config: ProcessCcdConfig | None = None):
        self.config = config or ProcessCcdConfig()
        self.config.validate()
        self.isr = IsrTask(self.config.isr)
        self.characterize = CharacterizeTask(self.config.characterize)
        self.calibrate = CalibrateTask(self.config.calibrate)

    def run(self, raw: RawFrame, *, camera: Camera, calibs: dict[str, Exposure] | None = None,
            refcat: Table | None = None, refcat_dir=None, release_calibs: bool = False) -> ProcessCcdResult:
        """Process one raw frame.

        Parameters
        ----------
        raw : RawFrame
        camera : Camera
            Its geometry and optical distortion give the starting WCS (``Camera.initial_wcs`` at
            the header pointing ``TELRA``, ``TELDEC``, ``ROTANG``).
        calibs : dict
            Master calibrations by name: ``bias``, ``dark``, ``flat``, ``fringe`` (those the
            ISR switches need).
        refcat : Table, optional
            Reference stars around the CCD; or give ``refcat_dir`` to load the covering shards.
        release_calibs : bool
            Empty ``calibs`` once ISR has used them, so that their planes (about 280 MB on an HSC
            CCD) go back to the heap before characterization; for a caller that holds them for
            this run only (the job script).

        Raises
        ------
        RawError
            A raw frame of another camera, or of a filter the camera does not have.

        Notes
        -----
        The numerics run on one BLAS/OpenMP thread, as every workflow job does (Snakemake sets the
        job's thread count): a multi-threaded BLAS sums in another order, and the PSF fluxes of a
        few sources then differ by ~5e-6 with the thread count of the calling process. The run's
        parallelism is across CCDs.
        """
        with threadpool_limits(limits=1):
            return self._run(raw, camera=camera, calibs=calibs, refcat=refcat, refcat_dir=refcat_dir,
                             release_calibs=release_calibs)

    def _run(self, raw: RawFrame, *, camera: Camera, calibs: dict[str, Exposure] | None, refcat: Table | None,
             refcat_dir, release_calibs: bool) -> ProcessCcdResult:
        check_raw(raw, camera)
        isr = self.isr.run(raw, camera=camera, **(calibs or {}))
        if release_calibs and calibs:
            calibs.clear()
        # the raw header's WCS lacks the optical distortion: start from the camera model's, so that
        # the astrometric fit only corrects pointing, rotation and scale (few reference stars suffice)
        h = raw.header
        exposure = replace(isr.exposure, wcs=camera.initial_wcs(raw.ccd, float(h["TELRA"]), float(h["TELDEC"]),
                                                                float(h["ROTANG"])))
        # the ISR image is not needed again: characterization works on it in place
        char = self.characterize.run(exposure, overwrite=True)
        # characterization made its own mask: the ISR one (34 MB on an HSC CCD) goes back to the
        # heap before calibration's full-image temporaries are allocated, which then reuse it
        unusable_amplifiers = isr.unusable_amplifiers
        del isr, exposure
        if refcat is None and refcat_dir is not None:
            refcat = refcat_for_exposure(refcat_dir, char.exposure.wcs, char.exposure.shape,
                                         self.config.calibrate.refcat_margin)
        band = camera.filters[raw.filter].band if raw.filter in camera.filters else None
        cal = self.calibrate.run(char.exposure, refcat, apcorr=char.apcorr, band=band, detections=char.detections)
        return ProcessCcdResult(calexp=cal.exposure, sources=cal.sources, psf_sources=char.psf_sources,
                                background=char.background, matches=cal.matches,
                                apcorr=cal.apcorr if cal.apcorr is not None else char.apcorr,
                                n_cosmic_rays=char.n_cosmic_rays, unusable_amplifiers=unusable_amplifiers)

    def run_data_id(self, butler, *, visit: int, ccd: int, refcat: str = "sim_gaia") -> ProcessCcdResult:
        """Read the raw, calibrations and reference catalog of ``(visit, ccd)`` through a butler and run."""
        raw = butler.get("raw", visit=visit, ccd=ccd)
        calibs = {}
        for name, enabled in (("bias", self.config.isr.do_bias), ("dark", self.config.isr.do_dark),
                              ("flat", self.config.isr.do_flat)):
            if enabled:
                calibs[name] = butler.get(name, visit=visit, ccd=ccd, filter=raw.filter)
        filt = butler.camera.filters.get(raw.filter)
        if self.config.isr.do_fringe and filt is not None and filt.fringe:
            calibs["fringe"] = butler.get("fringe", ccd=ccd, filter=raw.filter)
        refcat_dir = butler.path("ref_cat", refcat=refcat)
        return self.run(raw, camera=butler.camera, calibs=calibs, refcat_dir=Path(refcat_dir).parent)
