"""Config of the ingest of raw files into the registry.

The algorithm modules (ingest) import their configs from here, under the same names. This module
imports only :mod:`snakedrp.pexconfig`, the standard library and other light modules, so that
:mod:`snakedrp.config`, which every Snakefile parse and job script imports, stays light.
"""
from __future__ import annotations

from dataclasses import dataclass

from snakedrp.pexconfig import Config, option


@dataclass
class IngestConfig(Config):
    """Ingest of raw files into the registry (the role of ingestImages.py)."""

    on_error: str = option("skip", "What to do with an unreadable, truncated or incomplete raw file: "
                           "skip it with a warning, or fail the ingest", choices=("skip", "fail"))
    transfer: str = option("none", "How files are brought into the repository layout raw/<visit>/: "
                           "none (registered where they are), symlink or copy", choices=("none", "symlink", "copy"))
    append: bool = option(False, "Add to the existing registry instead of rebuilding it from the given files")
