"""Reliability on a small demo (one CCD, one visit in each of two bands): kill and resume at each
stage, the same products with --cores 1 and --cores 2, FITS-standard products, Snakemake's lock
against a second run, and two reruns of one repository side by side.

Every run goes through the whole workflow (simulation to the multi-band object tables). The reference run is
made once per session (conftest.py ``small_repo``); each other test compares its products with it by
data (pixels and table values, not headers, which hold dates).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from snakedrp.repo.butler import Butler
from snakedrp.repo.compare import compare_trees, product_files
from snakedrp.repo.dataid import patch_id

import snakemake_run
from conftest import SMALL_RUN_CONFIG, SMALL_RUN_TIMEOUT

pytestmark = pytest.mark.workflow

KILL_WAIT = 10 * 60            # s; longest wait for the stage to be killed in


def snakemake(repo: Path, *args: str, cores: int = 2) -> subprocess.Popen:
    """Start snakemake on ``repo`` (small demo config) in its own process group."""
    return snakemake_run.start("--cores", cores, "-q", "--config", f"repo={repo}", *SMALL_RUN_CONFIG, *args,
                               merge_output=True)


def finish(proc: subprocess.Popen, timeout: float = SMALL_RUN_TIMEOUT) -> str:
    return snakemake_run.finish(proc, timeout, "snakemake").stdout


def run(repo: Path, *args: str, cores: int = 2) -> str:
    return finish(snakemake(repo, *args, cores=cores))


def completed_run(repo: Path, *args: str, cores: int = 2) -> Path:
    proc = snakemake(repo, *args, cores=cores)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    return repo


def assert_same_products(a: Path, b: Path) -> None:
    result = compare_trees(a, b)
    assert result.compared > 0 and result.ok, result.summary()


@pytest.fixture(scope="module")
def reference(small_repo) -> Path:
    """The small demo, uninterrupted, with --cores 2 (conftest.py; tests/test_slurm.py compares with it too)."""
    return small_repo


def test_the_small_demo_reaches_the_multiband_catalog(reference):
    """What the comparisons below cover: both bands' forced photometry and the object tables."""
    merged = reference / "rerun" / "ci" / "deepCoadd-results" / "merged"
    tracts = list(merged.glob("*/objectTable-*.fits"))
    patches = list(merged.glob("*/*/objectTable-*.fits"))
    assert tracts and patches
    for band in ("HSC-R", "HSC-I"):
        assert list((reference / "rerun" / "ci" / "deepCoadd-results" / band).glob("*/*/forced_src-*.fits")), band
    from astropy.table import Table

    table = Table.read(tracts[0])
    assert len(table) > 10 and {"r_psfFlux", "i_psfFlux", "refBand"} <= set(table.colnames)


# ------------------------------------------------------------------ a bad input of the multi-band stage
def test_a_truncated_coadd_fails_only_its_patchs_multiband_jobs(reference, tmp_path):
    """A truncated HSC-I coadd: merge_detections of its patch fails with one line, every other patch is made."""
    repo = tmp_path / "repo"
    shutil.copytree(reference, repo, symlinks=True)
    butler = Butler(repo, rerun="ci")
    results = repo / "rerun" / "ci" / "deepCoadd-results"
    calexps = sorted(results.glob("HSC-I/*/*/calexp-HSC-I-*.fits"))
    assert len(calexps) >= 2, "the small demo needs two HSC-I patches for this test"
    bad = calexps[0]
    tract, patch = int(bad.parent.parent.name), patch_id(bad.parent.name)   # a path spells patch 1,2 as 1_2
    stat = bad.stat()
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # nothing upstream of it runs again
    # every multi-band product is made again: the other patches show that their jobs go on
    multiband = [*results.glob("merged/**/*.*"), *results.glob("*/*/*/meas-*"), *results.glob("*/*/*/forced_src-*")]
    for path in multiband:
        path.unlink()

    proc = snakemake(repo, "--keep-going", "multiband", "--rerun-triggers", "mtime")
    out = finish(proc)
    assert proc.returncode != 0
    assert "Traceback" not in out, out[-6000:]
    assert out.count("RuleException:") == 1, out[-6000:]   # one failed job (-q prints no "Error in rule")
    line = (rf"merge_detections tract={tract} patch={re.escape(patch)}: {re.escape(str(bad))}: "
            r"truncated \(\d+ bytes, headers and data need \d+\)")
    assert re.search(rf"^{line}$", out, re.M), out[-4000:]
    assert not Path(butler.output_path("objectTable", tract=tract, patch=patch)).exists()
    for good in calexps[1:]:
        t, p = int(good.parent.parent.name), patch_id(good.parent.name)
        made = Path(butler.output_path("objectTable", tract=t, patch=p))
        rel = made.relative_to(repo)
        assert made.is_file(), rel
        assert_same_products(reference / rel.parent, made.parent)
    assert not list(repo.rglob("*.tmp")), "a temporary file was left behind"


# ------------------------------------------------------------------ kill and resume
def _wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() - t0 > KILL_WAIT:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{what} did not happen within {KILL_WAIT} s")
        time.sleep(0.2)


def _files_with_mtimes(repo: Path, older_than: float) -> dict[str, float]:
    """Products finished well before ``older_than`` (their jobs completed before the kill)."""
    out = {}
    for rel in product_files(repo):
        mtime = (repo / rel).stat().st_mtime
        if mtime < older_than - 5.0:
            out[rel] = mtime
    return out


STAGES = {
    # stage: (what to wait for, test for it)
    "simulation": ("some raw frames written, before ingest",
                   lambda repo: len(list((repo / "raw").rglob("*.fits"))) >= 3
                   and not (repo / "registry.sqlite3").exists()),
    "single_frame": ("a process_ccd job started",
                     lambda repo: any((repo / "rerun" / "ci" / "logs" / "process_ccd").glob("*.log"))),
    "coadd": ("a warp job started",
              lambda repo: any((repo / "rerun" / "ci" / "logs").glob("make_warp*/*.log"))
              or any((repo / "rerun" / "ci" / "logs").glob("make_warp*"))),
    "multiband": ("a measure_coadd job started",
                  lambda repo: any((repo / "rerun" / "ci" / "logs").glob("measure_coadd/*.log"))),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_and_resume(stage, reference, tmp_path):
    repo = tmp_path / "repo"
    what, ready = STAGES[stage]
    proc = snakemake(repo)
    _wait_for(proc, lambda: ready(repo), what)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed_at = time.time()
    finished = _files_with_mtimes(repo, killed_at)

    run(repo, "--unlock")
    resumed = snakemake(repo)
    out = finish(resumed)
    assert resumed.returncode == 0, f"the resumed run failed:\n{out[-4000:]}"
    redone = [rel for rel, mtime in finished.items() if (repo / rel).stat().st_mtime != mtime]
    assert redone == [], f"finished products were made again: {redone[:10]}"
    assert not list(repo.rglob("*.tmp")), "a temporary file was left behind"
    assert_same_products(reference, repo)


# ------------------------------------------------------------------ determinism
def test_one_core_gives_the_same_products_as_two(reference, tmp_path):
    repo = completed_run(tmp_path / "repo", cores=1)
    assert_same_products(reference, repo)


# ------------------------------------------------------------------ FITS standard
@pytest.mark.parametrize("demo", ["small_repo", "ci_repo"])
def test_every_fits_product_passes_fitsverify(demo, request):
    """Every FITS product of the small demo and of the ci demo (conftest.py; a few seconds each)."""
    if shutil.which("fitsverify") is None:
        pytest.skip("fitsverify is not installed (Debian package fitsverify; .ci/run installs it)")
    repo = request.getfixturevalue(demo)
    files = [repo / rel for rel in product_files(repo) if rel.endswith(".fits")]
    assert len(files) > 100
    problems = []
    for i in range(0, len(files), 50):
        proc = subprocess.run(["fitsverify", "-q", *map(str, files[i:i + 50])], capture_output=True, text=True)
        problems += [line for line in proc.stdout.splitlines() if line.strip() and "verification OK" not in line]
    assert problems == [], "\n".join(problems[:20])


# ------------------------------------------------------------------ concurrency
def test_a_second_run_on_the_same_repository_is_refused_by_the_lock(tmp_path):
    repo = tmp_path / "repo"
    first = snakemake(repo)
    _wait_for(first, lambda: (repo / "raw").exists(), "the first run started writing")
    second = snakemake(repo)
    out = finish(second, timeout=5 * 60)
    still_running = first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    run(repo, "--unlock")
    assert still_running, "the first run ended before the second was refused; the test proved nothing"
    assert second.returncode != 0
    assert "cannot be locked" in out or "LockException" in out, out[-3000:]


def test_two_reruns_of_one_repository_run_side_by_side(reference, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(reference, repo, ignore=shutil.ignore_patterns("rerun"), symlinks=True)
    runs = [snakemake(repo, f"rerun={name}") for name in ("a", "b")]
    outs = [finish(p) for p in runs]
    for p, out in zip(runs, outs):
        assert p.returncode == 0, out[-4000:]
    assert_same_products(reference / "rerun" / "ci", repo / "rerun" / "a")
    assert_same_products(reference / "rerun" / "ci", repo / "rerun" / "b")
