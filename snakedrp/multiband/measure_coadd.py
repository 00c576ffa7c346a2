"""Measurement of the merged objects on one band's coadd (measureCoaddSources, forcedPhotCoadd).

Every band measures the same objects with the same footprints (the merged segmentation of
:mod:`snakedrp.multiband.merge_detections`), with the coadd's own PSF model, either free (the
windowed centroid of this band; ``deepCoadd_meas``) or forced at each object's reference-band
position (``deepCoadd_forced_src``), so that colours compare the same pixels' light.

PSF fluxes become total fluxes by the coadd's aperture correction: the ratio of total to PSF
flux of the patch's bright point sources, fitted over the patch (:func:`coadd_aperture_correction`).
A point source's total flux is measured as the calexps calibrate theirs (the warps carry their
total-flux zeropoint): the flux in a calibration aperture of ``aperture_fwhm`` x the widest
covering input's FWHM, neighbours left out, plus the light beyond from the covering inputs' own
curves of growth (:func:`snakedrp.coadd.total_flux.total_fluxes`). The coadd PSF model's kernels
are normalised within a finite box and lack the far wings, so without the correction PSF
fluxes on the ci demo's coadds are ~11 mmag faint.
"""
from __future__ import annotations

import logging

import numpy as np
from astropy.table import Table

from snakedrp.coadd.coadd_psf import CellCachedPsf, CoaddPsf
from snakedrp.coadd.total_flux import PsfMixes, clean_aperture_flux, neighbour_segmentation, total_fluxes
from snakedrp.meas.apcorr import ApCorrError, ApCorrMap, fit_aperture_correction
from snakedrp.meas.measure import measure_sources
from snakedrp.multiband.config import MeasureCoaddConfig
from snakedrp.repo.exposure import Exposure

logger = logging.getLogger(__name__)


def point_sources_for_apcorr(sources: Table, config: MeasureCoaddConfig) -> np.ndarray:
    """Rows (indices, brightest first) of the unblended, unflagged point sources above ``apcorr.snr_min``.

    A point source's adaptive-moment size lies within ``apcorr_size_tolerance`` of the PSF model's;
    at most ``apcorr_max_stars`` are returned.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.asarray(sources["psf_flux"], float) / np.asarray(sources["psf_flux_err"], float)
        size = np.asarray(sources["shape_sigma"], float) / np.asarray(sources["psf_sigma"], float)
    ok = np.isfinite(snr) & (snr >= config.apcorr.snr_min) & (np.abs(size - 1.0) <= config.apcorr_size_tolerance)
    for name in ("psf_flux_flag", "centroid_flag", "shape_flag", "is_blended", "flag_saturated", "flag_edge",
                 "flag_interpolated", "flag_bad"):
        if name in sources.colnames:
            ok &= ~np.asarray(sources[name], bool)
    rows = np.flatnonzero(ok)
    return rows[np.argsort(-snr[rows], kind="stable")][: config.apcorr_max_stars]


def coadd_aperture_correction(calexp: Exposure, sources: Table, config: MeasureCoaddConfig) -> ApCorrMap:
    """Fit total flux / PSF flux of the coadd's bright point sources over the patch.

    Parameters
    ----------
    calexp : Exposure
        ``deepCoadd_calexp`` with its :class:`CoaddPsf`.
    sources : Table
        :func:`snakedrp.meas.measure.measure_sources` rows of that coadd (PSF fluxes uncorrected).
    config : MeasureCoaddConfig

    Returns
    -------
    ApCorrMap
        ``evaluate(x, y)`` is the factor turning a PSF flux at ``(x, y)`` into a total flux.

    Raises
    ------
    ApCorrError
        No point source has a total flux (none bright enough, or no input curve of growth).
    """
    rows = point_sources_for_apcorr(sources, config)
    if len(rows) == 0:
        raise ApCorrError(f"no unblended point source above PSF S/N {config.apcorr.snr_min:g} for the aperture correction")
    psf = calexp.psf
    mixes = PsfMixes(psf)
    x = np.asarray(sources["x_centroid"], float)[rows]
    y = np.asarray(sources["y_centroid"], float)[rows]
    radius = config.aperture_fwhm * np.array([mixes.at(xc, yc).widest_fwhm for xc, yc in zip(x, y)])
    image = np.ascontiguousarray(np.nan_to_num(calexp.image), dtype=np.float32)
    variance = np.ascontiguousarray(np.nan_to_num(calexp.variance, nan=0.0), dtype=np.float32)
    segmentation, bad = neighbour_segmentation(calexp, config.neighbour_nsigma)
    ny, nx = image.shape
    ids = segmentation[np.clip(np.round(y).astype(int), 0, ny - 1), np.clip(np.round(x).astype(int), 0, nx - 1)]
    flux, flux_err = clean_aperture_flux(image, variance, bad, segmentation, ids, x, y, radius)
    total, total_err = total_fluxes(image, variance, bad, segmentation, ids, x, y, radius, flux, flux_err, psf,
                                    config.curve_of_growth, config.calib_aperture_fwhm, with_errors=True)
    good = np.isfinite(total) & (total > 0) & np.isfinite(total_err) & (total_err > 0)
    if not good.any():
        raise ApCorrError(f"none of {len(rows)} point sources has a total flux (an input without a curve of growth?)")
    return fit_aperture_correction(x[good], y[good], np.asarray(sources["psf_flux"], float)[rows][good],
                                   np.asarray(sources["psf_flux_err"], float)[rows][good], total[good],
                                   total_err[good], shape=(ny, nx), config=config.apcorr)


def measure_coadd(calexp: Exposure, objects: Table, segmentation: np.ndarray, *, config: MeasureCoaddConfig | None = None,
                  reference: Table | None = None) -> Table:
    """Measure the merged objects on one band's coadd, free or forced at the reference positions.

    Parameters
    ----------
    calexp : Exposure
        ``deepCoadd_calexp`` of the band (background subtracted, zeropoint ``ZEROPT``).
    objects : Table
        ``deepCoadd_mergeDet`` (``id``, ``x``, ``y``, ``parent``, ``blend_nchild``, ``is_blended``).
    segmentation : ndarray of int32, shape (ny, nx)
        The merged footprints (object id per pixel).
    config : MeasureCoaddConfig
    reference : Table, optional
        ``deepCoadd_ref`` (``id``, ``x_centroid``, ``y_centroid`` in the order of ``objects``):
        forced photometry at those positions.

    Returns
    -------
    Table
        :func:`snakedrp.meas.measure.measure_sources`' columns (fluxes in coadd units), with
        ``psf_flux`` and its error scaled to total flux by ``psf_apcorr`` (NaN, and
        ``psf_apcorr_flag`` set, when the patch has no aperture correction), and ``psf_mag``,
        ``psf_mag_err`` [AB mag]. ``meta``: ``ZEROPT`` (AB mag of total flux 1), ``APCORRN``
        (point sources in the aperture correction), ``APCORRSC`` (their RMS about the fit,
        fraction), ``FORCED`` (positions fixed at the reference band's).
    """
    config = config or MeasureCoaddConfig()
    config.validate()
    detections = objects["id", "x", "y", "parent", "blend_nchild", "is_blended"]
    if reference is not None:
        if len(reference) != len(objects) or (np.asarray(reference["id"]) != np.asarray(objects["id"])).any():
            raise ValueError("the reference table must hold the merged objects, in their order")
        detections = detections.copy()
        detections["x"] = np.asarray(reference["x_centroid"], float)
        detections["y"] = np.asarray(reference["y_centroid"], float)
    psf = calexp.psf
    model = CellCachedPsf(psf) if isinstance(psf, CoaddPsf) else psf
    sources = measure_sources(calexp.image, calexp.variance, calexp.mask, detections, model, config.measurement,
                              wcs=calexp.wcs, segmentation=segmentation, forced=reference is not None)
    factor = np.full(len(sources), np.nan)
    n_stars, scatter = 0, float("nan")
    if config.do_apcorr and len(sources):
        try:
            apcorr = coadd_aperture_correction(calexp, sources, config)
            factor = apcorr.evaluate(sources["x_centroid"], sources["y_centroid"])
            n_stars, scatter = apcorr.n_stars, apcorr.scatter
        except ApCorrError as err:
            logger.warning("no aperture correction, PSF fluxes are NaN: %s", err)
    elif not config.do_apcorr:
        factor = np.ones(len(sources))
    sources["psf_flux"] = np.asarray(sources["psf_flux"], float) * factor
    sources["psf_flux_err"] = np.asarray(sources["psf_flux_err"], float) * factor
    sources["psf_apcorr"] = factor
    sources["psf_apcorr"].description = "Factor applied to psf_flux: the coadd's total / PSF flux of point sources at the position"
    sources["psf_apcorr_flag"] = ~np.isfinite(factor)
    sources["psf_apcorr_flag"].description = "The patch had no aperture correction (psf_flux NaN)"
    zeropoint = float(calexp.zeropoint)
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.asarray(sources["psf_flux"], float)
        sources["psf_mag"] = zeropoint - 2.5 * np.log10(np.where(flux > 0, flux, np.nan))
        sources["psf_mag_err"] = 2.5 / np.log(10) * np.asarray(sources["psf_flux_err"], float) / flux
    sources["psf_mag"].unit = sources["psf_mag_err"].unit = "mag"
    sources["psf_mag"].description = "AB magnitude of the total PSF flux (NaN for non-positive fluxes)"
    sources["psf_mag_err"].description = "1-sigma error of psf_mag"
    sources.meta["ZEROPT"] = zeropoint
    sources.meta["APCORRN"] = int(n_stars)
    sources.meta["APCORRSC"] = float(scatter)
    sources.meta["FORCED"] = reference is not None
    return sources
