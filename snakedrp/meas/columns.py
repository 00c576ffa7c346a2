"""Which columns of a source table hold positions, fluxes and flags.

Catalogs at different stages name these differently (detections ``x, y``; measured sources
``x_centroid, y_centroid``); each helper takes the order of preference explicitly so that a
reader sees which column a caller uses.
"""
from __future__ import annotations

import numpy as np
from astropy.table import Table

#: Position column pairs, detections' first (the default of :func:`xy_columns`).
XY_COLUMNS = (("x", "y"), ("x_centroid", "y_centroid"))

#: Flux column pairs tried, in order, for a source's S/N (and PSF-star isolation).
FLUX_COLUMNS = (("flux", "flux_err"), ("psf_flux", "psf_flux_err"), ("calib_flux", "calib_flux_err"),
                ("ap_flux", "ap_flux_err"))


def xy_columns(table: Table, *, order: tuple[tuple[str, str], ...] = XY_COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(x, y)`` [pixel, zero-based] from the first column pair of ``order`` the table has."""
    for xname, yname in order:
        if xname in table.colnames and yname in table.colnames:
            return np.asarray(table[xname], float), np.asarray(table[yname], float)
    wanted = " or ".join(f"{a}, {b}" for a, b in order)
    raise KeyError(f"source table needs {wanted} columns; has {table.colnames}")


def flux_columns(table: Table, *, order: tuple[tuple[str, str], ...] = FLUX_COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """``(flux, flux_err)`` from the first pair of ``order`` the table has."""
    for name, err in order:
        if name in table.colnames and err in table.colnames:
            return np.asarray(table[name], float), np.asarray(table[err], float)
    raise KeyError(f"source table needs one of the flux column pairs {order}; has {table.colnames}")


def flagged(table: Table, *, also: tuple[str, ...] = ()) -> np.ndarray:
    """True where any boolean pixel flag ``flag_*`` (or one of the boolean columns ``also``) is set."""
    flags = np.zeros(len(table), bool)
    for name in table.colnames:
        if (name.startswith("flag_") or name in also) and table[name].dtype == bool:
            flags |= np.asarray(table[name])
    return flags


def append_rows(table: Table, more: Table) -> Table:
    """A new table: the rows of ``table`` then those of ``more`` (same column names), each column
    keeping ``table``'s unit and description, the metadata of both (``more``'s on a clash).

    What ``astropy.table.vstack(..., metadata_conflicts="silent")`` gives for such tables, in a
    quarter of its time on a CCD's src (astropy merges every column's info attribute by attribute).
    """
    if more.colnames != table.colnames:
        raise ValueError(f"append_rows: columns differ ({table.colnames} vs {more.colnames})")
    out = Table()
    for name in table.colnames:
        out[name] = np.concatenate([np.asarray(table[name]), np.asarray(more[name])])
        out[name].unit = table[name].unit
        out[name].description = table[name].description
    out.meta.update(table.meta)
    out.meta.update(more.meta)
    return out
