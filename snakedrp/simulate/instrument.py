"""Fixed instrument signatures of each simulated CCD: flat response, dark current, bias structure,
fringe pattern. They depend only on (seed, ccd), so every exposure of a CCD sees the same ones.

All maps are on the assembled CCD grid, shape ``(ny, nx)`` = ``camera.ccd_shape``, except the bias
structure, which lives on the raw grid ``camera.raw_shape`` (it is a property of the readout).
"""
from __future__ import annotations

import numpy as np

from snakedrp.repo.camera import Box, Camera

#: Fractional drop of the flat response (vignetting) at the focal-plane radius of the farthest CCD corner.
VIGNETTING = 0.04
#: RMS of the pixel-to-pixel flat response (Gaussian, fixed per CCD).
FLAT_PIXEL_RMS = 0.01
#: Response of the pixels of bad-column defects.
BAD_COLUMN_RESPONSE = 0.2
#: Dark current of hot pixels (1x1 and 2x2 defect boxes) [e-/s].
HOT_PIXEL_DARK = 30.0
#: Amplitude of the fixed 2-D bias structure [ADU].
BIAS_STRUCTURE = 2.0
#: Fringe amplitude relative to the sky (times a per-visit scale of 0.7-1.3).
FRINGE_AMPLITUDE = 0.015

# Stream labels of numpy SeedSequence entropy: (seed, stream, ...) keeps streams independent.
STREAM_VISIT, STREAM_OBJECTS, STREAM_EXPOSURE, STREAM_FLAT, STREAM_BIAS, STREAM_FRINGE, STREAM_REFCAT = range(1, 8)


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator seeded deterministically by ``(seed, *keys)``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(int(k) for k in keys)]))


def is_bad_column(box: Box) -> bool:
    """Defect boxes taller than 2 pixels are bad columns (low response); the others are hot pixels."""
    return box.y1 - box.y0 > 2


def defect_mask(camera: Camera, ccd: int) -> np.ndarray:
    """Boolean ``(ny, nx)``: True on the CCD's listed defects."""
    mask = np.zeros(camera.ccd_shape, bool)
    for box in camera.ccds[ccd].defects:
        mask[box.slices] = True
    return mask


def focal_plane_radius(camera: Camera) -> float:
    """Radius [mm] of the farthest CCD corner from the boresight."""
    ny, nx = camera.ccd_shape
    r = 0.0
    for c in camera.ccd_ids:
        fx, fy = camera.pixel_to_focal_plane(c, np.array([0, nx - 1, 0, nx - 1]), np.array([0, 0, ny - 1, ny - 1]))
        r = max(r, float(np.hypot(fx, fy).max()))
    return r


def _focal_plane_grid(camera: Camera, ccd: int):
    ny, nx = camera.ccd_shape
    return camera.pixel_to_focal_plane(ccd, np.arange(nx)[None, :], np.arange(ny)[:, None])


def flat_response(seed: int, camera: Camera, ccd: int) -> np.ndarray:
    """Multiplicative response to light, float32 ``(ny, nx)``.

    Vignetting (quadratic in focal-plane radius, ``VIGNETTING`` at the edge) x a Gaussian
    pixel-to-pixel term of RMS ``FLAT_PIXEL_RMS`` x ``BAD_COLUMN_RESPONSE`` on bad columns.
    """
    fx, fy = _focal_plane_grid(camera, ccd)
    r_edge = focal_plane_radius(camera)
    vignetting = 1.0 - VIGNETTING * (fx**2 + fy**2) / r_edge**2
    rng = rng_for(seed, STREAM_FLAT, ccd)
    response = vignetting * (1.0 + FLAT_PIXEL_RMS * rng.standard_normal(camera.ccd_shape))
    for box in camera.ccds[ccd].defects:
        if is_bad_column(box):
            response[box.slices] *= BAD_COLUMN_RESPONSE
    return response.astype(np.float32)


def median_flat_response(response: np.ndarray, camera: Camera, ccd: int) -> float:
    """Median of the flat response over the pixels that are not listed defects (the master-flat
    normalisation of the pipeline)."""
    return float(np.median(response[~defect_mask(camera, ccd)]))


def dark_current(camera: Camera, ccd: int) -> np.ndarray:
    """Dark current [e-/s], float32 ``(ny, nx)``: the camera's value, ``HOT_PIXEL_DARK`` on hot pixels."""
    dark = np.full(camera.ccd_shape, camera.dark_current, np.float32)
    for box in camera.ccds[ccd].defects:
        if not is_bad_column(box):
            dark[box.slices] = HOT_PIXEL_DARK
    return dark


def bias_structure(seed: int, camera: Camera, ccd: int) -> np.ndarray:
    """Fixed 2-D bias structure [ADU] on the raw grid ``camera.raw_shape``, zero in the overscans.

    A gradient along rows, a slow ripple along columns and per-column offsets, a few ADU in all.
    """
    ny, nx = camera.raw_shape
    rng = rng_for(seed, STREAM_BIAS, ccd)
    y = np.linspace(-0.5, 0.5, ny)[:, None]
    x = np.arange(nx)[None, :]
    a, b = rng.uniform(-1.0, 1.0, 2) * BIAS_STRUCTURE
    ripple = np.cos(2 * np.pi * x / rng.uniform(150, 400) + rng.uniform(0, 2 * np.pi))
    structure = a * y + 0.5 * b * ripple + 0.3 * rng.standard_normal((1, nx))
    out = np.zeros((ny, nx), np.float32)
    for amp in camera.ccds[ccd].amplifiers:
        out[amp.raw_data.slices] = np.broadcast_to(structure, (ny, nx))[amp.raw_data.slices]
    return out


def fringe_pattern(seed: int, camera: Camera, ccd: int) -> np.ndarray:
    """Fringe pattern, float32 ``(ny, nx)``, values in about [-1, 1] (RMS ~0.4).

    A sum of plane waves with periods of 60-200 pixels defined on focal-plane coordinates,
    so the pattern is fixed for the camera and continuous from CCD to CCD (interference
    fringes follow the thickness of the detector, not the sky).
    """
    rng = rng_for(seed, STREAM_FRINGE)
    fx, fy = _focal_plane_grid(camera, ccd)
    pattern = np.zeros(camera.ccd_shape)
    n_waves = 4
    for _ in range(n_waves):
        k = 2 * np.pi / (rng.uniform(60, 200) * camera.pixel_size)
        theta = rng.uniform(0, np.pi)
        pattern += np.cos(k * (np.cos(theta) * fx + np.sin(theta) * fy) + rng.uniform(0, 2 * np.pi))
    return (pattern / np.sqrt(n_waves) / 1.4).astype(np.float32)
