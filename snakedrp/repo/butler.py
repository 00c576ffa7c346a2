"""The butler: dataset type + data ID → file, reruns and their chains, typed get/put.

Dataset types are declared in ``snakedrp/repo/data/datasets.yaml`` (template, location, storage).
Datasets at location ``root`` (raw data, master calibrations, reference catalogs) live under
the repository root; ``rerun`` datasets (every pipeline output) under ``<root>/rerun/<name>/``.

Reruns chain as in the LSST command line: ``rerun="a:b"`` writes to ``b`` and reads what ``b``
lacks from ``a`` (and from ``a``'s own parent, and so on). ``b`` records its parent in
``<root>/rerun/b/_parent`` (one line, the parent's name), so afterwards ``rerun="b"`` means the
same chain, and a different parent (``"c:b"``) is refused with :class:`RerunError`.

Paths are returned as strings prefixed by the root *as given* (a relative root gives relative
paths), so that templates serve directly as Snakemake input/output patterns.
"""
from __future__ import annotations

import importlib
import json
import re
import string
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from snakedrp.repo.dataid import patch_in_path

#: Placeholders a template may use (the data-ID keys / Snakemake wildcards).
TEMPLATE_KEYS = ("visit", "ccd", "filter", "tract", "patch", "refcat")
LOCATIONS = ("root", "rerun")
PARENT_FILE = "_parent"
#: Data-ID keys :meth:`Butler.complete` may look up in the registry from visit (and ccd).
REGISTRY_FILLED = ("filter",)

_RERUN_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*\Z")


class ButlerError(KeyError):
    """Unknown dataset type, missing data-ID key, or a dataset that cannot be found."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class NoSuchDatasetError(ButlerError, FileNotFoundError):
    """A dataset was asked for that exists nowhere along the rerun chain."""


class RerunError(ValueError):
    """A rerun name is malformed, its chain is cyclic, or it would be re-pointed to a new parent."""


# ------------------------------------------------------------------ dataset types
@dataclass(frozen=True)
class DatasetType:
    """One entry of ``datasets.yaml``.

    Attributes
    ----------
    name : str
    template : str
        Path relative to the location directory, with ``{key}`` placeholders.
    location : str
        ``root`` or ``rerun``.
    storage : str
        Reader/writer name (see :data:`STORAGES`).
    python : str or None
        Dotted class name for storage ``object``.
    parquet : bool
        Tables only: also write a Parquet copy beside the FITS file.
    obstype : str or None
        The registry obstype of the exposures behind this dataset (for :meth:`Butler.query`).
    doc : str
    """

    name: str
    template: str
    location: str
    storage: str
    python: str | None = None
    parquet: bool = False
    obstype: str | None = None
    doc: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        """The data-ID keys of the template, in order of first appearance."""
        names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        return tuple(dict.fromkeys(names))


def load_dataset_types(path: str | Path | None = None) -> dict[str, DatasetType]:
    """Read and check ``datasets.yaml`` (the packaged one by default)."""
    if path is None:
        text = resources.files("snakedrp").joinpath("repo/data/datasets.yaml").read_text()
        where = "snakedrp/repo/data/datasets.yaml"
    else:
        text, where = Path(path).read_text(), str(path)
    out = {}
    for name, entry in (yaml.safe_load(text) or {}).items():
        unknown = set(entry) - {"template", "location", "storage", "python", "parquet", "obstype", "doc"}
        if unknown:
            raise ValueError(f"{where}: {name} has unknown field(s) {', '.join(sorted(unknown))}")
        dt = DatasetType(name=name, **entry)
        for _, field, spec, conv in string.Formatter().parse(dt.template):
            if field is not None and (field not in TEMPLATE_KEYS or spec or conv):
                raise ValueError(f"{where}: {name} template {dt.template!r} has placeholder {{{field}}}; "
                                 f"allowed are {', '.join(TEMPLATE_KEYS)} without format specs")
        if dt.location not in LOCATIONS:
            raise ValueError(f"{where}: {name} location {dt.location!r} is not one of {', '.join(LOCATIONS)}")
        if dt.storage not in STORAGES:
            raise ValueError(f"{where}: {name} storage {dt.storage!r} is not one of {', '.join(STORAGES)}")
        if dt.storage == "object" and not dt.python:
            raise ValueError(f"{where}: {name} has storage object but no python class")
        out[name] = dt
    return out


# ------------------------------------------------------------------ storages
def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _read_exposure(path, dt):
    from snakedrp.repo.exposure import Exposure

    return Exposure.read(path)


def _write_exposure(obj, path, dt):
    obj.write(path)


def _read_table(path, dt):
    from astropy.table import Table

    return Table.read(path, format="fits")


def _io():
    """snakedrp.repo.io, imported on first write: it needs astropy, and the Snakefile (parsed by
    every job) makes a Butler only to name paths."""
    from snakedrp.repo import io

    return io


def _write_table(obj, path, dt):
    _io().write_table(obj, path, parquet=dt.parquet)


def _read_raw(path, dt):
    from snakedrp.repo.raw import RawFrame

    return RawFrame.read(path)


def _write_raw(obj, path, dt):
    import numpy as np
    from astropy.io import fits

    header = obj.header.copy()
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    data = np.clip(np.round(obj.data), 0, 65535).astype(np.uint16)
    _io().write_hdulist(fits.HDUList([fits.PrimaryHDU(data=data, header=header)]), path)


def _read_camera(path, dt):
    from snakedrp.repo.camera import Camera

    return Camera.from_yaml(path)


def _read_object(path, dt):
    cls = _import(dt.python)
    if not hasattr(cls, "read"):
        raise TypeError(f"{dt.python} has no read(path); cannot get {dt.name}")
    return cls.read(path)


def _write_object(obj, path, dt):
    if not hasattr(obj, "write"):
        raise TypeError(f"{type(obj).__name__} has no write(path); cannot put {dt.name}")
    obj.write(path)


def _read_fits(path, dt):
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        return fits.HDUList([h.copy() for h in hdul])


#: storage name → (reader(path, dataset_type), writer(obj, path, dataset_type)); writers are atomic.
STORAGES: dict[str, tuple[Callable, Callable]] = {
    "exposure": (_read_exposure, _write_exposure),
    "table": (_read_table, _write_table),
    "raw": (_read_raw, _write_raw),
    "camera": (_read_camera, lambda obj, path, dt: _io().write_text(obj.to_yaml(), path)),
    "yaml": (lambda path, dt: yaml.safe_load(Path(path).read_text()),
             lambda obj, path, dt: _io().write_text(yaml.safe_dump(obj, sort_keys=False), path)),
    "json": (lambda path, dt: json.loads(Path(path).read_text()),
             lambda obj, path, dt: _io().write_text(json.dumps(obj, indent=1), path)),
    "text": (lambda path, dt: Path(path).read_text(), lambda obj, path, dt: _io().write_text(str(obj), path)),
    "fits": (_read_fits, lambda obj, path, dt: _io().write_hdulist(obj, path)),
    "object": (_read_object, _write_object),
}


# ------------------------------------------------------------------ reruns
def _check_rerun_name(name: str) -> str:
    if not name or not _RERUN_NAME.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise RerunError(f"bad rerun name {name!r}; use letters, digits, _ . - (and / for sub-directories)")
    return name


def read_parent(root: str | Path, rerun: str) -> str | None:
    """The parent recorded for ``rerun`` (``None`` if it has none)."""
    path = Path(root) / "rerun" / rerun / PARENT_FILE
    if not path.exists():
        return None
    return path.read_text().strip() or None


def resolve_chain(root: str | Path, rerun: str | None, *, record: bool = True) -> list[str]:
    """The rerun chain for a ``--rerun`` value, output first: ``"a:b"`` → ``["b", "a", ...]``.

    Records ``b``'s parent on first use (when ``record``), and refuses to re-point it.
    """
    if rerun is None or rerun == "":
        return []
    parts = rerun.split(":")
    if len(parts) > 2:
        raise RerunError(f"rerun {rerun!r}: give 'name' or 'parent:child'")
    names = [_check_rerun_name(p) for p in parts]
    output = names[-1]
    recorded = read_parent(root, output)
    if len(names) == 2:
        parent = names[0]
        if parent == output:
            raise RerunError(f"rerun {rerun!r} cannot chain onto itself")
        if recorded is not None and recorded != parent:
            raise RerunError(f"rerun {output} already chains onto {recorded}; cannot re-point it to {parent}")
    else:
        parent = recorded
    chain = [output]
    while parent is not None:
        if parent in chain:
            raise RerunError(f"rerun chain {' -> '.join(chain + [parent])} is cyclic")
        chain.append(parent)
        parent = read_parent(root, parent)
    if len(names) == 2 and recorded is None and record:
        _io().write_text(names[0] + "\n", Path(root) / "rerun" / output / PARENT_FILE)
    return chain


# ------------------------------------------------------------------ the butler
class Butler:
    """Paths and typed I/O of the datasets of one data repository and rerun chain.

    Parameters
    ----------
    root : str or Path
        Data repository root (raw/, CALIB/, ref_cats/, registry.sqlite3, rerun/).
    rerun : str, optional
        Output rerun ``"name"``, or ``"parent:name"`` to chain a new rerun onto a parent.
    registry : Registry, optional
        Use this registry instead of ``<root>/registry.sqlite3`` (e.g. the simulator's plan).
    record : bool
        Record a new chain's parent in ``<root>/rerun/<name>/_parent`` now (default).

    Examples
    --------
    >>> b = Butler("data/ci_repo", rerun="ci:coadd")                # doctest: +SKIP
    >>> b.template("calexp")                                         # doctest: +SKIP
    'data/ci_repo/rerun/coadd/calexp/{visit}/calexp-{visit}-{ccd}.fits'
    >>> calexp = b.get("calexp", visit=903334, ccd=1)    # found in rerun ci  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, rerun: str | None = None, *, registry=None, record: bool = True):
        self.root = Path(root)
        self.chain: list[str] = resolve_chain(self.root, rerun, record=record)
        self.dataset_types = DATASET_TYPES
        self._registry = registry

    def __repr__(self) -> str:
        return f"Butler({str(self.root)!r}, rerun={':'.join(reversed(self.chain[:2])) or None!r})"

    @property
    def rerun(self) -> str | None:
        """The output rerun's name."""
        return self.chain[0] if self.chain else None

    @property
    def parents(self) -> list[str]:
        """The reruns read through, nearest first."""
        return self.chain[1:]

    def rerun_dir(self, name: str | None = None) -> Path:
        """``<root>/rerun/<name>`` (the output rerun by default)."""
        name = name or self.rerun
        if name is None:
            raise ButlerError("this butler has no rerun; give Butler(root, rerun='name')")
        return self.root / "rerun" / name

    @cached_property
    def registry(self):
        """The registry (opened on first use)."""
        if self._registry is not None:
            return self._registry
        from snakedrp.repo.registry import REGISTRY_NAME, Registry

        return Registry(self.root / REGISTRY_NAME)

    @cached_property
    def camera(self):
        """The repository's camera, from ``<root>/_camera.yaml``."""
        path = self.root / "_camera.yaml"
        if not path.exists():
            raise FileNotFoundError(f"no camera definition {path}; the repository has not been set up")
        from snakedrp.repo.camera import Camera

        return Camera.from_yaml(path)

    # ------------------------------------------------------------ paths
    def dataset_type(self, name: str) -> DatasetType:
        try:
            return self.dataset_types[name]
        except KeyError:
            raise ButlerError(f"unknown dataset type {name!r}; known: {', '.join(sorted(self.dataset_types))}") from None

    def _location_dirs(self, dt: DatasetType, *, reading: bool) -> list[Path]:
        if dt.location == "root":
            return [self.root]
        if not self.chain:
            raise ButlerError(f"{dt.name} lives in a rerun; this butler has none (give rerun='name')")
        return [self.rerun_dir(n) for n in (self.chain if reading else self.chain[:1])]

    def template(self, dataset_type: str, *, absolute: bool = True) -> str:
        """Path pattern of a dataset with its ``{key}`` wildcards left in.

        ``absolute=True`` prefixes the output location (``<root>/rerun/<name>/`` or ``<root>/``);
        ``absolute=False`` gives the template relative to that location.
        """
        dt = self.dataset_type(dataset_type)
        if not absolute:
            return dt.template
        return str(self._location_dirs(dt, reading=False)[0] / dt.template)

    def keys(self, dataset_type: str) -> tuple[str, ...]:
        """The data-ID keys a dataset type needs."""
        return self.dataset_type(dataset_type).keys

    def complete(self, dataset_type: str, data_id: dict) -> dict:
        """The data ID with the keys the template needs, missing ones filled from the registry.

        A key the registry holds (``filter``) is looked up from the others it has (``visit``,
        ``ccd``); extra keys are ignored.
        """
        dt = self.dataset_type(dataset_type)
        out = {k: data_id[k] for k in dt.keys if k in data_id and data_id[k] is not None}
        missing = [k for k in dt.keys if k not in out]
        if not missing:
            return out
        given = {k: data_id[k] for k in ("visit", "ccd") if data_id.get(k) is not None}
        unfillable = [k for k in missing if k not in REGISTRY_FILLED or not given]
        if unfillable:
            raise ButlerError(
                f"data ID for {dt.name} lacks {', '.join(unfillable)} (needs {', '.join(dt.keys)}; got "
                f"{', '.join(f'{k}={v}' for k, v in data_id.items()) or 'nothing'})"
            )
        try:
            registry = self.registry
        except FileNotFoundError as err:
            raise ButlerError(f"data ID for {dt.name} lacks {', '.join(missing)}, and there is no "
                              f"registry to look it up ({err})") from None
        for key in missing:
            values = registry.query_metadata(key, **given)
            if len(values) != 1:
                where = " ".join(f"{k}={v}" for k, v in given.items())
                raise ButlerError(f"data ID for {dt.name} lacks {key}, and the registry has "
                                  f"{'no' if not values else len(values)} value(s) of {key} for {where}")
            out[key] = values[0]
        return out

    def _format(self, dt: DatasetType, data_id: dict) -> str:
        for key, value in data_id.items():
            text = str(value)
            if not text or "/" in text or text in (".", ".."):
                raise ButlerError(f"data ID value {key}={value!r} cannot be part of a path")
        if "patch" in data_id:
            data_id = {**data_id, "patch": patch_in_path(data_id["patch"])}
        return dt.template.format(**data_id)

    def output_path(self, dataset_type: str, **data_id) -> str:
        """Where a dataset is written: the output rerun, or the root for root datasets."""
        dt = self.dataset_type(dataset_type)
        rel = self._format(dt, self.complete(dataset_type, data_id))
        return str(self._location_dirs(dt, reading=False)[0] / rel)

    def _candidates(self, dataset_type: str, data_id: dict) -> list[Path]:
        dt = self.dataset_type(dataset_type)
        rel = self._format(dt, self.complete(dataset_type, data_id))
        return [d / rel for d in self._location_dirs(dt, reading=True)]

    def path(self, dataset_type: str, **data_id) -> str:
        """Where a dataset is read from: the first existing along the chain (output rerun first).

        If it exists nowhere yet, the output path (so workflow input functions name the file a
        rule will make).
        """
        candidates = self._candidates(dataset_type, data_id)
        return str(next((p for p in candidates if p.exists()), candidates[0]))

    def exists(self, dataset_type: str, **data_id) -> bool:
        """Whether the dataset exists anywhere along the chain (or in the root)."""
        return any(p.exists() for p in self._candidates(dataset_type, data_id))

    # ------------------------------------------------------------ I/O
    def get(self, dataset_type: str, **data_id) -> Any:
        """Read a dataset as its Python type (Exposure, Table, RawFrame, dict, ...)."""
        dt = self.dataset_type(dataset_type)
        candidates = self._candidates(dataset_type, data_id)
        for p in candidates:
            if p.exists():
                return STORAGES[dt.storage][0](p, dt)
        where = ", ".join(str(p) for p in candidates)
        raise NoSuchDatasetError(
            f"no {dataset_type} for {' '.join(f'{k}={v}' for k, v in data_id.items())}; looked in {where}"
        )

    def put(self, obj: Any, dataset_type: str, **data_id) -> str:
        """Write a dataset (atomically) to its output path; returns the path."""
        dt = self.dataset_type(dataset_type)
        path = self.output_path(dataset_type, **data_id)
        STORAGES[dt.storage][1](obj, path, dt)
        return path

    # ------------------------------------------------------------ registry
    def query(self, what: str | list[str] | tuple[str, ...], **where) -> list:
        """Data IDs from the registry.

        ``query("calexp", visit=903334)`` gives the data IDs (dicts of the dataset's keys) of
        the registry's exposures of that dataset's obstype; ``query(["visit", "ccd"],
        filter="HSC-R")`` is :meth:`Registry.query_metadata`.
        """
        if isinstance(what, str) and what in self.dataset_types:
            dt = self.dataset_types[what]
            from snakedrp.repo.registry import COLUMNS

            extra = [k for k in dt.keys if k not in COLUMNS]
            if extra:
                raise ButlerError(f"{what} is keyed by {', '.join(extra)}, which the registry does not hold")
            if dt.obstype is not None:
                where.setdefault("obstype", dt.obstype)
            rows = self.registry.query_metadata(list(dt.keys), **where)
            return [dict(zip(dt.keys, r if isinstance(r, tuple) else (r,))) for r in rows]
        return self.registry.query_metadata(what, **where)


#: The packaged dataset types.
DATASET_TYPES: dict[str, DatasetType] = load_dataset_types()
