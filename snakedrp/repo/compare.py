"""Compare the data products of two repositories (or two product trees): image pixels and table
values, not the headers, which hold dates, host names and versions.

Used to show that a refactoring, a Slurm run, a resumed run or a run with other ``--cores``
gives the same products: ``python -m snakedrp compare A B``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Product files compared, by suffix (.parq: the Parquet copies of tables, snakedrp.repo.io.write_table).
SUFFIXES = (".fits", ".parq", ".parquet")

#: Directories never compared: logs and benchmarks hold times, .snakemake is Snakemake's.
SKIPPED_DIRS = {"logs", "benchmarks", ".snakemake"}


@dataclass
class Comparison:
    """Outcome of :func:`compare_trees`; ``ok`` when both trees hold the same files with equal data."""

    compared: int = 0
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.different)

    def summary(self) -> str:
        lines = [f"{self.compared} product files compared: "
                 + ("identical data" if self.ok else f"{len(self.different)} differ")]
        lines += [f"  only in A: {p}" for p in self.only_in_a]
        lines += [f"  only in B: {p}" for p in self.only_in_b]
        lines += [f"  differs:   {p}" for p in self.different]
        return "\n".join(lines)


def product_files(root: str | Path) -> list[str]:
    """Relative paths of the product files under ``root`` (sorted)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.suffix in SUFFIXES and p.is_file() and not SKIPPED_DIRS & set(p.relative_to(root).parts))


def _arrays_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "O":  # variable-length array columns: one array per row
        return all(_arrays_equal(x, y) for x, y in zip(a.ravel(), b.ravel()))
    if a.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def fits_data_equal(path_a: str | Path, path_b: str | Path) -> bool:
    """Same HDU count, and each HDU's data (image pixels, or table columns by name) equal."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path_a) as ha, fits.open(path_b) as hb:
            if len(ha) != len(hb):
                return False
            for a, b in zip(ha, hb):
                if (a.data is None) != (b.data is None):
                    return False
                if a.data is None:
                    continue
                if isinstance(a, fits.BinTableHDU) or isinstance(a, fits.TableHDU):
                    if a.columns.names != b.columns.names:
                        return False
                    if not all(_arrays_equal(a.data[n], b.data[n]) for n in a.columns.names):
                        return False
                elif not _arrays_equal(a.data, b.data):
                    return False
    return True


def parquet_data_equal(path_a: str | Path, path_b: str | Path) -> bool:
    """Same column names and equal values (the key-value metadata is not compared)."""
    import pyarrow.parquet as pq

    a, b = pq.read_table(path_a), pq.read_table(path_b)
    if a.column_names != b.column_names or a.num_rows != b.num_rows:
        return False
    return all(_arrays_equal(a[n].to_numpy(zero_copy_only=False), b[n].to_numpy(zero_copy_only=False))
               for n in a.column_names)


def compare_trees(root_a: str | Path, root_b: str | Path) -> Comparison:
    """Compare every FITS and Parquet product under two directories by data."""
    files_a, files_b = set(product_files(root_a)), set(product_files(root_b))
    out = Comparison(only_in_a=sorted(files_a - files_b), only_in_b=sorted(files_b - files_a))
    for rel in sorted(files_a & files_b):
        pa, pb = Path(root_a, rel), Path(root_b, rel)
        same = fits_data_equal(pa, pb) if pa.suffix == ".fits" else parquet_data_equal(pa, pb)
        out.compared += 1
        if not same:
            out.different.append(rel)
    return out
