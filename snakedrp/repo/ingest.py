"""Ingest: read raw headers into the registry of a data repository (the ``ingest`` rule).

Bad files are named with their problem and skipped (``on_error: skip``) or stop the ingest
before anything is written (``fail``); the previous registry is unchanged either way.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from snakedrp.repo.config import IngestConfig
from snakedrp.repo.butler import Butler
from snakedrp.repo.camera import Camera
from snakedrp.repo.io import atomic_path
from snakedrp.repo.raw import RawError, camera_problem, read_raw_header
from snakedrp.repo.registry import COLUMNS, HEADER_KEYS, PYTHON_TYPES, REGISTRY_NAME, Registry, write_registry

log = logging.getLogger("snakedrp.ingest")


class IngestError(RuntimeError):
    """Ingest refused its input; the message names the file and the problem."""


# ------------------------------------------------------------------ ingest


@dataclass(frozen=True)
class IngestReport:
    """What an ingest did.

    Attributes
    ----------
    registry : Path
        The registry file written.
    ingested : list of str
        Registry paths (relative to the repository root) of the files added.
    skipped : list of (str, str)
        (file, reason) of every file left out.
    """

    registry: Path
    ingested: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _problem(path: Path, err: Exception) -> str:
    # RawError messages start with the path; keep only the problem.
    text = str(err)
    return text[len(f"{path}: "):] if text.startswith(f"{path}: ") else text


def _camera_of(repo: Path):
    camera_path = repo / "_camera.yaml"
    if not camera_path.exists():
        return None
    return Camera.from_yaml(camera_path)


def _row_from_header(header, camera) -> dict:
    row = {}
    for col, key in HEADER_KEYS.items():
        try:
            row[col] = PYTHON_TYPES[COLUMNS[col]](header[key])
        except (TypeError, ValueError):
            raise RawError(f"header key {key} = {header[key]!r} is not a valid {COLUMNS[col].lower()}") from None
    problem = camera_problem(header, camera) if camera is not None else None
    if problem is not None:
        raise RawError(f"visit={row['visit']} ccd={row['ccd']}: {problem}")
    return row


def _relative(path: Path, repo: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(repo))


def ingest(repo_root: str | Path, paths: Iterable[str | Path], config: IngestConfig | None = None) -> IngestReport:
    """Read raw headers and (re)write ``<repo_root>/registry.sqlite3``.

    Parameters
    ----------
    repo_root : str or Path
        Data repository root.
    paths : iterable of str or Path
        Raw files (see :mod:`snakedrp.repo.raw`).
    config : IngestConfig, optional

    Returns
    -------
    IngestReport

    Raises
    ------
    IngestError
        With ``on_error="fail"``: the first bad file (named, with the problem) before anything
        is written. Always: when no file at all can be ingested. A duplicate (visit, ccd) is a
        bad file naming both paths. Whatever goes wrong, the previous registry is unchanged.
    """
    config = config or IngestConfig()
    config.validate()
    repo = Path(repo_root)
    target = repo / REGISTRY_NAME
    camera = _camera_of(repo)
    existing: dict[tuple[int, int], dict] = {}
    if config.append and target.exists():
        existing = {(r["visit"], r["ccd"]): r for r in Registry(target).exposures()}

    rows: dict[tuple[int, int], dict] = {}
    sources: dict[tuple[int, int], Path] = {}
    skipped: list[tuple[str, str]] = []

    def reject(path: Path, problem: str) -> None:
        if config.on_error == "fail":
            raise IngestError(f"{path}: {problem}")
        log.warning("skipping %s: %s", path, problem)
        skipped.append((str(path), problem))

    for path in map(Path, paths):
        try:
            row = _row_from_header(read_raw_header(path), camera)
        except RawError as err:
            reject(path, _problem(path, err))
            continue
        key = (row["visit"], row["ccd"])
        if key in rows:
            reject(path, f"duplicate visit={key[0]} ccd={key[1]}: already read from {sources[key]}")
            continue
        if key in existing:
            old = repo / existing[key]["path"]
            if os.path.abspath(old) != os.path.abspath(path):
                reject(path, f"duplicate visit={key[0]} ccd={key[1]}: already registered from {old}")
            continue
        rows[key] = row
        sources[key] = path
    if not rows and not existing:
        raise IngestError(f"no raw file could be ingested into {target} ({len(skipped)} skipped); "
                          f"the registry is unchanged")

    for key, row in rows.items():
        row["path"] = _transfer(sources[key], repo, key, config.transfer)

    write_registry(target, list(existing.values()) + list(rows.values()))
    log.info("ingested %d raw file(s) into %s; %d skipped", len(rows), target, len(skipped))
    return IngestReport(registry=target, ingested=[r["path"] for r in rows.values()], skipped=skipped)


def _transfer(path: Path, repo: Path, key: tuple[int, int], mode: str) -> str:
    """Bring ``path`` into the repository layout (``mode`` = none, symlink, copy); its registry path."""
    if mode == "none":
        return _relative(path, repo)
    dest = Path(Butler(repo).output_path("raw", visit=key[0], ccd=key[1]))
    if os.path.abspath(dest) != os.path.abspath(path):
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        if mode == "symlink":
            dest.symlink_to(os.path.abspath(path))
        else:
            with atomic_path(dest) as tmp:
                shutil.copy2(path, tmp)
    return _relative(dest, repo)
