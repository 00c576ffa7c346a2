"""TAN-SIP WCS fitting: gnomonic projection, weighted polynomial fits of the tangent-plane
coordinates in the pixel offsets, and the SIP WCS (forward and fitted inverse) built from them.
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


def fit_tangent(u, v, ra, dec, sig_xi, sig_eta, order: int, norm: float, ra0: float, dec0: float) -> TangentFit:
    """Weighted polynomial (xi, eta)(u, v); CRVAL moved until the constant terms vanish."""
    terms = _poly_terms(order)
    design = _design(u / norm, v / norm, terms)
    wx, wy = 1.0 / sig_xi**2, 1.0 / sig_eta**2
    for _ in range(4):
        xi, eta = gnomonic(ra, dec, ra0, dec0)
        cx, cy = weighted_lstsq(design, xi, wx), weighted_lstsq(design, eta, wy)
        ra0, dec0 = (float(v) for v in inverse_gnomonic(cx[0], cy[0], ra0, dec0))
        if np.hypot(cx[0], cy[0]) * MAS_PER_DEG < 1e-4:
            break
    xi, eta = gnomonic(ra, dec, ra0, dec0)
    cx, cy = weighted_lstsq(design, xi, wx), weighted_lstsq(design, eta, wy)
    return TangentFit(ra0, dec0, order, terms, cx, cy, norm)


def usable_order(n: int, cfg: AstrometryConfig) -> int:
    order = cfg.sip_order
    while order > 1 and n < cfg.min_matches_per_term * len(_poly_terms(order)):
        order -= 1
    return order


def build_sip_wcs(fit: TangentFit, crpix0: tuple[float, float], shape, cfg: AstrometryConfig) -> tuple[WCS, float]:
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
