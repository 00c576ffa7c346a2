"""Source measurement: centroids, PSF, aperture, calibration-aperture and Kron fluxes, shapes, flags.

Every quantity is computed for all sources at once (stacks of stamps, one sep call per
quantity); Python loops over sources remain only for the adaptive moments (GalSim HSM, in C),
the joint PSF fits of deblended blends and the neighbour replacement in the calibration
aperture (about one neighbour per bright source). Conventions:

- Pixel positions zero-based, pixel centres on integers; fluxes in image units (electrons),
  with 1-sigma errors from the variance plane.
- Pixels with ``config.bad_mask_planes`` (default BAD, SAT, NO_DATA) or non-finite values carry no
  weight in fits; in circular apertures sep replaces them by the mean of the aperture's other
  pixels, and the ``ap_<r>_flag`` columns say so.
- Neighbours: with a segmentation image (from :func:`snakedrp.meas.detect.detect_sources`), pixels
  of other sources are excluded from a source's PSF fit, centroid error and adaptive moments;
  children of one deblended parent whose PSF-fit boxes overlap are fitted simultaneously, each
  with its own PSF model; in the calibration aperture of sources above ``calib_replace_snr_min``,
  other sources' footprint pixels are replaced by the source's own PSF model
  (:func:`neighbour_correction`). The fixed-radius apertures keep their neighbours.
- PSF fluxes are unweighted least-squares amplitudes of the unit-flux PSF model (normalised over the
  whole kernel), as LSST's PsfFlux: per-pixel variance weights would bias bright stars low.
- The calibration aperture has radius ``calib_aperture_fwhm`` x the local PSF FWHM (default 4; the
  Gaussian-equivalent FWHM of the PSF model's adaptive moments). The aperture correction maps PSF
  fluxes onto it; a real PSF has light beyond any radius (about 1 % beyond 4 FWHM), which the
  aperture loss of :func:`snakedrp.meas.apcorr.measure_aperture_loss` (a curve of growth of bright
  stars) adds back, so no radius is assumed to hold a star's total flux.
"""
from __future__ import annotations

import math

import numpy as np
import sep
from astropy.table import Table

from snakedrp.meas.detect import unusable_pixels
from snakedrp.repo.exposure import mask_bits
from snakedrp.meas.config import DEFAULT_PIXEL_FLAGS, MeasureConfig
from snakedrp.meas.columns import xy_columns
from snakedrp.repo.psf_model import PsfModel
from snakedrp.meas.apertures import aperture_fluxes, aperture_name, footprint_boxes, kron_fluxes, neighbour_correction
from snakedrp.meas.psf_flux import PsfGrid, blend_groups, draw_psf_models, joint_psf_fits, psf_fit
from snakedrp.meas.shapes import adaptive_moments, guess_sigma
from snakedrp.stamps import padded_cutouts


# ---------------------------------------------------------------- the task
def measure_sources(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, detections: Table,
                    psf: PsfModel, config: MeasureConfig | None = None, *, wcs=None,
                    segmentation: np.ndarray | None = None, footprints: Table | None = None,
                    bad: np.ndarray | None = None, minimal: bool = False, forced: bool = False) -> Table:
    """Measure every detected source.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image [electrons].
    variance : ndarray, shape (ny, nx)
        Per-pixel variance [electrons^2].
    mask : ndarray of int, shape (ny, nx)
        LSST bit mask (:data:`snakedrp.repo.exposure.MASK_PLANES`).
    detections : Table
        ``x, y`` (or ``x_centroid, y_centroid``) zero-based starting positions; optional ``id``
        (must equal the segmentation values when ``segmentation`` is given), ``parent``,
        ``blend_nchild``, ``is_blended`` (carried over) and ``a, b, theta`` (isophotal ellipse for
        the Kron aperture; the PSF's circle otherwise).
    psf : PsfModel
        PSF model of the image (:class:`snakedrp.repo.psf_model.GaussianPsf` before one is built).
    config : MeasureConfig
    wcs : astropy.wcs.WCS, optional
        When given, ``coord_ra``/``coord_dec`` are filled (NaN otherwise).
    segmentation : ndarray of int, shape (ny, nx), optional
        Footprints (value = source id); enables neighbour masking and joint blend fits.
    footprints : Table, optional
        ``id, x_min, x_max, y_min, y_max`` (inclusive box) of every footprint in ``segmentation``,
        e.g. :attr:`DetectionResult.sources <snakedrp.meas.detect.DetectionResult>`; saves finding the
        boxes in the segmentation (a pass over the image).
    bad : ndarray of bool, shape (ny, nx), optional
        The unusable pixels, as :func:`snakedrp.meas.detect.unusable_pixels` gives them for
        ``config.bad_mask_planes``; computed when not given. Pass it to measure one image twice.
    minimal : bool
        Measure only PSF fluxes and pixel flags, at the given positions taken as the centroids
        (what PSF-star selection needs, e.g. the first pass of characterization on detection's
        windowed centroids); the aperture, calibration-aperture, Kron and adaptive-moment
        columns are present but NaN (their flags True). Those columns and the centroids are
        most of the cost.
    forced : bool
        Forced photometry: the given positions are the centroids (e.g. an object's reference-band
        position on another band's coadd); every other column is measured as usual, the centroid
        errors from this image. ``centroid_flag`` is set only for non-finite or off-image positions.

    Returns
    -------
    Table
        One row per detection, in order; every column has a unit and a description. Columns:
        ``id, parent, blend_nchild, is_blended, x_centroid, y_centroid, x_centroid_err,
        y_centroid_err, centroid_flag, coord_ra, coord_dec, psf_flux, psf_flux_err, psf_flux_flag,
        psf_snr, psf_chi2, ap_<r>_flux, ap_<r>_flux_err, ap_<r>_flag`` (each radius),
        ``calib_flux, calib_flux_err, calib_radius, calib_flag, kron_radius, kron_flux,
        kron_flux_err, kron_flag, shape_xx, shape_yy, shape_xy, shape_e1, shape_e2, shape_sigma,
        shape_flag, psf_sigma`` and ``flag_<name>``, ``flag_<name>_center`` for each pixel flag.
    """
    config = config or MeasureConfig()
    data = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(variance, dtype=np.float32)
    mask = np.asarray(mask)
    ny, nx = data.shape
    n = len(detections)
    x0, y0 = xy_columns(detections, order=(("x_centroid", "y_centroid"), ("x", "y")))
    ids = (np.asarray(detections["id"], np.int64) if "id" in detections.colnames
           else np.arange(1, n + 1, dtype=np.int64))
    parent = (np.asarray(detections["parent"], np.int64) if "parent" in detections.colnames
              else np.zeros(n, np.int64))
    if bad is None:
        bad = unusable_pixels(data, var, mask, config.bad_mask_planes)
    # masked pixels are not copied out of the image: sep ignores the values of masked pixels, and
    # the stamps below (and the neighbour sums) zero them, as a zeroed copy of the image would
    seg = None if segmentation is None else np.ascontiguousarray(segmentation, dtype=np.int32)

    grid = PsfGrid.of(psf, (ny, nx), config.psf_grid_spacing)
    finite0 = np.isfinite(x0) & np.isfinite(y0)
    x0c, y0c = np.where(finite0, x0, 0.0), np.where(finite0, y0, 0.0)
    sigma = grid.sigma(x0c, y0c)
    fwhm = 2.3548 * sigma

    # ---- centroids: windowed (XWIN), Gaussian weight of the local PSF sigma
    if n and not (minimal or forced):
        xw, yw, wflag = sep.winpos(data, x0c, y0c, sigma, mask=bad, subpix=1)
    else:
        xw, yw, wflag = x0c.copy(), y0c.copy(), np.zeros(n, int)
    ok = finite0 & (wflag == 0) & np.isfinite(xw) & np.isfinite(yw)
    ok &= np.hypot(xw - x0c, yw - y0c) < config.max_centroid_shift * sigma
    ok &= (xw > -0.5) & (xw < nx - 0.5) & (yw > -0.5) & (yw < ny - 0.5)
    if seg is not None and not forced:
        jx = np.clip(np.floor(np.nan_to_num(xw) + 0.5).astype(int), 0, nx - 1)
        jy = np.clip(np.floor(np.nan_to_num(yw) + 0.5).astype(int), 0, ny - 1)
        ok &= (seg[jy, jx] == ids) | (seg[jy, jx] == 0)
    xc = np.where(ok, xw, x0c)
    yc = np.where(ok, yw, y0c)
    centroid_flag = ~ok
    ix = np.floor(xc + 0.5).astype(int)
    iy = np.floor(yc + 0.5).astype(int)

    # ---- stamps on the PSF-fit box
    half = max(2, int(math.ceil(config.psf_fit_radius * float(np.median(sigma))))) if n else 2
    d_st = padded_cutouts(data, ix, iy, half, np.float32(0.0)).astype(float)
    v_st = padded_cutouts(var, ix, iy, half, np.float32(0.0)).astype(float)
    bad_st = padded_cutouts(bad, ix, iy, half, True)
    d_st[bad_st] = 0.0
    v_st[bad_st] = 0.0
    if seg is not None:
        s_st = padded_cutouts(seg, ix, iy, half, -1)
        other = (s_st != 0) & (s_st != ids[:, None, None])
    else:
        other = np.zeros(bad_st.shape, bool)
    good = ~bad_st & ~other
    evaluation = config.psf_evaluation
    if evaluation == "auto":
        # a model with its own draw (GaussianPsf renders exact sub-pixel positions) is drawn per source;
        # for the rest, draw is the Lanczos-3 shift of the kernel, which the grid reproduces in bulk
        evaluation = "grid" if type(psf).draw is PsfModel.draw else "draw"
    if evaluation == "grid":
        models = grid.models(xc, yc, ix, iy, half)
    else:
        models = draw_psf_models(psf, xc, yc, ix, iy, half)

    psf_flux, psf_flux_err, psf_chi2, norm = psf_fit(d_st, v_st, good, models)
    full_norm = (models**2).sum(axis=(1, 2))
    psf_flux_flag = ~np.isfinite(psf_flux) | (norm < 0.5 * full_norm) | centroid_flag
    if seg is not None and config.joint_blend_fit:
        groups = blend_groups(parent, ix, iy, half)
        for r, (f, e) in joint_psf_fits(groups, data, var, bad, seg, ids, models, ix, iy, half).items():
            psf_flux[r], psf_flux_err[r] = f, e

    # ---- centroid errors from the linearised windowed-centroid condition (pixels of the fit box)
    off = np.arange(-half, half + 1, dtype=float)
    dxs = off[None, None, :] - (xc - ix)[:, None, None]
    dys = off[None, :, None] - (yc - iy)[:, None, None]
    s2 = (sigma**2)[:, None, None]
    w = np.exp(-0.5 * (dxs**2 + dys**2) / s2) * good
    wd = (w * d_st).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        den_x = (w * d_st * (1 - dxs**2 / s2)).sum(axis=(1, 2))
        den_y = (w * d_st * (1 - dys**2 / s2)).sum(axis=(1, 2))
        den_x = np.where(den_x > 0.2 * wd, den_x, 0.5 * wd)
        den_y = np.where(den_y > 0.2 * wd, den_y, 0.5 * wd)
        x_err = np.sqrt((w**2 * dxs**2 * v_st).sum(axis=(1, 2))) / den_x
        y_err = np.sqrt((w**2 * dys**2 * v_st).sum(axis=(1, 2))) / den_y
    bad_err = ~(wd > 0)
    x_err[bad_err] = np.nan
    y_err[bad_err] = np.nan

    # ---- aperture and calibration-aperture fluxes
    radii = [float(r) for r in config.aperture_radii]
    calib_radius = config.calib_aperture_fwhm * fwhm
    if minimal:
        ap_flux = np.full((n, len(radii) + 1), np.nan)
        ap_err = np.full((n, len(radii) + 1), np.nan)
        ap_flag = np.ones((n, len(radii) + 1), bool)
    else:
        ap_flux, ap_err, ap_flag = aperture_fluxes(data, var, bad, xc, yc, radii + [calib_radius])
    if seg is not None and config.calib_replace_neighbours and not minimal:
        with np.errstate(invalid="ignore", divide="ignore"):
            rows = np.nonzero(np.nan_to_num(psf_flux / psf_flux_err) >= config.calib_replace_snr_min)[0]
        ap_flux[rows, -1] += neighbour_correction(data, bad, seg, ids[rows], xc[rows], yc[rows], calib_radius[rows],
                                                   np.nan_to_num(psf_flux[rows]), grid, footprints=footprints)
    ap = {"flux": ap_flux, "err": ap_err, "flag": ap_flag}

    # ---- Kron
    if minimal:
        kron = {"radius": np.full(n, np.nan), "flux": np.full(n, np.nan), "err": np.full(n, np.nan),
                "flag": np.ones(n, bool)}
    else:
        kron = kron_fluxes(data, var, bad, seg, ids, xc, yc, sigma, detections, config)

    # ---- adaptive moments
    with np.errstate(invalid="ignore", divide="ignore"):
        psf_snr = psf_flux / psf_flux_err
    shape_rows = np.nonzero(np.nan_to_num(psf_snr) >= config.shape_snr_min)[0] if not minimal else np.zeros(0, int)
    shapes = adaptive_moments(data, bad, seg, ids, xc, yc, ix, iy, guess_sigma(sigma, detections),
                               shape_rows, config)
    shape_flag = ~np.isfinite(shapes[0])

    # ---- pixel flags
    flags = pixel_flags(mask, seg, ids, ix, iy, half, config, footprints)

    # ---- sky coordinates
    ra = np.full(n, np.nan)
    dec = np.full(n, np.nan)
    if wcs is not None and n:
        ra, dec = (np.asarray(v, float) for v in wcs.pixel_to_world_values(xc, yc))

    # ---- the table
    t = Table()

    def col(name, values, unit, description):
        t[name] = values
        t[name].unit = unit
        t[name].description = description

    col("id", ids, "", "Source id (the segmentation value of its footprint)")
    col("parent", parent, "", "Id of the deblended parent footprint (0: not blended); parents are not rows")
    col("blend_nchild", np.asarray(detections["blend_nchild"], np.int32) if "blend_nchild" in detections.colnames
        else np.ones(n, np.int32), "", "Number of sources the parent footprint was split into (1: not blended)")
    col("is_blended", np.asarray(detections["is_blended"], bool) if "is_blended" in detections.colnames
        else parent > 0, "", "Deblended child of a larger footprint")
    col("x_centroid", xc, "pix", "Windowed centroid x (column), zero-based, Gaussian window of the PSF sigma")
    col("y_centroid", yc, "pix", "Windowed centroid y (row), zero-based, Gaussian window of the PSF sigma")
    col("x_centroid_err", x_err, "pix", "1-sigma error of x_centroid")
    col("y_centroid_err", y_err, "pix", "1-sigma error of y_centroid")
    col("centroid_flag", centroid_flag, "", "Windowed centroid failed or ran away; the detection position is used")
    col("coord_ra", ra, "deg", "Right ascension of the centroid (from the WCS; NaN without one)")
    col("coord_dec", dec, "deg", "Declination of the centroid (from the WCS; NaN without one)")
    col("psf_flux", psf_flux, "electron", "PSF flux: linear least-squares amplitude of the PSF model at the centroid")
    col("psf_flux_err", psf_flux_err, "electron", "1-sigma error of psf_flux")
    col("psf_flux_flag", psf_flux_flag, "", "PSF flux unreliable: fit failed, over half the PSF weight masked, or centroid failed")
    col("psf_snr", psf_snr, "", "Signal-to-noise ratio of the PSF flux")
    col("psf_chi2", psf_chi2, "", "Reduced chi^2 of the PSF fit over its box (unresolved sources ~1)")
    col("psf_sigma", sigma, "pix", "Adaptive-moment sigma of the PSF model at the source")
    for k, r in enumerate(radii):
        stem = aperture_name(r)
        col(f"{stem}_flux", ap["flux"][:, k], "electron", f"Flux in a circular aperture of radius {r:g} pixels")
        col(f"{stem}_flux_err", ap["err"][:, k], "electron", f"1-sigma error of {stem}_flux")
        col(f"{stem}_flag", ap["flag"][:, k], "", f"Aperture of radius {r:g} leaves the image or holds masked pixels (replaced by the aperture mean)")
    col("calib_flux", ap["flux"][:, -1], "electron",
        f"Calibration-aperture flux: circle of radius {config.calib_aperture_fwhm:g} x PSF FWHM (no neighbours; the light beyond is the APLOSS header card)")
    col("calib_flux_err", ap["err"][:, -1], "electron", "1-sigma error of calib_flux")
    col("calib_radius", calib_radius, "pix", "Radius of the calibration aperture")
    col("calib_flag", ap["flag"][:, -1], "", "Calibration aperture leaves the image or holds masked pixels")
    col("kron_radius", kron["radius"], "pix", "Kron radius (first-moment radius, geometric mean of the ellipse axes)")
    col("kron_flux", kron["flux"], "electron", f"Flux in the Kron ellipse ({config.kron_factor:g} x Kron radius)")
    col("kron_flux_err", kron["err"], "electron", "1-sigma error of kron_flux")
    col("kron_flag", kron["flag"], "", "Kron radius or flux failed, or the ellipse holds masked pixels or leaves the image")
    col("shape_xx", shapes[3], "pix2", "Adaptive second moment <x x> (GalSim HSM), PSF not removed")
    col("shape_yy", shapes[4], "pix2", "Adaptive second moment <y y> (GalSim HSM), PSF not removed")
    col("shape_xy", shapes[5], "pix2", "Adaptive second moment <x y> (GalSim HSM), PSF not removed")
    col("shape_e1", shapes[1], "", "Distortion (xx - yy) / (xx + yy) of the adaptive moments")
    col("shape_e2", shapes[2], "", "Distortion 2 xy / (xx + yy) of the adaptive moments")
    col("shape_sigma", shapes[0], "pix", "Adaptive-moment size det(M)**(1/4)")
    col("shape_flag", shape_flag, "", "Adaptive moments not measured (S/N below shape_snr_min) or failed")
    for name, (foot, centre) in flags.items():
        planes = "/".join(config.pixel_flags[name])
        col(f"flag_{name}", foot, "", f"A {planes} pixel lies in the footprint or the 3x3 centre box")
        col(f"flag_{name}_center", centre, "", f"A {planes} pixel lies in the 3x3 box around the centroid")
    return t


def pixel_flags(mask, seg, ids, ix, iy, half, config, footprints=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per flag: (any plane pixel in footprint or 3x3 centre box, any in the 3x3 centre box)."""
    n = len(ix)
    ny, nx = mask.shape
    mask = np.asarray(mask)
    centre = np.zeros(n, np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            jy, jx = iy + dy, ix + dx
            inside = (jy >= 0) & (jy < ny) & (jx >= 0) & (jx < nx)
            centre |= np.where(inside, mask[np.clip(jy, 0, ny - 1), np.clip(jx, 0, nx - 1)], 0)
    if seg is not None:
        # the footprints' boxes: small cut-outs instead of passes over every footprint pixel
        lab, x0s, x1s, y0s, y1s = footprint_boxes(seg, footprints)
        rows = {int(i): k for k, i in enumerate(lab)}
        foot = centre.copy()
        for k, sid in enumerate(ids):
            r = rows.get(int(sid))
            if r is None:
                continue
            sl = (slice(y0s[r], y1s[r]), slice(x0s[r], x1s[r]))
            values = mask[sl][seg[sl] == sid]
            if values.size:
                foot[k] |= int(np.bitwise_or.reduce(values))
    else:
        box = padded_cutouts(mask, ix, iy, half, 0).astype(np.int64)
        foot = np.bitwise_or.reduce(box.reshape(n, -1), axis=1) if n else np.zeros(0, np.int64)
        foot |= centre
    off_image = (ix - half < 0) | (ix + half >= nx) | (iy - half < 0) | (iy + half >= ny)
    out = {}
    for name, planes in config.pixel_flags.items():
        bits = mask_bits(*planes)
        f, c = (foot & bits) != 0, (centre & bits) != 0
        if name == "edge":
            f = f | off_image
        out[name] = (f, c)
    return out


# ---------------------------------------------------------------- calibration helpers
def add_sky_coordinates(table: Table, wcs) -> Table:
    """Fill ``coord_ra``/``coord_dec`` [deg] from ``x_centroid``/``y_centroid`` (zero-based) and a WCS, in place."""
    ra, dec = wcs.pixel_to_world_values(np.asarray(table["x_centroid"], float), np.asarray(table["y_centroid"], float))
    table["coord_ra"] = np.asarray(ra, float)
    table["coord_dec"] = np.asarray(dec, float)
    table["coord_ra"].unit, table["coord_dec"].unit = "deg", "deg"
    table["coord_ra"].description = "Right ascension of the centroid (from the WCS)"
    table["coord_dec"].description = "Declination of the centroid (from the WCS)"
    return table


def calibrate_fluxes(table: Table, zeropoint: float, zeropoint_err: float = 0.0) -> Table:
    """A copy of ``table`` with ``<x>_mag`` and ``<x>_mag_err`` (AB) for every ``<x>_flux`` column.

    ``mag = zeropoint - 2.5 log10(flux)`` (NaN where the flux is not positive);
    ``mag_err = hypot(1.0857 flux_err / flux, zeropoint_err)``.
    """
    out = table.copy(copy_data=False)
    for name in table.colnames:
        if not name.endswith("_flux"):
            continue
        stem = name[: -len("_flux")]
        flux = np.asarray(table[name], float)
        with np.errstate(invalid="ignore", divide="ignore"):
            mag = np.where(flux > 0, zeropoint - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
        out[f"{stem}_mag"] = mag
        out[f"{stem}_mag"].unit = "mag"
        out[f"{stem}_mag"].description = f"AB magnitude from {name} (zeropoint {zeropoint:.4f})"
        if f"{name}_err" in table.colnames:
            ferr = np.asarray(table[f"{name}_err"], float)
            with np.errstate(invalid="ignore", divide="ignore"):
                merr = np.where(flux > 0, np.hypot(2.5 / np.log(10) * ferr / np.where(flux > 0, flux, 1.0),
                                                   zeropoint_err), np.nan)
            out[f"{stem}_mag_err"] = merr
            out[f"{stem}_mag_err"].unit = "mag"
            out[f"{stem}_mag_err"].description = f"1-sigma error of {stem}_mag, including the zeropoint error"
    return out
