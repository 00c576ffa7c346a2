"""CalibrateTask: measurement, astrometric and photometric calibration.

As in the LSST CalibrateTask: take the sources characterization detected (or detect at 5 sigma
on the characterized exposure and deblend, when run on its own or with ``redetect``),
measure (centroids, apertures, PSF and Kron fluxes, shapes, flags), find the faint sources hidden
in bright point sources' footprints on the image with their PSF models subtracted
(:func:`snakedrp.meas.detect.detect_in_residual`) and measure them with their neighbours' models
subtracted, apply the aperture correction (its constant re-centred on the median over the
aperture loss's stars) and the aperture loss measured by the curve of growth of the src's bright
unresolved stars on the image less all point-source models (:func:`snakedrp.meas.apcorr.measure_aperture_loss`;
PSF fluxes of stars are then total fluxes), match to the reference catalog and fit a TAN-SIP WCS,
then fit the zeropoint from matched unresolved stars and add calibrated magnitudes and sky
coordinates to the catalog.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from astropy.table import Table

from snakedrp.meas.apcorr import ApCorrMap, ApertureLoss, measure_aperture_loss
from snakedrp.meas.columns import append_rows
from snakedrp.calib.astrometry import AstrometryError, match_and_fit
from snakedrp.meas.detect import (DetectionResult, detect_in_residual,
                                  detect_sources, unusable_pixels)
from snakedrp.meas.psf_flux import psf_model_image
from snakedrp.repo.exposure import Exposure
from snakedrp.meas.measure import calibrate_fluxes, measure_sources
from snakedrp.single_frame.config import CalibrateConfig
from snakedrp.stamps import kernel_moments
from snakedrp.calib.photometry import PhotometryError, fit_zeropoint


class CalibrateError(RuntimeError):
    """Calibration failed (no sources, no reference stars, ...); the message says why."""


@dataclass(frozen=True)
class CalibrateResult:
    """exposure (with fitted ``wcs`` and ``zeropoint``), sources (src), matches (srcMatch), the apcorr applied."""

    exposure: Exposure
    sources: Table
    matches: Table | None
    apcorr: ApCorrMap | None = None


def _without_footprints(detections: DetectionResult, ids) -> np.ndarray:
    """A copy of the segmentation (int32) with the footprints of ``ids`` returned to sky (0).

    Cleared in each footprint's box (``x_min .. y_max`` of ``detections.sources``, which holds
    every pixel of it), not by a lookup over the whole image.
    """
    seg = detections.segmentation
    out = seg.astype(np.int32, copy=True)
    t = detections.sources
    row_of = {int(i): k for k, i in enumerate(np.asarray(t["id"]))}
    rows = [row_of.get(int(i)) for i in ids]
    if any(r is None for r in rows):  # not a footprint of these detections: the whole-image way
        is_point = np.zeros(int(max(seg.max(), np.max(ids))) + 1, bool)
        is_point[np.asarray(ids)] = True
        return np.where(is_point[seg], 0, seg).astype(np.int32)
    x0, x1 = np.asarray(t["x_min"], np.int64), np.asarray(t["x_max"], np.int64) + 1
    y0, y1 = np.asarray(t["y_min"], np.int64), np.asarray(t["y_max"], np.int64) + 1
    for i, r in zip(ids, rows):
        cut = out[y0[r]:y1[r], x0[r]:x1[r]]
        cut[cut == i] = 0
    return out


class CalibrateTask:
    """Calibrate a characterized exposure (see the module docstring for the steps)."""

    ConfigClass = CalibrateConfig

    def __init__(self, config: CalibrateConfig | None = None):
        self.config = config or CalibrateConfig()
        self.config.validate()

    def run(self, exposure: Exposure, refcat: Table | None, *, apcorr: ApCorrMap | None = None,
            band: str | None = None, detections: DetectionResult | None = None,
            aperture_loss: ApertureLoss | None = None) -> CalibrateResult:
        """Detect, measure and calibrate ``exposure`` (background-subtracted, with a PSF).

        Parameters
        ----------
        exposure : Exposure
            From :class:`snakedrp.single_frame.characterize.CharacterizeTask`; its ``wcs`` is the first guess.
        refcat : astropy.table.Table or None
            Reference stars around the CCD (``ra, dec, ra_err, dec_err, mag_<band>, ...``).
        apcorr : ApCorrMap, optional
            Applied to ``psf_flux`` (and its error); the factor is kept as ``psf_apcorr``.
        aperture_loss : ApertureLoss, optional
            Total / calibration-aperture flux of stars, applied to ``psf_flux`` with the aperture
            correction (and included in ``psf_apcorr``); measured here on the bright unresolved
            stars when not given (and ``config.aperture_loss.enabled``). Its cards go to the calexp
            header and the src metadata.
        band : str, optional
            Reference-catalog band of the exposure's filter (``mag_<band>``).
        detections : DetectionResult, optional
            The sources to measure (``CharacterizeResult.detections``); without them, or with
            ``config.redetect``, calibrate detects on ``exposure`` itself.

        Raises
        ------
        CalibrateError
            No sources, no reference stars, failed zeropoint fit (a failed WCS fit too with
            ``require_astrometry``; without, the exposure comes back flagged ``WCSFAIL``); names
            visit and ccd.
        """
        cfg = self.config
        where = f"visit {exposure.metadata.get('VISIT', '?')} ccd {exposure.metadata.get('CCD', '?')}"
        ny, nx = exposure.shape
        if detections is None or cfg.redetect:
            psf_sigma = kernel_moments(exposure.psf.kernel(nx / 2.0, ny / 2.0))[0]
            detections = detect_sources(exposure.image, exposure.variance, exposure.mask, cfg.detection,
                                        psf_sigma=psf_sigma)
            exposure = replace(exposure, mask=detections.mask)
        if len(detections.sources) == 0:
            raise CalibrateError(f"{where}: no source detected above {cfg.detection.threshold} sigma")
        # the unusable pixels of the image, once: every later measurement sees the same pixels (see _unusable)
        bad = unusable_pixels(exposure.image, exposure.variance, exposure.mask, cfg.measure.bad_mask_planes)
        sources = measure_sources(exposure.image, exposure.variance, exposure.mask, detections.sources,
                                  exposure.psf, cfg.measure, wcs=exposure.wcs,
                                  segmentation=detections.segmentation, footprints=detections.sources, bad=bad)
        stamps: dict = {}  # the point sources' unit-flux PSF models, drawn once (psf_model_image)
        if cfg.residual_detection.enabled:
            sources, detections = self._measure_residual_detections(exposure, detections, sources, bad=bad,
                                                                    stamps=stamps)
            exposure = replace(exposure, mask=detections.mask)
        x, y = np.asarray(sources["x_centroid"]), np.asarray(sources["y_centroid"])
        size_ratio = np.asarray(sources["shape_sigma"]) / np.asarray(sources["psf_sigma"])
        loss = aperture_loss
        if (loss is None and cfg.aperture_loss.enabled) or (apcorr is not None and cfg.recentre_apcorr):
            apcorr, measured_loss = self._crowded_field_calibration(exposure, detections, sources, apcorr, bad=bad,
                                                                    stamps=stamps)
            loss = loss if loss is not None else measured_loss
        del stamps
        loss = loss if loss is not None else ApertureLoss.none()
        factor = apcorr.evaluate(x, y) if apcorr is not None else np.ones(len(sources))
        factor = factor * loss.factor
        sources["psf_flux"] *= factor
        sources["psf_flux_err"] *= factor
        sources["psf_apcorr"] = factor
        sources["psf_apcorr"].unit = ""
        sources["psf_apcorr"].description = "factor applied to psf_flux: aperture correction (calib aperture / PSF flux) x aperture loss (total / calib aperture)"
        extendedness = np.where(np.isfinite(size_ratio), (size_ratio > cfg.star_size_max).astype(float), np.nan)
        sources["extendedness"] = extendedness
        sources["extendedness"].unit = ""
        sources["extendedness"].description = ("1 if resolved (adaptive-moment size / PSF size > "
                                               f"{cfg.star_size_max}), 0 if not, NaN without a shape")
        wcs, matches, zeropoint, zeropoint_err = exposure.wcs, None, None, None
        metadata = exposure.metadata.copy()
        for key, value, comment in loss.cards():
            metadata[key] = (value, comment)
            sources.meta[key] = value
        if cfg.do_astrometry:
            if refcat is None or len(refcat) == 0:
                raise CalibrateError(f"{where}: the reference catalog does not cover this CCD")
            try:
                astro = match_and_fit(sources, refcat, exposure.wcs, cfg.astrometry, shape=(ny, nx))
            except AstrometryError as err:
                if cfg.require_astrometry:
                    raise CalibrateError(f"{where}: astrometry failed: {err}") from None
                # the calexp is still written (a failed fit is a fact about the data, and a missing
                # product would stop every coadd it overlaps), flagged so that nothing trusts it
                metadata["WCSFAIL"] = (str(err)[:60], "astrometric fit failed: camera WCS, no zeropoint")
                sources.meta["WCSFAIL"] = str(err)[:60]
                out = replace(exposure, zeropoint=None, zeropoint_err=None, metadata=metadata)
                no_matches = Table({"source_id": np.zeros(0, np.int64), "ref_id": np.zeros(0, np.int64),
                                    "separation_mas": np.zeros(0), "used": np.zeros(0, bool)},
                                   meta={"WCSFAIL": str(err)[:60]})
                return CalibrateResult(exposure=out, sources=sources, matches=no_matches, apcorr=apcorr)
            wcs, matches = astro.wcs, astro.matches
            ra, dec = wcs.all_pix2world(x, y, 0)
            # in place: new columns would drop the unit and description measure_sources gave them
            sources["coord_ra"][:] = np.mod(ra, 360.0)
            sources["coord_dec"][:] = dec
            metadata["ASTRMS"] = (float(astro.rms_mas), "astrometric fit RMS vs reference [mas]")
            metadata["ASTNMAT"] = (int(astro.n_matches), "reference matches used in the WCS fit")
        if cfg.do_photometry:
            if matches is None:
                raise CalibrateError(f"{where}: photometry needs the reference matches (do_astrometry)")
            try:
                photo = fit_zeropoint(matches, cfg.photometry, band=band,
                                      filter_name=metadata.get("FILTER"))
            except PhotometryError as err:
                raise CalibrateError(f"{where}: photometric calibration failed: {err}") from None
            zeropoint, zeropoint_err = photo.zeropoint, photo.zeropoint_err
            sources = calibrate_fluxes(sources, zeropoint, zeropoint_err)
            metadata["PHONSTAR"] = (int(photo.n_used), "stars used in the zeropoint fit")
        out = replace(exposure, wcs=wcs, zeropoint=zeropoint, zeropoint_err=zeropoint_err, metadata=metadata)
        return CalibrateResult(exposure=out, sources=sources, matches=matches, apcorr=apcorr)

    def _crowded_field_calibration(self, exposure: Exposure, detections: DetectionResult, sources: Table,
                                   apcorr: ApCorrMap | None, *, bad: np.ndarray | None = None,
                                   stamps: dict | None = None) -> tuple[ApCorrMap | None, ApertureLoss | None]:
        """The aperture correction's constant and the aperture loss, from the bright unresolved stars of the src.

        In a crowded field a 4-FWHM calibration aperture (34 pixels at 1.5" seeing) holds tens of
        neighbours; with their footprints replaced, their wings remain and scatter the stars'
        calibration / PSF flux ratios by a few per cent, one-sided, so the weighted fit of
        characterization (dominated by a few bright, often blended stars) is off by up to a per
        cent. With ``recentre_apcorr`` the map's constant term moves onto the median of
        ``calib_flux / psf_flux - apcorr(x, y)`` over the stars of the aperture loss, whose total /
        calibration-aperture flux ratios take out the local sky level each one's aperture holds, so
        that ``apcorr x aperture loss`` is those stars' total / PSF flux. The sky level left under
        every star is a larger fraction of a fainter star's aperture (1.5 e- a pixel is 4 % of an
        S/N-100 star in 4 FWHM at 1.3" seeing, 0.2 % of an S/N-1000 one): a median over fainter
        stars than the aperture loss's would move the flux scale with the zero level. With an
        aperture loss of fewer than 3 stars, the median is over the unresolved, unflagged src stars
        above ``recentre_snr_min``. The aperture loss (:func:`measure_aperture_loss`) is measured on the image
        less the PSF models of every point source (:meth:`_point_sources`; beyond the model's
        kernel their wings remain, a per cent of a neighbour's light), resolved sources' footprints
        left out.

        ``bad`` are the unusable pixels of the exposure as ``run`` found them (recomputed when not
        given); ``stamps``, the PSF model stamps drawn so far (``psf_model_image``).

        Returns
        -------
        (ApCorrMap or None, ApertureLoss or None)
        """
        cfg = self.config
        image, variance, psf = exposure.image, exposure.variance, exposure.psf
        ny, nx = exposure.shape
        point = self._point_sources(sources)
        star = point.copy()
        for name in ("centroid_flag", "calib_flag", "flag_saturated", "flag_edge", "flag_bad"):
            star &= ~np.asarray(sources[name], bool)
        if not star.any():
            return apcorr, None
        t = sources[point]
        residual = image - psf_model_image(psf, (ny, nx), t["x_centroid"], t["y_centroid"],
                                           np.nan_to_num(np.asarray(t["psf_flux"], float)), stamps=stamps)
        seg_resolved = _without_footprints(detections, np.asarray(sources["id"])[point])
        bad = self._unusable(image, variance, exposure.mask, bad)
        s = sources[star]
        x, y = np.asarray(s["x_centroid"], float), np.asarray(s["y_centroid"], float)
        radius = np.asarray(s["calib_radius"], float)
        ids = np.asarray(s["id"], np.int32)
        psf_flux = np.asarray(s["psf_flux"], float)
        calib, calib_err = np.asarray(s["calib_flux"], float), np.asarray(s["calib_flux_err"], float)
        loss = None
        if cfg.aperture_loss.enabled:
            loss = measure_aperture_loss(residual, variance, bad, seg_resolved, ids, x, y, radius, calib, calib_err,
                                         cfg.aperture_loss)
        if apcorr is not None and cfg.recentre_apcorr:
            with np.errstate(invalid="ignore", divide="ignore"):
                offset = calib / psf_flux - apcorr.evaluate(x, y)
            if loss is not None and len(loss.stars) >= 3:
                # the aperture loss's stars: its total / calib ratios hold their calibration
                # apertures' local sky, so the product apcorr x aperture loss is their total / PSF flux
                use = np.zeros(len(s), bool)
                use[loss.stars] = True
            else:
                use = np.asarray(s["psf_snr"], float) >= cfg.recentre_snr_min
            use &= np.isfinite(offset)
            if use.sum() >= 3:
                coeffs = apcorr.coeffs.copy()
                coeffs[0] += float(np.median(offset[use]))  # the constant is the first basis function
                apcorr = ApCorrMap(coeffs, apcorr.degree, apcorr.x_center, apcorr.x_scale, apcorr.y_center,
                                   apcorr.y_scale, error=max(apcorr.error, 1.2533 * 1.4826 * float(
                                       np.median(np.abs(offset[use] - np.median(offset[use])))) / np.sqrt(use.sum())),
                                   scatter=apcorr.scatter, n_stars=int(use.sum()))
        return apcorr, loss

    def _point_sources(self, sources: Table) -> np.ndarray:
        """Rows whose PSF models the residual detection subtracts: unresolved, PSF fit good, S/N high enough."""
        cfg = self.config
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.asarray(sources["psf_flux"]) / np.asarray(sources["psf_flux_err"])
            size_ratio = np.asarray(sources["shape_sigma"]) / np.asarray(sources["psf_sigma"])
        # saturated stars too (their fit leaves the SAT pixels out; the residual detection masks them)
        return ((size_ratio < cfg.star_size_max) & (snr >= cfg.residual_detection.subtract_snr_min)
                & ~np.asarray(sources["psf_flux_flag"], bool))

    def _unusable(self, data: np.ndarray, variance: np.ndarray, mask: np.ndarray,
                  bad: np.ndarray | None) -> np.ndarray:
        """:func:`unusable_pixels` of ``data`` for the measurement's planes; ``bad``, those of the
        exposure's image, when they are the same pixels.

        They are when ``data`` (the image, or the image less PSF models) and the image have no
        non-finite pixel and the measurement's planes leave out the DETECTED planes, the only ones
        in which the masks after a residual detection differ from the exposure's.
        """
        planes = self.config.measure.bad_mask_planes
        if (bad is not None and not {"DETECTED", "DETECTED_NEGATIVE"} & set(planes)
                and np.isfinite(data).all()):
            return bad
        return unusable_pixels(data, variance, mask, planes)

    def _measure_residual_detections(self, exposure: Exposure, detections: DetectionResult,
                                     sources: Table, *, bad: np.ndarray | None = None,
                                     stamps: dict | None = None) -> tuple[Table, DetectionResult]:
        """Find the sources hidden next to bright point sources and measure them (see :func:`detect_in_residual`).

        Each of ``residual_detection.n_passes`` passes subtracts the PSF models of the point sources
        (:meth:`_point_sources`) and detects on the rest. The sources found so far (N) are measured
        on the image less every other point source's model, so their bright neighbours' light
        does not pull their centroids and fluxes; the older sources of the blends they joined (B)
        are measured again on the image less the models of N, with the new footprints, before N,
        so that N sees B's refitted models. The src gets a ``detected_in_residual`` column.
        ``bad`` are the unusable pixels of the exposure as ``run`` found them; ``stamps``, the PSF
        model stamps drawn so far (``psf_model_image``), to which this adds.
        """
        cfg = self.config
        rcfg = cfg.residual_detection
        image, variance, psf = exposure.image, exposure.variance, exposure.psf
        shape = exposure.shape
        marker = np.zeros(len(sources), bool)

        def models(rows):
            t = sources[rows]
            return psf_model_image(psf, shape, t["x_centroid"], t["y_centroid"],
                                   np.nan_to_num(np.asarray(t["psf_flux"], float)), stamps=stamps)

        for _ in range(rcfg.n_passes):
            point = self._point_sources(sources)
            if not point.any():
                break
            model = models(point)
            residual = image - model
            sigma = float(np.median(np.asarray(sources["psf_sigma"])[point]))
            found, new_rows = detect_in_residual(residual, variance, exposure.mask, model, detections,
                                                 np.asarray(sources["id"])[point], cfg.detection, rcfg,
                                                 psf_sigma=sigma)
            del model
            if not len(new_rows):
                break
            det = found.sources
            kw = dict(wcs=exposure.wcs, segmentation=found.segmentation, footprints=det)
            # every row of the new sources is measured again below; until then only their centroids
            # and PSF fluxes (the models subtracted to re-measure B) are used
            new = measure_sources(residual, variance, found.mask, det[new_rows], psf, cfg.measure,
                                  bad=self._unusable(residual, variance, found.mask, bad), minimal=True, **kw)
            del residual
            n_old = len(sources)
            sources = sources.copy(copy_data=True)
            for name in ("parent", "blend_nchild", "is_blended"):
                sources[name][:] = det[name][:n_old]
            sources = append_rows(sources, new)
            marker = np.concatenate([marker, np.ones(len(new), bool)])
            detections = found
            hidden = np.flatnonzero(marker)
            parents = np.asarray(det["parent"])
            blends = np.flatnonzero(~marker & np.isin(parents, parents[hidden]))
            residual = image - models(hidden)
            again = measure_sources(residual, variance, found.mask, det[blends], psf, cfg.measure,
                                    bad=self._unusable(residual, variance, found.mask, bad), **kw)
            for name in sources.colnames:
                sources[name][blends] = again[name]
            others = self._point_sources(sources)
            others[hidden] = False
            residual = image - models(others)
            again = measure_sources(residual, variance, found.mask, det[hidden], psf, cfg.measure,
                                    bad=self._unusable(residual, variance, found.mask, bad), **kw)
            del residual
            for name in sources.colnames:
                sources[name][hidden] = again[name]
        sources["detected_in_residual"] = marker
        sources["detected_in_residual"].unit = ""  # dimensionless, as every flag column
        sources["detected_in_residual"].description = ("Found on the image with the PSF models of bright point "
                                                       "sources subtracted (hidden in a brighter source's footprint)")
        sources.meta["NRESID"] = int(marker.sum())
        return sources, detections
