"""Reference catalogs sharded on HEALPix (nested) pixels: ``<dir>/<pixel>.fits`` + ``index.json``.

Columns: ``id``, ``ra``, ``dec`` [deg], ``ra_err``, ``dec_err`` [mas], ``mag_<band>``,
``mag_<band>_err`` [mag]. ``index.json`` holds ``nside``, ``order`` ("nested"), the list of
shards (pixel and number of rows) and the column units. :func:`load_refcat` reads only the
shards that overlap the search circle, so a CCD-sized query opens one to a few files; RA
wrap-around and the poles need no special casing (HEALPix and great-circle distances).
"""
from __future__ import annotations

import json
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import Table, vstack
from astropy_healpix import HEALPix

from snakedrp.repo.io import FitsReadError, check_fits_file, write_table, write_text

INDEX_NAME = "index.json"


class RefcatError(ValueError):
    """A reference catalog directory is missing, incomplete or inconsistent."""


def _healpix(nside: int) -> HEALPix:
    return HEALPix(nside=int(nside), order="nested")


def angular_distance(ra1, dec1, ra2, dec2):
    """Great-circle distance [deg] between points given in degrees (haversine)."""
    ra1, dec1, ra2, dec2 = (np.deg2rad(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.rad2deg(2 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0))))


def healpix_of(ra, dec, nside: int) -> np.ndarray:
    """Nested HEALPix pixel of each ``(ra, dec)`` [deg]."""
    return np.asarray(_healpix(nside).lonlat_to_healpix(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg))


def pixels_in_cone(nside: int, ra: float, dec: float, radius: float) -> np.ndarray:
    """Sorted nested HEALPix pixels that overlap (even partly) the circle of ``radius`` [deg]."""
    pix = _healpix(nside).cone_search_lonlat(float(ra) * u.deg, float(dec) * u.deg, float(radius) * u.deg)
    return np.unique(np.asarray(pix, np.int64))


def write_refcat(table: Table, directory: str | Path, *, nside: int = 64) -> dict:
    """Write ``table`` as HEALPix shards plus ``index.json`` in ``directory``.

    Parameters
    ----------
    table : Table
        Reference stars with at least ``id``, ``ra``, ``dec`` [deg]; every column is written.
    directory : path
        Created if needed; existing shards of the same name are replaced.
    nside : int
        HEALPix nside (power of 2); 64 gives shards of about 0.9 deg.

    Returns
    -------
    dict
        The index that was written.
    """
    if nside < 1 or nside & (nside - 1):
        raise RefcatError(f"refcat nside {nside} is not a power of 2")
    directory = Path(directory)
    pix = healpix_of(table["ra"], table["dec"], nside)
    shards = []
    for p in np.unique(pix):
        shard = table[pix == p]
        shard.sort("id")
        write_table(shard, directory / f"{int(p)}.fits")
        shards.append({"pixel": int(p), "n": len(shard)})
    index = {
        "nside": int(nside),
        "order": "nested",
        "frame": "icrs",
        "shards": shards,
        "n_rows": int(len(table)),
        "columns": {name: (str(table[name].unit) if table[name].unit is not None else "") for name in table.colnames},
    }
    write_text(json.dumps(index, indent=1) + "\n", directory / INDEX_NAME)
    return index


def read_index(directory: str | Path) -> dict:
    """The ``index.json`` of a reference catalog directory."""
    path = Path(directory) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise RefcatError(f"{path}: no reference catalog index") from None
    except json.JSONDecodeError as err:
        raise RefcatError(f"{path}: not valid JSON ({err})") from None
    for key in ("nside", "order", "shards"):
        if key not in index:
            raise RefcatError(f"{path}: index lacks {key!r}")
    if index["order"] != "nested":
        raise RefcatError(f"{path}: HEALPix order {index['order']!r}; only 'nested' is supported")
    return index


def refcat_shards(directory: str | Path, ra: float, dec: float, radius: float) -> list[Path]:
    """Paths of the shards ``index.json`` lists that overlap the circle of ``radius`` [deg] about ``(ra, dec)``."""
    directory = Path(directory)
    index = read_index(directory)
    present = {int(s["pixel"]) for s in index["shards"]}
    wanted = pixels_in_cone(index["nside"], ra, dec, radius)
    return [directory / f"{int(p)}.fits" for p in wanted if int(p) in present]


def read_shard(path: str | Path, n_rows: int | None = None) -> Table:
    """One shard, checked: present, a whole FITS table, and ``n_rows`` long if given (the index's count).

    Raises
    ------
    RefcatError
        Naming the shard and the problem (missing, unreadable, truncated, empty or short).
    """
    path = Path(path)
    if not path.exists():
        raise RefcatError(f"{path}: shard listed in {INDEX_NAME} is missing")
    try:
        check_fits_file(path)
        table = Table.read(path, format="fits")
    except FitsReadError as err:
        raise RefcatError(f"{err} (shard listed in {INDEX_NAME})") from None
    except Exception as err:  # a FITS file without a table, bad cards ...
        raise RefcatError(f"{path}: not a reference-catalog shard ({type(err).__name__}: {err})") from None
    if n_rows is not None and len(table) != n_rows:
        raise RefcatError(f"{path}: shard has {len(table)} rows, {INDEX_NAME} lists {n_rows}")
    return table


def load_refcat(directory: str | Path, ra: float, dec: float, radius: float) -> Table:
    """Reference stars within ``radius`` [deg] of ``(ra, dec)`` [deg], reading only overlapping shards.

    Returns an astropy Table with the catalog's columns and units (empty, with the columns,
    when no star is in the circle). A listed shard that is missing, damaged or holds another
    number of rows than the index says raises :class:`RefcatError` (a partial catalog would
    bias the astrometric and photometric fits without a word).
    """
    directory = Path(directory)
    index = read_index(directory)
    counts = {int(s["pixel"]): s.get("n") for s in index["shards"]}
    wanted = [int(p) for p in pixels_in_cone(index["nside"], ra, dec, radius) if int(p) in counts]
    tables = [read_shard(directory / f"{p}.fits", counts[p]) for p in wanted]
    if not tables:
        first = index["shards"][0]["pixel"] if index["shards"] else None
        if first is None:
            return Table(names=("id", "ra", "dec"), dtype=(np.int64, float, float))
        return read_shard(directory / f"{first}.fits")[:0]
    table = vstack(tables, metadata_conflicts="silent") if len(tables) > 1 else tables[0]
    keep = angular_distance(ra, dec, table["ra"], table["dec"]) <= radius
    return table[keep]
