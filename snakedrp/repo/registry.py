"""The registry: one SQLite file listing every raw exposure of a data repository.

``<repo>/registry.sqlite3`` holds a single table ``raw`` with one row per (visit, ccd):

==========  =======  ===========================================================
column      type     meaning (raw header key)
==========  =======  ===========================================================
visit       INTEGER  exposure number (VISIT)
ccd         INTEGER  detector id (CCD)
filter      TEXT     filter name, NONE for bias and dark (FILTER)
obstype     TEXT     science, bias, dark, flat or fringe (OBSTYPE)
date_obs    TEXT     UTC start, ISO 8601 (DATE-OBS)
mjd         REAL     MJD (UTC) of the start (MJD-OBS)
exptime     REAL     exposure time [s] (EXPTIME)
ra, dec     REAL     telescope pointing [deg] (TELRA, TELDEC)
rotation    REAL     sky rotation angle [deg] (ROTANG)
airmass     REAL     airmass at the start (AIRMASS)
path        TEXT     file path relative to the repository root
==========  =======  ===========================================================

Queries mirror the Gen2 butler's ``queryMetadata``. :func:`write_registry` writes the file
atomically (a new SQLite file beside the target, renamed into place), so a failed ingest
(:func:`snakedrp.repo.ingest.ingest`) leaves the previous registry untouched.
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Registry file name inside a data repository.
REGISTRY_NAME = "registry.sqlite3"

#: Columns of the ``raw`` table, with their SQLite types.
COLUMNS: dict[str, str] = {
    "visit": "INTEGER",
    "ccd": "INTEGER",
    "filter": "TEXT",
    "obstype": "TEXT",
    "date_obs": "TEXT",
    "mjd": "REAL",
    "exptime": "REAL",
    "ra": "REAL",
    "dec": "REAL",
    "rotation": "REAL",
    "airmass": "REAL",
    "path": "TEXT",
}

#: Raw header key of each column (``path`` comes from the file's location).
HEADER_KEYS: dict[str, str] = {
    "visit": "VISIT",
    "ccd": "CCD",
    "filter": "FILTER",
    "obstype": "OBSTYPE",
    "date_obs": "DATE-OBS",
    "mjd": "MJD-OBS",
    "exptime": "EXPTIME",
    "ra": "TELRA",
    "dec": "TELDEC",
    "rotation": "ROTANG",
    "airmass": "AIRMASS",
}

PYTHON_TYPES = {"INTEGER": int, "REAL": float, "TEXT": str}
_SCHEMA = (
    "CREATE TABLE raw ("
    + ", ".join(f'"{c}" {t} NOT NULL' for c, t in COLUMNS.items())
    + ", PRIMARY KEY (visit, ccd))"
)


class Registry:
    """Read-only view of a registry (the table of raw exposures).

    Parameters
    ----------
    path : str or Path
        ``<repo>/registry.sqlite3``; opened read-only.

    Examples
    --------
    >>> reg = Registry("data/ci_repo/registry.sqlite3")            # doctest: +SKIP
    >>> reg.query_metadata(["visit", "ccd"], filter="HSC-R", obstype="science")  # doctest: +SKIP
    [(903334, 0), (903334, 1), ...]
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no registry at {path}; run the ingest step first")
        self.path = path
        uri = path.absolute().as_uri() + "?mode=ro"  # as_uri escapes '?', '#' and spaces
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._check_schema()

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "Registry":
        """An in-memory registry with the given rows (each a dict with every column of :data:`COLUMNS`).

        The workflow uses it to stand in for a repository the simulator has not written yet.
        """
        self = cls.__new__(cls)
        self.path = None
        self._conn = sqlite3.connect(":memory:", check_same_thread=False)
        self._conn.execute(_SCHEMA)
        _insert(self._conn, [_coerce_row(r, where="from_rows") for r in rows])
        return self

    def _check_schema(self) -> None:
        try:
            cols = [r[1] for r in self._conn.execute("PRAGMA table_info(raw)")]
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path} is not a registry ({err})") from None
        if set(cols) != set(COLUMNS):
            raise ValueError(f"{self.path}: table raw has columns {cols}, expected {list(COLUMNS)}")

    def close(self) -> None:
        self._conn.close()

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM raw").fetchone()[0]

    def __repr__(self) -> str:
        return f"Registry({str(self.path) if self.path else '<memory>'!r}, {len(self)} raw rows)"

    # ------------------------------------------------------------ queries
    def _where(self, where: dict) -> tuple[str, list]:
        clauses, params = [], []
        for key, value in where.items():
            _check_column(key)
            if value is None:
                continue
            if isinstance(value, (list, tuple, set, frozenset)):
                values = [PYTHON_TYPES[COLUMNS[key]](v) for v in value]
                clauses.append(f'"{key}" IN ({", ".join("?" * len(values))})')
                params.extend(values)
            else:
                clauses.append(f'"{key}" = ?')
                params.append(PYTHON_TYPES[COLUMNS[key]](value))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def query_metadata(self, fields: str | Sequence[str], **where) -> list:
        """Distinct values of ``fields`` over the rows matching ``where`` (like ``queryMetadata``).

        Parameters
        ----------
        fields : str or sequence of str
            Column names. One field (a string or a one-element list) gives a list of values;
            several give a list of tuples.
        **where
            Column = value; a list/tuple value means "any of"; ``None`` is ignored.

        Returns
        -------
        list
            Sorted distinct values (or tuples).
        """
        single = isinstance(fields, str) or len(fields) == 1
        fields = [fields] if isinstance(fields, str) else list(fields)
        if not fields:
            raise ValueError("query_metadata needs at least one field")
        for f in fields:
            _check_column(f)
        clause, params = self._where(where)
        cols = ", ".join(f'"{f}"' for f in fields)
        rows = self._conn.execute(f"SELECT DISTINCT {cols} FROM raw{clause} ORDER BY {cols}", params).fetchall()
        return [r[0] for r in rows] if single else [tuple(r) for r in rows]

    def exposures(self, **where) -> list[dict]:
        """Every row matching ``where`` (see :meth:`query_metadata`) as a dict, sorted by (visit, ccd)."""
        clause, params = self._where(where)
        cur = self._conn.execute(f"SELECT * FROM raw{clause} ORDER BY visit, ccd", params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def table(self, **where):
        """:meth:`exposures` as an astropy Table (columns in :data:`COLUMNS` order)."""
        from astropy.table import Table

        rows = self.exposures(**where)
        dtype = [PYTHON_TYPES[t] for t in COLUMNS.values()]
        if not rows:
            return Table(names=list(COLUMNS), dtype=dtype)
        return Table(rows=[[r[c] for c in COLUMNS] for r in rows], names=list(COLUMNS), dtype=dtype)

    def visits(self, filter: str | None = None, obstype: str | None = "science") -> list[int]:
        """Visit numbers, optionally of one filter; science visits unless ``obstype`` says otherwise."""
        return self.query_metadata("visit", filter=filter, obstype=obstype)

    def filters(self, visit: int | None = None, obstype: str | None = "science") -> list[str]:
        """Filter names (of one visit, if given); science exposures unless ``obstype`` says otherwise."""
        return self.query_metadata("filter", visit=visit, obstype=obstype)

    def ccds(self, visit: int | None = None, obstype: str | None = None) -> list[int]:
        """CCD ids present (in one visit, if given), of any obstype unless one is given."""
        return self.query_metadata("ccd", visit=visit, obstype=obstype)

    def row(self, visit: int, ccd: int) -> dict:
        """The row of one (visit, ccd); :class:`KeyError` says what exists if there is none."""
        rows = self.exposures(visit=visit, ccd=ccd)
        if not rows:
            where = str(self.path) if self.path else "the registry"
            ccds = self.ccds(visit=visit)
            hint = (f"visit {visit} has ccds {', '.join(map(str, ccds))}" if ccds
                    else f"there is no visit {visit}")
            raise KeyError(f"no raw for visit={visit} ccd={ccd} in {where}; {hint}")
        return rows[0]


def _check_column(name: str) -> None:
    if name not in COLUMNS:
        raise KeyError(f"unknown registry field {name!r}; fields are {', '.join(COLUMNS)}")


def _coerce_row(row: dict, *, where: str) -> dict:
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ValueError(f"{where}: row {row!r} lacks column(s) {', '.join(missing)}")
    return {c: PYTHON_TYPES[t](row[c]) for c, t in COLUMNS.items()}


def _insert(conn: sqlite3.Connection, rows: list[dict]) -> None:
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    try:
        conn.executemany(f"INSERT INTO raw ({cols}) VALUES ({', '.join('?' * len(COLUMNS))})",
                         [tuple(r[c] for c in COLUMNS) for r in rows])
    except sqlite3.IntegrityError as err:
        raise ValueError(f"duplicate (visit, ccd) in registry rows: {err}") from None
    conn.commit()


def write_registry(path: str | Path, rows: list[dict]) -> None:
    """Write a registry file holding ``rows`` (dicts of :data:`COLUMNS`), atomically.

    The file appears complete under ``path`` or not at all: it is built under a temporary name
    in the same directory and renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.execute(_SCHEMA)
            _insert(conn, rows)
        finally:
            conn.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

