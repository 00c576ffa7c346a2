"""`validate` on the ci demo, the strict switch, and `snakemake --report`: every plot and the metrics table embedded.

Uses the session's ci demo run (fixture ``ci_repo`` of the workflow tests; it must live in
tests/conftest.py to be shared). ``validate`` adds the metrics, the plots and the report to that
repository (rerun/ci/validation/metrics.*, rerun/ci/qa/) and changes nothing the other tests read.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

import snakemake_run

pytestmark = pytest.mark.workflow

TIMEOUT = 15 * 60  # s; validate's jobs take ~1-2 min on 2 cores
SINGLE_FRAME_PLOTS = ("zeropoints.png", "astrometry_quiver.png", "residuals_vs_mag.png", "colour_diagrams.png",
                      "completeness.png")


def snakemake(*args):
    return snakemake_run.run(*args, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def repo(request) -> Path:
    try:
        return request.getfixturevalue("ci_repo")
    except pytest.FixtureLookupError:
        pytest.skip("needs the session fixture ci_repo in tests/conftest.py (now in tests/test_workflow.py)")


@pytest.fixture(scope="module")
def validated(repo) -> Path:
    # the session run's own config (validation strict), so that nothing upstream is rebuilt
    proc = snakemake("--cores", "2", "--config", f"repo={repo}", "validation={strict: true}", "--", "validate")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return repo


def embedded_results(html: str) -> dict:
    """The report's results (file name → record with ``data_uri``), read from its ``results`` script."""
    start = html.index('<script id="results">')
    start = html.index("var results = ", start) + len("var results = ")
    results, _ = json.JSONDecoder().raw_decode(html[start:])
    return {Path(path).name: record for path, record in results.items()}


def decoded(record: dict) -> bytes:
    return base64.b64decode(record["data_uri"].split("base64,", 1)[1])


def test_validate_writes_metrics_and_plots(validated):
    rerun = validated / "rerun" / "ci"
    report = json.loads((rerun / "validation" / "metrics.json").read_text())
    names = {(m["name"], m["filter"]) for m in report["metrics"]}
    for f in ("HSC-R", "HSC-I"):
        assert {("PA1", f), ("PF1", f), ("PA2", f), ("AM1", f), ("AF1", f), ("AD1", f)} <= names
    for m in report["metrics"]:
        assert m["passed"] in (True, False, None) and ("spec" in m)
        if m["value"] is None:
            assert m["note"]  # a metric not computed says why
    for name in SINGLE_FRAME_PLOTS:
        assert (rerun / "qa" / name).stat().st_size > 10_000
    assert len(list((rerun / "qa").glob("psf_focal_plane-*.png"))) == 6
    assert (rerun / "validation" / "single_frame.json").exists()


def test_a_missed_goal_fails_only_when_strict(validated):
    # a goal no catalog can meet: PA1 stretch below 0.001 mmag
    base = ("--cores", "1", "--config", f"repo={validated}", "validation={strict: true}")
    rerun = ("--forcerun", "validate_metrics")
    target = validated / "rerun" / "ci" / "validation" / "metrics.json"
    lenient = snakemake(*base, "metrics={pa1_spec: [0.003, 0.002, 0.001]}", *rerun, "--", target)
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    assert any(m["name"] == "PA1" and m["passed"] is False for m in json.loads(target.read_text())["metrics"])
    strict = snakemake(*base, "metrics={pa1_spec: [0.003, 0.002, 0.001], strict: true}", *rerun, "--", target)
    assert strict.returncode != 0
    log = (validated / "rerun" / "ci" / "logs" / "validate_metrics.log").read_text()
    assert "goal(s) missed" in log + strict.stderr
    restored = snakemake("--cores", "1", "--config", f"repo={validated}", "validation={strict: true}",
                         "--forcerun", "validate_metrics", "--", target)
    assert restored.returncode == 0


def test_report_embeds_every_plot_and_the_metrics_table(validated, tmp_path):
    out = tmp_path / "report.html"
    proc = snakemake("--config", f"repo={validated}", "validation={strict: true}", "--report", out, "--", "validate")
    assert proc.returncode == 0, proc.stderr[-5000:]
    html = out.read_text()
    results = embedded_results(html)
    qa = validated / "rerun" / "ci" / "qa"
    expected = [*SINGLE_FRAME_PLOTS, *(p.name for p in qa.glob("psf_focal_plane-*.png"))]
    for name in expected:
        assert name in results, f"{name} not in the report"
        assert decoded(results[name]) == (qa / name).read_bytes(), f"{name} embedded differs from the file"
        assert results[name]["caption"].strip()
    table = decoded(results["metrics.html"]).decode()
    assert "id='srd-metrics'" in table and ">PA1<" in table and ">AM1<" in table
    # self-contained: no element loads from disk when viewed (Snakemake's own scripts mention file: URLs)
    assert not re.search(r"""(?:src|href)\s*=\s*["']file:""", html)
