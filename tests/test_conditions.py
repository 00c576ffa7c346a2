"""Single-frame processing under observing conditions: the conditions matrix and the strict switch.

Each case of the matrix runs the workflow end to end on one ``ci`` CCD, two visits, one filter
(simulate, ingest, calibrations, process_ccd, validation against truth, no coadd) with
``validation.strict``, so a missed goal fails the run; the named conditions are
:data:`snakedrp.simulate.presets.CONDITIONS`.

Statistics: completeness is counted over the isolated stars of expected S/N 8-15
(``validation.completeness_band``), not within +-20 % of 10: one CCD of two visits then holds
~100-220 such stars instead of ~12 (one miss 0.5-1 %, not 8 %; the report gives the binomial
error), and the band's lower edge stays well above the threshold, 5. A second CCD would double
the sample but also the case's time (~2.5 min per case at load 15, ~1 min unloaded), and the
matrix must stay within ~8 minutes of CI; the photometric and PSF figures already rest on
hundreds of stars per case. The cheap tests of the strict switch call the
validation's :func:`snakedrp.validate.single_frame.finish` on a few figures.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from snakedrp.simulate.presets import CONDITIONS
from snakedrp.validate.single_frame import (ExposureFigures, ValidateConfig, ValidationFailed, finish,
                                            summarize)

import snakemake_run

CASE_TIMEOUT = 6 * 60  # s; a case takes about a minute on 2 cores
SMALL = dict(ccds=[0], n_visits=2, filters=["HSC-R"])
#: name -> simulate overrides on top of SMALL (flow-style YAML for --config)
CASES = {
    "good_seeing": CONDITIONS["good_seeing"],
    "bad_seeing": CONDITIONS["bad_seeing"],
    "sparse": CONDITIONS["sparse"],
    "dense": CONDITIONS["dense"],
    "bright_sky": CONDITIONS["bright_sky"],
    # another seed, centre and rotation at the preset's seeing
    "seed13": dict(seed=13, ra=35.5, dec=-12.0, rotation=37.0),
}


def _flow(values: dict) -> str:
    def one(v):
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(one(x) for x in v) + "]"
        return str(v)
    return "{" + ", ".join(f"{k}: {one(v)}" for k, v in values.items()) + "}"


def _figures(**over) -> ExposureFigures:
    base = dict(visit=1, ccd=0, astrometry_mas=np.full(10, 5.0), astrometry_all_mas=np.full(10, 5.0),
                astrometry_expected_mas=np.full(10, 4.0), wcs_mas=np.full(16, 3.0),
                photometry_mmag=np.full(10, 1.0), zeropoint_error_mmag=1.0, psf_size_errors=np.full(5, 0.002),
                psf_e_errors=np.full((5, 2), 0.001), cr_recovered=99, cr_total=100, star_cores_flagged=0,
                star_cores=50, completeness_found=95, completeness_total=100, psf_flux_ratios=np.ones(10))
    base.update(over)
    return ExposureFigures(**base)


# ------------------------------------------------------------------ the strict switch (cheap)
def test_missed_goal_is_reported_and_does_not_fail_without_strict():
    config = ValidateConfig(astrometry_rms_goal=1.0)  # impossibly tight: the WCS error is 3 mas
    report = finish(summarize([_figures()], config), config)
    assert report["strict"] is False
    assert len(report["missed"]) == 1 and "WCS error" in report["missed"][0]
    assert [m["passed"] for m in report["metrics"]].count(False) == 1


def test_missed_goal_fails_with_strict():
    config = ValidateConfig(astrometry_rms_goal=1.0, strict=True)
    with pytest.raises(ValidationFailed, match="WCS error"):
        finish(summarize([_figures()], config), config)
    # the same figures meet the default goals: strict passes them
    report = finish(summarize([_figures()], ValidateConfig(strict=True)), ValidateConfig(strict=True))
    assert report["missed"] == []


def test_ccd_without_bright_stars_misses_the_photometric_goal():
    config = ValidateConfig()
    metrics = summarize([_figures(), _figures(ccd=1, photometry_mmag=np.array([]))], config)
    phot = [m for m in metrics if "photometric" in m.name][0]
    assert phot.value == 1.0  # the CCD with no figure is left out of the max ...
    metrics = summarize([_figures(photometry_mmag=np.array([]))], config)
    assert not [m for m in metrics if "photometric" in m.name][0].passed  # ... but alone it is a miss


# ------------------------------------------------------------------ the conditions matrix (workflow)
#: Cases known to miss a goal, with the reason; they still run, and pass the test only while they
#: miss (strict xfail), so a fix shows up at once.
KNOWN_MISSES: dict[str, str] = {}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(reason=KNOWN_MISSES[c], strict=True))
                                  if c in KNOWN_MISSES else c for c in CASES])
@pytest.mark.workflow
def test_conditions_matrix(case, tmp_path, capsys):
    repo = tmp_path / "repo"
    simulate = _flow({**SMALL, **CASES[case]})
    t0 = time.monotonic()
    proc = snakemake_run.run("--cores", "2", "-q", "--config", f"repo={repo}", f"simulate={simulate}",
                             "validation={strict: true}", "coadd={enabled: false}",
                             timeout=CASE_TIMEOUT, what=f"case {case}")
    out, err = proc.stdout, proc.stderr
    elapsed = time.monotonic() - t0
    log = repo / "rerun/ci/logs/validate_single_frame.log"
    text = log.read_text() if log.exists() else ""
    with capsys.disabled():
        print(f"\n[conditions {case}: {simulate}, {elapsed:.0f} s]",
              *[line.split("INFO: ")[-1] for line in text.splitlines() if "PASS" in line or "FAIL" in line], sep="\n")
    assert proc.returncode == 0, f"case {case} failed (exit {proc.returncode}):\n{(out + err)[-5000:]}\n{text[-3000:]}"
    report = json.loads((repo / "rerun/ci/validation/single_frame.json").read_text())
    assert report["strict"] is True and report["missed"] == []
