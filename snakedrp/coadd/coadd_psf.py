"""The PSF of a warp or coadd: the weighted sum of its inputs' PSFs, warped to the coadd grid.

As LSST's CoaddPsf, the model keeps every input's PSF model and WCS. At a coadd position the
kernel is ``sum_k w_k K_k / sum_k w_k`` over the inputs ``k`` whose valid region contains the
position: each ``K_k`` is the input PSF kernel evaluated at the input position of that point and
resampled (Lanczos-3) through the local affine Jacobian of the coadd → input pixel mapping. The
weights are the assembly weights (one per warp), the valid regions the CCDs' footprints on the
coadd grid, so the model needs no image and can be evaluated anywhere.

On disk: one binary-table HDU (``EXTNAME = 'PSF'``, ``PSFTYPE = 'CoaddPsf'``), one row per input
(visit, ccd, weight, valid polygon, WCS header, PSF HDU header and data), the coadd WCS as cards
of the table header.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from snakedrp.repo.psf_model import PsfModel, psf_from_hdu, register
from snakedrp.stamps import kernel_moments, lanczos

FWHM_PER_SIGMA = 2.3548


@dataclass(frozen=True)
class CoaddPsfInput:
    """One input of a :class:`CoaddPsf` (a calexp resampled onto the coadd grid).

    Attributes
    ----------
    visit, ccd : int
    weight : float
        Weight of the input in the coadd (1 in a warp; the warp's weight in a coadd).
    psf : PsfModel
        The calexp's PSF model (CCD pixel coordinates).
    wcs : astropy.wcs.WCS
        The calexp's WCS (TAN-SIP; zero-based pixels with ``origin=0``).
    polygon : ndarray, shape (n, 2)
        Corners ``(x, y)`` of the input's valid region on the coadd grid [pixel, zero-based],
        in order around the (convex) region.
    aperture_wing : float
        The calexp's light beyond its calibration aperture, as a fraction of the light inside,
        from its curve of growth (``APLOSS - 1 - APLOSSSK``: the local-sky part left out); NaN
        when the calexp had no curve of growth.
    """

    visit: int
    ccd: int
    weight: float
    psf: PsfModel
    wcs: WCS
    polygon: np.ndarray
    aperture_wing: float = float("nan")

    def contains(self, x: float, y: float) -> bool:
        """Whether the coadd position ``(x, y)`` lies inside :attr:`polygon` (convex, either orientation)."""
        p = np.asarray(self.polygon, float)
        q = np.roll(p, -1, axis=0)
        cross = (q[:, 0] - p[:, 0]) * (y - p[:, 1]) - (q[:, 1] - p[:, 1]) * (x - p[:, 0])
        return bool((cross >= 0).all() or (cross <= 0).all())


def coadd_to_input(coadd_wcs: WCS, input_wcs: WCS, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Exact mapping of coadd pixels ``(x, y)`` to input pixels (zero-based; SIP honoured both ways)."""
    ra, dec = coadd_wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    xi, yi = input_wcs.all_world2pix(ra, dec, 0, tolerance=1e-7, maxiter=50, quiet=True)
    return np.asarray(xi, float), np.asarray(yi, float)


def local_jacobian(coadd_wcs: WCS, input_wcs: WCS, x: float, y: float, step: float = 1.0):
    """Input position of coadd ``(x, y)`` and the Jacobian ``d(input)/d(coadd)`` there (2x2, [[dxi/dx, dxi/dy], [dyi/dx, dyi/dy]])."""
    px = np.array([x, x + step, x - step, x, x])
    py = np.array([y, y, y, y + step, y - step])
    xi, yi = coadd_to_input(coadd_wcs, input_wcs, px, py)
    jac = np.array([[xi[1] - xi[2], xi[3] - xi[4]], [yi[1] - yi[2], yi[3] - yi[4]]]) / (2 * step)
    return float(xi[0]), float(yi[0]), jac


def warp_kernel(kernel: np.ndarray, jacobian: np.ndarray, size: int, order: int = 3,
                offset: tuple[float, float] = (0.0, 0.0), centre: tuple[float, float] | None = None) -> np.ndarray:
    """Resample a centred PSF kernel of the input grid onto the coadd grid.

    Parameters
    ----------
    kernel : ndarray, shape (n, n)
        Input PSF image, centred on ``[n // 2, n // 2]``.
    jacobian : ndarray, shape (2, 2)
        ``d(input pixel)/d(coadd pixel)`` at the position.
    size : int
        Odd side of the output kernel.
    offset : (float, float)
        Sub-pixel position ``(dx, dy)`` of the PSF centre relative to the output's central pixel
        (what :meth:`PsfModel.draw` needs: one resampling instead of a warp and then a shift).
    centre : (float, float), optional
        Position ``(x, y)`` in ``kernel`` of the point that maps to the output centre; default the
        central pixel. A star drawn at its input sub-pixel phase (``psf.draw``) and resampled
        from there is what the warp does to the star's pixels.

    Returns
    -------
    ndarray, shape (size, size)
        The kernel on the coadd grid, centred, sum 1 (the Jacobian determinant cancels in the
        normalisation; it only matters for flux, which a PSF does not carry).
    """
    n = kernel.shape[0]
    pad = order + 1
    padded = np.pad(np.asarray(kernel, float), pad)
    c_out = size // 2
    v, u = np.mgrid[0:size, 0:size] - c_out
    u, v = u - offset[0], v - offset[1]
    cx, cy = (n // 2, n // 2) if centre is None else centre
    xs = cx + pad + jacobian[0, 0] * u + jacobian[0, 1] * v
    ys = cy + pad + jacobian[1, 0] * u + jacobian[1, 1] * v
    inside = (xs >= order) & (xs < padded.shape[1] - order - 1) & (ys >= order) & (ys < padded.shape[0] - order - 1)
    xs, ys = np.where(inside, xs, pad), np.where(inside, ys, pad)
    ix, iy = np.floor(xs).astype(int), np.floor(ys).astype(int)
    taps = np.arange(-order + 1, order + 1)
    wx = lanczos(taps[None, :] - (xs - ix).ravel()[:, None], order)
    wy = lanczos(taps[None, :] - (ys - iy).ravel()[:, None], order)
    wx /= wx.sum(axis=1, keepdims=True)
    wy /= wy.sum(axis=1, keepdims=True)
    rows = (iy.ravel()[:, None] + taps[None, :])[:, :, None]
    cols = (ix.ravel()[:, None] + taps[None, :])[:, None, :]
    values = np.einsum("pj,pi,pji->p", wy, wx, padded[rows, cols]).reshape(size, size)
    values[~inside] = 0.0
    total = values.sum()
    return values / total if total != 0 else values


@register
class CoaddPsf(PsfModel):
    """PSF of a warp or coadd: weighted sum of the warped input PSFs (see the module docstring).

    Parameters
    ----------
    coadd_wcs : astropy.wcs.WCS
        WCS of the coadd (patch) grid.
    inputs : list of CoaddPsfInput
    size : int, optional
        Odd side of the kernels; default the largest input kernel.
    """

    def __init__(self, coadd_wcs: WCS, inputs: list[CoaddPsfInput], size: int | None = None):
        if not inputs:
            raise ValueError("a CoaddPsf needs at least one input")
        self.coadd_wcs = coadd_wcs
        self.inputs = list(inputs)
        if size is None:
            size = max(np.asarray(i.psf.kernel(*_centre(i)), float).shape[0] for i in self.inputs[:8])
        self.size = int(size) | 1

    # ------------------------------------------------------------ evaluation
    def covering(self, x: float, y: float) -> list[CoaddPsfInput]:
        """The inputs whose valid region contains ``(x, y)``; the nearest one if none does."""
        found = [i for i in self.inputs if i.contains(x, y)]
        if found:
            return found
        dist = [np.hypot(*(np.mean(i.polygon, axis=0) - (x, y))) for i in self.inputs]
        return [self.inputs[int(np.argmin(dist))]]

    def input_kernel(self, item: CoaddPsfInput, x: float, y: float, offset=(0.0, 0.0)) -> np.ndarray:
        """One input's PSF at coadd ``(x, y)``, warped to the coadd grid: shape (size, size), sum 1.

        The input star is drawn at its sub-pixel position on the CCD and resampled as the warp
        resamples the CCD's pixels, so that the model has the (slightly phase-dependent) width of
        the warped stars, not that of a twice-interpolated centred kernel.
        """
        xi, yi, jac = local_jacobian(self.coadd_wcs, item.wcs, x, y)
        stamp, sx0, sy0 = item.psf.draw(xi, yi)
        return warp_kernel(stamp, jac, self.size, offset=offset, centre=(xi - sx0, yi - sy0))

    def _sum(self, x: float, y: float, offset=(0.0, 0.0)) -> np.ndarray:
        total = np.zeros((self.size, self.size))
        weight = 0.0
        for item in self.covering(x, y):
            total += item.weight * self.input_kernel(item, x, y, offset)
            weight += item.weight
        out = total / weight if weight > 0 else total
        return out / out.sum()

    def kernel(self, x, y):
        return self._sum(float(x), float(y))

    def draw(self, x, y):
        """As :meth:`PsfModel.draw`; the sub-pixel shift is part of the warp of each input kernel."""
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        stamp = self._sum(float(x), float(y), offset=(float(x) - ix, float(y) - iy))
        return stamp, ix - self.size // 2, iy - self.size // 2

    def enclosed_light(self, x: float, y: float, radii, calib_aperture_fwhm: float = 4.0,
                       tail_index: float = 1.7) -> np.ndarray:
        """Fraction of a point source's total light within ``radii`` of coadd ``(x, y)``, from the inputs' curves of growth.

        Each covering input ``k`` (weight ``w_k``) measured, on its calexp, the light ``L_k``
        beyond its calibration aperture ``R_k`` (``calib_aperture_fwhm`` x its FWHM, here on the
        coadd grid) as a power-law wing, so its fraction within ``r >= R_k`` is
        ``E_k(r) = (1 + L_k (1 - (r / R_k)**-tail_index)) / (1 + L_k)``; the coadd, a weighted
        mean of the inputs at one zeropoint, holds ``sum_k w_k E_k(r) / sum_k w_k``. As LSST
        carries the inputs' aperture corrections to a coadd, this needs no star of the coadd.

        Parameters
        ----------
        x, y : float
            Coadd position [pixel, zero-based].
        radii : array_like
            Radii [coadd pixel]; each at least 0.9 x every covering input's ``R_k`` (the wing's
            power law holds a little inside ``R_k``; the light within 10 % of ``R_k`` is ~0.3 %).
        calib_aperture_fwhm : float
            The calexps' calibration-aperture radius [FWHM] (``measure.calib_aperture_fwhm``).
        tail_index : float
            Index of the wing's power law (``measure.aperture_loss.tail_index``).

        Returns
        -------
        ndarray, shape of ``radii``
            NaN where a radius is well inside an input's calibration aperture or an input has no
            ``aperture_wing``.
        """
        radii = np.asarray(radii, float)
        total = np.zeros(radii.shape)
        weight = 0.0
        for item in self.covering(float(x), float(y)):
            kernel = self.input_kernel(item, float(x), float(y))
            calib_radius = calib_aperture_fwhm * FWHM_PER_SIGMA * kernel_moments(kernel)[0]
            wing = float(item.aperture_wing)
            with np.errstate(invalid="ignore", divide="ignore"):
                inside = np.where(radii >= 0.9 * calib_radius,
                                  (1.0 + wing * (1.0 - (radii / calib_radius) ** -tail_index)) / (1.0 + wing), np.nan)
            total += item.weight * inside
            weight += item.weight
        return total / weight if weight > 0 else np.full(radii.shape, np.nan)

    def with_weights(self, factor: float) -> "CoaddPsf":
        """The same model with every input weight multiplied by ``factor``."""
        return CoaddPsf(self.coadd_wcs, [replace(i, weight=i.weight * factor) for i in self.inputs], self.size)

    @classmethod
    def combine(cls, parts: list[tuple["CoaddPsf", float]], coadd_wcs: WCS | None = None) -> "CoaddPsf":
        """One model from several (e.g. one per warp), each with its weight: ``[(psf, weight), ...]``."""
        inputs = [replace(i, weight=i.weight * w) for psf, w in parts for i in psf.inputs]
        wcs = coadd_wcs if coadd_wcs is not None else parts[0][0].coadd_wcs
        return cls(wcs, inputs, max(p.size for p, _ in parts))

    # ------------------------------------------------------------ persistence
    def to_hdu(self):
        n = len(self.inputs)
        hdus = [i.psf.to_hdu() for i in self.inputs]
        datas = [np.asarray(h.data, float) for h in hdus]
        shapes = np.ones((n, 3), np.int32)
        for k, d in enumerate(datas):
            shapes[k, 3 - d.ndim:] = d.shape
        wcs_text = [i.wcs.to_header_string(relax=True) for i in self.inputs]
        psf_text = [h.header.tostring() for h in hdus]
        n_corner = max(len(i.polygon) for i in self.inputs)
        poly = np.full((n, n_corner, 2), np.nan)
        for k, i in enumerate(self.inputs):
            poly[k, : len(i.polygon)] = i.polygon
        columns = [
            fits.Column("visit", "K", array=np.array([i.visit for i in self.inputs], np.int64)),
            fits.Column("ccd", "J", array=np.array([i.ccd for i in self.inputs], np.int32)),
            fits.Column("weight", "D", array=np.array([i.weight for i in self.inputs], float)),
            fits.Column("aperture_wing", "D", array=np.array([i.aperture_wing for i in self.inputs], float)),
            fits.Column("polygon_x", f"{n_corner}D", array=poly[:, :, 0], unit="pix"),
            fits.Column("polygon_y", f"{n_corner}D", array=poly[:, :, 1], unit="pix"),
            fits.Column("wcs_header", f"{max(len(t) for t in wcs_text)}A", array=np.array(wcs_text)),
            fits.Column("psf_header", f"{max(len(t) for t in psf_text)}A", array=np.array(psf_text)),
            fits.Column("psf_shape", "3J", array=shapes),
            fits.Column("psf_data", "PD()", array=np.array([d.ravel() for d in datas] + [None], dtype=object)[:-1]),
        ]
        hdu = fits.BinTableHDU.from_columns(columns, name="PSF")
        h = hdu.header
        h["PSFTYPE"] = (type(self).__name__, "PSF model class (snakedrp.coadd.coadd_psf)")
        h["PSFMOD"] = (__name__, "module defining PSFTYPE (imported by psf_from_hdu)")
        h["PSFSIZE"] = (self.size, "kernel side [pixel]")
        for card in self.coadd_wcs.to_header(relax=True).cards:
            h["HIERARCH CW_" + card.keyword] = card.value      # the coadd WCS (CW_ + its keyword)
        return hdu

    @classmethod
    def from_hdu(cls, hdu):
        h = hdu.header
        wcs_header = fits.Header()
        for card in h.cards:
            if card.keyword.startswith("CW_"):
                wcs_header[card.keyword[3:]] = (card.value, card.comment)
        coadd_wcs = WCS(wcs_header, relax=True)
        inputs = []
        for row in hdu.data:
            shape = tuple(int(s) for s in row["psf_shape"])
            shape = tuple(s for s in shape[:1] if s > 1) + shape[1:]
            data = np.asarray(row["psf_data"], float).reshape(shape)
            header = fits.Header.fromstring(str(row["psf_header"]))
            cls_hdu = fits.ImageHDU(data, header=header)
            if header.get("XTENSION") == "BINTABLE":
                raise ValueError("CoaddPsf inputs must be image-HDU PSF models")
            psf = psf_from_hdu(cls_hdu)
            wcs = WCS(fits.Header.fromstring(str(row["wcs_header"])), relax=True)
            px, py = np.asarray(row["polygon_x"], float), np.asarray(row["polygon_y"], float)
            good = np.isfinite(px) & np.isfinite(py)
            wing = float(row["aperture_wing"]) if "aperture_wing" in hdu.columns.names else float("nan")
            inputs.append(CoaddPsfInput(int(row["visit"]), int(row["ccd"]), float(row["weight"]), psf, wcs,
                                        np.stack([px[good], py[good]], axis=1), wing))
        return cls(coadd_wcs, inputs, int(h["PSFSIZE"]))


class CellCachedPsf(PsfModel):
    """A :class:`CoaddPsf` evaluated once per set of covering inputs and cell of ``cell`` pixels.

    Drawing a ``CoaddPsf`` warps every covering input's kernel (about 9 ms a source with three
    inputs), which is most of the cost of measuring a coadd. The inputs' own PSFs vary slowly over
    their CCDs, so this model keeps, for each cell and set of covering inputs, the coadd kernel
    at the cell's centre, and draws a source by its Lanczos-3 sub-pixel shift (as
    :meth:`PsfModel.draw`). A cell never mixes two sets of covering inputs: where an input's
    region ends within a cell, each side has its own kernel. Not persisted: the coadd keeps
    its ``CoaddPsf``.

    Parameters
    ----------
    psf : CoaddPsf
    cell : float
        Cell side [pixel].
    """

    def __init__(self, psf: CoaddPsf, cell: float = 128.0):
        self.psf = psf
        self.cell = float(cell)
        self._cache: dict = {}

    def kernel(self, x, y):
        x, y = float(x), float(y)
        items = self.psf.covering(x, y)
        cx, cy = int(x // self.cell), int(y // self.cell)
        key = (tuple((int(i.visit), int(i.ccd)) for i in items), cx, cy)
        if key not in self._cache:
            xc, yc = (cx + 0.5) * self.cell, (cy + 0.5) * self.cell
            total = sum(i.weight * self.psf.input_kernel(i, xc, yc) for i in items)
            self._cache[key] = total / total.sum()
        return self._cache[key]

    def to_hdu(self):
        return self.psf.to_hdu()

    @classmethod
    def from_hdu(cls, hdu):
        return cls(CoaddPsf.from_hdu(hdu))


def _centre(item: CoaddPsfInput) -> tuple[float, float]:
    """A position on the input CCD (its PSF model's reference point when it has one)."""
    return (float(getattr(item.psf, "x_center", 0.0)), float(getattr(item.psf, "y_center", 0.0)))
