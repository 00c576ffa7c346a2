"""Source measurement: centroids, PSF, aperture, calibration-aperture and Kron fluxes, shapes, flags.

Every quantity is computed for all sources at once (stacks of stamps, one sep call per
quantity); Python loops over sources remain only for the adaptive moments (GalSim HSM, in C),
the joint PSF fits of deblended blends and the neighbour replacement in the calibration
aperture (about one neighbour per bright source). Conventions:

- Pixel positions zero-based, pixel centres on integers; fluxes in image units (electrons),
  with 1-sigma errors from the variance plane.
- Pixels with ``config.bad_mask_planes`` (default BAD, SAT, NO_DATA) or non-finite values carry no
  weight in fits; in circular apertures sep replaces them by the mean of the aperture's other
  pixels, and the ``ap_<r>_flag`` columns say so.
- Neighbours: with a segmentation image (from :func:`snakedrp.meas.detect.detect_sources`), pixels
  of other sources are excluded from a source's PSF fit, centroid error and adaptive moments;
  children of one deblended parent whose PSF-fit boxes overlap are fitted simultaneously, each
  with its own PSF model; in the calibration aperture of sources above ``calib_replace_snr_min``,
  other sources' footprint pixels are replaced by the source's own PSF model
  (:func:`_neighbour_correction`). The fixed-radius apertures keep their neighbours.
- PSF fluxes are unweighted least-squares amplitudes of the unit-flux PSF model (normalised over the
  whole kernel), as LSST's PsfFlux: per-pixel variance weights would bias bright stars low.
- The calibration aperture has radius ``calib_aperture_fwhm`` x the local PSF FWHM (default 4; the
  Gaussian-equivalent FWHM of :meth:`PsfModel.fwhm`, which for the simulator's Moffat is ~1.1 x its
  true FWHM). The simulated PSF (a Moffat truncated at 4 FWHM) carries no flux beyond that, so this
  aperture is the total flux of a star, and the aperture correction maps PSF fluxes onto it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sep
from astropy.table import Table

from snakedrp.meas.detect import unusable_pixels
from snakedrp.repo.exposure import MASK_PLANES, mask_bits
from snakedrp.pexconfig import Config, option
from snakedrp.meas.columns import xy_columns
from snakedrp.repo.psf_model import PsfModel
from snakedrp.stamps import kernel_moments, shift_stack

#: Pixel-flag columns and the mask planes that set them by default (LSST base_PixelFlags names).
DEFAULT_PIXEL_FLAGS: dict[str, list[str]] = {
    "edge": ["EDGE", "NO_DATA"],
    "interpolated": ["INTRP"],
    "saturated": ["SAT"],
    "cr": ["CR"],
    "bad": ["BAD"],
    "suspect": ["SUSPECT"],
}


@dataclass
class MeasureConfig(Config):
    """Source measurement: centroids, PSF/aperture/Kron fluxes, adaptive moments, pixel flags."""

    aperture_radii: list[float] = option([3.0, 4.5, 6.0, 9.0, 12.0], "Circular aperture radii [pixel]; each costs ~(r / 12)^2 x 0.06 s per 5000 sources (the calibration aperture, ~4 FWHM, is extra)")
    calib_aperture_fwhm: float = option(4.0, "Calibration aperture radius in units of the local PSF FWHM (the simulated PSF has no flux beyond 4 FWHM)", min=0.5, max=20.0)
    psf_fit_radius: float = option(3.0, "Half-side of the PSF-fit box in PSF sigmas (the box also gives centroid errors)", min=1.0, max=10.0)
    psf_evaluation: str = option("auto", "PSF models: 'grid' = kernels on a grid over the CCD, bilinearly interpolated and Lanczos-3 shifted (vectorised, what PsfModel.draw does by default); 'draw' = psf.draw per source; 'auto' = 'draw' for models that override draw, else 'grid'", choices=("auto", "grid", "draw"))
    psf_grid_spacing: float = option(512.0, "Spacing of the grid on which the PSF kernel is evaluated for 'grid' [pixel]", min=16.0)
    calib_replace_neighbours: bool = option(True, "In the calibration aperture, replace other sources' footprint pixels by the source's PSF model (needs a segmentation)?")
    calib_replace_snr_min: float = option(20.0, "... only for sources above this PSF-flux S/N (fainter ones are noise-limited)", min=0.0)
    joint_blend_fit: bool = option(True, "Fit deblended children of one parent with overlapping fit boxes simultaneously?")
    max_centroid_shift: float = option(2.0, "Keep the input position if the windowed centroid moves farther than this many PSF sigmas", min=0.1)
    kron_factor: float = option(2.5, "Kron aperture = this x the Kron radius (SExtractor PHOT_AUTOPARAMS k)", min=0.5)
    kron_radius_limit: float = option(6.0, "Integrate the first moment for the Kron radius out to this many isophotal radii", min=1.0)
    kron_min_radius: float = option(3.5, "Kron apertures smaller than this radius are replaced by a circle of it [pixel]", min=0.5)
    shape_snr_min: float = option(20.0, "Adaptive moments only for sources above this PSF-flux S/N (HSM costs up to 0.5 ms on noise)", min=0.0)
    shape_stamp_size: int = option(25, "Side of the stamps for adaptive moments [pixel, odd]", min=9, max=201)
    shape_max_iterations: int = option(100, "Maximum HSM adaptive-moment iterations", min=5)
    bad_mask_planes: list[str] = option(["BAD", "SAT", "NO_DATA"], "Mask planes whose pixels carry no weight in fits and sums")
    pixel_flags: dict[str, list[str]] = option(DEFAULT_PIXEL_FLAGS, "flag_<name> (and flag_<name>_center) set by these mask planes in the footprint (the 3x3 centre box)")

    def validate(self) -> None:
        super().validate()
        planes = list(self.bad_mask_planes) + [p for v in self.pixel_flags.values() for p in v]
        unknown = sorted({p for p in planes if p not in MASK_PLANES})
        if unknown:
            raise ValueError(f"measure: unknown mask plane(s) {unknown}; known: {list(MASK_PLANES)}")
        if not self.aperture_radii or min(self.aperture_radii) <= 0:
            raise ValueError("measure.aperture_radii must be a non-empty list of positive radii")
        if self.shape_stamp_size % 2 == 0:
            raise ValueError("measure.shape_stamp_size must be odd")


def aperture_name(radius: float) -> str:
    """Column stem of an aperture: 4.5 -> ``ap_4_5`` (LSST's CircularApertureFlux_4_5)."""
    whole, frac = f"{float(radius):.1f}".split(".")
    return f"ap_{whole}_{frac}"


def _gather(array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int, fill) -> np.ndarray:
    """Stack of ``(2 half + 1)``-sided cutouts centred on integer pixels; ``fill`` off the image."""
    ny, nx = array.shape
    off = np.arange(-half, half + 1)
    yy = iy[:, None] + off
    xx = ix[:, None] + off
    out = array[np.clip(yy, 0, ny - 1)[:, :, None], np.clip(xx, 0, nx - 1)[:, None, :]]
    outside = ((yy < 0) | (yy >= ny))[:, :, None] | ((xx < 0) | (xx >= nx))[:, None, :]
    if outside.any():
        out = np.where(outside, fill, out)
    return out


class _PsfGrid:
    """The PSF kernel on a regular grid of CCD positions, for vectorised models and widths."""

    def __init__(self, psf: PsfModel, shape: tuple[int, int], spacing: float):
        ny, nx = shape
        self.gx = np.linspace(0.0, nx - 1.0, max(2, int(math.ceil((nx - 1) / spacing)) + 1))
        self.gy = np.linspace(0.0, ny - 1.0, max(2, int(math.ceil((ny - 1) / spacing)) + 1))
        kernels = np.array([[psf.kernel(x, y) for x in self.gx] for y in self.gy], float)
        self.kernels = kernels                                   # (n_gy, n_gx, n, n)
        sig = np.array([[kernel_moments(k)[0] for k in row] for row in kernels])
        if not np.isfinite(sig).all():
            fallback = np.nanmedian(sig) if np.isfinite(sig).any() else 2.0
            sig = np.where(np.isfinite(sig), sig, fallback)
        self.sigma_nodes = sig

    def _bilinear(self, x, y):
        fx = np.interp(x, self.gx, np.arange(len(self.gx)))
        fy = np.interp(y, self.gy, np.arange(len(self.gy)))
        i0 = np.clip(np.floor(fx).astype(int), 0, len(self.gx) - 2)
        j0 = np.clip(np.floor(fy).astype(int), 0, len(self.gy) - 2)
        tx, ty = fx - i0, fy - j0
        corners = [(j0, i0, (1 - ty) * (1 - tx)), (j0, i0 + 1, (1 - ty) * tx),
                   (j0 + 1, i0, ty * (1 - tx)), (j0 + 1, i0 + 1, ty * tx)]
        return corners

    def sigma(self, x, y) -> np.ndarray:
        """Adaptive-moment sigma of the PSF at ``(x, y)`` [pixel]."""
        return sum(w * self.sigma_nodes[j, i] for j, i, w in self._bilinear(x, y))

    def models(self, xc, yc, ix, iy, half: int) -> np.ndarray:
        """Unit-flux PSF images of sources at ``(xc, yc)`` on the boxes ``[iy +- half, ix +- half]``: (N, s, s)."""
        n = self.kernels.shape[-1]
        size = 2 * half + 1
        big = size + 6                                           # Lanczos-3 support on both sides
        pad = max(0, (big - n + 1) // 2)
        kernels = np.pad(self.kernels, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else self.kernels
        c = kernels.shape[-1] // 2
        sub = kernels[:, :, c - half - 3: c + half + 4, c - half - 3: c + half + 4]
        stack = sum(w[:, None, None] * sub[j, i] for j, i, w in self._bilinear(xc, yc))
        shifted = shift_stack(stack, xc - ix, yc - iy)
        return shifted[:, 3:-3, 3:-3]


def _place_centred(stamps: np.ndarray, half: int) -> np.ndarray:
    """Centred stamps (N, n, n) cut or zero-padded to (N, 2 half + 1, 2 half + 1) about their centre."""
    n = stamps.shape[-1]
    c = n // 2
    if n >= 2 * half + 1:
        return stamps[:, c - half: c + half + 1, c - half: c + half + 1]
    p = half - c
    return np.pad(stamps, ((0, 0), (p, p), (p, p)))


def _draw_models(psf: PsfModel, xc, yc, ix, iy, half: int) -> np.ndarray:
    """:meth:`PsfModel.draw` per source, placed on the boxes ``[iy +- half, ix +- half]``.

    The two models of this package that override ``draw`` are drawn in bulk with the same
    arithmetic (a per-source Python loop costs ~0.1 ms a source): :class:`GaussianPsf` (its
    pixel-integrated Gaussian) and :class:`PixelPsf` (its Lanczos-``resample_order`` shift of the
    kernel, cropped to the box plus the Lanczos support before shifting).
    """
    from snakedrp.repo.psf_model import GaussianPsf, PixelPsf

    size = 2 * half + 1
    n_src = len(xc)
    xc, yc = np.asarray(xc, float), np.asarray(yc, float)
    if type(psf) is GaussianPsf and n_src:
        from scipy.special import erf

        r = np.arange(psf.size) - psf.size // 2
        s = psf.sigma * np.sqrt(2.0)
        dx = (xc - np.floor(xc + 0.5))[:, None]
        dy = (yc - np.floor(yc + 0.5))[:, None]
        ex = 0.5 * (erf((r - dx + 0.5) / s) - erf((r - dx - 0.5) / s))
        ey = 0.5 * (erf((r - dy + 0.5) / s) - erf((r - dy - 0.5) / s))
        k = ey[:, :, None] * ex[:, None, :]
        k /= k.sum(axis=(1, 2), keepdims=True)
        return _place_centred(k, half)
    if type(psf) is PixelPsf and n_src:
        order = psf.resample_order
        kernels = psf.kernels(xc, yc)
        # box pixels see taps up to `order` pixels away: crop the kernel to the box plus that
        # margin before shifting (draw shifts the whole kernel, zero beyond it, then cuts the box)
        m = min(half + order, psf.size // 2)
        dx = xc - np.floor(xc + 0.5)
        dy = yc - np.floor(yc + 0.5)
        shifted = shift_stack(_place_centred(kernels, m), dx, dy, order=order)
        return np.ascontiguousarray(_place_centred(shifted, half))
    out = np.zeros((n_src, size, size))
    for k in range(len(xc)):
        stamp, x0, y0 = psf.draw(float(xc[k]), float(yc[k]))
        bx, by = ix[k] - half, iy[k] - half
        sy0, sx0 = max(by, y0), max(bx, x0)
        sy1, sx1 = min(by + size, y0 + stamp.shape[0]), min(bx + size, x0 + stamp.shape[1])
        if sy1 > sy0 and sx1 > sx0:
            out[k, sy0 - by: sy1 - by, sx0 - bx: sx1 - bx] = stamp[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0]
    return out


# ---------------------------------------------------------------- PSF fluxes
def _psf_fit(data, var, good, model):
    """Unweighted linear least-squares amplitude of ``model`` (N, s, s) over ``good`` pixels.

    Unweighted (as LSST's PsfFlux): variance-plane weights include the source's own photon noise,
    which correlates with the data and biases bright fluxes low.
    """
    pm = model * good
    norm = (pm * model).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = (pm * data).sum(axis=(1, 2)) / norm
        err = np.sqrt((pm**2 * var).sum(axis=(1, 2))) / norm
        resid = (data - flux[:, None, None] * model) ** 2 / np.where(var > 0, var, np.inf)
        chi2 = (resid * good).sum(axis=(1, 2)) / np.maximum(good.sum(axis=(1, 2)) - 1, 1)
    return flux, err, chi2, norm


def _joint_fits(groups, data, var, bad_img, seg, ids, models, ix, iy, half):
    """Simultaneous PSF amplitudes of each group of blended children: {row: (flux, err)}."""
    ny, nx = data.shape
    size = 2 * half + 1
    out = {}
    for rows in groups:
        x0 = max(int(ix[rows].min()) - half, 0)
        y0 = max(int(iy[rows].min()) - half, 0)
        x1 = min(int(ix[rows].max()) + half + 1, nx)
        y1 = min(int(iy[rows].max()) + half + 1, ny)
        d = data[y0:y1, x0:x1].astype(float)
        v = var[y0:y1, x0:x1].astype(float)
        s = seg[y0:y1, x0:x1]
        good = ~bad_img[y0:y1, x0:x1] & ((s == 0) | np.isin(s, ids[rows]))
        m = np.zeros((len(rows), y1 - y0, x1 - x0))
        for k, r in enumerate(rows):
            bx, by = ix[r] - half, iy[r] - half
            sy0, sx0 = max(by, y0), max(bx, x0)
            sy1, sx1 = min(by + size, y1), min(bx + size, x1)
            m[k, sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = models[r, sy0 - by: sy1 - by, sx0 - bx: sx1 - bx]
        mg = m[:, good]
        a = mg @ mg.T
        try:
            ainv = np.linalg.inv(a)
        except np.linalg.LinAlgError:
            continue
        flux = ainv @ (mg @ d[good])
        cov = ainv @ ((mg * v[good]) @ mg.T) @ ainv
        for k, r in enumerate(rows):
            out[int(r)] = (float(flux[k]), float(np.sqrt(max(cov[k, k], 0.0))))
    return out


def _blend_groups(parent, ix, iy, half) -> list[np.ndarray]:
    """Rows of children of one parent whose fit boxes overlap, linked transitively (>= 2 rows each)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    rows = np.nonzero(parent > 0)[0]
    if len(rows) < 2:
        return []
    pts = np.column_stack([ix[rows], iy[rows]]).astype(float)
    pairs = cKDTree(pts).query_pairs(2 * half + 1, p=np.inf, output_type="ndarray")
    if len(pairs) == 0:
        return []
    pairs = pairs[parent[rows[pairs[:, 0]]] == parent[rows[pairs[:, 1]]]]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(rows), len(rows)))
    n_comp, labels = connected_components(graph, directed=False)
    counts = np.bincount(labels, minlength=n_comp)
    order = np.argsort(labels, kind="stable")
    splits = np.split(order, np.cumsum(counts)[:-1])
    return [rows[s] for s in splits if len(s) > 1]


# ---------------------------------------------------------------- adaptive moments
def _guess_sigma(sigma, detections):
    """First-guess size for the moments: the PSF sigma, or the isophotal size if larger [pixel]."""
    if all(c in detections.colnames for c in ("a", "b")):
        ab = np.sqrt(np.abs(np.asarray(detections["a"], float) * np.asarray(detections["b"], float)))
        return np.where(np.isfinite(ab), np.maximum(sigma, ab), sigma)
    return sigma


def _adaptive_moments(data, bad, seg, ids, xc, yc, ix, iy, guess, rows, config):
    """GalSim HSM adaptive moments of the sources ``rows``, masked and neighbour pixels excluded.

    Returns an array (6, N): sigma, e1, e2, xx, yy, xy; NaN where not measured or failed.
    """
    import galsim

    out = np.full((6, len(xc)), np.nan)
    if len(rows) == 0:
        return out
    half = config.shape_stamp_size // 2
    params = galsim.hsm.HSMParams(max_mom2_iter=config.shape_max_iterations)
    stamps = _gather(data, ix[rows], iy[rows], half, np.float32(0.0)).astype(np.float64)
    masked = _gather(bad, ix[rows], iy[rows], half, True)
    if seg is not None:
        segs = _gather(seg, ix[rows], iy[rows], half, -1)
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


# ---------------------------------------------------------------- the task
def measure_sources(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, detections: Table,
                    psf: PsfModel, config: MeasureConfig | None = None, *, wcs=None,
                    segmentation: np.ndarray | None = None, footprints: Table | None = None,
                    bad: np.ndarray | None = None, minimal: bool = False) -> Table:
    """Measure every detected source.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted image [electrons].
    variance : ndarray, shape (ny, nx)
        Per-pixel variance [electrons^2].
    mask : ndarray of int, shape (ny, nx)
        LSST bit mask (:data:`snakedrp.repo.exposure.MASK_PLANES`).
    detections : Table
        ``x, y`` (or ``x_centroid, y_centroid``) zero-based starting positions; optional ``id``
        (must equal the segmentation values when ``segmentation`` is given), ``parent``,
        ``blend_nchild``, ``is_blended`` (carried over) and ``a, b, theta`` (isophotal ellipse for
        the Kron aperture; the PSF's circle otherwise).
    psf : PsfModel
        PSF model of the image (:class:`snakedrp.repo.psf_model.GaussianPsf` before one is built).
    config : MeasureConfig
    wcs : astropy.wcs.WCS, optional
        When given, ``coord_ra``/``coord_dec`` are filled (NaN otherwise).
    segmentation : ndarray of int, shape (ny, nx), optional
        Footprints (value = source id); enables neighbour masking and joint blend fits.
    footprints : Table, optional
        ``id, x_min, x_max, y_min, y_max`` (inclusive box) of every footprint in ``segmentation``,
        e.g. :attr:`DetectionResult.sources <snakedrp.meas.detect.DetectionResult>`; saves finding the
        boxes in the segmentation (a pass over the image).
    bad : ndarray of bool, shape (ny, nx), optional
        The unusable pixels, as :func:`snakedrp.meas.detect.unusable_pixels` gives them for
        ``config.bad_mask_planes``; computed when not given. Pass it to measure one image twice.
    minimal : bool
        Measure only centroids, PSF fluxes and pixel flags (what PSF-star selection needs, e.g.
        the first pass of characterization); the aperture, calibration-aperture, Kron and
        adaptive-moment columns are present but NaN (their flags True). Those columns are most
        of the cost.

    Returns
    -------
    Table
        One row per detection, in order; every column has a unit and a description. Columns:
        ``id, parent, blend_nchild, is_blended, x_centroid, y_centroid, x_centroid_err,
        y_centroid_err, centroid_flag, coord_ra, coord_dec, psf_flux, psf_flux_err, psf_flux_flag,
        psf_snr, psf_chi2, ap_<r>_flux, ap_<r>_flux_err, ap_<r>_flag`` (each radius),
        ``calib_flux, calib_flux_err, calib_radius, calib_flag, kron_radius, kron_flux,
        kron_flux_err, kron_flag, shape_xx, shape_yy, shape_xy, shape_e1, shape_e2, shape_sigma,
        shape_flag, psf_sigma`` and ``flag_<name>``, ``flag_<name>_center`` for each pixel flag.
    """
    config = config or MeasureConfig()
    data = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(variance, dtype=np.float32)
    mask = np.asarray(mask)
    ny, nx = data.shape
    n = len(detections)
    x0, y0 = xy_columns(detections, order=(("x_centroid", "y_centroid"), ("x", "y")))
    ids = (np.asarray(detections["id"], np.int64) if "id" in detections.colnames
           else np.arange(1, n + 1, dtype=np.int64))
    parent = (np.asarray(detections["parent"], np.int64) if "parent" in detections.colnames
              else np.zeros(n, np.int64))
    if bad is None:
        bad = unusable_pixels(data, var, mask, config.bad_mask_planes)
    # masked pixels are not copied out of the image: sep ignores the values of masked pixels, and
    # the stamps below (and the neighbour sums) zero them, as a zeroed copy of the image would
    seg = None if segmentation is None else np.ascontiguousarray(segmentation, dtype=np.int32)

    grid = _PsfGrid(psf, (ny, nx), config.psf_grid_spacing)
    finite0 = np.isfinite(x0) & np.isfinite(y0)
    x0c, y0c = np.where(finite0, x0, 0.0), np.where(finite0, y0, 0.0)
    sigma = grid.sigma(x0c, y0c)
    fwhm = 2.3548 * sigma

    # ---- centroids: windowed (XWIN), Gaussian weight of the local PSF sigma
    if n:
        xw, yw, wflag = sep.winpos(data, x0c, y0c, sigma, mask=bad, subpix=1)
    else:
        xw, yw, wflag = x0c.copy(), y0c.copy(), np.zeros(0, int)
    ok = finite0 & (wflag == 0) & np.isfinite(xw) & np.isfinite(yw)
    ok &= np.hypot(xw - x0c, yw - y0c) < config.max_centroid_shift * sigma
    ok &= (xw > -0.5) & (xw < nx - 0.5) & (yw > -0.5) & (yw < ny - 0.5)
    if seg is not None:
        jx = np.clip(np.floor(np.nan_to_num(xw) + 0.5).astype(int), 0, nx - 1)
        jy = np.clip(np.floor(np.nan_to_num(yw) + 0.5).astype(int), 0, ny - 1)
        ok &= (seg[jy, jx] == ids) | (seg[jy, jx] == 0)
    xc = np.where(ok, xw, x0c)
    yc = np.where(ok, yw, y0c)
    centroid_flag = ~ok
    ix = np.floor(xc + 0.5).astype(int)
    iy = np.floor(yc + 0.5).astype(int)

    # ---- stamps on the PSF-fit box
    half = max(2, int(math.ceil(config.psf_fit_radius * float(np.median(sigma))))) if n else 2
    d_st = _gather(data, ix, iy, half, np.float32(0.0)).astype(float)
    v_st = _gather(var, ix, iy, half, np.float32(0.0)).astype(float)
    bad_st = _gather(bad, ix, iy, half, True)
    d_st[bad_st] = 0.0
    v_st[bad_st] = 0.0
    if seg is not None:
        s_st = _gather(seg, ix, iy, half, -1)
        other = (s_st != 0) & (s_st != ids[:, None, None])
    else:
        other = np.zeros(bad_st.shape, bool)
    good = ~bad_st & ~other
    evaluation = config.psf_evaluation
    if evaluation == "auto":
        # a model with its own draw (GaussianPsf renders exact sub-pixel positions) is drawn per source;
        # for the rest, draw is the Lanczos-3 shift of the kernel, which the grid reproduces in bulk
        evaluation = "grid" if type(psf).draw is PsfModel.draw else "draw"
    if evaluation == "grid":
        models = grid.models(xc, yc, ix, iy, half)
    else:
        models = _draw_models(psf, xc, yc, ix, iy, half)

    psf_flux, psf_flux_err, psf_chi2, norm = _psf_fit(d_st, v_st, good, models)
    full_norm = (models**2).sum(axis=(1, 2))
    psf_flux_flag = ~np.isfinite(psf_flux) | (norm < 0.5 * full_norm) | centroid_flag
    if seg is not None and config.joint_blend_fit:
        groups = _blend_groups(parent, ix, iy, half)
        for r, (f, e) in _joint_fits(groups, data, var, bad, seg, ids, models, ix, iy, half).items():
            psf_flux[r], psf_flux_err[r] = f, e

    # ---- centroid errors from the linearised windowed-centroid condition (pixels of the fit box)
    off = np.arange(-half, half + 1, dtype=float)
    dxs = off[None, None, :] - (xc - ix)[:, None, None]
    dys = off[None, :, None] - (yc - iy)[:, None, None]
    s2 = (sigma**2)[:, None, None]
    w = np.exp(-0.5 * (dxs**2 + dys**2) / s2) * good
    wd = (w * d_st).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        den_x = (w * d_st * (1 - dxs**2 / s2)).sum(axis=(1, 2))
        den_y = (w * d_st * (1 - dys**2 / s2)).sum(axis=(1, 2))
        den_x = np.where(den_x > 0.2 * wd, den_x, 0.5 * wd)
        den_y = np.where(den_y > 0.2 * wd, den_y, 0.5 * wd)
        x_err = np.sqrt((w**2 * dxs**2 * v_st).sum(axis=(1, 2))) / den_x
        y_err = np.sqrt((w**2 * dys**2 * v_st).sum(axis=(1, 2))) / den_y
    bad_err = ~(wd > 0)
    x_err[bad_err] = np.nan
    y_err[bad_err] = np.nan

    # ---- aperture and calibration-aperture fluxes
    radii = [float(r) for r in config.aperture_radii]
    calib_radius = config.calib_aperture_fwhm * fwhm
    if minimal:
        ap_flux = np.full((n, len(radii) + 1), np.nan)
        ap_err = np.full((n, len(radii) + 1), np.nan)
        ap_flag = np.ones((n, len(radii) + 1), bool)
    else:
        ap_flux, ap_err, ap_flag = _aperture_fluxes(data, var, bad, xc, yc, radii + [calib_radius])
    if seg is not None and config.calib_replace_neighbours and not minimal:
        with np.errstate(invalid="ignore", divide="ignore"):
            rows = np.nonzero(np.nan_to_num(psf_flux / psf_flux_err) >= config.calib_replace_snr_min)[0]
        ap_flux[rows, -1] += _neighbour_correction(data, bad, seg, ids[rows], xc[rows], yc[rows], calib_radius[rows],
                                                   np.nan_to_num(psf_flux[rows]), grid, footprints=footprints)
    ap = {"flux": ap_flux, "err": ap_err, "flag": ap_flag}

    # ---- Kron
    if minimal:
        kron = {"radius": np.full(n, np.nan), "flux": np.full(n, np.nan), "err": np.full(n, np.nan),
                "flag": np.ones(n, bool)}
    else:
        kron = _kron(data, var, bad, seg, ids, xc, yc, sigma, detections, config)

    # ---- adaptive moments
    with np.errstate(invalid="ignore", divide="ignore"):
        psf_snr = psf_flux / psf_flux_err
    shape_rows = np.nonzero(np.nan_to_num(psf_snr) >= config.shape_snr_min)[0] if not minimal else np.zeros(0, int)
    shapes = _adaptive_moments(data, bad, seg, ids, xc, yc, ix, iy, _guess_sigma(sigma, detections),
                               shape_rows, config)
    shape_flag = ~np.isfinite(shapes[0])

    # ---- pixel flags
    flags = _pixel_flags(mask, seg, ids, ix, iy, half, config, footprints)

    # ---- sky coordinates
    ra = np.full(n, np.nan)
    dec = np.full(n, np.nan)
    if wcs is not None and n:
        ra, dec = (np.asarray(v, float) for v in wcs.pixel_to_world_values(xc, yc))

    # ---- the table
    t = Table()

    def col(name, values, unit, description):
        t[name] = values
        t[name].unit = unit
        t[name].description = description

    col("id", ids, "", "Source id (the segmentation value of its footprint)")
    col("parent", parent, "", "Id of the deblended parent footprint (0: not blended); parents are not rows")
    col("blend_nchild", np.asarray(detections["blend_nchild"], np.int32) if "blend_nchild" in detections.colnames
        else np.ones(n, np.int32), "", "Number of sources the parent footprint was split into (1: not blended)")
    col("is_blended", np.asarray(detections["is_blended"], bool) if "is_blended" in detections.colnames
        else parent > 0, "", "Deblended child of a larger footprint")
    col("x_centroid", xc, "pix", "Windowed centroid x (column), zero-based, Gaussian window of the PSF sigma")
    col("y_centroid", yc, "pix", "Windowed centroid y (row), zero-based, Gaussian window of the PSF sigma")
    col("x_centroid_err", x_err, "pix", "1-sigma error of x_centroid")
    col("y_centroid_err", y_err, "pix", "1-sigma error of y_centroid")
    col("centroid_flag", centroid_flag, "", "Windowed centroid failed or ran away; the detection position is used")
    col("coord_ra", ra, "deg", "Right ascension of the centroid (from the WCS; NaN without one)")
    col("coord_dec", dec, "deg", "Declination of the centroid (from the WCS; NaN without one)")
    col("psf_flux", psf_flux, "electron", "PSF flux: linear least-squares amplitude of the PSF model at the centroid")
    col("psf_flux_err", psf_flux_err, "electron", "1-sigma error of psf_flux")
    col("psf_flux_flag", psf_flux_flag, "", "PSF flux unreliable: fit failed, over half the PSF weight masked, or centroid failed")
    col("psf_snr", psf_snr, "", "Signal-to-noise ratio of the PSF flux")
    col("psf_chi2", psf_chi2, "", "Reduced chi^2 of the PSF fit over its box (unresolved sources ~1)")
    col("psf_sigma", sigma, "pix", "Adaptive-moment sigma of the PSF model at the source")
    for k, r in enumerate(radii):
        stem = aperture_name(r)
        col(f"{stem}_flux", ap["flux"][:, k], "electron", f"Flux in a circular aperture of radius {r:g} pixels")
        col(f"{stem}_flux_err", ap["err"][:, k], "electron", f"1-sigma error of {stem}_flux")
        col(f"{stem}_flag", ap["flag"][:, k], "", f"Aperture of radius {r:g} leaves the image or holds masked pixels (replaced by the aperture mean)")
    col("calib_flux", ap["flux"][:, -1], "electron",
        f"Calibration-aperture flux: circle of radius {config.calib_aperture_fwhm:g} x PSF FWHM (total flux of a star)")
    col("calib_flux_err", ap["err"][:, -1], "electron", "1-sigma error of calib_flux")
    col("calib_radius", calib_radius, "pix", "Radius of the calibration aperture")
    col("calib_flag", ap["flag"][:, -1], "", "Calibration aperture leaves the image or holds masked pixels")
    col("kron_radius", kron["radius"], "pix", "Kron radius (first-moment radius, geometric mean of the ellipse axes)")
    col("kron_flux", kron["flux"], "electron", f"Flux in the Kron ellipse ({config.kron_factor:g} x Kron radius)")
    col("kron_flux_err", kron["err"], "electron", "1-sigma error of kron_flux")
    col("kron_flag", kron["flag"], "", "Kron radius or flux failed, or the ellipse holds masked pixels or leaves the image")
    col("shape_xx", shapes[3], "pix2", "Adaptive second moment <x x> (GalSim HSM), PSF not removed")
    col("shape_yy", shapes[4], "pix2", "Adaptive second moment <y y> (GalSim HSM), PSF not removed")
    col("shape_xy", shapes[5], "pix2", "Adaptive second moment <x y> (GalSim HSM), PSF not removed")
    col("shape_e1", shapes[1], "", "Distortion (xx - yy) / (xx + yy) of the adaptive moments")
    col("shape_e2", shapes[2], "", "Distortion 2 xy / (xx + yy) of the adaptive moments")
    col("shape_sigma", shapes[0], "pix", "Adaptive-moment size det(M)**(1/4)")
    col("shape_flag", shape_flag, "", "Adaptive moments not measured (S/N below shape_snr_min) or failed")
    for name, (foot, centre) in flags.items():
        planes = "/".join(config.pixel_flags[name])
        col(f"flag_{name}", foot, "", f"A {planes} pixel lies in the footprint or the 3x3 centre box")
        col(f"flag_{name}_center", centre, "", f"A {planes} pixel lies in the 3x3 box around the centroid")
    return t


def _aperture_fluxes(data, var, bad, xc, yc, radii):
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


def _footprint_boxes(seg: np.ndarray, footprints: Table | None = None):
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


def _neighbour_correction(data, bad, seg, ids, xc, yc, radius, psf_flux, grid, *, footprints=None):
    """For each source, ``F_psf * sum(own model) - sum(data)`` over other sources' footprint pixels
    inside its circle of ``radius`` (pixel centres inside): adding it replaces the neighbours by the
    source's own PSF model (LSST replaces them by noise; a model keeps the aperture's total flux).

    Loops over (source, neighbour) pairs whose boxes meet: about one pair per source on an HSC CCD.
    The footprints' boxes come from :func:`_footprint_boxes`.
    """
    from scipy.spatial import cKDTree

    n = len(xc)
    corr = np.zeros(n)
    if n == 0:
        return corr
    lab, x0s, x1s, y0s, y1s = _footprint_boxes(seg, footprints)
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


def _kron(data, var, bad, seg, ids, xc, yc, sigma, detections, config):
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


def _pixel_flags(mask, seg, ids, ix, iy, half, config, footprints=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per flag: (any plane pixel in footprint or 3x3 centre box, any in the 3x3 centre box)."""
    n = len(ix)
    ny, nx = mask.shape
    mask = np.asarray(mask)
    centre = np.zeros(n, np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            jy, jx = iy + dy, ix + dx
            inside = (jy >= 0) & (jy < ny) & (jx >= 0) & (jx < nx)
            centre |= np.where(inside, mask[np.clip(jy, 0, ny - 1), np.clip(jx, 0, nx - 1)], 0)
    if seg is not None:
        # the footprints' boxes: small cut-outs instead of passes over every footprint pixel
        lab, x0s, x1s, y0s, y1s = _footprint_boxes(seg, footprints)
        rows = {int(i): k for k, i in enumerate(lab)}
        foot = centre.copy()
        for k, sid in enumerate(ids):
            r = rows.get(int(sid))
            if r is None:
                continue
            sl = (slice(y0s[r], y1s[r]), slice(x0s[r], x1s[r]))
            values = mask[sl][seg[sl] == sid]
            if values.size:
                foot[k] |= int(np.bitwise_or.reduce(values))
    else:
        box = _gather(mask, ix, iy, half, 0).astype(np.int64)
        foot = np.bitwise_or.reduce(box.reshape(n, -1), axis=1) if n else np.zeros(0, np.int64)
        foot |= centre
    off_image = (ix - half < 0) | (ix + half >= nx) | (iy - half < 0) | (iy + half >= ny)
    out = {}
    for name, planes in config.pixel_flags.items():
        bits = mask_bits(*planes)
        f, c = (foot & bits) != 0, (centre & bits) != 0
        if name == "edge":
            f = f | off_image
        out[name] = (f, c)
    return out


# ---------------------------------------------------------------- calibration helpers
def add_sky_coordinates(table: Table, wcs) -> Table:
    """Fill ``coord_ra``/``coord_dec`` [deg] from ``x_centroid``/``y_centroid`` (zero-based) and a WCS, in place."""
    ra, dec = wcs.pixel_to_world_values(np.asarray(table["x_centroid"], float), np.asarray(table["y_centroid"], float))
    table["coord_ra"] = np.asarray(ra, float)
    table["coord_dec"] = np.asarray(dec, float)
    table["coord_ra"].unit, table["coord_dec"].unit = "deg", "deg"
    table["coord_ra"].description = "Right ascension of the centroid (from the WCS)"
    table["coord_dec"].description = "Declination of the centroid (from the WCS)"
    return table


def calibrate_fluxes(table: Table, zeropoint: float, zeropoint_err: float = 0.0) -> Table:
    """A copy of ``table`` with ``<x>_mag`` and ``<x>_mag_err`` (AB) for every ``<x>_flux`` column.

    ``mag = zeropoint - 2.5 log10(flux)`` (NaN where the flux is not positive);
    ``mag_err = hypot(1.0857 flux_err / flux, zeropoint_err)``.
    """
    out = table.copy(copy_data=False)
    for name in table.colnames:
        if not name.endswith("_flux"):
            continue
        stem = name[: -len("_flux")]
        flux = np.asarray(table[name], float)
        with np.errstate(invalid="ignore", divide="ignore"):
            mag = np.where(flux > 0, zeropoint - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
        out[f"{stem}_mag"] = mag
        out[f"{stem}_mag"].unit = "mag"
        out[f"{stem}_mag"].description = f"AB magnitude from {name} (zeropoint {zeropoint:.4f})"
        if f"{name}_err" in table.colnames:
            ferr = np.asarray(table[f"{name}_err"], float)
            with np.errstate(invalid="ignore", divide="ignore"):
                merr = np.where(flux > 0, np.hypot(2.5 / np.log(10) * ferr / np.where(flux > 0, flux, 1.0),
                                                   zeropoint_err), np.nan)
            out[f"{stem}_mag_err"] = merr
            out[f"{stem}_mag_err"].unit = "mag"
            out[f"{stem}_mag_err"].description = f"1-sigma error of {stem}_mag, including the zeropoint error"
    return out
