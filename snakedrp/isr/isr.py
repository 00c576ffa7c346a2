"""Instrument signature removal (the LSST ``IsrTask``): raw ADU frame → exposure in electrons.

Steps, in the order :meth:`IsrTask.run` applies them (each a function here, each switchable):

1. ``detect_saturation``  pixels >= the amplifier's saturation level in *raw* ADU (before any
   bias or overscan is removed, as the hardware saturates on the raw signal).
2. ``overscan_correct``   per amplifier, subtract the serial overscan: a single median, or a
   polynomial / cubic spline in the row direction fitted to the per-row clipped mean.
3. ``assemble``           trim the overscan and place each amplifier at its assembled section,
   un-mirroring ``flip_x`` amplifiers.
4. ``mask_defects``, ``mask_saturation``  set BAD at the camera's defect boxes and SAT (grown
   mostly along columns, to cover bleed trails); only mask bits change here.
5. ``subtract_bias``      master bias, ADU, assembled.
6. ``apply_gain``         ADU → electrons per amplifier.
7. ``make_variance``      ``max(image, 0) + read_noise**2`` [e-^2] per amplifier, computed here,
   before dark and flat, where the image is still the detected charge (the Poisson term must
   count detected electrons); the later steps propagate it (``var / flat**2`` ...).
8. ``subtract_dark``      master dark [e-/s] times the header's DARKTIME.
9. ``divide_flat``        master flat, median 1 (docs/ARCHITECTURE.md).
10. ``fit_fringe_amplitude`` + ``subtract_fringe``  only for filters the camera marks as
    fringing: least-squares amplitude of the fringe template against box medians of the image.
11. ``mask_nonfinite``    NaN/inf pixels → NO_DATA|BAD, value 0, variance inf; so are the
    amplifiers that :func:`find_unusable_amplifiers` finds without signal in the raw frame (no
    finite pixel, one value everywhere, saturated everywhere); a whole CCD without usable data
    raises :class:`IsrError`.
12. ``interpolate_over_masked``  linear interpolation across columns over BAD (and SAT) pixels,
    which gain INTRP.
13. ``mask_edge``         EDGE on a border of ``edge_width`` pixels.

Calibration products' NO_DATA pixels mark the science pixels BAD. Output: float32 image and
variance in electrons (ADU when ``do_gain`` is false), int32 mask, the raw header's nominal WCS,
and metadata with the raw keys plus ``ISR*`` keys saying which steps ran.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from scipy import ndimage

from snakedrp.repo.camera import Camera
from snakedrp.repo.exposure import Exposure, mask_bit, mask_bits
from snakedrp.isr.config import IsrConfig
from snakedrp.repo.raw import RawFrame
from snakedrp.isr.overscan import (IsrError, amp_regions, assemble, assemble_overscan_corrected, overscan_correct,
                                    overscan_models, place_amp)

#: Raw header keys copied into the exposure's metadata (when present).
METADATA_KEYS = ("VISIT", "CCD", "FILTER", "OBSTYPE", "DATE-OBS", "MJD-OBS", "EXPTIME", "DARKTIME",
                 "AIRMASS", "TELRA", "TELDEC", "ROTANG", "CAMERA")

#: Mask planes whose pixels are never used as data (fringe fit, interpolation neighbours).
UNUSABLE_BITS = mask_bits("BAD", "SAT", "NO_DATA")
#: Calibration-product mask planes that make the corrected science pixel BAD (a master's BAD
#: marks the camera defects, which do_defect handles, so only pixels without data count).
CALIB_BAD_BITS = mask_bit("NO_DATA")


@dataclass(frozen=True)
class IsrResult:
    """What ISR produces.

    Attributes
    ----------
    exposure : Exposure
        ``image`` and ``variance`` float32 (electrons, e-^2), ``mask`` int32, shape
        ``camera.ccd_shape`` (the raw shape if ``do_assemble`` is false); ``wcs`` the nominal
        WCS of the raw header; ``metadata`` raw keys plus ``ISR*`` step flags.
    fringe_amplitude : float or None
        Fitted amplitude of the fringe template (e-, i.e. sky level, for a per-unit-sky
        template); None when no fringe was subtracted.
    unusable_amplifiers : dict of str to str
        Amplifier name → why it holds no signal (see :func:`find_unusable_amplifiers`); its
        pixels are NO_DATA|BAD. Empty when every amplifier is usable.
    """

    exposure: Exposure
    fringe_amplitude: float | None = None
    unusable_amplifiers: dict[str, str] = field(default_factory=dict)


#: Rows per block in whole-image arithmetic: the temporaries stay in cache (2x faster than
#: whole-image temporaries on a 2048 x 4176 CCD).
BLOCK_ROWS = 128


def _blocks(n_rows: int):
    for y in range(0, n_rows, BLOCK_ROWS):
        yield slice(y, min(y + BLOCK_ROWS, n_rows))


def detect_saturation(data: np.ndarray, amplifiers, shape: tuple[int, int], *, assembled: bool) -> np.ndarray:
    """Pixels at or above their amplifier's saturation level in raw ADU.

    Parameters
    ----------
    data : ndarray, shape (ny_raw, nx_raw)
        The raw frame [ADU], before any overscan or bias subtraction.
    shape : (ny, nx)
        Shape of the output layout (assembled CCD, or raw if ``assembled`` is false).

    Returns
    -------
    ndarray, bool, shape ``shape``
    """
    saturated = np.zeros(shape, bool)
    for amp in amplifiers:
        hit = data[amp.raw_data.slices] >= amp.saturation
        if assembled:
            saturated[amp.assembled.slices] = place_amp(hit, amp)
        else:
            saturated[amp.raw_data.slices] = hit
    return saturated


def find_unusable_amplifiers(data: np.ndarray, amplifiers) -> dict[str, str]:
    """Amplifiers whose raw data section carries no signal, with the reason.

    Unusable is an amplifier with no finite pixel, one that reads one value everywhere (a
    dead or stuck readout: all zeros, say; real data always have read noise), or one at or
    above its saturation level everywhere. Two passes (min, max) over the raw frame.

    Parameters
    ----------
    data : ndarray, shape (ny_raw, nx_raw)
        The raw frame [ADU].

    Returns
    -------
    dict
        Amplifier name → reason, in the camera's order; empty if all are usable.
    """
    out = {}
    for amp in amplifiers:
        pix = data[amp.raw_data.slices]
        lo, hi = float(pix.min()), float(pix.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            finite = pix[np.isfinite(pix)]
            if finite.size == 0:
                out[amp.name] = "no finite pixel (NaN/inf everywhere)"
                continue
            lo, hi = float(finite.min()), float(finite.max())
        if lo >= amp.saturation:
            out[amp.name] = f"every pixel saturated (>= {amp.saturation:g} ADU)"
        elif lo == hi:
            out[amp.name] = f"every pixel reads {lo:g} ADU (a dead or stuck readout)"
    return out


def mask_saturation(mask: np.ndarray, saturated: np.ndarray, *, grow: int = 1, bleed_grow: int = 4) -> int:
    """Set SAT on saturated pixels grown by ``grow`` (x) and ``grow + bleed_grow`` (y) pixels.

    Bleed trails run along columns and their ends hold less than full-well charge, so the
    mask grows further in y. Works on the bounding box of the saturated pixels only.
    Returns the number of SAT pixels.
    """
    rows = np.flatnonzero(saturated.any(axis=1))
    if rows.size == 0:
        return 0
    cols = np.flatnonzero(saturated.any(axis=0))
    gy = grow + bleed_grow
    ny, nx = mask.shape
    y0, y1 = max(rows[0] - gy, 0), min(rows[-1] + gy + 1, ny)
    x0, x1 = max(cols[0] - grow, 0), min(cols[-1] + grow + 1, nx)
    box = saturated[y0:y1, x0:x1].view(np.uint8)
    if grow:
        box = ndimage.maximum_filter1d(box, 2 * grow + 1, axis=1, mode="constant")
    if gy:
        box = ndimage.maximum_filter1d(box, 2 * gy + 1, axis=0, mode="constant")
    grown = box.astype(bool)
    sub = mask[y0:y1, x0:x1]
    np.bitwise_or(sub, mask_bit("SAT"), out=sub, where=grown)
    return int(grown.sum())


def mask_defects(mask: np.ndarray, defects) -> int:
    """Set BAD on the camera's defect boxes (assembled CCD pixels); returns the pixel count."""
    n = 0
    bad = mask_bit("BAD")
    for box in defects:
        mask[box.slices] |= bad
        n += box.shape[0] * box.shape[1]
    return n


def mask_edge(mask: np.ndarray, width: int) -> None:
    """Set EDGE on a border ``width`` pixels wide."""
    if width <= 0:
        return
    edge = mask_bit("EDGE")
    mask[:width] |= edge
    mask[-width:] |= edge
    mask[:, :width] |= edge
    mask[:, -width:] |= edge


def propagate_calib_mask(mask: np.ndarray, calib: Exposure) -> None:
    """Mark BAD the pixels where a calibration product has no data (NO_DATA)."""
    if calib.mask is None or not calib.mask.any():
        return
    bad = mask_bit("BAD")
    for b in _blocks(mask.shape[0]):
        hit = (calib.mask[b] & CALIB_BAD_BITS) != 0
        np.bitwise_or(mask[b], bad, out=mask[b], where=hit)


# ---------------------------------------------------------------------------- calibrations
def _check_calib(name: str, calib: Exposure, shape, where: str) -> None:
    if calib.image.shape != tuple(shape):
        raise IsrError(f"{where}: {name} has shape {calib.image.shape}, the CCD is {tuple(shape)}")


def subtract_bias(image: np.ndarray, bias: Exposure) -> None:
    """``image -= bias`` in place; both ADU, assembled (its variance is added after the gain)."""
    image -= bias.image


def apply_gain(image: np.ndarray, regions, gains) -> None:
    """Multiply each amplifier region by its gain (ADU → electrons), in place."""
    for sl, g in zip(regions, gains):
        image[sl] *= np.float32(g)


def make_variance(image: np.ndarray, regions, amplifiers, *, electrons: bool) -> np.ndarray:
    """Poisson plus read-noise variance per amplifier.

    ``max(image, 0) + read_noise**2`` [e-^2] when ``image`` is in electrons; in ADU
    ``max(image, 0) / gain + (read_noise / gain)**2`` [ADU^2].

    Returns
    -------
    ndarray, float32, shape image.shape
    """
    variance = np.maximum(image, np.float32(0.0))
    for sl, amp in zip(regions, amplifiers):
        k = 1.0 if electrons else 1.0 / amp.gain
        if not electrons:
            variance[sl] *= np.float32(k)
        variance[sl] += np.float32((amp.read_noise * k) ** 2)
    return variance


def subtract_dark(image: np.ndarray, variance: np.ndarray | None, dark: Exposure, darktime: float) -> None:
    """``image -= dark * darktime`` in place; dark [e-/s], darktime [s]. Adds ``dark_var * darktime**2``."""
    t = np.float32(darktime)
    _add_scaled(image, dark.image, -t)
    if variance is not None:
        _add_scaled(variance, dark.variance, t * t)


def divide_flat(image: np.ndarray, variance: np.ndarray | None, flat: Exposure) -> None:
    """``image /= flat`` in place (flat median 1); ``flat <= 0`` or non-finite → NaN (masked later).

    Variance: ``(var + image_out**2 * var_flat) / flat**2`` when the flat variance is given.
    """
    f = flat.image
    with np.errstate(divide="ignore", invalid="ignore"):
        for b in _blocks(image.shape[0]):
            inv = np.reciprocal(f[b])
            image[b] *= inv
            if variance is not None:
                if flat.variance is not None:
                    term = np.square(image[b])
                    term *= flat.variance[b]
                    variance[b] += term
                inv *= inv
                variance[b] *= inv
    if not f.min() > 0:  # also true when the flat holds NaN
        image[~(f > 0)] = np.nan


@dataclass(frozen=True)
class FringeFit:
    """Least-squares fit of a fringe template: amplitude [image units per template unit]."""

    amplitude: float
    amplitude_err: float
    n_used: int


def fit_fringe_amplitude(image: np.ndarray, mask: np.ndarray, template: np.ndarray, *, num_points: int = 30000,
                         box_half: int = 2, clip_sigma: float = 3.0, iterations: int = 10,
                         background: str = "plane", rng: np.random.Generator | None = None,
                         template_variance: np.ndarray | None = None) -> FringeFit:
    """Amplitude ``a`` of a fringe template in an image, ``image ≈ a * template + background``.

    As in the LSST FringeTask, image and template are compared through the medians of small
    boxes at random positions (robust to noise and faint sources); boxes touching BAD, SAT or
    NO_DATA pixels are skipped, a constant (or plane) absorbs the sky, and positions whose
    residual exceeds ``clip_sigma`` MAD-sigma (stars, galaxies) are rejected iteratively.

    A template made of a few night-sky frames is noisy, and least squares on a noisy regressor
    underestimates its coefficient by the noise's share of the regressor's variance (with 4
    frames and 5x5 boxes, ~20 %: a fifth of the fringes left in every calexp). With
    ``template_variance``, the noise of each box median, ``(pi / 2) mean(var) / n_box``, is taken
    out of the normal equations (the errors-in-variables correction for a known error variance).

    Parameters
    ----------
    image, template : ndarray, float32, shape (ny, nx)
    mask : ndarray, int32, shape (ny, nx)
    template_variance : ndarray, float32, shape (ny, nx), optional
        Variance of the template's pixels (the master fringe's variance plane).

    Returns
    -------
    FringeFit
    """
    rng = rng or np.random.default_rng(0)
    ny, nx = image.shape
    h = box_half
    ys = np.sort(rng.integers(h, ny - h, num_points))  # sorted rows: memory locality
    xs = rng.integers(h, nx - h, num_points)
    offsets = np.arange(-h, h + 1)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    iy = ys[:, None] + dy.ravel()
    ix = xs[:, None] + dx.ravel()
    usable = ~((mask[iy, ix] & UNUSABLE_BITS) != 0).any(axis=1)
    d = np.median(image[iy, ix], axis=1).astype(np.float64)
    t = np.median(template[iy, ix], axis=1).astype(np.float64)
    usable &= np.isfinite(d) & np.isfinite(t)
    t_noise = np.zeros_like(t)
    if template_variance is not None:
        t_noise = 0.5 * np.pi * np.mean(template_variance[iy, ix], axis=1).astype(np.float64) / iy.shape[1]
        usable &= np.isfinite(t_noise)
    columns = [t, np.ones_like(t)]
    if background == "plane":
        columns += [xs / nx - 0.5, ys / ny - 0.5]
    design = np.stack(columns, axis=1)
    use = usable
    coeffs = np.zeros(design.shape[1])
    scale = np.nan
    for _ in range(iterations):
        if use.sum() < design.shape[1] + 1:
            raise ValueError(f"fringe fit: only {int(use.sum())} usable positions")
        normal = design[use].T @ design[use]
        normal[0, 0] -= np.sum(t_noise[use])
        coeffs = np.linalg.solve(normal, design[use].T @ d[use])
        resid = d - design @ coeffs
        r = resid[use]
        scale = 1.4826 * np.median(np.abs(r - np.median(r)))
        new_use = usable & (np.abs(resid) <= clip_sigma * scale)
        if np.array_equal(new_use, use):
            break
        use = new_use
    cov = np.linalg.pinv(design[use].T @ design[use]) * scale**2
    return FringeFit(amplitude=float(coeffs[0]), amplitude_err=float(np.sqrt(cov[0, 0])), n_used=int(use.sum()))


def subtract_fringe(image: np.ndarray, variance: np.ndarray | None, fringe: Exposure, amplitude: float) -> None:
    """``image -= amplitude * template`` in place; adds ``amplitude**2 * var_template``."""
    a = np.float32(amplitude)
    _add_scaled(image, fringe.image, -a)
    if variance is not None and fringe.variance is not None:
        _add_scaled(variance, fringe.variance, a * a)


def _add_scaled(target: np.ndarray, source: np.ndarray, scale) -> None:
    # target += scale * source, block by block
    scale = np.float32(scale)
    for b in _blocks(target.shape[0]):
        target[b] += source[b] * scale


# ---------------------------------------------------------------------------- NaN, interpolation
def mask_nonfinite(image: np.ndarray, variance: np.ndarray, mask: np.ndarray) -> int:
    """NaN/inf pixels → NO_DATA|BAD, image 0, variance inf. Returns the number of such pixels."""
    if np.isfinite(image).all():  # the usual case
        return 0
    bad = ~np.isfinite(image)
    image[bad] = 0.0
    variance[bad] = np.inf
    np.bitwise_or(mask, mask_bits("NO_DATA", "BAD"), out=mask, where=bad)
    return int(bad.sum())


def interpolate_over_masked(image: np.ndarray, mask: np.ndarray, *, target_bits: int,
                            avoid_bits: int = UNUSABLE_BITS, planes=()) -> int:
    """Linear interpolation along rows (across columns) over the pixels with ``target_bits``.

    Each maximal run of unusable pixels (``target_bits | avoid_bits``) in a row is filled
    between the nearest usable pixels left and right of it (the one side at the CCD edge);
    only target pixels that are not NO_DATA change, and they gain INTRP. ``planes`` (e.g. the
    variance) are interpolated with the same weights. Hand-written rather than
    astropy's ``interpolate_replace_nans``: that convolves the whole image (seconds per CCD),
    whereas defects and bleed trails are narrow in x and this touches only their pixels.

    Parameters
    ----------
    image : ndarray, float32, shape (ny, nx)
        Modified in place.
    mask : ndarray, int32, shape (ny, nx)
        Modified in place (INTRP).

    Returns
    -------
    int
        Number of pixels interpolated.
    """
    # flat indices split into rows and columns: half the time of a 2-d np.nonzero, same order
    ys, xs = np.divmod(np.flatnonzero(mask & (target_bits | avoid_bits)), mask.shape[1])
    n = ys.size
    if n == 0:
        return 0
    values = mask[ys, xs]
    target = ((values & target_bits) != 0) & ((values & mask_bit("NO_DATA")) == 0)
    new_run = np.ones(n, bool)
    new_run[1:] = (ys[1:] != ys[:-1]) | (xs[1:] != xs[:-1] + 1)
    run = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], n] - 1
    ry, xl, xr = ys[starts], xs[starts] - 1, xs[ends] + 1
    nx = image.shape[1]
    has_l, has_r = xl >= 0, xr < nx
    fill = target & (has_l | has_r)[run]
    py, px, pr = ys[fill], xs[fill], run[fill]
    w = ((px - xl[pr]) / (xr[pr] - xl[pr])).astype(np.float32)
    xl_c, xr_c = np.clip(xl, 0, nx - 1), np.clip(xr, 0, nx - 1)
    for plane in (image, *planes):
        vl, vr = plane[ry, xl_c], plane[ry, xr_c]
        vl, vr = np.where(has_l, vl, vr), np.where(has_r, vr, vl)
        plane[py, px] = vl[pr] + (vr[pr] - vl[pr]) * w
    mask[py, px] |= mask_bit("INTRP")
    return int(py.size)


# ---------------------------------------------------------------------------- the task
def _wcs_from_header(header: fits.Header, shape) -> WCS | None:
    if "CTYPE1" not in header:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header)
    wcs.pixel_shape = (shape[1], shape[0])
    return wcs


class IsrTask:
    """Instrument signature removal of one raw CCD frame (steps in the module docstring)."""

    ConfigClass = IsrConfig

    def __init__(self, config: IsrConfig | None = None):
        self.config = config or IsrConfig()
        self.config.validate()

    def run(self, raw: RawFrame, *, camera: Camera, bias: Exposure | None = None, dark: Exposure | None = None,
            flat: Exposure | None = None, fringe: Exposure | None = None) -> IsrResult:
        """Correct ``raw`` (not modified) with the given master calibrations.

        Parameters
        ----------
        raw : RawFrame
            ``data`` float32 ADU of shape ``camera.raw_shape``; header with VISIT, CCD, FILTER,
            DARKTIME, the nominal WCS ...
        camera : Camera
        bias : Exposure, optional
            Master bias [ADU], assembled; needed if ``do_bias``.
        dark : Exposure, optional
            Master dark [e-/s]; needed if ``do_dark``.
        flat : Exposure, optional
            Master flat, median 1; needed if ``do_flat``.
        fringe : Exposure, optional
            Fringe template per unit sky (see :func:`snakedrp.isr.calibs.construct_fringe`); needed
            if ``do_fringe`` and the filter fringes.

        Returns
        -------
        IsrResult

        Raises
        ------
        IsrError
            Missing calibration, wrong shapes, unknown CCD, or no usable pixel.
        """
        cfg = self.config
        header = raw.header
        visit, ccd_id = header.get("VISIT", "?"), header.get("CCD", "?")
        where = f"visit {visit} ccd {ccd_id}"
        try:
            ccd = camera.ccds[int(ccd_id)]
        except (KeyError, ValueError):
            raise IsrError(f"{where}: ccd not in camera {camera.name}") from None
        if raw.data.shape != tuple(camera.raw_shape):
            raise IsrError(f"{where}: raw shape {raw.data.shape}, camera {camera.name} expects {tuple(camera.raw_shape)}")
        filt = camera.filters.get(str(header.get("FILTER", "")))
        fringes = bool(filt and filt.fringe)
        for name, calib, needed in (("bias", bias, cfg.do_bias), ("dark", dark, cfg.do_dark),
                                    ("flat", flat, cfg.do_flat), ("fringe", fringe, cfg.do_fringe and fringes)):
            if needed and calib is None:
                extra = f" and filter {filt.name} fringes," if name == "fringe" else ""
                raise IsrError(f"{where}: do_{name} is true{extra} but no {name} was given")

        amps = ccd.amplifiers
        assembled = cfg.do_assemble
        shape = tuple(camera.ccd_shape) if assembled else raw.data.shape
        regions = amp_regions(amps, assembled=assembled)
        meta = fits.Header()
        for key in METADATA_KEYS:
            if key in header:
                meta[key] = (header[key], header.comments[key][:40])  # 80-character cards
        mask = np.zeros(shape, np.int32)

        saturated = detect_saturation(raw.data, amps, shape, assembled=assembled) if cfg.do_saturation else None
        unusable = find_unusable_amplifiers(raw.data, amps) if cfg.do_nan_masking else {}

        work = raw.data
        if cfg.do_overscan:
            if assembled:
                # subtract while assembling: no raw-layout copy (a 36 MB array per HSC CCD)
                models = overscan_models(raw.data, amps, **cfg.overscan_options())
            else:
                work, models = overscan_correct(raw.data, amps, **cfg.overscan_options())
            for amp, model in zip(amps, models):
                level = float(np.median(model))
                if np.isfinite(level):
                    meta[f"OSLVL_{amp.name}"[:8]] = (round(level, 3), f"amp {amp.name} overscan level [ADU]")
        meta["ISROSCAN"] = (cfg.overscan_fit if cfg.do_overscan else "none", "overscan model subtracted")
        if assembled and cfg.do_overscan:
            image = assemble_overscan_corrected(raw.data, amps, shape, models)
        elif assembled:
            image = assemble(work, amps, shape)
        else:
            image = work.astype(np.float32, copy=work is raw.data)
        meta["ISRASSEM"] = (assembled, "amplifiers trimmed and assembled")
        for amp, region in zip(amps, regions):
            if amp.name in unusable:
                image[region] = np.nan  # masked NO_DATA|BAD with the other non-finite pixels below
        if unusable:
            meta["NODATAMP"] = (",".join(unusable), "amplifiers without signal, masked NO_DATA")

        n_sat = mask_saturation(mask, saturated, grow=cfg.saturated_grow, bleed_grow=cfg.saturated_bleed_grow) \
            if cfg.do_saturation else 0
        meta["ISRSAT"] = (cfg.do_saturation, "saturated pixels masked SAT")
        meta["NSATPIX"] = (n_sat, "pixels masked SAT (grown)")
        if cfg.do_defect:
            mask_defects(mask, ccd.defects)
        meta["ISRDEFCT"] = (cfg.do_defect, "camera defects masked BAD")

        calib_var = cfg.do_variance and cfg.use_calib_variance
        if cfg.do_bias:
            _check_calib("bias", bias, shape, where)
            subtract_bias(image, bias)
            propagate_calib_mask(mask, bias)
        meta["ISRBIAS"] = (cfg.do_bias, "master bias subtracted")

        if cfg.do_gain:
            apply_gain(image, regions, [a.gain for a in amps])
        meta["ISRGAIN"] = (cfg.do_gain, "converted to electrons with the amp gains")
        meta["BUNIT"] = ("electron" if cfg.do_gain else "adu", "image unit")

        if cfg.do_variance:
            variance = make_variance(image, regions, amps, electrons=cfg.do_gain)
            if cfg.do_bias and calib_var and bias.variance is not None:
                # bias variance is in ADU^2; convert with each amp's gain
                for sl, amp in zip(regions, amps):
                    g2 = np.float32(amp.gain**2 if cfg.do_gain else 1.0)
                    variance[sl] += bias.variance[sl] * g2
        else:
            variance = np.zeros(shape, np.float32)
        meta["ISRVAR"] = (cfg.do_variance, "variance plane computed")
        cvar = variance if calib_var else None

        if cfg.do_dark:
            _check_calib("dark", dark, shape, where)
            darktime = float(header.get("DARKTIME", header.get("EXPTIME", 0.0)))
            subtract_dark(image, cvar if dark.variance is not None else None, dark, darktime)
            propagate_calib_mask(mask, dark)
        meta["ISRDARK"] = (cfg.do_dark, "master dark subtracted (scaled by DARKTIME)")

        if cfg.do_flat:
            _check_calib("flat", flat, shape, where)
            divide_flat(image, variance if cfg.do_variance else None,
                        flat if calib_var else Exposure(flat.image, flat.mask, None))
            propagate_calib_mask(mask, flat)
        meta["ISRFLAT"] = (cfg.do_flat, "divided by the master flat")

        amplitude = None
        if cfg.do_fringe and fringes:
            _check_calib("fringe", fringe, shape, where)
            propagate_calib_mask(mask, fringe)
            rng = np.random.default_rng([cfg.fringe_seed, abs(int(raw.visit)), abs(int(ccd_id))])
            try:
                fit = fit_fringe_amplitude(image, mask, fringe.image, num_points=cfg.fringe_num_points,
                                           box_half=cfg.fringe_box_half, clip_sigma=cfg.fringe_clip_sigma,
                                           iterations=cfg.fringe_iterations, background=cfg.fringe_background, rng=rng,
                                           template_variance=fringe.variance)
            except ValueError as err:
                raise IsrError(f"{where}: {err}") from None
            amplitude = fit.amplitude
            subtract_fringe(image, cvar, fringe, amplitude)
            meta["FRNGAMP"] = (round(fit.amplitude, 4), "fringe amplitude (template per unit sky)")
            meta["FRNGAERR"] = (round(fit.amplitude_err, 4), "1-sigma error of FRNGAMP")
            meta["FRNGNPT"] = (fit.n_used, "positions used in the fringe fit")
        meta["ISRFRNG"] = (amplitude is not None, "fringe template fitted and subtracted")

        n_nodata = 0
        if cfg.do_nan_masking:
            n_nodata = mask_nonfinite(image, variance, mask)
            if n_nodata:
                nodata = mask_bit("NO_DATA")
                usable = [not np.all(mask[sl] & nodata) for sl in regions]
                if not any(usable):
                    why = "; ".join(f"amplifier {a.name}: {unusable.get(a.name, 'NaN/inf everywhere after calibration')}"
                                    for a in amps)
                    raise IsrError(f"{where}: no usable pixel ({why}); the CCD cannot be processed")
        meta["ISRNAN"] = (cfg.do_nan_masking, "NaN/inf pixels masked NO_DATA|BAD")
        meta["NNODATA"] = (n_nodata, "pixels masked NO_DATA")

        n_interp = 0
        if cfg.do_interpolate:
            target = mask_bit("BAD") | (mask_bit("SAT") if cfg.do_saturation_interpolation else 0)
            n_interp = interpolate_over_masked(image, mask, target_bits=target, planes=(variance,) if cfg.do_variance else ())
        meta["ISRINTRP"] = (cfg.do_interpolate, "BAD (and SAT) interpolated across columns")
        meta["NINTRPIX"] = (n_interp, "pixels interpolated (INTRP)")

        mask_edge(mask, cfg.edge_width)
        meta["ISREDGE"] = (cfg.edge_width, "border masked EDGE [pixel]")

        exposure = Exposure(image=image, mask=mask, variance=variance, wcs=_wcs_from_header(header, shape),
                            metadata=meta)
        return IsrResult(exposure=exposure, fringe_amplitude=amplitude, unusable_amplifiers=unusable)
