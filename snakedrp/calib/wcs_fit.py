"""TAN-SIP WCS fitting: gnomonic projection, weighted fits of the tangent-plane coordinates in
pixel offsets (or in offsets on the undistorted detector of a guess's SIP distortion) with the
model chosen from the matches, and the SIP WCS (forward and fitted inverse) built from them.
Angles in degrees; pixel positions zero-based.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from astropy.wcs import WCS, Sip

if TYPE_CHECKING:  # annotations only: the config lives with the task that owns it
    from snakedrp.calib.astrometry import AstrometryConfig


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
    if not terms:
        return np.zeros(np.shape(u) + (0,))
    return np.stack([u**p * v**q for p, q in terms], axis=-1)


def weighted_lstsq(design: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
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


def pixel_scale_matrix(wcs: WCS) -> np.ndarray:
    return np.asarray(wcs.pixel_scale_matrix, float)  # deg per pixel, intermediate world coords


@dataclass
class TangentFit:
    """Tangent-plane ``(xi, eta)`` [deg] about ``(ra0, dec0)`` as polynomials of ``(u/norm, v/norm)``.

    ``similarity``: a fit of order 1 whose linear part was constrained to a rotation and scale
    of a given matrix (4 parameters instead of 6).
    """

    ra0: float
    dec0: float
    order: int
    terms: list
    cx: np.ndarray  # xi coefficients [deg] on normalized (u/norm, v/norm)
    cy: np.ndarray
    norm: float
    similarity: bool = False

    @property
    def n_parameters(self) -> int:
        """Fitted parameters, both axes."""
        return 4 if self.similarity else 2 * len(self.terms)

    def tangent(self, u, v):
        d = _design(u / self.norm, v / self.norm, self.terms)
        return d @ self.cx, d @ self.cy


def _similarity_design(u, v, norm: float, similar_to: np.ndarray) -> np.ndarray:
    # both axes in one design, rows (xi at all points, then eta), parameters
    # (t_xi, t_eta, s cos phi, s sin phi) of (xi, eta) = t + s R(phi) M (u, v)
    m = np.asarray(similar_to, float) * norm
    big_x, big_y = m @ np.stack([np.asarray(u, float) / norm, np.asarray(v, float) / norm])
    n = len(big_x)
    joint = np.zeros((2 * n, 4))
    joint[:n, 0], joint[n:, 1] = 1.0, 1.0
    joint[:n, 2], joint[:n, 3] = big_x, -big_y
    joint[n:, 2], joint[n:, 3] = big_y, big_x
    return joint


def fit_tangent(u, v, ra, dec, sig_xi, sig_eta, order: int, norm: float, ra0: float, dec0: float, *,
                similar_to: np.ndarray | None = None) -> TangentFit:
    """Weighted polynomial (xi, eta)(u, v); CRVAL moved until the constant terms vanish.

    With ``similar_to`` (a 2x2 matrix [deg per unit of u, v], e.g. the guess's CD matrix), the
    fit is a shift plus ``similar_to`` rotated and scaled: ``(xi, eta) = t + s R(phi) M (u, v)``,
    linear in ``(t, s cos phi, s sin phi)``; ``order`` must be 1.
    """
    terms = _poly_terms(order)
    design = _design(u / norm, v / norm, terms)
    wx, wy = 1.0 / sig_xi**2, 1.0 / sig_eta**2
    if similar_to is not None:
        if order != 1:
            raise ValueError(f"a similarity fit is of order 1, not {order}")
        m = np.asarray(similar_to, float) * norm  # per unit of the normalized (u/norm, v/norm)
        joint = _similarity_design(u, v, norm, similar_to)
        weights = np.concatenate([wx, wy])

    def solve(xi, eta):
        if similar_to is None:
            return weighted_lstsq(design, xi, wx), weighted_lstsq(design, eta, wy)
        tx, ty, c, d = weighted_lstsq(joint, np.concatenate([xi, eta]), weights)
        return (np.array([tx, c * m[0, 0] - d * m[1, 0], c * m[0, 1] - d * m[1, 1]]),
                np.array([ty, c * m[1, 0] + d * m[0, 0], c * m[1, 1] + d * m[0, 1]]))

    for _ in range(4):
        xi, eta = gnomonic(ra, dec, ra0, dec0)
        cx, cy = solve(xi, eta)
        ra0, dec0 = (float(v) for v in inverse_gnomonic(cx[0], cy[0], ra0, dec0))
        if np.hypot(cx[0], cy[0]) * MAS_PER_DEG < 1e-4:
            break
    xi, eta = gnomonic(ra, dec, ra0, dec0)
    cx, cy = solve(xi, eta)
    return TangentFit(ra0, dec0, order, terms, cx, cy, norm, similarity=similar_to is not None)


def chi_square(fit: TangentFit, u, v, ra, dec, sig_xi, sig_eta) -> float:
    """Sum over both axes of the squared error-normalized residuals of ``fit``."""
    xi, eta = fit.tangent(u, v)
    rxi, reta = gnomonic(ra, dec, fit.ra0, fit.dec0)
    return float(np.sum(((xi - rxi) / sig_xi) ** 2 + ((eta - reta) / sig_eta) ** 2))


def predicted_grid_error(fit: TangentFit, u, v, sig_xi, sig_eta, grid_u, grid_v, chi2: float, *,
                         similar_to: np.ndarray | None = None) -> float:
    """RMS over a grid of the position error [mas] the fit's parameter noise predicts.

    Parameters
    ----------
    fit : TangentFit
        The fitted model (``fit.similarity``: ``similar_to`` must be the matrix it was fitted with).
    u, v : array_like
        Fit coordinates of the matches [pixel].
    sig_xi, sig_eta : array_like
        Their tangent-plane errors [deg], as weighted in the fit.
    grid_u, grid_v : array_like
        Fit coordinates of the points the error is predicted at, e.g. a grid over the CCD [pixel].
    chi2 : float
        The fit's chi-square; the covariance is scaled by ``chi2`` per degree of freedom when that
        exceeds 1 (errors underestimated), never scaled down.
    similar_to : ndarray, optional
        2x2 matrix [deg per pixel] of a similarity fit.

    Returns
    -------
    float
        ``sqrt(mean(var_xi + var_eta))`` over the grid [mas]; inf without degrees of freedom.

    The covariance ``s^2 (J^T W J)^-1`` of the weighted linear least squares (``J`` the design at
    the matches, ``W`` their inverse variances) carried to the grid's design rows: a model
    that the matches do not pin down where the CCD has none extrapolates there, which the
    residuals at the matches cannot show.
    """
    u, v = np.asarray(u, float), np.asarray(v, float)
    w = np.concatenate([1.0 / np.asarray(sig_xi, float) ** 2, 1.0 / np.asarray(sig_eta, float) ** 2])
    if fit.similarity:
        if similar_to is None:
            raise ValueError("a similarity fit's predicted error needs the matrix it was fitted with")
        design = _similarity_design(u, v, fit.norm, similar_to)
        grid = _similarity_design(grid_u, grid_v, fit.norm, similar_to)
    else:
        one = _design(u / fit.norm, v / fit.norm, fit.terms)
        design = np.block([[one, np.zeros_like(one)], [np.zeros_like(one), one]])
        g = _design(np.asarray(grid_u, float) / fit.norm, np.asarray(grid_v, float) / fit.norm, fit.terms)
        grid = np.block([[g, np.zeros_like(g)], [np.zeros_like(g), g]])
    dof = len(w) - design.shape[1]
    if dof <= 0:
        return float("inf")
    # scaled to unit-norm columns, as weighted_lstsq solves, for the conditioning
    d = np.sqrt(np.sum(design**2 * w[:, None], axis=0))
    d = np.where(d > 0, d, 1.0)
    cov = np.linalg.pinv((design / d).T @ ((design / d) * w[:, None])) / np.outer(d, d)
    var = np.einsum("ij,jk,ik->i", grid, cov, grid) * max(chi2 / dof, 1.0)
    n_grid = len(var) // 2
    return float(np.sqrt(np.mean(var[:n_grid] + var[n_grid:]))) * MAS_PER_DEG


def choose_fit(u, v, ra, dec, sig_xi, sig_eta, norm: float, ra0: float, dec0: float, *, max_order: int,
               matches_per_term: float, significance: float, similar_to: np.ndarray | None = None,
               grid: tuple | None = None, max_predicted_error: float = np.inf) -> TangentFit:
    """The simplest model the matches call for.

    Candidates, simplest first: with ``similar_to``, shift + rotation + scale (4 parameters);
    then polynomial orders 1 (affine) to ``max_order``. A candidate is tried while the matches
    number at least ``matches_per_term`` x its terms per axis (2 for the similarity), and
    replaces the current model when it lowers the chi-square by more than chance would, by the
    F-test at ``significance`` (which needs no absolute error scale: it compares the
    chi-square drop per added parameter with the residual chi-square per degree of freedom),
    and, with ``grid`` (fit coordinates ``(u, v)`` [pixel] of points over the CCD), when its
    :func:`predicted_grid_error` there is at most ``max_predicted_error`` [mas]. The first
    candidate is always fitted.

    The F-test only sees the matches: with a few dozen of them unevenly spread, a polynomial
    can lower the chi-square (e.g. by bending to one bad match) while it is free to swing by
    hundreds of mas in the parts of the CCD without matches; the grid error bounds that.
    """
    # the F distribution's survival function is the ufunc scipy.stats.f.sf calls (1 at and below 0),
    # without the ~1 s import of scipy.stats
    from scipy.special import fdtrc

    n = len(u)
    args = (u, v, ra, dec, sig_xi, sig_eta)
    candidates = ([(1, similar_to)] if similar_to is not None else []) + [(m, None) for m in range(1, max_order + 1)]
    best, best_chi2 = None, np.inf
    for order, similar in candidates:
        per_axis = 2 if similar is not None else len(_poly_terms(order))
        if best is not None and n < matches_per_term * per_axis:
            break
        fit = fit_tangent(*args, order, norm, ra0, dec0, similar_to=similar)
        chi2 = chi_square(fit, *args)
        if best is None:
            best, best_chi2 = fit, chi2
            continue
        added, dof = fit.n_parameters - best.n_parameters, 2 * n - fit.n_parameters
        if dof <= 0:
            break
        f_stat = ((best_chi2 - chi2) / added) / max(chi2 / dof, 1e-300)
        p_chance = float(fdtrc(added, dof, f_stat)) if f_stat > 0 else 1.0
        if p_chance >= significance:
            continue
        if grid is not None and not (predicted_grid_error(fit, u, v, sig_xi, sig_eta, *grid, chi2)
                                     <= max_predicted_error):
            continue
        best, best_chi2 = fit, chi2
    return best


def sip_forward(wcs: WCS, x, y):
    """Zero-based pixel ``(x, y)`` moved by the forward SIP of ``wcs``: ``(x + A(u, v), y + B(u, v))``,
    ``(u, v)`` the offset from CRPIX [pixel].

    The CD matrix maps these positions linearly to the tangent plane: on a camera's initial WCS
    (:meth:`snakedrp.repo.camera.Camera.initial_wcs`) they are the positions on an undistorted
    detector. Without SIP, ``(x, y)`` unchanged.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    sip = wcs.sip
    if sip is None:
        return x, y
    crpix0 = np.asarray(sip.crpix, float) - 1.0
    u, v = x - crpix0[0], y - crpix0[1]
    return x + _polyval2d(sip.a, u, v), y + _polyval2d(sip.b, u, v)


def _grid(crpix0: tuple[float, float], shape):
    # pixel offsets from crpix0 on a grid over the CCD grown by 10 pixels
    ny, nx = shape
    gu, gv = np.meshgrid(np.linspace(-10, nx + 9, 25) - crpix0[0], np.linspace(-10, ny + 9, 49) - crpix0[1])
    return gu.ravel(), gv.ravel()


def compose_pixel_fit(fit: TangentFit, fit_coordinates, crpix0: tuple[float, float], shape, cfg: AstrometryConfig,
                      *, min_order: int = 1) -> tuple[TangentFit, float]:
    """``fit``, a polynomial of other coordinates, re-expressed as a polynomial of pixel offsets.

    Parameters
    ----------
    fit : TangentFit
        Tangent-plane polynomial of the coordinates ``fit_coordinates(x, y)``.
    fit_coordinates : callable
        Zero-based pixel ``(x, y)`` → the coordinates ``fit`` takes (e.g. offsets from the CCD
        centre on the undistorted detector of a camera distortion) [pixel].
    crpix0 : (x, y)
        Zero-based pixel the new polynomial is about.
    shape : (ny, nx)
    cfg : AstrometryConfig
        ``inverse_tolerance`` is the goal [pixel]; the order is raised from the larger of
        ``fit.order`` and ``min_order`` up to ``inverse_sip_order_max``.
    min_order : int
        Order of the pixel → fit-coordinate map (exact when ``fit`` is linear).

    Returns
    -------
    (TangentFit, float)
        The pixel polynomial (same tangent point) and its largest error on the grid [pixel].

    A least-squares fit on a grid over the CCD rather than composing the polynomials
    algebraically: the map may be any function, and a linear ``fit`` of a polynomial map is
    reproduced to rounding.
    """
    gu, gv = _grid(crpix0, shape)
    xi, eta = fit.tangent(*fit_coordinates(gu + crpix0[0], gv + crpix0[1]))
    scale = float(np.sqrt(abs(np.linalg.det(_linear_cd(fit)))))  # deg per pixel
    ones = np.ones(len(gu))
    best = (np.inf, None)
    for order in range(max(fit.order, min_order), max(cfg.inverse_sip_order_max, fit.order, min_order) + 1):
        terms = _poly_terms(order)
        design = _design(gu / fit.norm, gv / fit.norm, terms)
        cx, cy = weighted_lstsq(design, xi, ones), weighted_lstsq(design, eta, ones)
        err = float(np.max(np.hypot(design @ cx - xi, design @ cy - eta))) / scale
        if err < best[0]:
            best = (err, TangentFit(fit.ra0, fit.dec0, order, terms, cx, cy, fit.norm))
        if err <= cfg.inverse_tolerance:
            break
    return best[1], best[0]


def _linear_cd(fit: TangentFit) -> np.ndarray:
    coef = dict(zip(fit.terms, zip(fit.cx, fit.cy)))
    return np.array([[coef[(1, 0)][0], coef[(0, 1)][0]], [coef[(1, 0)][1], coef[(0, 1)][1]]]) / fit.norm


def build_sip_wcs(fit: TangentFit, crpix0: tuple[float, float], shape, cfg: AstrometryConfig) -> tuple[WCS, float]:
    """TAN-SIP WCS from a tangent-plane polynomial of the pixel offsets from ``crpix0``.

    The inverse SIP is fitted on a grid over the CCD. Order 1 gives a plain TAN WCS (no
    distortion to represent; inverse error 0).
    """
    coef = {t: (cx, cy) for t, cx, cy in zip(fit.terms, fit.cx, fit.cy)}
    scale = {t: fit.norm ** -(t[0] + t[1]) for t in fit.terms}
    cd = _linear_cd(fit)
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    crpix = [crpix0[0] + 1.0, crpix0[1] + 1.0]  # FITS CRPIX is one-based
    w.wcs.crpix = crpix
    w.wcs.crval = [fit.ra0, fit.dec0]
    w.wcs.cd = cd
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (nx, ny)
    m = fit.order
    if m < 2:
        w.wcs.set()
        return w, 0.0

    cd_inv = np.linalg.inv(cd)
    a = np.zeros((m + 1, m + 1))
    b = np.zeros((m + 1, m + 1))
    for (p, q), (cx, cy) in coef.items():
        if p + q < 2:
            continue
        a[p, q] = (cd_inv[0, 0] * cx + cd_inv[0, 1] * cy) * scale[(p, q)]
        b[p, q] = (cd_inv[1, 0] * cx + cd_inv[1, 1] * cy) * scale[(p, q)]

    # inverse: pixel offsets (u, v) as polynomials of the intermediate (U, V) = (u + A, v + B)
    gu, gv = _grid(crpix0, shape)
    fwd = _design(gu, gv, _poly_terms(m, min_degree=2))
    aa = np.array([a[p, q] for p, q in _poly_terms(m, min_degree=2)])
    bb = np.array([b[p, q] for p, q in _poly_terms(m, min_degree=2)])
    big_u, big_v = gu + fwd @ aa, gv + fwd @ bb
    norm = fit.norm
    inv_err, ap, bp = np.inf, None, None
    for order in range(m, max(cfg.inverse_sip_order_max, m) + 1):
        terms = _poly_terms(order, min_degree=1)
        design = _design(big_u / norm, big_v / norm, terms)
        ones = np.ones(len(gu))
        cu = weighted_lstsq(design, gu - big_u, ones)
        cv = weighted_lstsq(design, gv - big_v, ones)
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

    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.sip = Sip(a, b, ap, bp, crpix)
    w.wcs.set()
    return w, inv_err


def world_to_pixel_sip(wcs: WCS, ra, dec):
    """Zero-based pixel ``(x, y)`` of ``(ra, dec)`` [deg] through the inverse SIP (no iterations).

    Faster than ``all_world2pix``; exact to the fit's ``inverse_tolerance`` on the CCD. A SIP
    without the inverse polynomials falls back on ``all_world2pix``.
    """
    sip = wcs.sip
    if sip is not None and sip.ap is None:  # a forward-only SIP (a camera's initial WCS): iterate
        x, y = wcs.all_world2pix(np.ravel(ra), np.ravel(dec), 0)
        return x, y
    foc = wcs.wcs_world2pix(np.column_stack([np.ravel(ra), np.ravel(dec)]), 0)
    if sip is None:
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


def rotation_deg(guess: WCS, fitted: WCS, cx: float, cy: float) -> float:
    rot = []
    for dx, dy in ((100.0, 0.0), (0.0, 100.0)):
        d = _sky_pa(fitted, cx, cy, dx, dy) - _sky_pa(guess, cx, cy, dx, dy)
        rot.append((d + np.pi) % (2 * np.pi) - np.pi)
    return float(np.rad2deg(np.mean(rot)))


def residual_mas(fit: TangentFit, u, v, ra, dec) -> np.ndarray:
    xi, eta = fit.tangent(u, v)
    rxi, reta = gnomonic(ra, dec, fit.ra0, fit.dec0)
    return np.hypot(xi - rxi, eta - reta) * MAS_PER_DEG


MAS_PER_DEG = 3.6e6


class AstrometryError(RuntimeError):
    """Matching or fitting failed; the message says why (the caller adds visit and CCD)."""
