"""Astrometric calibration: match detected sources to a reference catalog and fit a TAN-SIP WCS.

The steps follow the LSST AstrometryTask (matchOptimisticB, then a fitted TAN-SIP):

1. Reference stars are placed on the CCD with the guess WCS: the camera's initial TAN-SIP
   (``Camera.initial_wcs``: pointing, camera geometry and optical distortion) or a raw header's
   nominal TAN, without the distortion; either 1–2 arcsec off and slightly rotated.
2. Pattern match: for the brightest sources and reference stars, every source–reference pair
   within ``max_offset`` votes for its pixel offset in a 2-D histogram. The winning bin holds
   the true pairs. Trials over a grid of rotations and of radial distortions
   ``theta = rho (1 + d3 rho^2)`` about the guess's tangent point (the optical axis; a nominal
   TAN guess omits the distortion, which reaches tens of arcsec on the outer CCDs of a wide
   camera) keep the true pairs in one bin; a coarse then a fine grid is searched.
3. Nearest-neighbour matching (``scipy.spatial.cKDTree``) in the tangent plane, with a radius
   shrinking to ``match_radius``, alternating with the fit and sigma-clipping.
4. TAN-SIP fit, CRPIX at the CCD centre. The fit's coordinates are the pixel offsets from the
   CCD centre; with ``keep_guess_distortion`` and a TAN-SIP guess, those offsets moved by the
   guess's SIP: positions on the undistorted detector of the camera's optical model, so that
   the stars only correct pointing, rotation and scale, as survey pipelines fit on top of
   their camera geometry, and a sparse field's dozen reference stars suffice. The
   tangent-plane coordinates ``(xi, eta)`` of the reference stars about CRVAL are a weighted
   linear least-squares model of them, the simplest the matches call for: shift + rotation +
   scale of the guess's CD (4 parameters), then polynomials of order 1 (affine) up to
   ``sip_order``; a model is tried while there are ``min_matches_per_term`` matches per term
   and axis, and replaces a simpler one when its chi-square drop passes the F-test at
   ``order_significance`` and, for a correction on top of the guess's distortion, the
   position error its parameter covariance predicts over an 11x11 grid of the CCD has an RMS
   of at most ``max_predicted_error`` (a sparse field's few matches leave a polynomial free to
   swing where the CCD has none). The constant terms move CRVAL (iterated). With the guess's
   distortion kept, model after distortion is refitted as a polynomial of the pixel offsets
   on a grid over the CCD (exact for a linear model and a polynomial distortion). Its linear
   terms are the CD matrix and the rest, multiplied by ``CD^-1``, the SIP ``A``/``B``
   coefficients (order 1: a plain TAN). The inverse ``AP``/``BP`` is fitted on a grid over
   the CCD, its order raised until it reproduces the pixels within ``inverse_tolerance``.

Steps 2–3 are in :mod:`snakedrp.calib.match`, step 4 in :mod:`snakedrp.calib.wcs_fit`; this module
holds the configuration and :func:`match_and_fit`, which chains them.

astropy's ``fit_wcs_from_points`` is not used: it has no weights or outlier rejection and runs
a non-linear optimizer over all parameters, where the problem is linear once CRVAL is fixed.

Source table columns (zero-based pixels): ``x_centroid``, ``y_centroid`` (or ``x``, ``y``);
optional ``x_centroid_err``, ``y_centroid_err`` [pixel]; a flux pair (``psf_flux``,
``psf_flux_err`` or ``flux``/``calib_flux``/``ap_flux`` with ``_err``) for brightness order and
S/N; optional ``id``; boolean ``flag_*`` columns (a set flag excludes the source unless named in
``ignore_flags``). Reference catalog: ``id``, ``ra``, ``dec`` [deg], ``ra_err``, ``dec_err``
[mas], ``mag_<band>`` (brightness order uses the mean over bands).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from snakedrp.calib.match import RefModel, bootstrap_matches, nn_match, pattern_match
from snakedrp.calib.wcs_fit import (
    MAS_PER_DEG,
    AstrometryError,
    angular_separation_mas,
    build_sip_wcs,
    choose_fit,
    compose_pixel_fit,
    gnomonic,
    pixel_scale_matrix,
    residual_mas,
    rotation_deg,
    sip_forward,
)
from snakedrp.calib.config import AstrometryConfig

#: (x, y) column pairs tried in order for source centroids, and for their errors.
XY_COLUMNS = (("x_centroid", "y_centroid"), ("x", "y"))
XY_ERR_COLUMNS = (("x_centroid_err", "y_centroid_err"), ("x_err", "y_err"))
FLUX_COLUMNS = (("psf_flux", "psf_flux_err"), ("flux", "flux_err"), ("calib_flux", "calib_flux_err"),
                ("ap_flux", "ap_flux_err"))

#: Columns of the matches table made here; other source and reference columns are copied in
#: under their own names where they do not collide.
MATCH_COLUMNS = ("source_id", "ref_id", "source_row", "ref_row", "x", "y", "ra", "dec",
                 "separation_mas", "used")


@dataclass(frozen=True)
class AstrometryResult:
    """The fitted WCS and the matches it rests on.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
        TAN-SIP; zero-based pixels via ``all_pix2world(x, y, 0)``; ``to_header(relax=True)``.
    matches : astropy.table.Table
        One row per source–reference match: ``source_id``, ``ref_id``, ``source_row``,
        ``ref_row`` (row indices into the inputs), ``x``, ``y`` (source, pixel), ``ra``,
        ``dec`` (reference, deg), ``separation_mas`` (fitted source position − reference),
        ``used`` (in the final fit), then the other reference and source columns.
    rms_mas : float
        RMS on-sky separation of the used matches [mas].
    n_matches : int
        Matches used in the final fit.
    offset_arcsec : float
        Separation of the guess and fitted positions of the CCD centre [arcsec].
    rotation_deg : float
        Rotation of the fitted WCS relative to the guess at the CCD centre [deg, sky PA].
    sip_order : int
        Order of the WCS's SIP polynomials (1: a plain TAN WCS).
    fit_order : int
        Order of the polynomial fitted to the matches: of the correction on top of the guess's
        distortion when ``kept_guess_distortion``, else of the whole distortion.
    fit_parameters : int
        Parameters of that fit, both axes: 4 for shift + rotation + scale (order 1 with the
        linear part a rotated and scaled guess CD), ``(m + 1)(m + 2)`` for a polynomial of order m.
    kept_guess_distortion : bool
        The fit corrected the guess's SIP distortion (the camera's) instead of replacing it.
    radial_distortion : float
        d3 [deg^-2] found by the pattern matcher about the guess's tangent point.
    pattern_votes : int
        Pairs in the winning offset-vote bin.
    inverse_error_px : float
        Largest error of the inverse SIP (world -> pixel) over the CCD [pixel].
    forward_error_px : float
        Largest error over the CCD of the forward SIP that holds the guess's distortion with
        the fitted correction [pixel]; 0 when the fit is already a polynomial of the pixels.
    """

    wcs: WCS
    matches: Table
    rms_mas: float
    n_matches: int
    offset_arcsec: float
    rotation_deg: float
    sip_order: int
    fit_order: int
    fit_parameters: int
    kept_guess_distortion: bool
    radial_distortion: float
    pattern_votes: int
    inverse_error_px: float
    forward_error_px: float = 0.0


# ------------------------------------------------------------------ inputs
def _first_pair(table: Table, pairs):
    for a, b in pairs:
        if a in table.colnames and b in table.colnames:
            return np.asarray(table[a], float), np.asarray(table[b], float)
    return None


def _source_arrays(sources: Table, cfg: AstrometryConfig, pixel_scale: float) -> dict:
    xy = _first_pair(sources, XY_COLUMNS)
    if xy is None:
        raise AstrometryError(f"source table has no centroid columns {XY_COLUMNS}; has {sources.colnames}")
    x, y = xy
    flux_pair = _first_pair(sources, FLUX_COLUMNS)
    n = len(sources)
    if flux_pair is None:
        flux, snr = np.ones(n), np.full(n, np.inf)
    else:
        flux, flux_err = flux_pair
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(flux_err > 0, flux / flux_err, np.inf)
    err = _first_pair(sources, XY_ERR_COLUMNS)
    if err is not None:
        err_px = np.sqrt(0.5 * (err[0] ** 2 + err[1] ** 2))
    else:
        # centroid error of a ~1.7 pixel-sigma PSF: sqrt(2) sigma / (S/N)
        err_px = 2.4 / np.where(np.isfinite(snr) & (snr > 0), snr, 1e3)
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0) & (snr >= cfg.source_snr_min)
    ignore = set(cfg.ignore_flags)
    for name in sources.colnames:
        if name.startswith("flag") and name not in ignore and sources[name].dtype == bool:
            good &= ~np.asarray(sources[name])
    bad_err = ~np.isfinite(err_px) | (err_px <= 0)
    err_px = np.where(bad_err, 0.1, err_px)
    ids = np.asarray(sources["id"]) if "id" in sources.colnames else np.arange(n)
    rows = np.nonzero(good)[0]
    order = np.argsort(-flux[rows], kind="stable")
    rows = rows[order]
    return {"row": rows, "x": x[rows], "y": y[rows], "err_mas": err_px[rows] * pixel_scale * 1e3,
            "id": ids[rows], "n_input": n}


def _ref_arrays(refcat: Table) -> dict:
    for name in ("ra", "dec"):
        if name not in refcat.colnames:
            raise AstrometryError(f"reference catalog has no {name!r} column; has {refcat.colnames}")
    ra = np.asarray(refcat["ra"], float)
    dec = np.asarray(refcat["dec"], float)
    n = len(refcat)
    ra_err = np.asarray(refcat["ra_err"], float) if "ra_err" in refcat.colnames else np.full(n, 10.0)
    dec_err = np.asarray(refcat["dec_err"], float) if "dec_err" in refcat.colnames else np.full(n, 10.0)
    mags = [np.asarray(refcat[c], float) for c in refcat.colnames
            if c.startswith("mag_") and not c.endswith("_err")]
    if mags:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
            mag = np.nanmean(np.stack(mags), axis=0)
        mag = np.where(np.isfinite(mag), mag, 99.0)
    else:
        mag = np.zeros(n)
    good = np.isfinite(ra) & np.isfinite(dec)
    ra_err = np.where(np.isfinite(ra_err) & (ra_err >= 0), ra_err, 10.0)
    dec_err = np.where(np.isfinite(dec_err) & (dec_err >= 0), dec_err, 10.0)
    ids = np.asarray(refcat["id"]) if "id" in refcat.colnames else np.arange(n)
    rows = np.nonzero(good)[0]
    rows = rows[np.argsort(mag[rows], kind="stable")]
    return {"row": rows, "ra": ra[rows], "dec": dec[rows], "ra_err": ra_err[rows], "dec_err": dec_err[rows],
            "id": ids[rows]}


def match_and_fit(sources: Table, refcat: Table, wcs_guess: WCS, config: AstrometryConfig | None = None, *,
                  shape: tuple[int, int]) -> AstrometryResult:
    """Match ``sources`` to ``refcat`` starting from ``wcs_guess`` and fit a TAN-SIP WCS.

    Parameters
    ----------
    sources : astropy.table.Table
        Detected sources; columns as in the module docstring (zero-based pixel centroids).
    refcat : astropy.table.Table
        Reference stars: ``id``, ``ra``, ``dec`` [deg], ``ra_err``, ``dec_err`` [mas],
        ``mag_<band>`` [mag]. May extend beyond the CCD.
    wcs_guess : astropy.wcs.WCS
        Starting WCS: the camera's initial TAN-SIP (``Camera.initial_wcs``: pointing, camera
        geometry and optical distortion) or a raw header's nominal TAN. Its tangent point is
        taken as the centre of the radial distortion the matcher searches. With
        ``keep_guess_distortion``, its SIP is kept and the matches fit only a correction on top
        of it; a TAN guess leaves the whole distortion to the fit.
    config : AstrometryConfig, optional
    shape : (ny, nx)
        CCD shape in pixels.

    Returns
    -------
    AstrometryResult

    Raises
    ------
    AstrometryError
        Too few usable sources or reference stars on the CCD, no significant pattern match,
        too few matches, or a fit RMS above ``max_rms``.
    """
    cfg = config or AstrometryConfig()
    ny, nx = (int(v) for v in shape)
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    half_diag = 0.5 * float(np.hypot(nx, ny))
    pixel_scale = float(np.sqrt(abs(np.linalg.det(pixel_scale_matrix(wcs_guess))))) * 3600.0  # arcsec/px

    ref = _ref_arrays(refcat)
    theta_ccd = float(np.hypot(*gnomonic(*wcs_guess.all_pix2world([centre[0]], [centre[1]], 0),
                                         *wcs_guess.wcs.crval))[0]) + half_diag * pixel_scale / 3600.0
    reach_deg = (half_diag * pixel_scale + 2 * cfg.max_offset) / 3600.0 + cfg.max_radial_distortion * theta_ccd**3
    model = RefModel(ref["ra"], ref["dec"], wcs_guess, centre, 1.5 * reach_deg)
    # on the CCD, allowing for the offsets and distortion the matcher searches
    reach = cfg.max_offset / pixel_scale + cfg.max_radial_distortion * model.theta**3 * 3600.0 / pixel_scale
    reach = reach + np.deg2rad(cfg.max_rotation) * half_diag
    on_ccd = (np.isfinite(model.x0) & (model.x0 > -reach) & (model.x0 < nx - 1 + reach)
              & (model.y0 > -reach) & (model.y0 < ny - 1 + reach))
    ref_idx = np.nonzero(on_ccd)[0]
    if len(ref_idx) < cfg.min_matches:
        raise AstrometryError(f"only {len(ref_idx)} reference stars fall on the CCD (need {cfg.min_matches}; "
                              f"{len(ref['ra'])} in the reference catalog)")
    src = _source_arrays(sources, cfg, pixel_scale)
    if len(src["x"]) < cfg.min_matches:
        raise AstrometryError(f"only {len(src['x'])} usable sources of {src['n_input']} "
                              f"(S/N >= {cfg.source_snr_min:g}, unflagged; need {cfg.min_matches})")

    vote = pattern_match(src, model, ref_idx, cfg, pixel_scale, half_diag)

    ri, si, radius_px = bootstrap_matches(src, model, ref_idx, vote, cfg, pixel_scale, centre)
    if len(ri) < cfg.min_matches:
        raise AstrometryError(f"only {len(ri)} sources match reference stars after the pattern match "
                              f"(need {cfg.min_matches}; best offset vote {vote.count} pairs)")

    sys2 = cfg.systematic_error**2
    keep = cfg.keep_guess_distortion and wcs_guess.sip is not None
    if keep:
        def fit_coordinates(x, y):
            # offsets from the CCD centre on the undistorted detector of the guess's distortion
            (qx, qy), (qcx, qcy) = sip_forward(wcs_guess, x, y), sip_forward(wcs_guess, *centre)
            return qx - qcx, qy - qcy
    else:
        def fit_coordinates(x, y):
            return x - centre[0], y - centre[1]
    guess_cd = pixel_scale_matrix(wcs_guess)
    src_u, src_v = fit_coordinates(src["x"], src["y"])
    gx, gy = np.meshgrid(np.linspace(0.0, nx - 1.0, 11), np.linspace(0.0, ny - 1.0, 11))
    grid_uv = fit_coordinates(gx.ravel(), gy.ravel())
    # only for a correction of the camera's distortion, which leaves the simpler models mas-level
    # biases, so that their noise decides; fitting the whole distortion (a TAN guess), the simpler
    # models are off by arcseconds and the F-test alone must let the order rise
    max_predicted_error = cfg.max_predicted_error if keep else np.inf
    norm = max(nx, ny) / 2.0
    ra0, dec0 = (float(v[0]) for v in wcs_guess.all_pix2world([centre[0]], [centre[1]], 0))
    used = np.ones(len(ri), bool)
    radius_mas = radius_px * pixel_scale * 1e3
    fit = None
    for iteration in range(cfg.rejection_iterations + 1):
        n_used = int(used.sum())
        if n_used < cfg.min_matches:
            raise AstrometryError(f"only {n_used} matches left after outlier rejection (need {cfg.min_matches})")
        s_err = src["err_mas"][si]
        sig_xi = np.sqrt(s_err**2 + ref["ra_err"][ri] ** 2 + sys2) / MAS_PER_DEG
        sig_eta = np.sqrt(s_err**2 + ref["dec_err"][ri] ** 2 + sys2) / MAS_PER_DEG
        fit = choose_fit(src_u[si][used], src_v[si][used], ref["ra"][ri][used], ref["dec"][ri][used],
                         sig_xi[used], sig_eta[used], norm, ra0, dec0, max_order=cfg.sip_order,
                         matches_per_term=cfg.min_matches_per_term, significance=cfg.order_significance,
                         similar_to=guess_cd, grid=grid_uv, max_predicted_error=max_predicted_error)
        ra0, dec0 = fit.ra0, fit.dec0
        if iteration == cfg.rejection_iterations:
            break
        # re-match every source to the reference stars in the fitted tangent plane
        sxi, seta = fit.tangent(src_u, src_v)
        rxi, reta = gnomonic(ref["ra"], ref["dec"], ra0, dec0)
        finite = np.isfinite(rxi)
        ref_tree = cKDTree(np.column_stack([rxi[finite], reta[finite]]) * MAS_PER_DEG)
        resid = residual_mas(fit, src_u[si][used], src_v[si][used], ref["ra"][ri][used], ref["dec"][ri][used])
        rms2d = float(np.sqrt(np.mean(resid**2)))
        radius_mas = max(cfg.match_radius * 1e3, min(radius_mas, 5.0 * rms2d))
        si, rj = nn_match(sxi * MAS_PER_DEG, seta * MAS_PER_DEG, ref_tree, radius_mas)
        ri = np.nonzero(finite)[0][rj]
        # sigma-clip on the error-normalized residuals, rescaled by their robust spread
        s_err = src["err_mas"][si]
        sig = np.sqrt(s_err**2 + 0.5 * (ref["ra_err"][ri] ** 2 + ref["dec_err"][ri] ** 2) + sys2)
        resid = residual_mas(fit, src_u[si], src_v[si], ref["ra"][ri], ref["dec"][ri])
        chi = resid / sig
        spread = max(np.median(chi) / 1.1774, 1.0)  # Rayleigh: median = 1.1774 sigma
        used = chi < cfg.clip_sigma * spread

    n_used = int(used.sum())
    pixel_fit, fwd_err = fit, 0.0
    if keep:
        guess_order = max(wcs_guess.sip.a_order, wcs_guess.sip.b_order)
        pixel_fit, fwd_err = compose_pixel_fit(fit, fit_coordinates, centre, (ny, nx), cfg, min_order=guess_order)
    wcs, inv_err = build_sip_wcs(pixel_fit, centre, (ny, nx), cfg)
    ra_s, dec_s = wcs.all_pix2world(src["x"][si], src["y"][si], 0)
    sep = angular_separation_mas(ra_s, dec_s, ref["ra"][ri], ref["dec"][ri])
    rms = float(np.sqrt(np.mean(sep[used] ** 2))) if n_used else float("nan")
    if not rms <= cfg.max_rms:
        raise AstrometryError(f"astrometric fit poor: RMS {rms:.0f} mas over {n_used} matches "
                              f"(max {cfg.max_rms:g} mas)")

    matches = _matches_table(sources, refcat, src, ref, si, ri, sep, used)
    if "coord_ra" in matches.colnames:
        # the sources' sky positions came from the guess WCS: give the matches the fitted ones
        matches["coord_ra"], matches["coord_dec"] = np.mod(ra_s, 360.0), dec_s
    ra_g, dec_g = wcs_guess.all_pix2world([centre[0]], [centre[1]], 0)
    ra_f, dec_f = wcs.all_pix2world([centre[0]], [centre[1]], 0)
    offset = float(angular_separation_mas(ra_g, dec_g, ra_f, dec_f)[0]) / 1e3
    return AstrometryResult(wcs=wcs, matches=matches, rms_mas=rms, n_matches=n_used, offset_arcsec=offset,
                            rotation_deg=rotation_deg(wcs_guess, wcs, *centre), sip_order=pixel_fit.order,
                            fit_order=fit.order, fit_parameters=fit.n_parameters, kept_guess_distortion=keep,
                            radial_distortion=vote.d3, pattern_votes=vote.count,
                            inverse_error_px=inv_err, forward_error_px=fwd_err)


def _matches_table(sources: Table, refcat: Table, src: dict, ref: dict, si, ri, sep, used) -> Table:
    t = Table()
    t["source_id"] = src["id"][si]
    t["ref_id"] = ref["id"][ri]
    t["source_row"] = src["row"][si].astype(np.int64)
    t["ref_row"] = ref["row"][ri].astype(np.int64)
    t["x"] = src["x"][si]
    t["y"] = src["y"][si]
    t["ra"] = ref["ra"][ri]
    t["dec"] = ref["dec"][ri]
    t["separation_mas"] = sep
    t["used"] = np.asarray(used, bool)
    for table, rows in ((refcat, ref["row"][ri]), (sources, src["row"][si])):
        for name in table.colnames:
            if name not in t.colnames and name not in ("id", "ra", "dec"):
                t[name] = table[name][rows]
    for name, unit in (("ra", "deg"), ("dec", "deg"), ("separation_mas", "mas"), ("x", "pix"), ("y", "pix")):
        t[name].unit = unit
    return t
