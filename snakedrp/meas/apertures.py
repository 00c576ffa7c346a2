"""Aperture photometry: circular apertures, the calibration aperture with neighbours replaced
by the source's PSF model, and Kron (elliptical, adaptive-radius) fluxes, all through sep.

In circular apertures sep replaces masked pixels by the mean of the aperture's other pixels
(the ``*_flag`` columns say so). Positions zero-based pixels; fluxes in image units.
"""
from __future__ import annotations

import numpy as np
import sep
from astropy.table import Table


def aperture_name(radius: float) -> str:
    """Column stem of an aperture: 4.5 -> ``ap_4_5`` (LSST's CircularApertureFlux_4_5)."""
    whole, frac = f"{float(radius):.1f}".split(".")
    return f"ap_{whole}_{frac}"


def aperture_fluxes(data, var, bad, xc, yc, radii):
    """sep exact-overlap circular apertures: flux, error, flag arrays of shape (N, n_radii).

    Masked pixels are replaced by the mean of the aperture's other pixels (sep's area correction)
    and flagged.
    """
    n = len(xc)
    flux = np.zeros((n, len(radii)))
    err = np.zeros((n, len(radii)))
    flag = np.zeros((n, len(radii)), bool)
    if n == 0:
        return flux, err, flag
    for k, r in enumerate(radii):
        f, e, fl = sep.sum_circle(data, xc, yc, r, var=var, mask=bad, subpix=0)
        flux[:, k], err[:, k] = f, e
        flag[:, k] = (fl & (sep.APER_TRUNC | sep.APER_HASMASKED)) != 0
    return flux, err, flag


def footprint_boxes(seg: np.ndarray, footprints: Table | None = None):
    """Id and half-open box ``(x0, x1, y0, y1)`` of every footprint in ``seg``, as int64 arrays.

    Read from ``footprints`` (``id, x_min, x_max, y_min, y_max``, inclusive) when given, else found
    by a pass over ``seg``.
    """
    if footprints is not None:
        return (np.asarray(footprints["id"], np.int64),
                np.asarray(footprints["x_min"], np.int64), np.asarray(footprints["x_max"], np.int64) + 1,
                np.asarray(footprints["y_min"], np.int64), np.asarray(footprints["y_max"], np.int64) + 1)
    from scipy import ndimage

    boxes = ndimage.find_objects(seg)
    present = [i for i, b in enumerate(boxes, start=1) if b is not None]
    lab = np.array(present, np.int64)
    x0s = np.array([boxes[i - 1][1].start for i in present], np.int64)
    x1s = np.array([boxes[i - 1][1].stop for i in present], np.int64)
    y0s = np.array([boxes[i - 1][0].start for i in present], np.int64)
    y1s = np.array([boxes[i - 1][0].stop for i in present], np.int64)
    return lab, x0s, x1s, y0s, y1s


def neighbour_correction(data, bad, seg, ids, xc, yc, radius, psf_flux, grid, *, footprints=None):
    """For each source, ``F_psf * sum(own model) - sum(data)`` over other sources' footprint pixels
    inside its circle of ``radius`` (pixel centres inside): adding it replaces the neighbours by the
    source's own PSF model (LSST replaces them by noise; a model keeps the aperture's total flux).

    Loops over (source, neighbour) pairs whose boxes meet: about one pair per source on an HSC CCD.
    The footprints' boxes come from :func:`footprint_boxes`.
    """
    from scipy.spatial import cKDTree

    n = len(xc)
    corr = np.zeros(n)
    if n == 0:
        return corr
    lab, x0s, x1s, y0s, y1s = footprint_boxes(seg, footprints)
    if len(lab) == 0:
        return corr
    cx = (x0s + x1s - 1) / 2.0
    cy = (y0s + y1s - 1) / 2.0
    ext = np.hypot(x1s - x0s, y1s - y0s) / 2.0
    tree = cKDTree(np.column_stack([cx, cy]))
    reach = radius + ext.max() + 1
    ksize = grid.kernels.shape[-1]
    kc = ksize // 2
    ix, iy = np.floor(xc + 0.5).astype(int), np.floor(yc + 0.5).astype(int)
    gj = np.abs(grid.gy[None, :] - yc[:, None]).argmin(axis=1)
    gi = np.abs(grid.gx[None, :] - xc[:, None]).argmin(axis=1)
    own = [grid.kernels[a, b] for a, b in zip(gj, gi)]
    for k in range(n):
        r = radius[k]
        for j in tree.query_ball_point((xc[k], yc[k]), reach[k]):
            if lab[j] == ids[k] or np.hypot(cx[j] - xc[k], cy[j] - yc[k]) > r + ext[j] + 1:
                continue
            y0, y1 = max(y0s[j], int(yc[k] - r)), min(y1s[j], int(yc[k] + r) + 2)
            x0, x1 = max(x0s[j], int(xc[k] - r)), min(x1s[j], int(xc[k] + r) + 2)
            if y1 <= y0 or x1 <= x0:
                continue
            ddy = (np.arange(y0, y1) - yc[k])[:, None]
            ddx = (np.arange(x0, x1) - xc[k])[None, :]
            sel = (seg[y0:y1, x0:x1] == lab[j]) & (ddx**2 + ddy**2 < r * r)
            if not sel.any():
                continue
            # own model: the nearest grid kernel, placed at the nearest pixel (a fill needs no sub-pixel shift)
            sy, sx = np.nonzero(sel)
            ky = sy + y0 - iy[k] + kc
            kx = sx + x0 - ix[k] + kc
            inside = (ky >= 0) & (ky < ksize) & (kx >= 0) & (kx < ksize)
            model = own[k][ky[inside], kx[inside]].sum()
            own_data = np.where(bad[y0:y1, x0:x1], np.float32(0.0), data[y0:y1, x0:x1])  # masked count 0
            corr[k] += psf_flux[k] * model - float(own_data[sel].sum())
    return np.where(np.isfinite(corr), corr, 0.0)


def kron_fluxes(data, var, bad, seg, ids, xc, yc, sigma, detections, config):
    """Kron radius and flux (sep), on the isophotal ellipse or the PSF's circle."""
    n = len(xc)
    out = {"radius": np.full(n, np.nan), "flux": np.full(n, np.nan), "err": np.full(n, np.nan),
           "flag": np.ones(n, bool)}
    if n == 0:
        return out
    if all(c in detections.colnames for c in ("a", "b", "theta")):
        a = np.asarray(detections["a"], float)
        b = np.asarray(detections["b"], float)
        theta = np.asarray(detections["theta"], float)
        okab = np.isfinite(a) & np.isfinite(b) & np.isfinite(theta) & (a > 0) & (b > 0)
        a, b, theta = np.where(okab, a, sigma), np.where(okab, b, sigma), np.where(okab, theta, 0.0)
    else:
        a, b, theta = sigma.copy(), sigma.copy(), np.zeros(n)
    theta = np.clip(theta, -np.pi / 2 + 1e-6, np.pi / 2 - 1e-6)
    extra = {}
    if seg is not None:
        extra = {"segmap": seg, "seg_id": ids.astype(np.int32)}
    kr, kflag = sep.kron_radius(data, xc, yc, a, b, theta, config.kron_radius_limit, mask=bad, **extra)
    ok = np.isfinite(kr) & (kr > 0)
    kr = np.where(ok, kr, 1.0)
    scale = config.kron_factor * kr
    circle = scale * np.sqrt(a * b) < config.kron_min_radius
    flux = np.zeros(n)
    ferr = np.zeros(n)
    fflag = np.zeros(n, int)
    el = ~circle
    if el.any():
        sub = {k: (v if k == "segmap" else v[el]) for k, v in extra.items()}
        f, e, fl = sep.sum_ellipse(data, xc[el], yc[el], a[el], b[el], theta[el], scale[el], var=var, mask=bad,
                                   subpix=1, **sub)
        flux[el], ferr[el], fflag[el] = f, e, fl
    if circle.any():
        sub = {k: (v if k == "segmap" else v[circle]) for k, v in extra.items()}
        f, e, fl = sep.sum_circle(data, xc[circle], yc[circle], config.kron_min_radius, var=var, mask=bad,
                                  subpix=1, **sub)
        flux[circle], ferr[circle], fflag[circle] = f, e, fl
    radius = np.where(circle, config.kron_min_radius / config.kron_factor, kr * np.sqrt(a * b))
    out["radius"] = np.where(ok, radius, np.nan)
    out["flux"] = flux
    out["err"] = ferr
    out["flag"] = ~ok | (kflag != 0) | (fflag & (sep.APER_TRUNC | sep.APER_ALLMASKED) != 0)
    return out
