"""Shapes: adaptive (elliptical Gaussian-weighted) second moments of every source by GalSim's
HSM, with other sources' footprint pixels masked. Sizes in pixels.
"""
from __future__ import annotations

import math

import numpy as np

from snakedrp.stamps import padded_cutouts


# ---------------------------------------------------------------- adaptive moments
def guess_sigma(sigma, detections):
    """First-guess size for the moments: the PSF sigma, or the isophotal size if larger [pixel]."""
    if all(c in detections.colnames for c in ("a", "b")):
        ab = np.sqrt(np.abs(np.asarray(detections["a"], float) * np.asarray(detections["b"], float)))
        return np.where(np.isfinite(ab), np.maximum(sigma, ab), sigma)
    return sigma


def adaptive_moments(data, bad, seg, ids, xc, yc, ix, iy, guess, rows, config):
    """GalSim HSM adaptive moments of the sources ``rows``, masked and neighbour pixels excluded.

    Returns an array (6, N): sigma, e1, e2, xx, yy, xy; NaN where not measured or failed.
    """
    import galsim

    out = np.full((6, len(xc)), np.nan)
    if len(rows) == 0:
        return out
    half = config.shape_stamp_size // 2
    params = galsim.hsm.HSMParams(max_mom2_iter=config.shape_max_iterations)
    stamps = padded_cutouts(data, ix[rows], iy[rows], half, np.float32(0.0)).astype(np.float64)
    masked = padded_cutouts(bad, ix[rows], iy[rows], half, True)
    if seg is not None:
        segs = padded_cutouts(seg, ix[rows], iy[rows], half, -1)
        masked |= (segs != 0) & (segs != ids[rows, None, None])
    stamps[masked] = 0.0
    weights = (~masked).astype(np.int32)        # HSM's own mask format: no per-call conversion
    bounds = galsim.BoundsI(1, 2 * half + 1, 1, 2 * half + 1)
    for k, r in enumerate(rows):
        centre = galsim.PositionD(xc[r] - (ix[r] - half) + 1.0, yc[r] - (iy[r] - half) + 1.0)
        res = galsim.hsm.FindAdaptiveMom(
            galsim._Image(stamps[k], bounds, None), weight=galsim._Image(weights[k], bounds, None),
            guess_sig=float(guess[r]), guess_centroid=centre, strict=False, check=False, hsmparams=params)
        if res.moments_status == 0 and res.moments_sigma > 0:
            s, e1, e2 = res.moments_sigma, res.observed_shape.e1, res.observed_shape.e2
            trace = 2.0 * s**2 / math.sqrt(max(1.0 - e1**2 - e2**2, 1e-12))
            out[:, r] = s, e1, e2, 0.5 * trace * (1 + e1), 0.5 * trace * (1 - e1), 0.5 * trace * e2
    return out
