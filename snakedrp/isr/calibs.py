"""Master calibrations (LSST constructBias / constructDark / constructFlat / constructFringe).

Each ``construct_*`` runs :class:`snakedrp.isr.isr.IsrTask` on every input frame, with the steps up
to the one being built switched on (one implementation of overscan, assembly, gain ...), then
combines the frames with a sigma-clipped mean, pixel by pixel, clipping against each input's
ISR variance (see :func:`combine_clipped`).

=========  ======================  =====================================================
master     unit                    per-frame processing before the combination
=========  ======================  =====================================================
bias       ADU                     overscan, assembly
dark       e-/s                    + bias, gain; divided by the frame's DARKTIME
flat       none, median 1          + dark; divided by the frame's median
fringe     fraction of the sky     + flat; ``(frame - sky) / sky``, sources masked
=========  ======================  =====================================================

Every master is an :class:`~snakedrp.repo.exposure.Exposure` (no WCS): ``image`` the clipped mean,
``variance`` the variance *of that mean* (per pixel, the clipped inputs' sample variance over
their number: the master's own noise, which ISR adds to the science variance), ``mask``
NO_DATA|BAD where no input pixel survived (value 0, or 1 for the flat) and BAD on the camera's
defects (their values are kept; the flat's median and the fringe's mean leave them out). Input pixels masked
SAT, BAD or NO_DATA by the per-frame ISR are left out. Metadata: OBSTYPE, CCD, FILTER,
NCOMBINE, BUNIT and the clipping parameters.

The fringe template is **per unit sky**: a frame whose sky level is ``S`` electrons shows a
fringe pattern ``S * template`` when its fringe-to-sky ratio equals that of the fringe
frames; :meth:`IsrTask.run` fits a single amplitude ``a`` (≈ ``S`` scaled by the night's
fringe strength) and subtracts ``a * template``. The template has zero mean over its
unmasked pixels.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace

import numpy as np
from astropy.io import fits
from scipy import ndimage

from snakedrp.repo.camera import Camera
from snakedrp.repo.exposure import Exposure, mask_bit, mask_bits
from snakedrp.repo.io import FitsReadError, check_fits_file
from snakedrp.isr.isr import IsrError, IsrTask
from snakedrp.isr.config import CalibsConfig, CombineConfig, FringeCombineConfig
from snakedrp.repo.raw import RawFrame

log = logging.getLogger(__name__)

#: Per-frame mask planes whose pixels are left out of the combination.
EXCLUDE_BITS = mask_bits("SAT", "BAD", "NO_DATA")
#: Rows combined at a time (bounds the memory of the clipping temporaries).
COMBINE_ROWS = 256


class CalibError(ValueError):
    """A master calibration cannot be built (too few or inconsistent inputs); names the ccd."""


@dataclass(frozen=True)
class CombineResult:
    """Sigma-clipped mean of a stack.

    Attributes
    ----------
    mean, variance : ndarray, float32, shape (ny, nx)
        Clipped mean and the variance of that mean; NaN where ``n_used`` is 0.
    n_used : ndarray, int16, shape (ny, nx)
        Inputs that survived the clipping.
    """

    mean: np.ndarray
    variance: np.ndarray
    n_used: np.ndarray


def combine_clipped(images: list[np.ndarray], variances: list[np.ndarray] | None = None, *,
                    clip_sigma: float = 3.0, clip_iterations: int = 3) -> CombineResult:
    """Pixel-by-pixel sigma-clipped mean of frames.

    Pixels farther than ``clip_sigma`` sigma from the centre are left out: first about the
    stack median, then, ``clip_iterations`` times, about the mean of the survivors. Sigma is
    each input's own noise, ``sqrt(variances[i])``, when the variances are given, else the
    standard deviation of the surviving inputs (astropy ``sigma_clip`` semantics). Hand-written
    rather than astropy's ``sigma_clip`` because that takes sigma from the scatter of the N
    values: a single outlier among N < 10 can never lie beyond 3 such sigma (at most
    ``sqrt(N - 1)``), and a MAD scale instead clips good pixels (+4 to +15 % noise in the
    master, its variance biased low, for N = 16 to 3).

    Parameters
    ----------
    images : list of ndarray, float32, shape (ny, nx)
        The frames; NaN marks pixels to leave out.
    variances : list of ndarray, float32, shape (ny, nx), optional
        Each frame's expected variance (e.g. ISR's Poisson + read-noise plane).

    Returns
    -------
    CombineResult
        ``variance`` is the sample variance (ddof 1) of the surviving pixels over their number;
        with a single surviving input it is that input's own variance when ``variances`` are
        given (a master of one frame has that frame's noise), else the median of the other
        pixels' variances.
    """
    ny, nx = images[0].shape
    mean = np.empty((ny, nx), np.float32)
    variance = np.empty((ny, nx), np.float32)
    n_used = np.empty((ny, nx), np.int16)
    k2 = np.float32(clip_sigma**2)
    for y in range(0, ny, COMBINE_ROWS):
        b = slice(y, min(y + COMBINE_ROWS, ny))
        x = np.stack([im[b] for im in images])
        valid = np.isfinite(x)
        x[~valid] = 0.0
        noise2 = np.stack([v[b] for v in variances]) if variances is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels → NaN, handled below
            center = np.nanmedian(np.where(valid, x, np.nan), axis=0)
            if noise2 is not None:
                # the median of n values is itself uncertain by ~ sqrt(pi / 2n) sigma
                scale2 = noise2 * np.float32(1.0 + np.pi / (2 * len(images)))
            else:
                scale2 = _masked_var(x, valid)
            keep = valid & ((x - center) ** 2 <= k2 * scale2)
            for _ in range(clip_iterations):
                center = _masked_mean(x, keep)
                if noise2 is None:
                    scale2 = _masked_var(x, keep)
                new_keep = valid & ((x - center) ** 2 <= k2 * (noise2 if noise2 is not None else scale2))
                if np.array_equal(new_keep, keep):
                    break
                keep = new_keep
            n = keep.sum(axis=0)
            mean[b] = _masked_mean(x, keep)
            var = _masked_var(x, keep) / np.maximum(n, 1)
        var[n < 2] = np.nan
        if noise2 is not None:
            own = n == 1
            var[own] = np.where(keep, noise2, 0).sum(axis=0)[own]
        variance[b] = var
        n_used[b] = n
    single = (n_used == 1) & ~np.isfinite(variance)
    if single.any():
        finite = np.isfinite(variance)
        variance[single] = np.median(variance[finite]) if finite.any() else np.nan
    return CombineResult(mean=mean, variance=variance, n_used=n_used)


def _masked_mean(x, keep):
    # NaN where nothing is kept
    return (np.where(keep, x, 0).sum(axis=0, dtype=np.float64) / keep.sum(axis=0)).astype(np.float32)


def _masked_var(x, keep):
    n = keep.sum(axis=0)
    m = _masked_mean(x, keep)
    d = np.where(keep, x - m, 0)
    return ((d * d).sum(axis=0, dtype=np.float64) / (n - 1)).astype(np.float32)


# ------------------------------------------------------------------ helpers
def _check_inputs(raws: list[RawFrame], kind: str, obstypes: tuple[str, ...], minimum: int, *, same_filter: bool):
    if not raws:
        raise CalibError(f"master {kind}: no input frames")
    ccds = {r.ccd for r in raws}
    if len(ccds) != 1:
        raise CalibError(f"master {kind}: inputs from several ccds {sorted(ccds)}")
    ccd = ccds.pop()
    wrong = [r.visit for r in raws if str(r.header.get("OBSTYPE", "")).lower() not in obstypes]
    if wrong:
        raise CalibError(f"master {kind} ccd {ccd}: visit(s) {wrong} are not of OBSTYPE {'/'.join(obstypes)}")
    if same_filter:
        filters = {r.filter for r in raws}
        if len(filters) != 1:
            raise CalibError(f"master {kind} ccd {ccd}: inputs in several filters {sorted(filters)}")
    if len(raws) < minimum:
        raise CalibError(f"master {kind} ccd {ccd}: {len(raws)} input frame(s), at least {minimum} needed")
    return ccd


def _frame_isr(config: CalibsConfig, **steps) -> IsrTask:
    """IsrTask with the calibs' per-frame options and the given step switches."""
    base = dict(do_assemble=True, do_bias=False, do_dark=False, do_flat=False, do_fringe=False, do_gain=False, do_variance=True,
                use_calib_variance=False, do_defect=False, do_interpolate=False, edge_width=0)
    return IsrTask(replace(config.isr, **{**base, **steps}))


def _process(raws, camera, task: IsrTask, kind: str, ccd: int, combine: CombineConfig, transform=None, **calibs):
    """Run ISR on every frame and combine them.

    ``transform(image, variance, raw)`` rescales a frame in place (excluded pixels are NaN).
    Returns the CombineResult and the frames used.
    """
    images, variances, used = [], [], []
    for raw in raws:
        try:
            exposure = task.run(raw, camera=camera, **calibs).exposure
        except IsrError as err:
            log.warning("master %s ccd %d: frame left out: %s", kind, ccd, err)
            continue
        image, variance = exposure.image, exposure.variance
        image[(exposure.mask & EXCLUDE_BITS) != 0] = np.nan
        if transform is not None:
            transform(image, variance, raw)
        images.append(image)
        if combine.clip_noise == "variance":
            variances.append(variance)
        used.append(raw)
    if len(images) < combine.min_inputs:
        raise CalibError(f"master {kind} ccd {ccd}: {len(images)} usable frame(s), at least {combine.min_inputs} needed")
    combined = combine_clipped(images, variances or None, clip_sigma=combine.clip_sigma,
                               clip_iterations=combine.clip_iterations)
    return combined, used


def _master_mask(combined: CombineResult, camera: Camera, ccd: int) -> np.ndarray:
    """NO_DATA|BAD where no input survived; BAD on the camera's defects."""
    mask = np.zeros(combined.mean.shape, np.int32)
    for box in camera.ccds[ccd].defects:
        mask[box.slices] = mask_bit("BAD")
    mask[combined.n_used == 0] = mask_bits("NO_DATA", "BAD")
    return mask


def _master(combined: CombineResult, used: list[RawFrame], mask: np.ndarray, *, kind: str, ccd: int, unit: str,
            combine: CombineConfig, fill: float, filter: str | None = None) -> Exposure:
    image, variance = combined.mean, combined.variance
    empty = combined.n_used == 0
    if empty.any():
        image[empty] = fill
        variance[empty] = 0.0
    meta = fits.Header()
    meta["OBSTYPE"] = (kind, "master calibration type")
    meta["CCD"] = (ccd, "detector id")
    meta["FILTER"] = (filter or "NONE", "filter of the inputs")
    if "CAMERA" in used[0].header:
        meta["CAMERA"] = (used[0].header["CAMERA"], "camera name")
    meta["BUNIT"] = (unit, "image unit")
    meta["NCOMBINE"] = (len(used), "input frames combined")
    visits = sorted(r.visit for r in used)
    meta["VISITMIN"] = (visits[0], "first input visit")
    meta["VISITMAX"] = (visits[-1], "last input visit")
    meta["CLIPSIG"] = (combine.clip_sigma, "sigma-clipping threshold")
    meta["CLIPITER"] = (combine.clip_iterations, "sigma-clipping iterations")
    meta["NNODATA"] = (int(empty.sum()), "pixels with no surviving input")
    return Exposure(image=image, mask=mask, variance=variance, metadata=meta)


def _median_unmasked(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    good = np.isfinite(image) if mask is None else np.isfinite(image) & (mask == 0)
    finite = image[good]
    if finite.size == 0:
        raise CalibError("no unmasked pixel to normalise")
    return float(np.median(finite))


# ------------------------------------------------------------------ the masters
def construct_bias(raws: list[RawFrame], camera: Camera, config: CalibsConfig | None = None) -> Exposure:
    """Master bias [ADU]: overscan-subtracted, assembled bias frames, sigma-clipped mean.

    Parameters
    ----------
    raws : list of RawFrame
        Bias frames (OBSTYPE bias) of one CCD.
    camera : Camera
    config : CalibsConfig, optional

    Returns
    -------
    Exposure
        ``image`` [ADU] and ``variance`` [ADU^2] of shape ``camera.ccd_shape``.
    """
    config = config or CalibsConfig()
    ccd = _check_inputs(raws, "bias", ("bias",), config.bias.min_inputs, same_filter=False)
    combined, used = _process(raws, camera, _frame_isr(config), "bias", ccd, config.bias)
    return _master(combined, used, _master_mask(combined, camera, ccd), kind="bias", ccd=ccd, unit="adu", combine=config.bias, fill=0.0)


def construct_dark(raws: list[RawFrame], camera: Camera, *, bias: Exposure | None,
                   config: CalibsConfig | None = None) -> Exposure:
    """Master dark [e-/s]: per frame ISR through bias and gain, divided by DARKTIME, clipped mean.

    Parameters
    ----------
    raws : list of RawFrame
        Dark frames (OBSTYPE dark) of one CCD, DARKTIME > 0.
    bias : Exposure or None
        Master bias [ADU]; None skips bias subtraction.

    Returns
    -------
    Exposure
        ``image`` [e-/s], ``variance`` [(e-/s)^2].
    """
    config = config or CalibsConfig()
    ccd = _check_inputs(raws, "dark", ("dark",), config.dark.min_inputs, same_filter=False)
    for raw in raws:
        if not float(raw.header.get("DARKTIME", 0.0)) > 0:
            raise CalibError(f"master dark ccd {ccd}: visit {raw.visit} has DARKTIME {raw.header.get('DARKTIME')} (must be > 0)")

    def per_second(image, variance, raw):
        t = np.float32(raw.header["DARKTIME"])
        image /= t
        variance /= t * t

    task = _frame_isr(config, do_bias=bias is not None, do_gain=True)
    combined, used = _process(raws, camera, task, "dark", ccd, config.dark, per_second, bias=bias)
    return _master(combined, used, _master_mask(combined, camera, ccd), kind="dark", ccd=ccd, unit="electron/s", combine=config.dark, fill=0.0)


def construct_flat(raws: list[RawFrame], camera: Camera, *, bias: Exposure | None, dark: Exposure | None,
                   config: CalibsConfig | None = None) -> Exposure:
    """Master flat, median 1 over its unmasked pixels, i.e. off the camera defects (docs/ARCHITECTURE.md).

    Each frame goes through ISR up to the dark (overscan, assembly, bias, gain, dark) and is
    divided by its own median; the clipped mean is divided by its median over the pixels
    that had data.

    Parameters
    ----------
    raws : list of RawFrame
        Flat-field frames (OBSTYPE flat) of one CCD and one filter.
    bias, dark : Exposure or None
        Master bias [ADU] and dark [e-/s]; None skips that step.

    Returns
    -------
    Exposure
        ``image`` (dimensionless, median 1), ``variance`` of it; FLATMED records the combined
        frame's median before the final normalisation (≈ 1).
    """
    config = config or CalibsConfig()
    ccd = _check_inputs(raws, "flat", ("flat",), config.flat.min_inputs, same_filter=True)

    def normalise(image, variance, raw):
        m = np.float32(_median_unmasked(image))
        image /= m
        variance /= m * m

    task = _frame_isr(config, do_bias=bias is not None, do_gain=True, do_dark=dark is not None)
    combined, used = _process(raws, camera, task, "flat", ccd, config.flat, normalise, bias=bias, dark=dark)
    mask = _master_mask(combined, camera, ccd)
    level = _median_unmasked(combined.mean, mask)
    mean, variance = combined.mean, combined.variance  # normalised in place
    mean /= np.float32(level)
    variance /= np.float32(level**2)
    master = _master(combined, used, mask, kind="flat", ccd=ccd, unit="", combine=config.flat, fill=1.0, filter=raws[0].filter)
    master.metadata["FLATMED"] = (round(level, 6), "median of the combined frame before normalising")
    return master


def construct_fringe(raws: list[RawFrame], camera: Camera, *, bias: Exposure | None, dark: Exposure | None,
                     flat: Exposure | None, config: CalibsConfig | None = None) -> Exposure:
    """Fringe template per unit sky, zero mean (see the module docstring).

    Each night-sky frame goes through ISR up to the flat; its sky ``S`` is the median of the
    unmasked pixels; pixels more than ``source_threshold`` robust sigma above the sky (grown by
    ``source_grow``) are left out; the frame becomes ``(frame - S) / S``. The clipped mean of
    the frames (dithered, so sources fall on different pixels) minus its mean is the template.

    Parameters
    ----------
    raws : list of RawFrame
        Night-sky frames (OBSTYPE fringe or science) of one CCD and one filter.
    bias, dark, flat : Exposure or None
        Masters; None skips that step.

    Returns
    -------
    Exposure
        ``image`` [fraction of the sky], ``variance`` of it.
    """
    config = config or CalibsConfig()
    fc = config.fringe
    ccd = _check_inputs(raws, "fringe", ("fringe", "science"), fc.min_inputs, same_filter=True)

    def per_unit_sky(image, variance, raw):
        sky = _median_unmasked(image)
        if not sky > 0:
            raise CalibError(f"master fringe ccd {ccd}: visit {raw.visit} has sky level {sky:.1f} (must be > 0)")
        image -= np.float32(sky)
        if fc.source_threshold > 0:
            finite = image[np.isfinite(image)]
            sigma = 1.4826 * np.median(np.abs(finite))
            with np.errstate(invalid="ignore"):
                sources = image > fc.source_threshold * sigma
            if fc.source_grow:
                sources = ndimage.maximum_filter(sources.view(np.uint8), size=2 * fc.source_grow + 1).astype(bool)
            image[sources] = np.nan
        image /= np.float32(sky)
        variance /= np.float32(sky * sky)

    task = _frame_isr(config, do_bias=bias is not None, do_gain=True, do_dark=dark is not None, do_flat=flat is not None)
    combined, used = _process(raws, camera, task, "fringe", ccd, fc, per_unit_sky, bias=bias, dark=dark, flat=flat)
    mask = _master_mask(combined, camera, ccd)
    good = np.isfinite(combined.mean) & (mask == 0)
    combined.mean[np.isfinite(combined.mean)] -= np.float32(np.mean(combined.mean[good], dtype=np.float64))
    master = _master(combined, used, mask, kind="fringe", ccd=ccd, unit="", combine=fc, fill=0.0, filter=raws[0].filter)
    master.metadata["FRNGUNIT"] = ("per unit sky", "template x sky level [e-] = fringe [e-]")
    return master


# ------------------------------------------------------------------ reading a master
def read_master(path, kind: str, *, ccd: int | None = None, filter: str | None = None,
                memmap: bool = False) -> Exposure:
    """Read a master calibration written by this module, checking that it is whole and the one asked for.

    Parameters
    ----------
    path : str or Path
    kind : str
        ``bias``, ``dark``, ``flat`` or ``fringe``; compared with the header's OBSTYPE.
    ccd, filter : optional
        Compared with the header's CCD and FILTER when given.
    memmap : bool
        Planes as memory maps of the file (see :meth:`Exposure.read`): for a job that only reads them.

    Raises
    ------
    CalibError
        Missing, unreadable or truncated file, or a master of another kind, CCD or filter; the
        message starts with the path.
    """
    try:
        check_fits_file(path)
        master = Exposure.read(path, memmap=memmap)
    except FitsReadError as err:
        problem = str(err).removeprefix(f"{path}: ")
        raise CalibError(f"{path}: master {kind} is unusable: {problem}") from None
    except Exception as err:  # a FITS file of another layout: missing extensions, bad cards ...
        raise CalibError(f"{path}: master {kind} is unusable: {type(err).__name__}: {err}") from None
    meta = master.metadata
    expected = {"OBSTYPE": kind, "CCD": ccd, "FILTER": filter}
    for key, value in expected.items():
        if value is not None and key in meta and str(meta[key]) != str(value):
            raise CalibError(f"{path}: master {kind} has {key} = {meta[key]!r}, expected {value!r}")
    return master
