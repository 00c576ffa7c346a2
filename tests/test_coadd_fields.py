"""The coadd validation on a second field: another seed, centre and rotation, the ``rings`` sky map.

A small run (2 CCDs, 3 HSC-R visits; the second has the satellite trail) from simulation through
coadd validation with ``validation.strict`` true, so a missed coadd goal fails the run.
"""
from __future__ import annotations

import json

import pytest

import snakemake_run

pytestmark = pytest.mark.workflow

TIMEOUT = 8 * 60  # s; about 4 minutes on 2 cores
FIELD = "{seed: 7, ra: 10.0, dec: -30.0, rotation: 25.0, ccds: [0, 1], n_visits: 3, filters: [HSC-R]}"


def test_second_field_with_rings_skymap_passes_coadd_validation(tmp_path, capsys):
    repo = tmp_path / "field7"
    proc = snakemake_run.run("--cores", "2", "--config", f"repo={repo}", f"simulate={FIELD}",
                             # dotted options travel inside set= (snakemake --config takes identifiers only as keys)
                             "set=coadd.skymap.type=rings validation.strict=true",
                             timeout=TIMEOUT, what="the second field")
    err = proc.stderr
    report_path = repo / "rerun" / "ci" / "validation" / "coadd.json"
    log = repo / "rerun" / "ci" / "logs" / "validate_coadd" / "all.log"
    with capsys.disabled():
        print("\n[second field: seed 7, RA 10, Dec -30, rotation 25, rings sky map]")
        if log.exists():
            print(*[line for line in log.read_text().splitlines() if "PASS" in line or "FAIL" in line], sep="\n")
    assert proc.returncode == 0, f"snakemake failed:\n{err[-6000:]}"
    report = json.loads(report_path.read_text())
    assert report["strict"] is True
    names = " ".join(m["name"] for m in report["metrics"])
    for figure in ("trail", "CLIPPED", "noise", "FWHM", "positions", "magnitude", "depth"):
        assert figure in names, f"no {figure} figure in {names}"
    failed = [m for m in report["metrics"] if not m["passed"]]
    assert failed == []
