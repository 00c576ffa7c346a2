"""Safe YAML reading with libyaml's parser where PyYAML was built with it (5-10x faster).

Every Snakemake process (one per Slurm job) reads the config and its 100 kB schema, and every job
a camera file: the pure-Python parser costs tenths of a second each time. The constructor is
PyYAML's safe one either way, so the objects are the same.
"""
from __future__ import annotations

from pathlib import Path

import yaml

SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: str | Path):
    """The YAML document in ``path``, as ``yaml.safe_load`` gives it."""
    loader = SAFE_LOADER(Path(path).read_text())
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
