"""Source–reference matching for astrometry: the pattern match (offset voting over a grid of
rotations and radial distortions, as LSST's matchOptimisticB does) and the nearest-neighbour
matching it bootstraps. Positions in CCD pixels (zero-based) and tangent-plane pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from snakedrp.calib.wcs_fit import (
    MAS_PER_DEG,
    AstrometryError,
    angular_separation_mas,
    gnomonic,
    pixel_scale_matrix,
    weighted_lstsq,
)

if TYPE_CHECKING:  # annotations only: the config lives with the task that owns it
    from snakedrp.calib.astrometry import AstrometryConfig


# ------------------------------------------------------------------ pattern matching
@dataclass(frozen=True)
class Vote:
    count: int
    background: float
    dx: float
    dy: float
    d3: float
    rotation: float  # radians
    coarse_count: int = 0
    false_alarm: float = 1.0
    pairs: tuple | None = None  # (ref index, source index) of the winning block's pairs


class RefModel:
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
        self.cd_inv = np.linalg.inv(pixel_scale_matrix(wcs_guess))
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


def _vote_search(sx, sy, model: RefModel, idx: np.ndarray, cfg: AstrometryConfig, pixel_scale: float,
                 half_diag: float) -> Vote:
    """Coarse then fine grid over (d3, rotation), each trial an offset vote."""
    fine = cfg.vote_bin / pixel_scale
    coarse = 4.0 * fine
    max_off = cfg.max_offset / pixel_scale + coarse

    theta3 = model.theta[idx] ** 3
    spread = float(np.ptp(theta3)) * 3600.0 / pixel_scale if len(idx) > 1 else 0.0  # px per unit d3
    d3_step = coarse / spread if spread > 0 else np.inf
    rot_step = 0.5 * coarse / half_diag
    max_rot = np.deg2rad(cfg.max_rotation)

    best = Vote(-1, 0.0, 0.0, 0.0, 0.0, 0.0)
    d3_grid = _grid(0.0, cfg.max_radial_distortion, d3_step)
    rot_grid = _grid(0.0, max_rot, rot_step)
    for d3 in d3_grid:
        for rot in rot_grid:
            rx, ry = model.positions(float(d3), float(rot), idx=idx)
            count, bg, dx, dy, _ = _offset_vote(sx, sy, rx, ry, 0.0, 0.0, max_off, coarse)
            if count > best.count:
                best = Vote(count, bg, dx, dy, float(d3), float(rot))
    coarse_best = best
    # chance of so many pairs in the best of all blocks and trials if no pair were real
    n_blocks = (max(int(np.ceil(2 * max_off / coarse)), 2) - 1) ** 2
    # P(N >= count) for N ~ Poisson(background): the ufunc scipy.stats.poisson.sf calls, without the
    # ~1 s import of scipy.stats
    from scipy.special import pdtrc

    p_chance = float(pdtrc(best.count - 1, max(best.background, 1e-3))) if best.count >= 1 else 1.0
    false_alarm = p_chance * n_blocks * len(d3_grid) * len(rot_grid)

    # fine stage: around the coarse winner, a quarter of the steps and bins
    fine_d3 = _grid(best.d3, min(d3_step, cfg.max_radial_distortion), d3_step / 4)
    fine_rot = _grid(best.rotation, min(rot_step, max_rot), 0.5 * fine / half_diag)
    best = Vote(-1, 0.0, 0.0, 0.0, 0.0, 0.0)
    for d3 in fine_d3:
        for rot in fine_rot:
            rx, ry = model.positions(float(d3), float(rot), idx=idx)
            count, bg, dx, dy, _ = _offset_vote(sx, sy, rx, ry, coarse_best.dx, coarse_best.dy, 2 * coarse, fine)
            if count > best.count:
                best = Vote(count, bg, dx, dy, float(d3), float(rot))
    rx, ry = model.positions(best.d3, best.rotation, idx=idx)
    count, _, dx, dy, pairs = _offset_vote(sx, sy, rx, ry, coarse_best.dx, coarse_best.dy, 2 * coarse, fine,
                                           refine=True)
    if pairs is not None:
        pairs = (idx[pairs[0]], pairs[1])
    return Vote(count, coarse_best.background, dx, dy, best.d3, best.rotation, coarse_best.count, false_alarm,
                 pairs)


def pattern_match(src: dict, model: RefModel, ref_idx: np.ndarray, cfg: AstrometryConfig,
                   pixel_scale: float, half_diag: float) -> Vote:
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
def nn_match(qx, qy, tree: cKDTree, radius: float):
    """Unique nearest-neighbour pairs (query index, tree index) within ``radius``."""
    dist, j = tree.query(np.column_stack([qx, qy]), distance_upper_bound=radius)
    ok = np.isfinite(dist)
    qi, j, dist = np.nonzero(ok)[0], j[ok], dist[ok]
    order = np.argsort(dist, kind="stable")
    qi, j = qi[order], j[order]
    _, first = np.unique(j, return_index=True)  # a tree point keeps its closest query
    keep = np.sort(first)
    return qi[keep], j[keep]


def bootstrap_matches(src: dict, model: RefModel, ref_idx: np.ndarray, vote: Vote, cfg: AstrometryConfig,
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
            p = weighted_lstsq(design[rows], target[rows], np.ones(int(rows.sum())))
            res = design @ p - target
            dist = np.hypot(res[:n], res[n:])
            keep = dist < max(3.0 * np.median(dist[keep]) / 1.1774, 0.1)
        px = p[0] + p[1] * (rx - centre[0]) + p[2] * (ry - centre[1]) + p[6] * gx
        py = p[3] + p[4] * (rx - centre[0]) + p[5] * (ry - centre[1]) + p[6] * gy
        rms_px = float(np.sqrt(np.mean(dist[keep] ** 2)))
        radius = max(floor, min(radius, 5.0 * rms_px))
        ri, si = nn_match(px, py, src_tree, radius)
        if len(ri) < 7:
            break
    return ref_idx[ri], si, radius
