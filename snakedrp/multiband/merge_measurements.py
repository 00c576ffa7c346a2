"""Each object's reference band, and its position and shape there (mergeCoaddMeasurements).

The reference band is the first band in priority order (``multiband.priority``) where the
object is a detected peak with an unflagged PSF flux of S/N at least ``min_snr``. Without one,
the band of highest PSF S/N is taken if its S/N exceeds the priority band's by more than
``min_snr_diff``; failing that, the first band where the object is a peak. Forced photometry in
every band then measures at the reference band's centroid, so that an object's colours are
measured at one position, that of its most trusted band.
"""
from __future__ import annotations

import numpy as np
from astropy.table import Table

from snakedrp.multiband.config import MergeMeasurementsConfig
from snakedrp.multiband.merge_detections import band_order


def _column(table: Table, name: str, default, dtype=float) -> np.ndarray:
    return np.asarray(table[name], dtype) if name in table.colnames else np.full(len(table), default, dtype)


def reference_bands(objects: Table, measurements: dict[str, Table], priority,
                    config: MergeMeasurementsConfig | None = None) -> np.ndarray:
    """The reference band of each object (array of str, in the order of ``objects``).

    Parameters
    ----------
    objects : Table
        ``deepCoadd_mergeDet`` (``merge_peak_<band>`` columns).
    measurements : dict of str to Table
        Each band's ``deepCoadd_meas`` (``psf_flux``, ``psf_flux_err``, ``psf_flux_flag``), rows
        in the order of ``objects``.
    priority : list of str
    config : MergeMeasurementsConfig
    """
    config = config or MergeMeasurementsConfig()
    order = band_order(measurements, priority)
    n = len(objects)
    snr, usable, peak = {}, {}, {}
    for band in order:
        meas = measurements[band]
        with np.errstate(invalid="ignore", divide="ignore"):
            s = _column(meas, "psf_flux", np.nan) / _column(meas, "psf_flux_err", np.nan)
        snr[band] = np.where(np.isfinite(s), s, -np.inf)
        peak[band] = _column(objects, f"merge_peak_{band}", False, bool)
        usable[band] = peak[band] & ~_column(meas, "psf_flux_flag", True, bool)
    chosen = np.full(n, "", dtype="U16")
    for band in order:
        take = (chosen == "") & usable[band] & (snr[band] >= config.min_snr)
        chosen[take] = band
    rest = chosen == ""
    if rest.any():
        stack = np.array([snr[b] for b in order])
        best = np.array(order)[np.argmax(stack, axis=0)]
        gain = stack.max(axis=0) - stack[0]
        switch = rest & (gain > config.min_snr_diff)
        chosen[switch] = best[switch]
        for band in order:
            take = (chosen == "") & peak[band]
            chosen[take] = band
        chosen[chosen == ""] = order[0]
    return chosen


def merge_measurements(objects: Table, measurements: dict[str, Table], priority,
                       config: MergeMeasurementsConfig | None = None) -> Table:
    """``deepCoadd_ref``: per object the reference band and that band's measurement.

    Parameters
    ----------
    objects, measurements, priority, config
        As :func:`reference_bands`.

    Returns
    -------
    Table
        The reference band's ``deepCoadd_meas`` row of each object, in the order of ``objects``,
        with ``ref_band`` (str) and, per band, ``merge_measurement_<band>`` (bool: the band is the
        reference) in front of the measurement's columns. Columns a band lacks are NaN / False.
    """
    ref = reference_bands(objects, measurements, priority, config)
    order = band_order(measurements, priority)
    first = measurements[order[0]]
    for band, meas in measurements.items():
        if len(meas) != len(objects) or (np.asarray(meas["id"]) != np.asarray(objects["id"])).any():
            raise ValueError(f"the {band}-band measurement must hold the merged objects, in their order")
    out = Table()
    out["id"] = np.asarray(objects["id"], np.int64)
    out["id"].description = first["id"].description
    out["ref_band"] = ref
    out["ref_band"].description = "The object's reference band (position and shape of the forced photometry)"
    for band in order:
        out[f"merge_measurement_{band}"] = ref == band
        out[f"merge_measurement_{band}"].description = f"The {band} band is the reference band"
    for name in first.colnames:
        if name == "id":
            continue
        column = first[name]
        values = np.array(column, copy=True)
        for band in order[1:]:
            take = ref == band
            if take.any() and name in measurements[band].colnames:
                values[take] = np.asarray(measurements[band][name])[take]
        out[name] = values
        out[name].unit = column.unit
        out[name].description = column.description
    out.meta["BANDS"] = ",".join(order)
    return out
