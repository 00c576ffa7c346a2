"""Session fixtures shared by the workflow tests: the ci demo and a small demo, each run once,
locally, end to end.

tests/test_workflow.py and the coadd and multi-band tests check the ci demo's products; the small
demo (one CCD, one visit in each of two bands) is the reference of tests/test_reliability.py, whose
runs repeat the workflow many times, and of tests/test_slurm.py, which runs it through Slurm and
compares the two by data.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import snakemake_run

ROOT = snakemake_run.ROOT
FULL_RUN_TIMEOUT = 25 * 60  # s; the run takes 3-4 min on 2 cores, CI allows 30 min for everything
#: --config words of the ci demo run (after repo=...); a run to compare with it uses the same
CI_RUN_CONFIG = ("rerun=ci", "validation={strict: true}")
#: --config words of the small demo (one CCD, one visit in each of two bands, every stage): the
#: reliability and Slurm tests, which run the workflow many times or slowly, run this one
SMALL_RUN_CONFIG = ("simulate={ccds: [0], n_visits: 1, filters: [HSC-R, HSC-I]}",)
SMALL_RUN_TIMEOUT = 15 * 60  # s; the run takes about 2 min on 2 cores


@pytest.fixture(scope="session")
def ci_timings() -> dict[str, float]:
    """Wall seconds of the session's long runs, by name (printed by the validation test)."""
    return {}


def _demo_run(repo: Path, config: tuple[str, ...], timeout: float, what: str, timings: dict[str, float],
              timing_key: str) -> Path:
    """Run the workflow on ``repo`` with --cores 2 and ``config`` words to the end; its wall seconds go
    to ``timings[timing_key]``."""
    t0 = time.monotonic()
    proc = snakemake_run.run("--cores", "2", "-q", "--config", f"repo={repo}", *config,
                             timeout=timeout, what=what, merge_output=True)
    timings[timing_key] = time.monotonic() - t0
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    return repo


@pytest.fixture(scope="session")
def ci_repo(tmp_path_factory, ci_timings) -> Path:
    """The default ci demo run once, end to end, with validation, into a temporary repository."""
    # SNAKEDRP_TEST_CI_REPO=<dir> runs into that directory instead, rebuilding what a config change
    # affects (local iteration: a finished repo is up to date and the run takes seconds); CI leaves it
    # unset and gets a fresh run.
    given = os.environ.get("SNAKEDRP_TEST_CI_REPO")
    repo = Path(given).resolve() if given else tmp_path_factory.mktemp("workflow") / "repo"
    reuse = ("clobber_config=true",) if given else ()
    return _demo_run(repo, (*CI_RUN_CONFIG, *reuse), FULL_RUN_TIMEOUT, "the ci demo", ci_timings, "full ci run [s]")


@pytest.fixture(scope="session")
def small_repo(tmp_path_factory, ci_timings) -> Path:
    """The small demo (SMALL_RUN_CONFIG) run once, uninterrupted, with --cores 2: the reference the
    reliability and Slurm tests compare their runs with."""
    return _demo_run(tmp_path_factory.mktemp("small") / "repo", SMALL_RUN_CONFIG, SMALL_RUN_TIMEOUT,
                     "the small demo", ci_timings, "small demo run [s]")


# ------------------------------------------------------------------ inputs of one demo exposure
def raw_and_calibs(repo: Path, exposure: dict):
    """The butler, raw frame and master calibrations of one science exposure of a finished demo."""
    from snakedrp.repo.butler import Butler

    butler = Butler(repo, rerun="ci")
    visit, ccd, band = exposure["visit"], exposure["ccd"], exposure["filter"]
    raw = butler.get("raw", visit=visit, ccd=ccd)
    names = ("bias", "dark", "flat", "fringe") if butler.camera.filters[band].fringe else ("bias", "dark", "flat")
    return butler, raw, {name: butler.get(name, ccd=ccd, filter=band) for name in names}


def moved_refcat(repo: Path, exposure: dict, offset_deg: float = 0.5):
    """The reference stars around the exposure's calexp, moved ``offset_deg`` in RA: no pattern
    match, so ProcessCcdTask's astrometric fit fails."""
    from snakedrp.repo.butler import Butler
    from snakedrp.repo.exposure import Exposure
    from snakedrp.repo.refcat import load_refcat

    calexp = Exposure.read(Butler(repo, rerun="ci").output_path("calexp", visit=exposure["visit"],
                                                                  ccd=exposure["ccd"]))
    ra, dec = calexp.wcs.all_pix2world([calexp.shape[1] / 2], [calexp.shape[0] / 2], 0)
    refcat = load_refcat(repo / "ref_cats/sim_gaia", float(ra[0]), float(dec[0]), 0.15)
    refcat["ra"] = refcat["ra"] + offset_deg
    return refcat
