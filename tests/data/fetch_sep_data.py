"""Fetch the real-pixel test data (sep's ESO NTT frame and SExtractor's catalog of it) into a cache.

Run by the CI set-up before pytest (never during the tests):

    python tests/data/fetch_sep_data.py            # into $SNAKEDRP_SEP_DATA or ~/.cache/snakedrp/sep-data

It downloads the source distribution of the installed sep version with pip
(``pip download --no-binary sep --no-deps sep==<version>``) and unpacks its ``data/`` directory:
``image.fits`` (256x256 NTT CCD frame), ``image.cat`` (SExtractor's ASCII_HEAD catalog of it),
``back.fits`` and ``rms.fits`` (SExtractor's background and RMS check images) and the
configuration that made them (``default.sex``, ``default.param``, ``default.conv``).
``--sdist PATH`` unpacks an already downloaded tarball instead.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

FILES = ("image.fits", "image.cat", "back.fits", "rms.fits", "default.sex", "default.param", "default.conv")


def cache_dir() -> Path:
    """Where the data live: ``$SNAKEDRP_SEP_DATA``, else ``~/.cache/snakedrp/sep-data``."""
    return Path(os.environ.get("SNAKEDRP_SEP_DATA", Path.home() / ".cache" / "snakedrp" / "sep-data"))


def unpack(sdist: Path, dest: Path) -> list[Path]:
    """Extract ``<sdist>/data/<FILES>`` flat into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "data" and parts[2] in FILES and member.isfile():
                (dest / parts[2]).write_bytes(tar.extractfile(member).read())
                written.append(dest / parts[2])
    missing = sorted(set(FILES) - {p.name for p in written})
    if missing:
        raise SystemExit(f"{sdist} has no data/{', data/'.join(missing)}")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=cache_dir())
    parser.add_argument("--version", default=importlib.metadata.version("sep"), help="sep version (default: installed)")
    parser.add_argument("--sdist", type=Path, help="use this sep-<version>.tar.gz instead of downloading")
    args = parser.parse_args(argv)
    if all((args.dest / f).exists() for f in FILES) and args.sdist is None:
        print(f"sep data already in {args.dest}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", "sep", "--no-deps",
                            f"sep=={args.version}", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("sep-*.tar.gz"))
        unpack(sdist, args.dest)
    print(f"unpacked sep {args.version} data/ into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
