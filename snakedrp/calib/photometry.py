"""Photometric calibration: the zeropoint of a CCD from matched reference stars.

Definition (docs/ARCHITECTURE.md): ``mag = zeropoint - 2.5 log10(flux)`` with ``flux`` the
instrumental flux in electrons of the calexp, so each matched star gives an estimate
``ref_mag - (-2.5 log10 flux)``.

The fit (as LSST PhotoCalTask): only unflagged, unresolved stars with S/N above ``snr_min``
and reference magnitudes inside ``[mag_min, mag_max]`` enter. Starting from the weighted median,
the estimates are iteratively sigma-clipped at ``clip_sigma`` times each star's error (rescaled
by the robust spread of the normalized residuals) and averaged with weights
``1 / (sigma_i^2 + s^2)``, where ``sigma_i`` combines the instrumental and reference errors
and the per-star floor, and ``s`` is the extra scatter that makes the reduced chi^2 one.

Error: ``sqrt(1 / sum(w))`` — the scatter over sqrt(N) when the scatter exceeds the quoted
errors, since ``s`` absorbs the excess — combined in quadrature with ``zeropoint_err_floor``,
the systematic floor (flat-field and aperture-correction errors that do not average down).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from snakedrp.calib.config import PhotometryConfig

MAG_PER_LN = 2.5 / np.log(10.0)


class PhotometryError(RuntimeError):
    """Too few usable stars for a zeropoint; the message says why (the caller adds visit, CCD)."""


@dataclass(frozen=True)
class PhotometryResult:
    """The fitted zeropoint.

    Attributes
    ----------
    zeropoint : float
        AB magnitude of a source of total flux 1 e- (``mag = zeropoint - 2.5 log10 flux``).
    zeropoint_err : float
        1-sigma error [mag], including the systematic floor.
    n_used : int
        Stars in the final average.
    scatter_mag : float
        RMS of the used stars' estimates about the zeropoint [mag].
    intrinsic_scatter : float
        Extra per-star scatter beyond the quoted errors [mag] (0 when the errors explain it).
    used : ndarray of bool, shape (n_matches,)
        Rows of the matches table in the final average.
    """

    zeropoint: float
    zeropoint_err: float
    n_used: int
    scatter_mag: float
    intrinsic_scatter: float
    used: np.ndarray


def _column(table: Table, name: str) -> np.ndarray:
    if name not in table.colnames:
        raise PhotometryError(f"matches table has no column {name!r}; has {table.colnames}")
    return np.asarray(table[name], float)


def _ref_band(table: Table, band: str | None) -> str:
    if band is not None:
        return band
    bands = [c[4:] for c in table.colnames if c.startswith("mag_") and not c.endswith("_err")]
    if len(bands) != 1:
        raise PhotometryError(f"give the reference band: the matches table has magnitude columns for {bands}")
    return bands[0]


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """Median of ``values`` with non-negative ``weights`` (lower weighted median)."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _extra_scatter(resid: np.ndarray, sig: np.ndarray) -> float:
    """s >= 0 with sum(resid^2 / (sig^2 + s^2)) = n - 1, or 0 when the errors explain the scatter."""
    dof = len(resid) - 1
    if dof < 1 or np.sum(resid**2 / sig**2) <= dof:
        return 0.0
    f = lambda s: np.sum(resid**2 / (sig**2 + s**2)) - dof  # noqa: E731
    hi = float(np.sqrt(np.mean(resid**2))) + 1e-6
    from scipy.optimize import brentq  # here: scipy.optimize costs ~0.3 s to import, for one root

    return float(brentq(f, 0.0, hi * 10.0, xtol=1e-7))


def fit_zeropoint(matches: Table, config: PhotometryConfig | None = None, *, band: str | None = None,
                  filter_name: str | None = None) -> PhotometryResult:
    """Fit the zeropoint from matched reference stars.

    Parameters
    ----------
    matches : astropy.table.Table
        One row per source–reference match (e.g. ``AstrometryResult.matches``): the instrumental
        flux ``<flux_column>`` and ``<flux_column>_err`` [e-], the reference ``mag_<band>`` and
        ``mag_<band>_err`` [AB mag]; optional ``<extendedness_column>`` and boolean ``flag_*``.
    config : PhotometryConfig, optional
    band : str, optional
        Reference band (the camera filter's ``band``); needed when the table has several.
    filter_name : str, optional
        The exposure's filter, which selects a colour term from ``config.colour_terms``.

    Returns
    -------
    PhotometryResult

    Raises
    ------
    PhotometryError
        Fewer than ``min_stars`` usable stars, or missing columns.
    """
    cfg = config or PhotometryConfig()
    band = _ref_band(matches, band)
    flux = _column(matches, cfg.flux_column)
    flux_err = _column(matches, cfg.flux_column + "_err")
    ref_mag = _column(matches, f"mag_{band}")
    ref_err = (_column(matches, f"mag_{band}_err") if f"mag_{band}_err" in matches.colnames
               else np.zeros(len(matches)))
    if filter_name is not None and filter_name in cfg.colour_terms:
        c, b1, b2 = cfg.colour_terms[filter_name]
        ref_mag = ref_mag + c * (_column(matches, f"mag_{b1}") - _column(matches, f"mag_{b2}"))

    n = len(matches)
    counts = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / flux_err
        inst_mag = -MAG_PER_LN * np.log(flux)
        inst_err = MAG_PER_LN / snr
    sel = np.isfinite(inst_mag) & np.isfinite(ref_mag) & (flux > 0) & (flux_err > 0)
    counts["without valid flux or reference magnitude"] = n - int(sel.sum())
    flagged = np.zeros(n, bool)
    ignore = set(cfg.ignore_flags)
    for name in matches.colnames:
        if name.startswith("flag") and name not in ignore and matches[name].dtype == bool:
            flagged |= np.asarray(matches[name])
    cuts = [("flagged", flagged),
            (f"below S/N {cfg.snr_min:g}", ~(snr >= cfg.snr_min)),
            (f"outside reference magnitudes [{cfg.mag_min:g}, {cfg.mag_max:g}]",
             ~((ref_mag >= cfg.mag_min) & (ref_mag <= cfg.mag_max))),
            (f"with reference errors above {cfg.ref_mag_err_max:g} mag", ~(ref_err <= cfg.ref_mag_err_max))]
    if cfg.extendedness_column in matches.colnames:
        ext = np.asarray(matches[cfg.extendedness_column], float)
        cuts.append(("resolved", ~(ext < cfg.extendedness_max)))
    for why, bad in cuts:
        counts[why] = int(np.sum(sel & bad))
        sel &= ~bad
    if cfg.exclude_blended and "is_blended" in matches.colnames:
        # a deblended child's PSF flux shares light with its siblings; kept only when too few others remain
        blended = np.asarray(matches["is_blended"], bool)
        if (sel & ~blended).sum() >= cfg.min_blend_free:
            counts["blended"] = int(np.sum(sel & blended))
            sel &= ~blended
    if sel.sum() < cfg.min_stars:
        detail = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        raise PhotometryError(f"only {int(sel.sum())} stars usable for the zeropoint (need {cfg.min_stars}); "
                              f"{n} matches" + (f": {detail}" if detail else ""))

    delta = ref_mag - inst_mag
    sig = np.sqrt(inst_err**2 + ref_err**2 + cfg.star_error_floor**2)
    sig = np.where(sig > 0, sig, 1e-4)
    zp = weighted_median(delta[sel], 1.0 / sig[sel] ** 2)
    extra = 0.0
    used = sel.copy()
    for _ in range(cfg.iterations):
        sig_eff = np.sqrt(sig**2 + extra**2)
        norm = (delta - zp) / sig_eff
        spread = max(1.4826 * float(np.median(np.abs(norm[used]))), 1.0)
        new_used = sel & (np.abs(norm) < cfg.clip_sigma * spread)
        if new_used.sum() < cfg.min_stars:
            break
        w = 1.0 / sig_eff[new_used] ** 2
        zp = float(np.sum(w * delta[new_used]) / np.sum(w))
        extra = _extra_scatter(delta[new_used] - zp, sig[new_used])
        converged = np.array_equal(new_used, used)
        used = new_used
        if converged:
            break
    w = 1.0 / (sig[used] ** 2 + extra**2)
    zp = float(np.sum(w * delta[used]) / np.sum(w))
    err = float(np.sqrt(1.0 / np.sum(w) + cfg.zeropoint_err_floor**2))
    scatter = float(np.sqrt(np.mean((delta[used] - zp) ** 2)))
    return PhotometryResult(zeropoint=zp, zeropoint_err=err, n_used=int(used.sum()), scatter_mag=scatter,
                            intrinsic_scatter=extra, used=used)
