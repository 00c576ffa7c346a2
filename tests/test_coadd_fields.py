"""The coadd and multi-band validations beyond the demo, each case run from simulation with ``validation.strict`` true.

- A second field: another seed, centre and rotation, the ``rings`` sky map (2 CCDs, 3 HSC-R
  visits; the second has the satellite trail).
- Mixed seeing: 2 CCDs x 2 HSC-R visits of the ``ci`` preset, whose seeing is 0.50" and 1.30",
  so that each patch holds regions covered by one visit and by both (the coadd PSF changes 2.6x
  within a patch) and pixels where one warp is masked hold only the other's PSF.

The second field runs the multi-band stage too (one band, the rings sky map's tract regions). A
missed coadd or multi-band goal fails the run. Mixed seeing runs without the multi-band stage: its
forced PSF magnitudes miss their goal (6.0 mmag; the coadd aperture correction inherits the
total-flux estimator's bias where the covering visits change, README "Multi-band"), and so
does the g-i colour of a two-band field; both are cases of ``python validation/sweep.py --multiband``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import snakemake_run

pytestmark = pytest.mark.workflow

TIMEOUT = 8 * 60  # s; about 4 minutes on 2 cores for the second field, 1 for mixed seeing
FIGURES = ("CLIPPED", "noise", "FWHM", "positions", "magnitude", "depth")
#: case id: (what it is, simulate, set= options, figures its report must hold)
CASES = {
    "second_field": ("second field: seed 7, RA 10, Dec -30, rotation 25, rings sky map",
                     "{seed: 7, ra: 10.0, dec: -30.0, rotation: 25.0, ccds: [0, 1], n_visits: 3, filters: [HSC-R]}",
                     "coadd.skymap.type=rings", FIGURES + ("trail",)),
    # the second visit's trail crosses too few pixels that both visits cover for the trail figure
    "mixed_seeing": ('mixed seeing: 0.50" and 1.30" visits, 2 CCDs',
                     "{ccds: [0, 1], n_visits: 2, filters: [HSC-R]}", "multiband.enabled=false", FIGURES),
}
#: figures a multi-band report must hold
MULTIBAND_FIGURES = ("median forced PSF mag", "reference positions", "more than one primary")


@pytest.mark.parametrize("case", list(CASES))
def test_coadd_validation_passes_beyond_the_demo(case, tmp_path, capsys):
    what, field, options, figures = CASES[case]
    repo = tmp_path / "repo"
    proc = snakemake_run.run("--cores", "2", "--config", f"repo={repo}", f"simulate={field}",
                             # dotted options travel inside set= (snakemake --config takes identifiers only as keys)
                             "set=" + " ".join(filter(None, [options, "validation.strict=true"])),
                             timeout=TIMEOUT, what=what)
    err = proc.stderr
    report_path = repo / "rerun" / "ci" / "validation" / "coadd.json"
    logs = [repo / "rerun" / "ci" / "logs" / rule / "all.log" for rule in ("validate_coadd", "validate_multiband")]
    with capsys.disabled():
        print(f"\n[{what}]")
        for log in filter(Path.exists, logs):
            print(*[line for line in log.read_text().splitlines() if "PASS" in line or "FAIL" in line
                    or "no goal" in line], sep="\n")
    assert proc.returncode == 0, f"snakemake failed:\n{err[-6000:]}"
    report = json.loads(report_path.read_text())
    assert report["strict"] is True
    names = " ".join(m["name"] for m in report["metrics"])
    for figure in figures:
        assert figure in names, f"no {figure} figure in {names}"
    failed = [m for m in report["metrics"] if not m["passed"]]
    assert failed == []
    assert report["missed"] == []
    if "multiband.enabled=false" in options:
        return
    multiband = json.loads((repo / "rerun" / "ci" / "validation" / "multiband.json").read_text())
    names = " ".join(m["name"] for m in multiband["metrics"])
    for figure in MULTIBAND_FIGURES:
        assert figure in names, f"no {figure} figure in {names}"
    assert multiband["strict"] is True and multiband["missed"] == [] and multiband["passed"]
