"""Run snakemake from the tests: the workflow directory, a process group of its own, a time limit.

Every workflow test starts snakemake the same way; on a timeout the whole group (snakemake and the
jobs it started) is killed, so that no stray job keeps writing into the next test's repository.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the Snakefile's directory
SNAKEMAKE = (sys.executable, "-m", "snakemake")


def start(*args, merge_output: bool = False) -> subprocess.Popen:
    """Start ``snakemake args`` in its own process group; stdout and stderr captured as text.

    ``merge_output`` sends stderr into stdout (one stream in the order snakemake wrote it).
    """
    cmd = [*SNAKEMAKE, *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float, what: str | None = None) -> subprocess.CompletedProcess:
    """Wait for ``proc``; on timeout kill its process group and fail the test with its last output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        tail = (err or out or "")[-3000:]
        pytest.fail(f"{what or ' '.join(proc.args)} did not finish within {timeout:.0f} s; last output:\n{tail}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err or "")


def run(*args, timeout: float, what: str | None = None, merge_output: bool = False) -> subprocess.CompletedProcess:
    """Run ``snakemake args`` to the end (see :func:`start` and :func:`finish`)."""
    return finish(start(*args, merge_output=merge_output), timeout, what)
