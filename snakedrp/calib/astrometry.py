"""Astrometric calibration: match detected sources to a reference catalog and fit a TAN-SIP WCS.

The steps follow the LSST AstrometryTask (matchOptimisticB, then a fitted TAN-SIP):

1. Reference stars are placed on the CCD with the guess WCS (the raw header's nominal TAN,
   1–2 arcsec off, slightly rotated and without the optical distortion).
2. Pattern match: for the brightest sources and reference stars, every source–reference pair
   within ``max_offset`` votes for its pixel offset in a 2-D histogram. The winning bin holds
   the true pairs. Trials over a grid of rotations and of radial distortions
   ``theta = rho (1 + d3 rho^2)`` about the guess's tangent point (the optical axis in raw
   headers; the guess omits the distortion, which reaches tens of arcsec on the outer CCDs of
   a wide camera) keep the true pairs in one bin; a coarse then a fine grid is searched.
3. Nearest-neighbour matching (``scipy.spatial.cKDTree``) in the tangent plane, with a radius
   shrinking to ``match_radius``, alternating with the fit and sigma-clipping.
4. TAN-SIP fit: CRPIX at the CCD centre; the tangent-plane coordinates ``(xi, eta)`` of the
   reference stars about CRVAL are a weighted linear least-squares polynomial of order
   ``sip_order`` in the pixel offsets; the constant terms move CRVAL (iterated), the linear
   terms are the CD matrix and the rest, multiplied by ``CD^-1``, the SIP ``A``/``B``
   coefficients. The inverse ``AP``/``BP`` is fitted on a grid over the CCD, its order raised
   until it reproduces the pixels within ``inverse_tolerance``.

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
from astropy.wcs import WCS, Sip
from scipy.spatial import cKDTree
from scipy.stats import poisson

from snakedrp.pexconfig import Config, ConfigError, option

MAS_PER_DEG = 3.6e6

#: (x, y) column pairs tried in order for source centroids, and for their errors.
XY_COLUMNS = (("x_centroid", "y_centroid"), ("x", "y"))
XY_ERR_COLUMNS = (("x_centroid_err", "y_centroid_err"), ("x_err", "y_err"))
FLUX_COLUMNS = (("psf_flux", "psf_flux_err"), ("flux", "flux_err"), ("calib_flux", "calib_flux_err"),
                ("ap_flux", "ap_flux_err"))

#: Columns of the matches table made here; other source and reference columns are copied in
#: under their own names where they do not collide.
MATCH_COLUMNS = ("source_id", "ref_id", "source_row", "ref_row", "x", "y", "ra", "dec",
                 "separation_mas", "used")


class AstrometryError(RuntimeError):
    """Matching or fitting failed; the message says why (the caller adds visit and CCD)."""


@dataclass
class AstrometryConfig(Config):
    """Reference matching (offset vote, then nearest neighbours) and the TAN-SIP fit."""

    max_offset: float = option(10.0, "Largest offset of the guess WCS searched by the matcher [arcsec]",
                               min=0.5, max=3600.0)
    max_rotation: float = option(0.05, "Largest rotation error of the guess WCS searched by the matcher [deg]",
                                 min=0.0, max=180.0)
    max_radial_distortion: float = option(
        1.0, "Largest |d3| of a radial distortion theta = rho (1 + d3 rho^2) about the guess's tangent point "
             "searched by the matcher (0: none) [deg^-2]", min=0.0)
    n_pattern_sources: int = option(150, "Brightest usable sources used by the pattern matcher", min=5)
    n_pattern_refs: int = option(100, "Brightest reference stars on the CCD used by the pattern matcher", min=5)
    vote_bin: float = option(0.5, "Offset-vote bin of the fine stage; the coarse stage uses 4x [arcsec]",
                             min=0.02, max=60.0)
    min_pattern_matches: int = option(6, "Fewest pairs in the winning offset-vote bin", min=3)
    pattern_false_alarm: float = option(1e-3, "Largest chance probability of the winning coarse offset-vote bin "
                                              "(Poisson, times the number of bins and trials)", min=0.0, max=1.0)
    match_radius: float = option(0.5, "Final nearest-neighbour match radius [arcsec]", min=0.01, max=60.0)
    source_snr_min: float = option(5.0, "Sources below this S/N are not matched", min=0.0)
    ignore_flags: list[str] = option([], "flag_* columns that do not exclude a source from matching")
    sip_order: int = option(3, "Polynomial order of the SIP distortion (lowered when matches are few)",
                            min=1, max=7)
    inverse_sip_order_max: int = option(7, "Highest order tried for the inverse SIP (AP/BP)", min=1, max=9)
    inverse_tolerance: float = option(0.002, "Inverse SIP goal: max pixel error of world->pixel on the CCD [pixel]",
                                      min=0.0)
    rejection_iterations: int = option(3, "Fit / sigma-clip / re-match iterations", min=0, max=20)
    clip_sigma: float = option(3.0, "Matches beyond this many (robustly rescaled) sigma are rejected", min=1.0)
    systematic_error: float = option(2.0, "Added in quadrature to each match's error in the weights [mas]",
                                     min=0.0)
    min_matches: int = option(10, "Fewest matches (after rejection) for a solution", min=3)
    min_matches_per_term: float = option(2.0, "SIP order is lowered until matches >= this x polynomial terms",
                                         min=1.0)
    max_rms: float = option(200.0, "Fail when the RMS of the used matches exceeds this [mas]", min=0.0)

    def validate(self) -> None:
        super().validate()
        if self.match_radius > self.max_offset:
            raise ConfigError(f"match_radius ({self.match_radius}) must not exceed max_offset ({self.max_offset})")


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
        Order of the fitted SIP polynomial.
    radial_distortion : float
        d3 [deg^-2] found by the pattern matcher about the guess's tangent point.
    pattern_votes : int
        Pairs in the winning offset-vote bin.
    inverse_error_px : float
        Largest error of the inverse SIP (world -> pixel) over the CCD [pixel].
    """

    wcs: WCS
    matches: Table
    rms_mas: float
    n_matches: int
    offset_arcsec: float
    rotation_deg: float
    sip_order: int
    radial_distortion: float
    pattern_votes: int
    inverse_error_px: float


# ------------------------------------------------------------------ sphere / tangent plane
def _unit(ra, dec):
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    return np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)], axis=-1)


def _tangent_basis(ra0: float, dec0: float):
    a, d = np.deg2rad(ra0), np.deg2rad(dec0)
    p0 = np.array([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])
    east = np.array([-np.sin(a), np.cos(a), 0.0])
    north = np.array([-np.sin(d) * np.cos(a), -np.sin(d) * np.sin(a), np.cos(d)])
    return p0, east, north


def gnomonic(ra, dec, ra0: float, dec0: float):
    """Tangent-plane ``(xi, eta)`` [deg] of ``(ra, dec)`` about ``(ra0, dec0)`` (FITS TAN).

    Points 90 deg or more from the tangent point come back as NaN.
    """
    v = _unit(np.asarray(ra, float), np.asarray(dec, float))
    p0, east, north = _tangent_basis(ra0, dec0)
    cosc = v @ p0
    cosc = np.where(cosc > 1e-6, cosc, np.nan)
    return np.rad2deg(v @ east / cosc), np.rad2deg(v @ north / cosc)


def inverse_gnomonic(xi, eta, ra0: float, dec0: float):
    """``(ra, dec)`` [deg] of tangent-plane ``(xi, eta)`` [deg] about ``(ra0, dec0)``."""
    p0, east, north = _tangent_basis(ra0, dec0)
    xi = np.deg2rad(np.asarray(xi, float))[..., None]
    eta = np.deg2rad(np.asarray(eta, float))[..., None]
    v = p0 + xi * east + eta * north
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    ra = np.rad2deg(np.arctan2(v[..., 1], v[..., 0])) % 360.0
    dec = np.rad2deg(np.arcsin(np.clip(v[..., 2], -1.0, 1.0)))
    return ra, dec


def angular_separation_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle separation [mas] (chord formula, accurate at small separations)."""
    chord = np.linalg.norm(_unit(ra1, dec1) - _unit(ra2, dec2), axis=-1)
    return np.rad2deg(2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))) * MAS_PER_DEG


# ------------------------------------------------------------------ polynomials
def _poly_terms(order: int, *, min_degree: int = 0) -> list[tuple[int, int]]:
    return [(p, d - p) for d in range(min_degree, order + 1) for p in range(d, -1, -1)]


def _design(u, v, terms) -> np.ndarray:
    return np.stack([u**p * v**q for p, q in terms], axis=-1)


def _wls(design: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted linear least squares by the normal equations (columns scaled to unit norm).

    Normal equations rather than ``lstsq``: the designs are tall and narrow (<= 45 columns of
    normalized monomials) and the SVD is 100x slower on a busy machine.
    """
    wd = design * weights[:, None]
    ata = design.T @ wd
    atb = wd.T @ values
    d = np.sqrt(np.diag(ata))
    d = np.where(d > 0, d, 1.0)
    try:
        return np.linalg.solve(ata / np.outer(d, d), atb / d) / d
    except np.linalg.LinAlgError:
        sw = np.sqrt(weights)
        coeffs, *_ = np.linalg.lstsq(design * sw[:, None], values * sw, rcond=None)
        return coeffs


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


def _pixel_scale_matrix(wcs: WCS) -> np.ndarray:
    return np.asarray(wcs.pixel_scale_matrix, float)  # deg per pixel, intermediate world coords


# ------------------------------------------------------------------ pattern matching
@dataclass(frozen=True)
class _Vote:
    count: int
    background: float
    dx: float
    dy: float
    d3: float
    rotation: float  # radians
    coarse_count: int = 0
    false_alarm: float = 1.0
    pairs: tuple | None = None  # (ref index, source index) of the winning block's pairs


class _RefModel:
    """Reference positions on the CCD under the guess plus a trial (d3, rotation, shift)."""

    def __init__(self, ra, dec, wcs_guess: WCS, centre, reach_deg: float):
        ra0, dec0 = (float(v) for v in wcs_guess.wcs.crval)
        self.xi, self.eta = gnomonic(ra, dec, ra0, dec0)
        self.theta = np.hypot(self.xi, self.eta)
        # only stars near the CCD are placed with the guess (a SIP guess diverges far away)
        ra_c, dec_c = wcs_guess.all_pix2world([centre[0]], [centre[1]], 0)
        ok = np.isfinite(self.xi) & (angular_separation_mas(ra, dec, ra_c[0], dec_c[0]) < reach_deg * MAS_PER_DEG)
        px = np.full(len(ra), np.nan)
        py = np.full(len(ra), np.nan)
        if ok.any():
            px[ok], py[ok] = wcs_guess.all_world2pix(ra[ok], dec[ok], 0)
        self.x0, self.y0 = px, py
        self.cd_inv = np.linalg.inv(_pixel_scale_matrix(wcs_guess))
        self.centre = centre

    def positions(self, d3: float, rotation: float, dx: float = 0.0, dy: float = 0.0, idx=slice(None)):
        x, y = self.x0[idx], self.y0[idx]
        if d3 != 0.0:
            theta = self.theta[idx]
            rho = theta.copy()
            for _ in range(4):  # Newton: rho + d3 rho^3 = theta
                rho -= (rho + d3 * rho**3 - theta) / (1.0 + 3.0 * d3 * rho**2)
            scale = np.where(theta > 0, rho / np.where(theta > 0, theta, 1.0), 1.0) - 1.0
            dxi, deta = self.xi[idx] * scale, self.eta[idx] * scale
            x = x + self.cd_inv[0, 0] * dxi + self.cd_inv[0, 1] * deta
            y = y + self.cd_inv[1, 0] * dxi + self.cd_inv[1, 1] * deta
        if rotation != 0.0:
            c, s = np.cos(rotation), np.sin(rotation)
            ux, uy = x - self.centre[0], y - self.centre[1]
            x = self.centre[0] + c * ux - s * uy
            y = self.centre[1] + s * ux + c * uy
        return x + dx, y + dy

    def d3_derivative(self, d3: float, idx=slice(None)):
        """Pixel shift per unit change of d3 at ``d3`` (rotation neglected)."""
        theta = self.theta[idx]
        rho = theta.copy()
        for _ in range(4):
            rho -= (rho + d3 * rho**3 - theta) / (1.0 + 3.0 * d3 * rho**2)
        dscale = -(rho**3) / (1.0 + 3.0 * d3 * rho**2) / np.where(theta > 0, theta, 1.0)
        dxi, deta = self.xi[idx] * dscale, self.eta[idx] * dscale
        return (self.cd_inv[0, 0] * dxi + self.cd_inv[0, 1] * deta,
                self.cd_inv[1, 0] * dxi + self.cd_inv[1, 1] * deta)


def _offset_vote(sx, sy, rx, ry, cx: float, cy: float, half: float, bin_px: float, *, refine: bool = False):
    """Best 2x2-bin block of the histogram of (source - ref) offsets within ``half`` of (cx, cy).

    Returns (pairs in the block, mean pairs per block, offset x, offset y, pairs); the offset
    is the block centre, or with ``refine`` the median offset of the block's pairs, and
    ``pairs`` their (ref, source) indices.
    """
    ddx = sx[None, :] - rx[:, None] - cx
    ddy = sy[None, :] - ry[:, None] - cy
    ok = (np.abs(ddx) < half) & (np.abs(ddy) < half)
    ddx, ddy = ddx[ok], ddy[ok]
    if not len(ddx):
        return 0, 0.0, cx, cy, None
    nb = max(int(np.ceil(2 * half / bin_px)), 2)
    ix = np.minimum(((ddx + half) / bin_px).astype(int), nb - 1)
    iy = np.minimum(((ddy + half) / bin_px).astype(int), nb - 1)
    hist = np.bincount(iy * nb + ix, minlength=nb * nb).reshape(nb, nb)
    block = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
    k = int(np.argmax(block))
    by, bx = divmod(k, nb - 1)
    count = int(block[by, bx])
    dx, dy = cx + (bx + 1) * bin_px - half, cy + (by + 1) * bin_px - half
    pairs = None
    if refine and count:
        sel = (ix >= bx) & (ix <= bx + 1) & (iy >= by) & (iy <= by + 1)
        dx, dy = float(np.median(ddx[sel])) + cx, float(np.median(ddy[sel])) + cy
        ri, si = np.nonzero(ok)
        pairs = (ri[sel], si[sel])
    return count, float(block.mean()), dx, dy, pairs


def _grid(best: float, half_range: float, step: float) -> np.ndarray:
    if half_range <= 0 or step <= 0:
        return np.array([best])
    n = max(int(np.ceil(half_range / step - 0.5)), 0)  # +-(n + 1/2) steps cover the range
    return best + step * np.arange(-n, n + 1)


def _vote_search(sx, sy, model: _RefModel, idx: np.ndarray, cfg: AstrometryConfig, pixel_scale: float,
                 half_diag: float) -> _Vote:
    """Coarse then fine grid over (d3, rotation), each trial an offset vote."""
    fine = cfg.vote_bin / pixel_scale
    coarse = 4.0 * fine
    max_off = cfg.max_offset / pixel_scale + coarse

    theta3 = model.theta[idx] ** 3
    spread = float(np.ptp(theta3)) * 3600.0 / pixel_scale if len(idx) > 1 else 0.0  # px per unit d3
    d3_step = coarse / spread if spread > 0 else np.inf
    rot_step = 0.5 * coarse / half_diag
    max_rot = np.deg2rad(cfg.max_rotation)

    best = _Vote(-1, 0.0, 0.0, 0.0, 0.0, 0.0)
    d3_grid = _grid(0.0, cfg.max_radial_distortion, d3_step)
    rot_grid = _grid(0.0, max_rot, rot_step)
    for d3 in d3_grid:
        for rot in rot_grid:
            rx, ry = model.positions(float(d3), float(rot), idx=idx)
            count, bg, dx, dy, _ = _offset_vote(sx, sy, rx, ry, 0.0, 0.0, max_off, coarse)
            if count > best.count:
                best = _Vote(count, bg, dx, dy, float(d3), float(rot))
    coarse_best = best
    # chance of so many pairs in the best of all blocks and trials if no pair were real
    n_blocks = (max(int(np.ceil(2 * max_off / coarse)), 2) - 1) ** 2
    false_alarm = float(poisson.sf(best.count - 1, max(best.background, 1e-3))) * n_blocks * len(d3_grid) * len(rot_grid)

    # fine stage: around the coarse winner, a quarter of the steps and bins
    fine_d3 = _grid(best.d3, min(d3_step, cfg.max_radial_distortion), d3_step / 4)
    fine_rot = _grid(best.rotation, min(rot_step, max_rot), 0.5 * fine / half_diag)
    best = _Vote(-1, 0.0, 0.0, 0.0, 0.0, 0.0)
    for d3 in fine_d3:
        for rot in fine_rot:
            rx, ry = model.positions(float(d3), float(rot), idx=idx)
            count, bg, dx, dy, _ = _offset_vote(sx, sy, rx, ry, coarse_best.dx, coarse_best.dy, 2 * coarse, fine)
            if count > best.count:
                best = _Vote(count, bg, dx, dy, float(d3), float(rot))
    rx, ry = model.positions(best.d3, best.rotation, idx=idx)
    count, _, dx, dy, pairs = _offset_vote(sx, sy, rx, ry, coarse_best.dx, coarse_best.dy, 2 * coarse, fine,
                                           refine=True)
    if pairs is not None:
        pairs = (idx[pairs[0]], pairs[1])
    return _Vote(count, coarse_best.background, dx, dy, best.d3, best.rotation, coarse_best.count, false_alarm,
                 pairs)


def _pattern_match(src: dict, model: _RefModel, ref_idx: np.ndarray, cfg: AstrometryConfig,
                   pixel_scale: float, half_diag: float) -> _Vote:
    """Offset vote of the brightest sources and reference stars; 3x as many if that fails."""
    for factor in (1, 3):
        ns = min(factor * cfg.n_pattern_sources, len(src["x"]))
        nr = min(factor * cfg.n_pattern_refs, len(ref_idx))
        vote = _vote_search(src["x"][:ns], src["y"][:ns], model, ref_idx[:nr], cfg, pixel_scale, half_diag)
        if vote.count >= cfg.min_pattern_matches and vote.false_alarm <= cfg.pattern_false_alarm:
            return vote
        if ns == len(src["x"]) and nr == len(ref_idx):
            break
    why = (f"need {cfg.min_pattern_matches}" if vote.count < cfg.min_pattern_matches else
           f"{vote.coarse_count} in the coarse vote where {vote.background:.1f} come by chance: "
           f"false-alarm probability {min(vote.false_alarm, 1.0):.2g}")
    raise AstrometryError(f"pattern match failed: best offset vote {vote.count} pairs ({why}); {ns} sources "
                          f"and {nr} reference stars tried within {cfg.max_offset:g} arcsec")


# ------------------------------------------------------------------ matching and fitting
def _nn_match(qx, qy, tree: cKDTree, radius: float):
    """Unique nearest-neighbour pairs (query index, tree index) within ``radius``."""
    dist, j = tree.query(np.column_stack([qx, qy]), distance_upper_bound=radius)
    ok = np.isfinite(dist)
    qi, j, dist = np.nonzero(ok)[0], j[ok], dist[ok]
    order = np.argsort(dist, kind="stable")
    qi, j = qi[order], j[order]
    _, first = np.unique(j, return_index=True)  # a tree point keeps its closest query
    keep = np.sort(first)
    return qi[keep], j[keep]


def _bootstrap_matches(src: dict, model: _RefModel, ref_idx: np.ndarray, vote: _Vote, cfg: AstrometryConfig,
                       pixel_scale: float, centre):
    """Matches over the whole CCD from the pattern solution.

    The pairs of the winning vote bin seed a least-squares model of the reference positions
    (affine on the pattern solution plus a change of the radial distortion, 7 parameters whose
    extrapolation over the CCD is safe), refitted while all reference stars are re-matched with
    a shrinking radius. Returns (ref indices, source indices, last radius [pixel]).
    """
    src_tree = cKDTree(np.column_stack([src["x"], src["y"]]))
    rx, ry = model.positions(vote.d3, vote.rotation, vote.dx, vote.dy, idx=ref_idx)
    gx, gy = model.d3_derivative(vote.d3, idx=ref_idx)
    where = {int(k): n for n, k in enumerate(ref_idx)}
    ri = np.array([where[int(k)] for k in vote.pairs[0]], int)
    si = np.asarray(vote.pairs[1], int)
    radius = 4.0 * cfg.vote_bin / pixel_scale
    floor = 2.0 * cfg.match_radius / pixel_scale
    px, py = rx, ry
    for _ in range(4):
        n = len(ri)
        design = np.zeros((2 * n, 7))
        design[:n, 0] = 1.0
        design[:n, 1] = rx[ri] - centre[0]
        design[:n, 2] = ry[ri] - centre[1]
        design[n:, 3] = 1.0
        design[n:, 4] = rx[ri] - centre[0]
        design[n:, 5] = ry[ri] - centre[1]
        design[:n, 6] = gx[ri]
        design[n:, 6] = gy[ri]
        target = np.concatenate([src["x"][si], src["y"][si]])
        keep = np.ones(n, bool)
        for _ in range(2):  # clipped fit: the seed and the wide first radius let wrong pairs in
            rows = np.concatenate([keep, keep])
            p = _wls(design[rows], target[rows], np.ones(int(rows.sum())))
            res = design @ p - target
            dist = np.hypot(res[:n], res[n:])
            keep = dist < max(3.0 * np.median(dist[keep]) / 1.1774, 0.1)
        px = p[0] + p[1] * (rx - centre[0]) + p[2] * (ry - centre[1]) + p[6] * gx
        py = p[3] + p[4] * (rx - centre[0]) + p[5] * (ry - centre[1]) + p[6] * gy
        rms_px = float(np.sqrt(np.mean(dist[keep] ** 2)))
        radius = max(floor, min(radius, 5.0 * rms_px))
        ri, si = _nn_match(px, py, src_tree, radius)
        if len(ri) < 7:
            break
    return ref_idx[ri], si, radius


@dataclass
class _Fit:
    ra0: float
    dec0: float
    order: int
    terms: list
    cx: np.ndarray  # xi coefficients [deg] on normalized (u/norm, v/norm)
    cy: np.ndarray
    norm: float

    def tangent(self, u, v):
        d = _design(u / self.norm, v / self.norm, self.terms)
        return d @ self.cx, d @ self.cy


def _fit_tangent(u, v, ra, dec, sig_xi, sig_eta, order: int, norm: float, ra0: float, dec0: float) -> _Fit:
    """Weighted polynomial (xi, eta)(u, v); CRVAL moved until the constant terms vanish."""
    terms = _poly_terms(order)
    design = _design(u / norm, v / norm, terms)
    wx, wy = 1.0 / sig_xi**2, 1.0 / sig_eta**2
    for _ in range(4):
        xi, eta = gnomonic(ra, dec, ra0, dec0)
        cx, cy = _wls(design, xi, wx), _wls(design, eta, wy)
        ra0, dec0 = (float(v) for v in inverse_gnomonic(cx[0], cy[0], ra0, dec0))
        if np.hypot(cx[0], cy[0]) * MAS_PER_DEG < 1e-4:
            break
    xi, eta = gnomonic(ra, dec, ra0, dec0)
    cx, cy = _wls(design, xi, wx), _wls(design, eta, wy)
    return _Fit(ra0, dec0, order, terms, cx, cy, norm)


def _usable_order(n: int, cfg: AstrometryConfig) -> int:
    order = cfg.sip_order
    while order > 1 and n < cfg.min_matches_per_term * len(_poly_terms(order)):
        order -= 1
    return order


def _build_wcs(fit: _Fit, crpix0: tuple[float, float], shape, cfg: AstrometryConfig) -> tuple[WCS, float]:
    """TAN-SIP WCS from the tangent-plane polynomial; inverse SIP fitted on a grid over the CCD."""
    coef = {t: (cx, cy) for t, cx, cy in zip(fit.terms, fit.cx, fit.cy)}
    scale = {t: fit.norm ** -(t[0] + t[1]) for t in fit.terms}
    cd = np.array([[coef[(1, 0)][0] * scale[(1, 0)], coef[(0, 1)][0] * scale[(0, 1)]],
                   [coef[(1, 0)][1] * scale[(1, 0)], coef[(0, 1)][1] * scale[(0, 1)]]])
    cd_inv = np.linalg.inv(cd)
    m = fit.order
    a = np.zeros((m + 1, m + 1))
    b = np.zeros((m + 1, m + 1))
    for (p, q), (cx, cy) in coef.items():
        if p + q < 2:
            continue
        a[p, q] = (cd_inv[0, 0] * cx + cd_inv[0, 1] * cy) * scale[(p, q)]
        b[p, q] = (cd_inv[1, 0] * cx + cd_inv[1, 1] * cy) * scale[(p, q)]

    # inverse: pixel offsets (u, v) as polynomials of the intermediate (U, V) = (u + A, v + B)
    ny, nx = shape
    gu, gv = np.meshgrid(np.linspace(-10, nx + 9, 25) - crpix0[0], np.linspace(-10, ny + 9, 49) - crpix0[1])
    gu, gv = gu.ravel(), gv.ravel()
    fwd = _design(gu, gv, _poly_terms(m, min_degree=2))
    aa = np.array([a[p, q] for p, q in _poly_terms(m, min_degree=2)])
    bb = np.array([b[p, q] for p, q in _poly_terms(m, min_degree=2)])
    big_u, big_v = gu + fwd @ aa, gv + fwd @ bb
    norm = fit.norm
    inv_err, ap, bp = np.inf, None, None
    for order in range(max(m, 1), max(cfg.inverse_sip_order_max, m) + 1):
        terms = _poly_terms(order, min_degree=1)
        design = _design(big_u / norm, big_v / norm, terms)
        ones = np.ones(len(gu))
        cu = _wls(design, gu - big_u, ones)
        cv = _wls(design, gv - big_v, ones)
        err = float(np.max(np.hypot(design @ cu - (gu - big_u), design @ cv - (gv - big_v))))
        if err < inv_err:
            inv_err = err
            ap = np.zeros((order + 1, order + 1))
            bp = np.zeros((order + 1, order + 1))
            for (p, q), ku, kv in zip(terms, cu, cv):
                ap[p, q] = ku * norm ** -(p + q)
                bp[p, q] = kv * norm ** -(p + q)
        if err <= cfg.inverse_tolerance:
            break

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    crpix = [crpix0[0] + 1.0, crpix0[1] + 1.0]  # FITS CRPIX is one-based
    w.wcs.crpix = crpix
    w.wcs.crval = [fit.ra0, fit.dec0]
    w.wcs.cd = cd
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.sip = Sip(a, b, ap, bp, crpix)
    w.pixel_shape = (nx, ny)
    w.wcs.set()
    return w, inv_err


def world_to_pixel_sip(wcs: WCS, ra, dec):
    """Zero-based pixel ``(x, y)`` of ``(ra, dec)`` [deg] through the inverse SIP (no iterations).

    Faster than ``all_world2pix``; exact to the fit's ``inverse_tolerance`` on the CCD.
    """
    foc = wcs.wcs_world2pix(np.column_stack([np.ravel(ra), np.ravel(dec)]), 0)
    sip = wcs.sip
    if sip is None or sip.ap is None:
        return foc[:, 0], foc[:, 1]
    crpix0 = np.asarray(sip.crpix, float) - 1.0
    big_u, big_v = foc[:, 0] - crpix0[0], foc[:, 1] - crpix0[1]
    return (foc[:, 0] + _polyval2d(sip.ap, big_u, big_v), foc[:, 1] + _polyval2d(sip.bp, big_u, big_v))


def _polyval2d(coeffs: np.ndarray, u, v) -> np.ndarray:
    """``sum c[p, q] u^p v^q`` (SIP coefficient layout)."""
    out = np.zeros_like(u)
    for p in range(coeffs.shape[0]):
        for q in range(coeffs.shape[1] - p):
            if coeffs[p, q] != 0.0:
                out += coeffs[p, q] * u**p * v**q
    return out


def _sky_pa(wcs: WCS, x: float, y: float, dx: float, dy: float) -> float:
    ra, dec = wcs.all_pix2world([x, x + dx], [y, y + dy], 0)
    xi, eta = gnomonic(ra[1], dec[1], ra[0], dec[0])
    return float(np.arctan2(xi, eta))


def _rotation_deg(guess: WCS, fitted: WCS, cx: float, cy: float) -> float:
    rot = []
    for dx, dy in ((100.0, 0.0), (0.0, 100.0)):
        d = _sky_pa(fitted, cx, cy, dx, dy) - _sky_pa(guess, cx, cy, dx, dy)
        rot.append((d + np.pi) % (2 * np.pi) - np.pi)
    return float(np.rad2deg(np.mean(rot)))


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
        Starting WCS (e.g. the raw header's nominal TAN); its tangent point is taken as the
        centre of the radial distortion the matcher searches.
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
    pixel_scale = float(np.sqrt(abs(np.linalg.det(_pixel_scale_matrix(wcs_guess))))) * 3600.0  # arcsec/px

    ref = _ref_arrays(refcat)
    theta_ccd = float(np.hypot(*gnomonic(*wcs_guess.all_pix2world([centre[0]], [centre[1]], 0),
                                         *wcs_guess.wcs.crval))[0]) + half_diag * pixel_scale / 3600.0
    reach_deg = (half_diag * pixel_scale + 2 * cfg.max_offset) / 3600.0 + cfg.max_radial_distortion * theta_ccd**3
    model = _RefModel(ref["ra"], ref["dec"], wcs_guess, centre, 1.5 * reach_deg)
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

    vote = _pattern_match(src, model, ref_idx, cfg, pixel_scale, half_diag)

    ri, si, radius_px = _bootstrap_matches(src, model, ref_idx, vote, cfg, pixel_scale, centre)
    if len(ri) < cfg.min_matches:
        raise AstrometryError(f"only {len(ri)} sources match reference stars after the pattern match "
                              f"(need {cfg.min_matches}; best offset vote {vote.count} pairs)")

    sys2 = cfg.systematic_error**2
    src_u, src_v = src["x"] - centre[0], src["y"] - centre[1]
    norm = max(nx, ny) / 2.0
    ra0, dec0 = (float(v[0]) for v in wcs_guess.all_pix2world([centre[0]], [centre[1]], 0))
    used = np.ones(len(ri), bool)
    radius_mas = radius_px * pixel_scale * 1e3
    fit = None
    for iteration in range(cfg.rejection_iterations + 1):
        n_used = int(used.sum())
        if n_used < cfg.min_matches:
            raise AstrometryError(f"only {n_used} matches left after outlier rejection (need {cfg.min_matches})")
        order = _usable_order(n_used, cfg)
        s_err = src["err_mas"][si]
        sig_xi = np.sqrt(s_err**2 + ref["ra_err"][ri] ** 2 + sys2) / MAS_PER_DEG
        sig_eta = np.sqrt(s_err**2 + ref["dec_err"][ri] ** 2 + sys2) / MAS_PER_DEG
        fit = _fit_tangent(src_u[si][used], src_v[si][used], ref["ra"][ri][used], ref["dec"][ri][used],
                           sig_xi[used], sig_eta[used], order, norm, ra0, dec0)
        ra0, dec0 = fit.ra0, fit.dec0
        if iteration == cfg.rejection_iterations:
            break
        # re-match every source to the reference stars in the fitted tangent plane
        sxi, seta = fit.tangent(src_u, src_v)
        rxi, reta = gnomonic(ref["ra"], ref["dec"], ra0, dec0)
        finite = np.isfinite(rxi)
        ref_tree = cKDTree(np.column_stack([rxi[finite], reta[finite]]) * MAS_PER_DEG)
        resid = _residual_mas(fit, src_u[si][used], src_v[si][used], ref["ra"][ri][used], ref["dec"][ri][used])
        rms2d = float(np.sqrt(np.mean(resid**2)))
        radius_mas = max(cfg.match_radius * 1e3, min(radius_mas, 5.0 * rms2d))
        si, rj = _nn_match(sxi * MAS_PER_DEG, seta * MAS_PER_DEG, ref_tree, radius_mas)
        ri = np.nonzero(finite)[0][rj]
        # sigma-clip on the error-normalized residuals, rescaled by their robust spread
        s_err = src["err_mas"][si]
        sig = np.sqrt(s_err**2 + 0.5 * (ref["ra_err"][ri] ** 2 + ref["dec_err"][ri] ** 2) + sys2)
        resid = _residual_mas(fit, src_u[si], src_v[si], ref["ra"][ri], ref["dec"][ri])
        chi = resid / sig
        spread = max(np.median(chi) / 1.1774, 1.0)  # Rayleigh: median = 1.1774 sigma
        used = chi < cfg.clip_sigma * spread

    n_used = int(used.sum())
    wcs, inv_err = _build_wcs(fit, centre, (ny, nx), cfg)
    ra_s, dec_s = wcs.all_pix2world(src["x"][si], src["y"][si], 0)
    sep = angular_separation_mas(ra_s, dec_s, ref["ra"][ri], ref["dec"][ri])
    rms = float(np.sqrt(np.mean(sep[used] ** 2))) if n_used else float("nan")
    if not rms <= cfg.max_rms:
        raise AstrometryError(f"astrometric fit poor: RMS {rms:.0f} mas over {n_used} matches "
                              f"(max {cfg.max_rms:g} mas)")

    matches = _matches_table(sources, refcat, src, ref, si, ri, sep, used)
    ra_g, dec_g = wcs_guess.all_pix2world([centre[0]], [centre[1]], 0)
    ra_f, dec_f = wcs.all_pix2world([centre[0]], [centre[1]], 0)
    offset = float(angular_separation_mas(ra_g, dec_g, ra_f, dec_f)[0]) / 1e3
    return AstrometryResult(wcs=wcs, matches=matches, rms_mas=rms, n_matches=n_used, offset_arcsec=offset,
                            rotation_deg=_rotation_deg(wcs_guess, wcs, *centre), sip_order=fit.order,
                            radial_distortion=vote.d3, pattern_votes=vote.count,
                            inverse_error_px=inv_err)


def _residual_mas(fit: _Fit, u, v, ra, dec) -> np.ndarray:
    xi, eta = fit.tangent(u, v)
    rxi, reta = gnomonic(ra, dec, fit.ra0, fit.dec0)
    return np.hypot(xi - rxi, eta - reta) * MAS_PER_DEG


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
