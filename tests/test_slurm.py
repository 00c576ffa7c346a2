"""The small demo end to end through a real Slurm (``--profile profiles/slurm``), compared with the local run.

Needs a running Slurm whose node is idle: CI starts a one-node cluster with .ci/slurm/start.sh
(.ci/run); elsewhere the tests skip, saying why. The run goes to a temporary repository with the
config of the local small demo (conftest.py ``small_repo``: one CCD, one visit in each of two bands,
every stage and every job group of the profile), every Slurm job's log in a temporary directory. The
checks: every job that runs a script ran inside a Slurm job (the Slurm job logs hold, per rule, at
least as many executed jobs as the main log has finished ones), every Slurm job id of the main log
completed according to Slurm (its job-completion log, or ``squeue --states=all``), and the products
equal the local run's by data (pixels and table values, not headers or dates).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, SMALL_RUN_CONFIG
from snakedrp.repo.compare import compare_trees

pytestmark = [
    pytest.mark.slurm, pytest.mark.workflow,
]

SLURM_TIMEOUT = 30 * 60  # s
JOBCOMP_LOG = Path("/var/log/slurm/jobcomp.log")
SUBMITTED = re.compile(r"^Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.$", re.M)
FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", re.M)
# A job run in the process that prints the log is a "localrule" (or "localcheckpoint") block: in
# the main log the local rules (rerun_config, all); inside a Slurm job, where the plugin's snakemake
# runs each job through srun in a nested snakemake, every job that ran there.
EXECUTED_IN_SLURM = re.compile(r"^local(?:rule|checkpoint) (\w+):$", re.M)


def slurm_not_ready() -> str | None:
    """Why the Slurm tests cannot run here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm client (sinfo, sbatch) on PATH; .ci/slurm/start.sh installs and starts one"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    states = proc.stdout.split()
    if proc.returncode != 0 or "idle" not in states:
        return f"no idle Slurm node (sinfo: {(proc.stdout + proc.stderr).strip() or 'nothing'})"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed"
    return None


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory) -> dict:
    """The small demo through Slurm: repository, main log, Slurm logs, wall seconds."""
    reason = slurm_not_ready()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("slurm")
    repo, logdir = work / "repo", work / "slurm_logs"
    # CI-only flags: no accounting to pick an account from; check status every 5 s, not 20
    cmd = ["timeout", "-k", "10", str(SLURM_TIMEOUT), sys.executable, "-m", "snakemake",
           "--profile", "profiles/slurm", "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "5",
           "--slurm-logdir", str(logdir), "--config", f"repo={repo}", *SMALL_RUN_CONFIG]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - t0
    (work / "snakemake.log").write_text(proc.stdout)
    if proc.returncode == 124:
        pytest.fail(f"the Slurm run did not finish within {SLURM_TIMEOUT} s (killed):\n{proc.stdout[-4000:]}")
    assert proc.returncode == 0, f"the Slurm run failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    submitted = SUBMITTED.findall(proc.stdout)
    print(f"\n[slurm: small demo in {seconds:.0f} s, {len(submitted)} Slurm jobs, "
          f"{len(FINISHED.findall(proc.stdout))} workflow jobs; logs in {work}]")
    return dict(repo=repo, log=proc.stdout, logdir=logdir, submitted=submitted, seconds=seconds)


def test_every_job_ran_in_a_slurm_job(slurm_run):
    finished = Counter(FINISHED.findall(slurm_run["log"]))
    remote = dict(finished - Counter(EXECUTED_IN_SLURM.findall(slurm_run["log"])))
    assert remote.get("process_ccd") == 2 and remote.get("simulate_raw", 0) > 2, finished
    assert remote.get("object_table", 0) > 0, finished
    inside = Counter()
    for _, _, log in slurm_run["submitted"]:
        inside.update(EXECUTED_IN_SLURM.findall(Path(log).read_text(errors="replace")))
    # more inside than finished only where a failed attempt was retried (retries: 1)
    missing = {rule: n - inside[rule] for rule, n in remote.items() if inside[rule] < n}
    assert not missing, f"jobs finished without running in a Slurm job: {missing} (inside Slurm: {dict(inside)})"


def test_slurm_saw_every_job_complete(slurm_run):
    ids = {slurm_id for _, slurm_id, _ in slurm_run["submitted"]}
    assert ids, "no job was submitted to Slurm"
    if JOBCOMP_LOG.is_file() and os.access(JOBCOMP_LOG, os.R_OK):
        states = dict(re.findall(r"^JobId=(\d+) .*?JobState=(\w+)", JOBCOMP_LOG.read_text(), re.M))
        where = str(JOBCOMP_LOG)
    else:
        out = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        where = "squeue --states=all"
    seen = {i: states.get(i) for i in ids}
    assert all(state == "COMPLETED" for state in seen.values()), f"{where}: {seen}"


def test_products_equal_the_local_run(slurm_run, small_repo):
    report = compare_trees(small_repo, slurm_run["repo"])  # every FITS and Parquet product, by data
    print(f"\n[slurm vs local: {report.summary()}]")
    assert report.compared > 100
    assert report.ok, report.summary()
