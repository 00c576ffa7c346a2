"""Amplifier-level ISR steps: overscan models, their subtraction, and assembly of the amplifiers
into the CCD image (trimming the overscan, un-mirroring ``flip_x`` amplifiers).

Arrays are raw frames in ADU, indexed ``[y, x]`` in the camera's raw layout; amplifier boxes come
from :class:`snakedrp.repo.camera.Amplifier`.
"""
from __future__ import annotations

import warnings

import numpy as np
from astropy.stats import sigma_clip
from astropy.utils.exceptions import AstropyUserWarning
from scipy.interpolate import LSQUnivariateSpline

from snakedrp.repo.camera import Amplifier


class IsrError(RuntimeError):
    """ISR cannot proceed (missing calibration, wrong shape, no usable data); names visit and ccd."""


def amp_regions(amplifiers, *, assembled: bool) -> list[tuple[slice, slice]]:
    """Each amplifier's pixels in the output image: its assembled box, or raw data box."""
    return [(a.assembled if assembled else a.raw_data).slices for a in amplifiers]


def place_amp(src: np.ndarray, amp: Amplifier) -> np.ndarray:
    """An amplifier's raw pixels in CCD orientation (``flip_x`` amplifiers read out to the right)."""
    return src[:, ::-1] if amp.flip_x else src


# ---------------------------------------------------------------------------- overscan
def fit_overscan(overscan: np.ndarray, *, fit: str = "poly", order: int = 3, knots: int = 8,
                 clip_sigma: float = 3.0, clip_iterations: int = 3) -> np.ndarray:
    """Model of the overscan level along the rows of one amplifier.

    Parameters
    ----------
    overscan : ndarray, shape (ny, n_columns)
        Overscan pixels [ADU]; NaN pixels are ignored.
    fit : {"median", "poly", "spline"}
        ``median``: one level, the median of all overscan pixels. ``poly``/``spline``: a
        polynomial of ``order`` / a cubic spline with ``knots`` interior knots fitted to the
        per-row sigma-clipped mean, rows beyond ``clip_sigma`` (MAD) sigma of the fit rejected.

    Returns
    -------
    ndarray, float32, shape (ny,)
        Overscan level of each row [ADU]; NaN if the overscan holds no finite pixel.
    """
    ny = overscan.shape[0]
    if fit == "median":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN overscan → NaN level
            level = np.nanmedian(overscan)
        return np.full(ny, level, np.float32)
    if clip_iterations > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)  # NaN pixels are meant to be dropped
            clipped = sigma_clip(overscan, sigma=clip_sigma, maxiters=clip_iterations, axis=1, masked=True)
        row_mean = np.ma.filled(clipped.mean(axis=1).astype(np.float64), np.nan)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            row_mean = np.nanmean(overscan, axis=1, dtype=np.float64)
    rows = np.arange(ny, dtype=np.float64)
    good = np.isfinite(row_mean)
    n_params = order + 1 if fit == "poly" else knots + 4
    if good.sum() < max(n_params + 1, 2):
        level = np.nanmedian(row_mean) if good.any() else np.nan
        return np.full(ny, level, np.float32)

    def _fit(use):
        if fit == "poly":
            return np.polynomial.Polynomial.fit(rows[use], row_mean[use], order)
        x = rows[use]
        inner = np.linspace(x[0], x[-1], knots + 2)[1:-1]
        return LSQUnivariateSpline(x, row_mean[use], inner, k=3)

    use = good
    model = _fit(use)
    for _ in range(clip_iterations):
        resid = row_mean - model(rows)
        scale = 1.4826 * np.median(np.abs(resid[use] - np.median(resid[use])))
        if not scale > 0:
            break
        new_use = good & (np.abs(resid) <= clip_sigma * scale)
        if np.array_equal(new_use, use) or new_use.sum() < n_params + 1:
            break
        use = new_use
        model = _fit(use)
    return model(rows).astype(np.float32)


def overscan_correct(data: np.ndarray, amplifiers, **fit) -> tuple[np.ndarray, list[np.ndarray]]:
    """Subtract each amplifier's overscan model from its data and overscan columns.

    Parameters
    ----------
    data : ndarray, float32, shape (ny_raw, nx_raw)
        Raw frame [ADU], camera raw layout; not modified.
    amplifiers : sequence of Amplifier
    **fit
        Options of :func:`overscan_models` (``fit``, ``order``, ``knots``, ``clip_sigma``,
        ``clip_iterations``, ``skip_columns``; ``IsrConfig.overscan_options()`` gives them).

    Returns
    -------
    corrected : ndarray, float32, shape (ny_raw, nx_raw)
        Raw layout with the overscan level removed [ADU].
    models : list of ndarray, float32, shape (ny_amp,)
        Each amplifier's overscan level per row [ADU].
    """
    covered = sum(a.raw_data.shape[0] * a.raw_data.shape[1] + a.raw_overscan.shape[0] * a.raw_overscan.shape[1]
                  for a in amplifiers)
    out = np.empty_like(data, dtype=np.float32) if covered == data.size else data.astype(np.float32, copy=True)
    models = overscan_models(data, amplifiers, **fit)
    for amp, model in zip(amplifiers, models):
        column = model[:, None]
        for box in (amp.raw_data, amp.raw_overscan):
            np.subtract(data[box.slices], column, out=out[box.slices])
    return out, models


def overscan_models(data: np.ndarray, amplifiers, *, fit: str = "poly", order: int = 3, knots: int = 8,
                    clip_sigma: float = 3.0, clip_iterations: int = 3, skip_columns: int = 0) -> list[np.ndarray]:
    """Each amplifier's overscan level per row [ADU] (the models :func:`overscan_correct` subtracts).

    The first ``skip_columns`` overscan columns (next to the data, in readout order) are left out;
    the other options are :func:`fit_overscan`'s.
    """
    models = []
    for amp in amplifiers:
        ys, xs = amp.raw_overscan.slices
        skip = min(skip_columns, amp.raw_overscan.shape[1] - 1)
        columns = data[ys, xs.start + skip:xs.stop]
        model = fit_overscan(columns, fit=fit, order=order, knots=knots, clip_sigma=clip_sigma,
                             clip_iterations=clip_iterations)
        if amp.raw_overscan.y0 != amp.raw_data.y0 or amp.raw_overscan.shape[0] != amp.raw_data.shape[0]:
            raise IsrError(f"amplifier {amp.name}: overscan rows {amp.raw_overscan} do not match data rows {amp.raw_data}")
        models.append(model)
    return models


def assemble_overscan_corrected(data: np.ndarray, amplifiers, ccd_shape: tuple[int, int],
                                models: list[np.ndarray]) -> np.ndarray:
    """``assemble(overscan_correct(data)[0])`` in one pass, without the raw-layout intermediate."""
    out = np.empty(ccd_shape, np.float32)
    for amp, model in zip(amplifiers, models):
        if amp.raw_data.shape != amp.assembled.shape:
            raise IsrError(f"amplifier {amp.name}: raw data {amp.raw_data} and assembled {amp.assembled} differ in shape")
        np.subtract(place_amp(data[amp.raw_data.slices], amp), model[:, None], out=out[amp.assembled.slices])
    return out


# ---------------------------------------------------------------------------- assembly, masks
def assemble(data: np.ndarray, amplifiers, ccd_shape: tuple[int, int]) -> np.ndarray:
    """Trim and assemble the amplifiers into the CCD image.

    Parameters
    ----------
    data : ndarray, shape (ny_raw, nx_raw)
        Raw layout (overscan-corrected or not).
    amplifiers : sequence of Amplifier
        ``raw_data`` → ``assembled`` boxes; ``flip_x`` data are un-mirrored.
    ccd_shape : (ny, nx)

    Returns
    -------
    ndarray, float32, shape ccd_shape
    """
    out = np.empty(ccd_shape, np.float32)
    for amp in amplifiers:
        if amp.raw_data.shape != amp.assembled.shape:
            raise IsrError(f"amplifier {amp.name}: raw data {amp.raw_data} and assembled {amp.assembled} differ in shape")
        out[amp.assembled.slices] = place_amp(data[amp.raw_data.slices], amp)
    return out
