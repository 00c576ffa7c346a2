"""File writing helpers: every product is written atomically (temporary file, then rename)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from astropy.io import fits
from astropy.table import Table


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A job killed half-way leaves no partial product behind, so Snakemake never mistakes
    a truncated file for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_hdulist(hdulist: fits.HDUList, path: str | Path) -> None:
    """Write a FITS HDU list atomically.

    No CHECKSUM cards: astropy dates their comments, and the same inputs must give the same bytes.
    """
    with atomic_path(path) as tmp:
        hdulist.writeto(tmp, overwrite=True)


def write_table(table: Table, path: str | Path, *, parquet: bool = False) -> None:
    """Write an astropy table as FITS (units and descriptions kept), and Parquet beside it.

    The Parquet copy, when asked for, goes to the same path with a ``.parq`` suffix. Units
    FITS cannot hold are mapped to FITS ones: ``electron`` (calexp counts) becomes ``ct``.
    """
    table = table.copy(copy_data=False)
    for col in table.itercols():
        if col.unit is not None:
            col.unit = _fits_unit(col.unit)
    with atomic_path(path) as tmp:
        table.write(tmp, format="fits", overwrite=True)
    if parquet:
        ppath = Path(path).with_suffix(".parq")
        with atomic_path(ppath) as tmp:
            table.write(tmp, format="parquet", overwrite=True)


def _fits_unit(unit):
    import astropy.units as u

    if isinstance(unit, u.CompositeUnit) and u.electron in unit.bases:
        out = u.Unit(unit.scale)
        for base, power in zip(unit.bases, unit.powers):
            out = out * (u.ct if base == u.electron else base) ** power
        return out
    return u.ct if unit == u.electron else unit


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
