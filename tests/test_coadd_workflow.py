"""The coadd part of the workflow on a small fake repository: patch targets, data IDs, incremental runs.

The repository holds only what the coadd rules read: a registry, calexps that are nothing but a
WCS and a tiny image (their footprints are what matter), and, older than those, empty stand-ins
for the simulator's truth, the raw files and the reference index, so that every job before the
coadds is up to date. Only the cheap jobs run for real
(make_skymap and the make_overlaps checkpoint, which read headers); warps, coadds and detections
are then planned with dry runs (``snakemake -n``) and, for the incremental test, stood in for by
files newer than their inputs.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from snakedrp.coadd.skymap import RingsSkyMap, format_patch
from snakedrp.repo.dataid import patch_id
from snakedrp.repo.butler import Butler
from snakedrp.repo.exposure import Exposure
from snakedrp.repo.registry import write_registry

pytestmark = pytest.mark.workflow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 5 * 60  # s, per snakemake call
# Calexps of 40 x 80 pixels of 6 arcsec: 4' x 8' footprints; patches of 1200 + 2 x 50 pixels of
# 0.168 arcsec (the ci camera's): 3.4' inner, so each CCD touches a few patches.
CALEXP_SHAPE = (80, 40)  # (ny, nx)
CALEXP_SCALE = 6.0  # arcsec/pixel
PATCH_INNER, PATCH_BORDER = 1200, 50
SETTINGS = ("isr.do_bias=false isr.do_dark=false isr.do_flat=false isr.do_fringe=false "
            f"coadd.skymap.type=rings coadd.skymap.patch_inner={PATCH_INNER} "
            f"coadd.skymap.patch_border={PATCH_BORDER}")
FIELD = (150.0, 2.0)  # deg; the first visits' pointing
# visit → (filter, RA offset [deg], Dec offset [deg]) of its two CCDs' centre
VISITS = {
    100: ("HSC-R", 0.0, 0.0),
    102: ("HSC-R", 0.01, 0.005),
    104: ("HSC-R", 0.4, 0.0),   # far east: touches none of the first visits' patches
    200: ("HSC-I", 0.0, 0.0),
    202: ("HSC-I", -0.01, 0.0),
}
NEW_VISITS = {106: ("HSC-R", 0.0, -0.004)}  # added later, on the first visits' field


def sky_map() -> RingsSkyMap:
    return RingsSkyMap(n_rings=120, tract_overlap=60 / 3600, projection="TAN", pixel_scale=0.168,
                       patch_inner=PATCH_INNER, patch_border=PATCH_BORDER)


def calexp_wcs(ra: float, dec: float):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(CALEXP_SHAPE[1] + 1) / 2, (CALEXP_SHAPE[0] + 1) / 2]
    w.wcs.cd = [[-CALEXP_SCALE / 3600, 0], [0, CALEXP_SCALE / 3600]]
    return w


def ccd_centres(d_ra: float, d_dec: float) -> dict[int, tuple[float, float]]:
    """Two CCDs side by side in RA, 4' apart."""
    step = CALEXP_SHAPE[1] * CALEXP_SCALE / 3600 / np.cos(np.radians(FIELD[1]))
    return {ccd: (FIELD[0] + d_ra + (ccd - 0.5) * step, FIELD[1] + d_dec) for ccd in (0, 1)}


def registry_rows(visits: dict) -> list[dict]:
    return [dict(visit=v, ccd=c, filter=f, obstype="science", date_obs="2024-03-01T00:00:00", mjd=60370.0,
                 exptime=30.0, ra=FIELD[0] + dra, dec=FIELD[1] + ddec, rotation=0.0, airmass=1.1,
                 path=f"raw/{v}/raw-{v}-{c}.fits")
            for v, (f, dra, ddec) in visits.items() for c in (0, 1)]


def stand_in_time() -> float:
    """mtime of the stand-ins for simulate_field's outputs: newer than the camera definition and the
    simulator scripts (Snakemake re-runs a job whose outputs are older than its script), older
    than the raw files (stand_in_time() + 1) and the calexps (now)."""
    sources = ["config/cameras/ci.yaml", "scripts/simulate_field.py", "scripts/simulate_raw.py"]
    return max([time.time() - 1200] + [(ROOT / s).stat().st_mtime + 1 for s in sources])


def add_visits(repo: Path, visits: dict, all_visits: dict) -> None:
    """Register ``visits`` (raw files older than the calexps) and write their calexps."""
    old = stand_in_time() + 1
    write_registry(repo / "registry.sqlite3", registry_rows(all_visits))
    os.utime(repo / "registry.sqlite3", (old, old))
    for row in registry_rows(visits):
        v, c = row["visit"], row["ccd"]
        # simulate_raw's outputs: the raw file and its truth tables
        for path in (repo / row["path"], repo / f"truth/sources/truth-{v}-{c}.fits", repo / f"truth/cr/cr-{v}-{c}.fits"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
            os.utime(path, (old, old))
    butler = Butler(repo, rerun="ci")
    for visit, (f, dra, ddec) in visits.items():
        for ccd, (ra, dec) in ccd_centres(dra, ddec).items():
            ny, nx = CALEXP_SHAPE
            calexp = Exposure(image=np.zeros((ny, nx), np.float32), mask=np.zeros((ny, nx), np.int32),
                              variance=np.ones((ny, nx), np.float32), wcs=calexp_wcs(ra, dec))
            calexp.write(butler.output_path("calexp", visit=visit, ccd=ccd, filter=f))
            for dataset in ("src", "icSrc", "calexpBackground", "srcMatch"):  # process_ccd's other outputs
                path = Path(butler.output_path(dataset, visit=visit, ccd=ccd, filter=f))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")


def make_fake_repo(repo: Path) -> Path:
    repo.mkdir(parents=True)
    old = stand_in_time()
    shutil.copy(ROOT / "config/cameras/ci.yaml", repo / "_camera.yaml")
    index = repo / "ref_cats/sim_gaia/index.json"
    index.parent.mkdir(parents=True)
    index.write_text("{}\n")
    stand_ins = [repo / "_camera.yaml", index] + [repo / "truth" / n for n in ("objects.fits", "visits.fits", "exposures.fits")]
    for path in stand_ins:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(b"")
        os.utime(path, (old, old))
    add_visits(repo, VISITS, VISITS)
    return repo


@pytest.fixture(scope="module")
def overlap_repo(tmp_path_factory) -> Path:
    """A fake repository whose sky map and overlap tables are made (only dry runs may use it)."""
    repo = make_fake_repo(tmp_path_factory.mktemp("coadd") / "repo")
    proc = run_overlaps(repo)
    assert "rule process_ccd" not in text_of(proc), "the fake calexps should be up to date"
    return repo


def snakemake(repo: Path, *args: str, config=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *args, "--config", f"repo={repo}", f"set={SETTINGS}", *config]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    return proc


def text_of(proc) -> str:
    return proc.stdout + proc.stderr


def overlap_tables(repo: Path, filters=("HSC-R", "HSC-I")) -> list[str]:
    butler = Butler(repo, rerun="ci")
    return [butler.output_path("deepCoadd_overlaps", filter=f) for f in filters]


def run_overlaps(repo: Path, filters=("HSC-R", "HSC-I"), config=()) -> subprocess.CompletedProcess:
    """Run make_skymap and the make_overlaps checkpoints for real (they read headers only)."""
    proc = snakemake(repo, "--cores", "1", *overlap_tables(repo, filters), config=config)
    assert proc.returncode == 0, text_of(proc)[-4000:]
    return proc


def planned_jobs(proc) -> dict[str, list[dict]]:
    """Rule → wildcards of each job a dry run lists (from its job blocks)."""
    jobs: dict[str, list[dict]] = {}
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", text_of(proc)):
        m = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block.strip())
        if not m:
            continue
        w = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        pairs = dict(re.findall(r"(\w+)=(.*?)(?=, \w+=|$)", w.group(1))) if w else {}
        if "patch" in pairs:  # the path form x_y, as data IDs spell it (x,y)
            pairs["patch"] = patch_id(pairs["patch"])
        jobs.setdefault(m.group(1), []).append(pairs)
    return jobs


def expected_patches(visits: dict, filter_name: str) -> dict[tuple[int, str], set[int]]:
    """(tract, patch) → visits of one filter, from the sky-map API on the test's own footprints."""
    from snakedrp.coadd.overlaps import calexp_polygon

    skymap = sky_map()
    out: dict[tuple[int, str], set[int]] = {}
    for visit, (f, dra, ddec) in visits.items():
        if f != filter_name:
            continue
        for ra, dec in ccd_centres(dra, ddec).values():
            header = calexp_wcs(ra, dec).to_header()
            header["NAXIS1"], header["NAXIS2"] = CALEXP_SHAPE[1], CALEXP_SHAPE[0]
            for tract, index in skymap.find_patches(calexp_polygon(header)):
                out.setdefault((tract, format_patch(index)), set()).add(visit)
    return out


# ------------------------------------------------------------------ tests
def test_overlap_table_lists_each_calexp_patch_pair(overlap_repo):
    table = Table.read(overlap_tables(overlap_repo, ["HSC-R"])[0])
    assert set(table["filter"]) == {"HSC-R"}
    got: dict[tuple[int, str], set[int]] = {}
    for row in table:
        got.setdefault((int(row["tract"]), str(row["patch"])), set()).add(int(row["visit"]))
    assert got == expected_patches(VISITS, "HSC-R")


def test_patch_target_plans_only_the_overlapping_warps(overlap_repo):
    r_patches = expected_patches(VISITS, "HSC-R")
    # a patch of the first visits' field that visit 104 (0.4 deg east) cannot touch
    (tract, patch), visits = next((k, v) for k, v in sorted(r_patches.items()) if v == {100, 102})
    proc = snakemake(overlap_repo, "-n", "coadd", config=(f"id=tract={tract} patch={patch} filter=HSC-R",))
    assert proc.returncode == 0, text_of(proc)[-4000:]
    jobs = planned_jobs(proc)
    warps = {(j["filter"], int(j["tract"]), j["patch"], int(j["visit"])) for j in jobs["make_warp"]}
    assert warps == {("HSC-R", tract, patch, v) for v in visits}
    assert [(j["tract"], j["patch"]) for j in jobs["assemble_coadd"]] == [(str(tract), patch)]
    assert len(jobs["detect_coadd"]) == 1 and "make_overlaps" not in jobs


def test_coadd_target_covers_every_band_and_patch(overlap_repo):
    proc = snakemake(overlap_repo, "-n", "coadd")
    assert proc.returncode == 0, text_of(proc)[-4000:]
    jobs = planned_jobs(proc)
    want = {(f, t, p) for f in ("HSC-R", "HSC-I") for t, p in expected_patches(VISITS, f)}
    assert {(j["filter"], int(j["tract"]), j["patch"]) for j in jobs["detect_coadd"]} == want
    n_warps = sum(len(v) for f in ("HSC-R", "HSC-I") for v in expected_patches(VISITS, f).values())
    assert len(jobs["make_warp"]) == n_warps


def test_patch_block_and_select_id_narrow_the_jobs(tmp_path):
    repo = make_fake_repo(tmp_path / "repo")
    r_patches = expected_patches(VISITS, "HSC-R")
    tract = min(t for t, _ in r_patches)
    xs = sorted({int(p.split(",")[0]) for t, p in r_patches if t == tract})
    ys = sorted({int(p.split(",")[1]) for t, p in r_patches if t == tract})
    # the block holds patches of visit 104 (east, small x) only, and patches of no visit
    block = f"{xs[0]}..{xs[0] + 1},{ys[0]}..{ys[-1] + 1}"
    config = (f"id=tract={tract} patch={block} filter=HSC-R", "select_id=visit=100^104")
    # select_id changes the checkpoint's inputs (the coadd inputs), so it runs again first
    run_overlaps(repo, ["HSC-R"], config=config[1:])
    proc = snakemake(repo, "-n", "coadd", config=config)
    assert proc.returncode == 0, text_of(proc)[-4000:]
    jobs = planned_jobs(proc)
    in_block = {(t, p) for t, p in r_patches if t == tract and xs[0] <= int(p.split(",")[0]) <= xs[0] + 1}
    want = {k for k in in_block if r_patches[k] & {100, 104}}
    assert want and {(int(j["tract"]), j["patch"]) for j in jobs["assemble_coadd"]} == want
    assert {int(j["visit"]) for j in jobs["make_warp"]} == {104}
    assert all(j["filter"] == "HSC-R" for j in jobs["make_warp"])


@pytest.mark.parametrize("data_id, words", [
    ("tract=99999999 patch=1,1", ["no tract 99999999", "0.."]),
    ("tract=9811 patch=99,1", ["no patch 99,1"]),
    ("tract=9811 patch=0,0 filter=HSC-R", ["patch=0,0", "matches no patch with coadd inputs"]),  # no overlap
    ("tract=9811 patch=1,1 filter=HSC-Z", ["filter=HSC-Z", "HSC-I, HSC-R"]),
    ("tract=9811 visit=100", ["unknown key 'visit'", "select_id"]),
])
def test_bad_coadd_ids_stop_before_any_job(overlap_repo, data_id, words):
    proc = snakemake(overlap_repo, "-n", "coadd", config=(f"id={data_id}",))
    text = text_of(proc)
    assert proc.returncode != 0
    line = next(l for l in text.splitlines() if "data ID error" in l)
    for word in words:
        assert word in line, text[-3000:]
    assert not re.search(r"^(?:local)?(?:rule|checkpoint) \w+:", text, re.M)  # no job planned


def stand_in_outputs(repo: Path, jobs: dict[str, list[dict]]) -> None:
    """Files for every planned warp, coadd and detection, newer than their inputs (as if run)."""
    butler = Butler(repo, rerun="ci")
    outputs = {"make_warp": ["deepCoadd_directWarp"],
               "assemble_coadd": ["deepCoadd", "deepCoadd_nImage", "deepCoadd_inputs"],
               "detect_coadd": ["deepCoadd_calexp", "deepCoadd_det"]}
    for offset, rule in enumerate(outputs):
        stamp = time.time() + offset  # each stage newer than the one before
        for j in jobs.get(rule, []):
            data_id = dict(filter=j["filter"], tract=int(j["tract"]), patch=j["patch"])
            if "visit" in j:
                data_id["visit"] = int(j["visit"])
            for dataset in outputs[rule]:
                path = Path(butler.output_path(dataset, **data_id))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
                os.utime(path, (stamp, stamp))


def test_new_visits_rebuild_only_their_warps_and_patches(tmp_path):
    fake_repo = make_fake_repo(tmp_path / "repo")
    run_overlaps(fake_repo)
    first = planned_jobs(snakemake(fake_repo, "-n", "coadd"))
    stand_in_outputs(fake_repo, first)
    assert "Nothing to be done" in text_of(snakemake(fake_repo, "-n", "coadd"))
    skymap_file = Path(Butler(fake_repo, rerun="ci").output_path("deepCoadd_skyMap"))
    skymap_mtime = skymap_file.stat().st_mtime_ns

    add_visits(fake_repo, NEW_VISITS, {**VISITS, **NEW_VISITS})
    proc = run_overlaps(fake_repo)
    assert "make_skymap" not in text_of(proc) and skymap_file.stat().st_mtime_ns == skymap_mtime
    assert "filter=HSC-I" not in text_of(proc), "the HSC-I overlaps did not change"
    proc = snakemake(fake_repo, "-n", "coadd")
    assert proc.returncode == 0, text_of(proc)[-4000:]
    jobs = planned_jobs(proc)
    touched = {k for k, v in expected_patches({**VISITS, **NEW_VISITS}, "HSC-R").items() if 106 in v}
    assert touched and touched < set(expected_patches({**VISITS, **NEW_VISITS}, "HSC-R"))
    assert {(int(j["tract"]), j["patch"], int(j["visit"])) for j in jobs["make_warp"]} == \
        {(t, p, 106) for t, p in touched}
    for rule in ("assemble_coadd", "detect_coadd"):
        assert {("HSC-R", int(j["tract"]), j["patch"]) for j in jobs[rule]} == {("HSC-R", t, p) for t, p in touched}
        assert all(j["filter"] == "HSC-R" for j in jobs[rule])
    assert set(jobs) <= {"make_warp", "assemble_coadd", "detect_coadd", "coadd"}, set(jobs)


def test_calexp_with_failed_astrometry_drops_out_of_the_coadd(tmp_path):
    repo = make_fake_repo(tmp_path / "repo")
    butler = Butler(repo, rerun="ci")
    path = butler.output_path("calexp", visit=102, ccd=1, filter="HSC-R")
    calexp = Exposure.read(path)
    calexp.metadata["WCSFAIL"] = ("no pattern match", "astrometric fit failed: camera WCS, no zeropoint")
    calexp.write(path)
    run_overlaps(repo, ["HSC-R"])
    table = Table.read(overlap_tables(repo, ["HSC-R"])[0])
    pairs = set(zip(table["visit"].tolist(), table["ccd"].tolist()))
    assert (102, 1) not in pairs and {(100, 0), (100, 1), (102, 0)} <= pairs
    logs = "".join(p.read_text() for p in (repo / "rerun/ci/logs").rglob("*.log"))
    assert re.search(rf"WARNING: make_overlaps HSC-R: {re.escape(path)} \(visit=102 ccd=1\): astrometric fit "
                     r"failed \(no pattern match\): left out of the coadds", logs), logs[-2000:]
