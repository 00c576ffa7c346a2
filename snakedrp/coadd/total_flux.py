"""Total fluxes of point sources on a coadd, and the coadd PSF's mix of inputs at a position.

The warps carry the calexps' total-flux zeropoint, so a star's total flux on a coadd is measured
as the single frame calibrates it: the flux within a calibration aperture without its
neighbours' footprints, and the light beyond from the covering inputs' own curves of growth
(:meth:`snakedrp.coadd.coadd_psf.CoaddPsf.enclosed_light`), with a local sky level fitted to the
star's annuli. The coadd's aperture correction (:mod:`snakedrp.multiband.measure_coadd`) and
the coadd validation (:mod:`snakedrp.validate.coadd`) both measure stars this way.

A patch holds regions covered by different sets of visits, and the coadd PSF differs between
them (a factor 2.6 in FWHM with 0.5" and 1.3" visits); :class:`PsfMixes` gives the mix at a
position, from which the apertures take their scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

from snakedrp.meas.apcorr import annulus_edges, annulus_fluxes
from snakedrp.meas.config import ApertureLossConfig
from snakedrp.repo.exposure import Exposure, mask_bits
from snakedrp.stamps import kernel_moments

FWHM_PER_SIGMA = 2.3548


@dataclass(frozen=True)
class PsfMix:
    """The coadd PSF at a position: which visits' inputs cover it and their widths there.

    Attributes
    ----------
    visits : tuple of int
        The covering inputs' visits, sorted: the PSF mix (stars with the same set share a
        coadd PSF up to the inputs' own slow variation).
    fwhm : float
        FWHM of the coadd PSF model [pixel] (Gaussian-equivalent, from adaptive moments).
    widest_fwhm : float
        FWHM of the widest covering input's PSF on the coadd grid [pixel].
    """

    visits: tuple
    fwhm: float
    widest_fwhm: float

    @property
    def label(self) -> str:
        """The visits joined by ``+`` (a key that survives concatenation of per-patch tables)."""
        return "+".join(str(v) for v in self.visits)


class PsfMixes:
    """:class:`PsfMix` of a coadd PSF at any position, cached per set of covering inputs and ``cell`` pixels.

    A ``CoaddPsf`` changes abruptly where an input's valid region ends (a patch holds regions
    of one visit and of several), and slowly elsewhere (the inputs' own models vary over a
    CCD); one evaluation per covering set and cell of ``cell`` pixels keeps the cost of
    hundreds of stars small without mixing two covering sets. A PSF model without
    ``covering``/``input_kernel`` is one mix, its FWHM the only input's.
    """

    def __init__(self, psf, cell: float = 64.0):
        self.psf = psf
        self.cell = float(cell)
        self._cache: dict = {}

    def visits(self, x: float, y: float) -> tuple:
        """The sorted visits of the inputs covering ``(x, y)`` (``()`` for a single-input PSF model)."""
        if not hasattr(self.psf, "covering"):
            return ()
        return tuple(sorted({int(i.visit) for i in self.psf.covering(float(x), float(y))}))

    def at(self, x: float, y: float) -> PsfMix:
        """The mix at ``(x, y)`` [pixel, zero-based]."""
        x, y = float(x), float(y)
        if not hasattr(self.psf, "covering") or not hasattr(self.psf, "input_kernel"):
            key = ((), int(x // self.cell), int(y // self.cell))
            if key not in self._cache:
                fwhm = float(self.psf.fwhm(x, y))
                self._cache[key] = PsfMix((), fwhm, fwhm)
            return self._cache[key]
        items = self.psf.covering(x, y)
        key = (tuple(sorted((int(i.visit), int(i.ccd)) for i in items)), int(x // self.cell), int(y // self.cell))
        if key not in self._cache:
            kernels = [np.asarray(self.psf.input_kernel(i, x, y), float) for i in items]
            weights = np.array([i.weight for i in items], float)
            coadd = sum(w * k for w, k in zip(weights, kernels)) / weights.sum()
            widths = [FWHM_PER_SIGMA * kernel_moments(k)[0] for k in kernels]
            self._cache[key] = PsfMix(tuple(sorted({int(i.visit) for i in items})),
                                      FWHM_PER_SIGMA * kernel_moments(coadd)[0], float(np.nanmax(widths)))
        return self._cache[key]


def neighbour_segmentation(calexp: Exposure, nsigma: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Footprints of the coadd's sources (``sep.extract`` above ``nsigma``) reaching far into their wings, and its unusable pixels.

    Deeper than detection's 5 sigma footprints: the pixels a neighbour's wing holds are left out of
    a star's aperture and annuli.

    Returns
    -------
    segmentation : ndarray of int32, shape (ny, nx)
        Source id per pixel (0: sky).
    bad : ndarray of bool, shape (ny, nx)
        NO_DATA, SAT, BAD, EDGE or CLIPPED pixels.
    """
    image = np.ascontiguousarray(np.nan_to_num(calexp.image), dtype=np.float32)
    var = np.nan_to_num(calexp.variance, nan=0.0)
    bad = ((calexp.mask & mask_bits("NO_DATA", "SAT", "BAD", "EDGE", "CLIPPED")) != 0) | ~(var > 0)
    err = np.ascontiguousarray(np.sqrt(np.where(bad, 0.0, var)), dtype=np.float32)
    sep.set_extract_pixstack(max(300000, image.size // 4))
    sep.set_sub_object_limit(4096)
    _, segmentation = sep.extract(image, nsigma, err=err, mask=bad, minarea=5,
                                  segmentation_map=True)
    return np.ascontiguousarray(segmentation, dtype=np.int32), bad


def clean_aperture_flux(image, variance, bad, segmentation, ids, x, y, radius):
    """Aperture flux without the neighbours: other footprints' and bad pixels replaced by their ring's mean.

    The disc is summed in 1-pixel rings (``sep.sum_circann``, which scales each ring by its
    usable area), so a neighbour's pixels take the star's light at their radius, not the
    aperture's mean.

    Parameters
    ----------
    image, variance : ndarray, shape (ny, nx)
    bad : ndarray of bool, shape (ny, nx)
    segmentation : ndarray of int32, shape (ny, nx)
    ids : ndarray of int
        Each star's own footprint id.
    x, y : ndarray
        Zero-based centres [pixel].
    radius : float or ndarray
        Aperture radius [pixel], one for all or one per star.

    Returns
    -------
    flux, flux_err : ndarray
        [image units].
    """
    data = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(variance, dtype=np.float32)
    mask = np.ascontiguousarray(bad, dtype=np.uint8)
    x, y, ids = np.asarray(x, float), np.asarray(y, float), np.asarray(ids)
    radius = np.broadcast_to(np.asarray(radius, float), x.shape)
    flux, var_sum = np.zeros(len(x)), np.zeros(len(x))
    for k in range(int(np.ceil(radius.max())) if len(x) else 0):
        # ring [k, min(k + 1, radius)] of the stars whose aperture reaches beyond k
        on = np.flatnonzero(radius > k)
        rout = np.minimum(k + 1.0, radius[on])
        common = dict(var=var, mask=mask, segmap=segmentation, seg_id=ids[on], subpix=5)
        if k == 0:
            f, e, _ = sep.sum_circle(data, x[on], y[on], rout, **common)
        else:
            f, e, _ = sep.sum_circann(data, x[on], y[on], float(k), rout, **common)
        flux[on] += f
        var_sum[on] += e**2
    return flux, np.sqrt(var_sum)


def total_fluxes(image, variance, bad, segmentation, ids, x, y, radius, flux, flux_err, psf,
                 curve_of_growth: ApertureLossConfig, calib_aperture_fwhm: float = 4.0, *,
                 with_errors: bool = False):
    """Stars' total fluxes: aperture and annuli fitted by the coadd's curve of growth from its inputs, plus a local sky.

    The light beyond the aperture comes from the covering inputs' own curves of growth, each
    measured on its calexp from all its bright stars (:meth:`CoaddPsf.enclosed_light`), as
    LSST carries the inputs' aperture corrections to a coadd; a curve of growth measured on
    the coadd's stars of one set of covering visits (3-6 stars above S/N 200 in a patch) moved
    the figure by +-15 mmag from set to set. Each star's aperture flux and its
    ``curve_of_growth.n_annuli`` annuli out to ``radius_max`` apertures (neighbours' footprints
    replaced by the annulus mean) are fitted, weighted, by ``F * (enclosed light) + s * area``:
    ``F`` is the total flux, ``s`` the local sky level the background left near the star (in a
    crowded field, undetected neighbours and wings), which the calexps' curves of growth take
    out of their aperture too.

    Parameters
    ----------
    image, variance, bad, segmentation, ids
        As :func:`clean_aperture_flux`.
    x, y, radius, flux, flux_err : ndarray
        Centres and aperture radii [pixel], aperture fluxes and errors (from :func:`clean_aperture_flux`).
    psf : CoaddPsf
        The coadd's PSF model (a model without ``enclosed_light`` gives NaN).
    curve_of_growth : ApertureLossConfig
        The annuli (``n_annuli``, ``radius_max``, ``radius_max_pixels``) and the wing's power law
        (``tail_index``), as the calexps' ``measure.aperture_loss``.
    calib_aperture_fwhm : float
        The calexps' calibration-aperture radius [FWHM] (``measure.calib_aperture_fwhm``).

    with_errors : bool
        Also return each total flux's 1-sigma error, from the fit's covariance (the aperture's and
        annuli's variance-plane errors; the local sky level's uncertainty is most of it).

    Returns
    -------
    ndarray, or (ndarray, ndarray) with ``with_errors``
        Total fluxes [image units] (and their errors); NaN where an input covering the star has
        no curve of growth, or fewer than 2 annuli are usable.
    """
    cog = curve_of_growth
    n = len(x)
    out, err = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0 or not hasattr(psf, "enclosed_light"):
        return (out, err) if with_errors else out
    edges = annulus_edges(radius, cog)
    ring, ring_err = np.empty((n, cog.n_annuli)), np.empty((n, cog.n_annuli))
    data = np.ascontiguousarray(image, dtype=np.float32)
    seg = np.ascontiguousarray(segmentation, dtype=np.int32)
    for k in range(cog.n_annuli):
        ring[:, k], ring_err[:, k] = annulus_fluxes(data, variance, bad, seg, np.asarray(ids), x, y,
                                                    edges[:, k], edges[:, k + 1])
    for j in range(n):
        enclosed = psf.enclosed_light(x[j], y[j], edges[j], calib_aperture_fwhm, cog.tail_index)
        values = np.r_[flux[j], ring[j]]
        errors = np.r_[flux_err[j], ring_err[j]]
        design = np.column_stack([np.r_[enclosed[0], np.diff(enclosed)],
                                  np.pi * np.r_[edges[j, 0] ** 2, np.diff(edges[j] ** 2)]])
        use = np.isfinite(values) & np.isfinite(errors) & (errors > 0) & np.isfinite(design).all(axis=1)
        if not np.isfinite(enclosed).all() or not use[0] or use.sum() < 3:
            continue
        w = 1.0 / errors[use]
        solution, *_ = np.linalg.lstsq(design[use] * w[:, None], values[use] * w, rcond=None)
        out[j] = solution[0]
        # the fit's covariance: the local sky's uncertainty, over the wide aperture, dominates
        err[j] = float(np.sqrt(np.linalg.pinv((design[use] * w[:, None]).T @ (design[use] * w[:, None]))[0, 0]))
    return (out, err) if with_errors else out
