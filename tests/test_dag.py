"""The workflow's DAG: job counts a user can check against the data, the DAG pictures, the rule graph.

Dry runs only (plus, for the rule graph, the finished ci demo of conftest.py): the job counts of
a fresh simulated repository follow from the simulator's plan (N visits x M CCDs process_ccd jobs,
one master bias and dark per CCD, flats per CCD and filter, fringes for fringing filters only), and
those of a registry-only survey repository (benchmarks/survey_registry.py) from its registry.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CI_RUN_CONFIG, ROOT
from snakedrp import simulate
from snakedrp.repo.camera import Camera
from snakedrp.repo.registry import REGISTRY_NAME, Registry

sys.path.insert(0, str(ROOT / "benchmarks"))
from survey_registry import write_survey  # noqa: E402  (a script beside the benchmarks)

pytestmark = pytest.mark.workflow
TIMEOUT = 5 * 60  # s


def snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)


def job_counts(text: str) -> dict[str, int]:
    """Rule -> jobs of the first "Job stats" table."""
    block = text.split("Job stats:\n", 1)[1].split("\ntotal", 1)[0]
    return {p[0]: int(p[1]) for p in (line.split() for line in block.splitlines()) if len(p) == 2 and p[1].isdigit()}


def dry_run_counts(repo: Path, *config: str) -> dict[str, int]:
    proc = snakemake("-n", "-q", "rules", "--config", f"repo={repo}", *config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job_counts(proc.stdout + proc.stderr)


@pytest.mark.parametrize("ccds, n_visits", [((0, 2), 1), ((0, 1, 3), 2)])
def test_fresh_repo_job_counts_follow_the_simulator_plan(tmp_path, ccds, n_visits):
    params = simulate.resolve_config(simulate.SimulateConfig(ccds=list(ccds), n_visits=n_visits))
    camera = Camera.from_yaml(ROOT / "config/cameras/ci.yaml")
    plan = simulate.plan_exposures(params, camera)
    filters = list(params.filters)
    fringing = [f for f in filters if camera.filters[f].fringe]
    counts = dry_run_counts(tmp_path / "fresh", f"simulate={{ccds: [{', '.join(map(str, ccds))}], n_visits: {n_visits}}}")
    expected = dict(simulate_raw=len(plan), ingest=1, master_bias=len(ccds), master_dark=len(ccds),
                    master_flat=len(filters) * len(ccds), master_fringe=len(fringing) * len(ccds),
                    process_ccd=len(filters) * n_visits * len(ccds))
    assert {rule: counts.get(rule, 0) for rule in expected} == expected, counts


def test_survey_repo_job_counts_follow_the_registry(tmp_path):
    repo = tmp_path / "survey"
    n_science = write_survey(repo, n_visits=6, n_ccds=5)
    registry = Registry(repo / REGISTRY_NAME)
    science = registry.exposures(obstype="science")
    assert n_science == len(science) == 30
    counts = dry_run_counts(repo)
    n_ccds = len(registry.ccds())
    flats = {(r["filter"], r["ccd"]) for r in registry.exposures(obstype="flat")}
    fringes = {(r["filter"], r["ccd"]) for r in registry.exposures(obstype="fringe")}
    assert counts.get("process_ccd") == len(science)
    assert counts.get("master_bias") == counts.get("master_dark") == n_ccds
    assert counts.get("master_flat") == len(flats) and counts.get("master_fringe") == len(fringes)
    assert "simulate_raw" not in counts and "ingest" not in counts  # registry and raws exist
    # an id narrows the jobs as the registry says
    visit = science[0]["visit"]
    assert dry_run_counts(repo, f"id=visit={visit}").get("process_ccd") == len(registry.ccds(visit=visit))


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz (dot) is not installed")
@pytest.mark.parametrize("flag", ["--dag", "--rulegraph"])
def test_dag_pictures_render(tmp_path, flag):
    proc = snakemake(flag, "--config", f"repo={tmp_path / 'fresh'}", "simulate={ccds: [0], n_visits: 1}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.lstrip().startswith("digraph")
    svg = subprocess.run(["dot", "-Tsvg"], input=proc.stdout, capture_output=True, text=True, check=True).stdout
    for rule in ("process_ccd", "master_bias", "simulate_raw"):
        assert f">{rule}" in svg, rule


def test_committed_rule_graph_is_current(ci_repo):
    # the full graph, coadds included, needs a repository whose overlap checkpoint has run
    proc = subprocess.run([sys.executable, str(ROOT / "docs/make_rulegraph.py"), "--repo", str(ci_repo), "--check",
                           "--config", *CI_RUN_CONFIG], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
