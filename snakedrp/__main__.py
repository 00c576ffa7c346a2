"""Command line: ``python -m snakedrp show-config [PATTERN] [--configfile F] [--config K=V ...]``.

``compare A B`` compares the data products (FITS pixels and table values, Parquet values; not
headers) of two directories and exits 1 when they differ.

``show-config`` prints every option of the config tree with its description, type, default,
allowed values and the source of its value, like the LSST tasks' ``--show=config``.
``write-config`` regenerates ``config/config.yaml`` and ``config/schema.yaml`` from the
config dataclasses (the single source of truth for options).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from snakedrp import config as sdconfig
from snakedrp.pexconfig import ConfigError


def _parse_assignments(items: list[str]) -> dict:
    """``["isr.do_flat=false", "rerun=x"]`` → dict, values parsed as YAML (as Snakemake does)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--config expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snakedrp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show-config", help="print the resolved config with documentation")
    show.add_argument("pattern", nargs="?", help="glob or substring of dotted option names, e.g. 'isr.*'")
    show.add_argument("--configfile", action="append", default=[], help="partial config file(s), merged in order")
    show.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, as snakemake --config")
    show.add_argument("--base", default="config/config.yaml", help="the workflow's config file")
    write = sub.add_parser("write-config", help="regenerate config/config.yaml and config/schema.yaml")
    write.add_argument("--directory", default="config")
    compare = sub.add_parser("compare", help="compare the data products of two directories (not headers)")
    compare.add_argument("a")
    compare.add_argument("b")
    args = parser.parse_args(argv)

    if args.command == "compare":
        from snakedrp.repo.compare import compare_trees

        result = compare_trees(args.a, args.b)
        print(result.summary())
        return 0 if result.ok and result.compared else 1

    if args.command == "write-config":
        d = Path(args.directory)
        (d / "config.yaml").write_text(sdconfig.default_config_yaml())
        (d / "schema.yaml").write_text(sdconfig.schema_yaml())
        print(f"wrote {d / 'config.yaml'} and {d / 'schema.yaml'}")
        return 0
    try:
        sources = []
        if Path(args.base).exists():
            sources.append((args.base, yaml.safe_load(Path(args.base).read_text())))
        for f in args.configfile:
            sources.append((f"--configfile {f}", yaml.safe_load(Path(f).read_text())))
        sources.append(("command line", _parse_assignments(args.config)))
        cfg, origin = sdconfig.resolve(sources)
    except ConfigError as err:
        print(f"snakedrp: config error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(sdconfig.format_config(cfg, origin, args.pattern))
    return 0


if __name__ == "__main__":
    sys.exit(main())
