"""A survey-size data repository without pixels: the registry and empty placeholder files.

Writes what the workflow needs to plan a survey's single-frame jobs in a dry run: a registry of
``visits`` science visits (spread evenly over the filters) on a camera of ``ccds`` CCDs, plus
bias, dark, flat and fringe exposures for every CCD; the camera YAML (the HSC-like camera with
its CCDs repeated on a grid up to ``ccds``); an empty file at every raw path (Snakemake checks
that inputs exist, never what they hold) and a placeholder reference-catalog index. The
pointings step across the sky in a raster of ``tracts`` fields one degree apart, so a survey spans
several tracts. Nothing here is meant to be processed: it is for ``snakemake -n`` only.

    python benchmarks/survey_registry.py /tmp/survey --visits 1000 --ccds 100
    snakemake -n -q rules --config repo=/tmp/survey
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from snakedrp.repo.registry import REGISTRY_NAME, write_registry

ROOT = Path(__file__).resolve().parents[1]
CALIB_EXPOSURES = dict(bias=3, dark=3, flat=3, fringe=2)  # per CCD (flat, fringe: per filter)
FIRST_VISIT = 1000


def survey_camera(n_ccds: int) -> dict:
    """The hsc camera's YAML with its CCDs repeated on a grid to ``n_ccds`` CCDs (ids 0..n-1)."""
    spec = yaml.safe_load((ROOT / "config/cameras/hsc.yaml").read_text())
    template = spec["ccds"]
    n_x = math.ceil(math.sqrt(n_ccds))
    ny, nx = spec["ccd_shape"]
    pitch_x, pitch_y = (nx + 50) * spec["pixel_size"], (ny + 50) * spec["pixel_size"]  # mm, 50 px gaps
    ccds = []
    for i in range(n_ccds):
        row, col = divmod(i, n_x)
        ccd = dict(template[i % len(template)])
        ccd.update(id=i, x_mm=round((col - (n_x - 1) / 2) * pitch_x, 3),
                   y_mm=round((row - (math.ceil(n_ccds / n_x) - 1) / 2) * pitch_y, 3))
        ccds.append(ccd)
    spec.update(name=f"survey{n_ccds}", description=f"HSC-like camera with {n_ccds} CCDs (dry runs only)",
                ccds=ccds)
    return spec


def survey_rows(n_visits: int, n_ccds: int, filters: list[str], fringe: set[str], n_tracts: int) -> list[dict]:
    """Registry rows: science visits, then every CCD's calibration exposures."""
    rows = []
    visit = FIRST_VISIT

    def add(obstype, filter_name, exptime, ra, dec):
        nonlocal visit
        mjd = 60000.0 + visit * 1e-3
        for ccd in range(n_ccds):
            rows.append(dict(visit=visit, ccd=ccd, filter=filter_name, obstype=obstype,
                             date_obs=f"2026-01-01T00:00:{visit % 60:02d}", mjd=mjd, exptime=exptime,
                             ra=ra, dec=dec, rotation=0.0, airmass=1.1,
                             path=f"raw/{visit}/raw-{visit}-{ccd}.fits"))
        visit += 1

    side = math.ceil(math.sqrt(n_tracts))
    for i in range(n_visits):
        field = i % n_tracts
        # dithers of up to ~0.1 deg about each of n_tracts field centres one degree apart
        ra = 150.0 + field % side + 0.02 * ((i // n_tracts) % 5)
        dec = 2.0 + field // side + 0.02 * ((i // n_tracts // 5) % 5)
        add("science", filters[i % len(filters)], 60.0, ra, dec)
    for _ in range(CALIB_EXPOSURES["bias"]):
        add("bias", "NONE", 0.0, 0.0, 0.0)
    for _ in range(CALIB_EXPOSURES["dark"]):
        add("dark", "NONE", 300.0, 0.0, 0.0)
    for f in filters:
        for _ in range(CALIB_EXPOSURES["flat"]):
            add("flat", f, 5.0, 0.0, 0.0)
        if f in fringe:
            for _ in range(CALIB_EXPOSURES["fringe"]):
                add("fringe", f, 60.0, 150.0, 2.0)
    return rows


def write_survey(repo: Path, n_visits: int, n_ccds: int, n_tracts: int = 4, refcat: str = "sim_gaia") -> int:
    """Write the repository; returns the number of science (visit, ccd) rows."""
    repo = Path(repo)
    camera = survey_camera(n_ccds)
    filters = list(camera["filters"])
    fringe = {name for name, f in camera["filters"].items() if f.get("fringe")}
    rows = survey_rows(n_visits, n_ccds, filters, fringe, n_tracts)
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "_camera.yaml").write_text(yaml.safe_dump(camera, sort_keys=False))
    index = repo / "ref_cats" / refcat / "index.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"placeholder": True, "shards": []}))
    for visit in sorted({r["visit"] for r in rows}):
        (repo / "raw" / str(visit)).mkdir(parents=True, exist_ok=True)
    for r in rows:
        (repo / r["path"]).touch()
    write_registry(repo / REGISTRY_NAME, rows)
    return sum(r["obstype"] == "science" for r in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path)
    parser.add_argument("--visits", type=int, default=1000, help="science visits")
    parser.add_argument("--ccds", type=int, default=100, help="CCDs of the camera")
    parser.add_argument("--tracts", type=int, default=4, help="fields (one degree apart) the visits cycle over")
    args = parser.parse_args(argv)
    n = write_survey(args.repo, args.visits, args.ccds, args.tracts)
    print(f"{args.repo}: {n} science CCD exposures ({args.visits} visits x {args.ccds} CCDs)")


if __name__ == "__main__":
    main()
