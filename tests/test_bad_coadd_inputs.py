"""The bad-input matrix of the coadd stage (issue 13, item 1), as one workflow run.

A copy of the finished ci demo (conftest.py) gets three bad inputs at once, and one
``snakemake --keep-going coadd`` rebuilds what they touch:

- in HSC-R, a calexp whose astrometric fit failed (made by ``ProcessCcdTask`` itself from a
  reference catalog moved by 0.5 deg): make_overlaps leaves it out with one warning, the coadds
  are built without it;
- in HSC-R, a visit whose calexps are masked BAD everywhere: its warps have no usable pixel, and
  assemble_coadd leaves them out with one warning per patch;
- in HSC-I, a truncated warp: the assemble_coadd job of its patch fails with one line naming the
  filter, tract, patch and file; every other patch is built, no earlier product is touched.

A coadd id naming a patch without inputs, an unknown tract, patch or filter are refused before any
job (tests/test_coadd_workflow.py ``test_bad_coadd_id_stops_before_any_job``).
"""
from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from snakedrp.coadd.overlaps import overlap_index
from snakedrp.repo.butler import Butler
from snakedrp.repo.exposure import Exposure, mask_bit
from snakedrp.repo.registry import REGISTRY_NAME, Registry
from snakedrp.single_frame.process_ccd import ProcessCcdTask

import snakemake_run
from conftest import CI_RUN_CONFIG, moved_refcat, raw_and_calibs

pytestmark = pytest.mark.workflow

RUN_TIMEOUT = 15 * 60  # s; the run rebuilds about a third of the demo's coadd jobs (1-3 min on 2 cores)
#: per-patch coadd products, deleted where a bad input must make them again
PATCH_PRODUCTS = ("deepCoadd", "deepCoadd_nImage", "deepCoadd_inputs", "deepCoadd_calexp", "deepCoadd_det")
#: what a run may write in place (Snakemake's benchmark files, our logs): copied, never linked
COPIED = ("logs", "benchmarks")


def link_copy(src: Path, dest: Path) -> Path:
    """A copy of a repository: products and inputs hard-linked, logs, benchmarks and the registry copied.

    Every product is replaced by a rename and Snakemake unlinks a job's outputs before it runs, so
    a link is never written through; modification times are kept.
    """
    def copy(s, d):
        parts = Path(s).relative_to(src).parts
        if not any(p in COPIED for p in parts) and parts[-1] != REGISTRY_NAME:
            try:
                os.link(s, d)
                return d
            except OSError:  # another file system
                pass
        return shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=copy)
    return dest


def replace_keeping_mtime(path: Path, write) -> None:
    """Replace ``path`` by a new file (``write(path)``), with the old modification time: nothing re-runs for it."""
    stat = path.stat()
    path.unlink()
    write(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@dataclass
class CoaddMatrix:
    repo: Path
    proc: object
    wcs_failed: tuple[int, int]                 # (visit, ccd) in HSC-R
    masked_visit: int                           # HSC-R
    truncated: tuple[int, str, Path]            # (tract, patch, warp) in HSC-I
    touched: dict[str, set[tuple[int, str]]]    # filter -> patches whose products were deleted
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def path(self, dataset: str, **data_id) -> Path:
        return Path(Butler(self.repo, rerun="ci").output_path(dataset, **data_id))

    def log(self, rule: str, **data_id) -> str:
        parts = "-".join(str(data_id[k]).replace(",", "_") for k in ("filter", "tract", "patch") if k in data_id)
        return (self.repo / "rerun/ci/logs" / rule / f"{parts or 'all'}.log").read_text()


def snapshot(repo: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime in ns) of every product of the rerun (logs and benchmarks aside)."""
    rerun = repo / "rerun" / "ci"
    return {str(p.relative_to(rerun)): (p.stat().st_size, p.stat().st_mtime_ns) for p in rerun.rglob("*")
            if p.is_file() and p.relative_to(rerun).parts[0] not in COPIED}


def _failed_astrometry_calexp(repo: Path, exposure: dict) -> Exposure:
    """The calexp ProcessCcdTask makes for ``exposure`` when its reference stars are 0.5 deg off."""
    butler, raw, calibs = raw_and_calibs(repo, exposure)
    result = ProcessCcdTask().run(raw, camera=butler.camera, calibs=calibs, refcat=moved_refcat(repo, exposure))
    assert "WCSFAIL" in result.calexp.metadata, "the moved reference catalog did not make the fit fail"
    return result.calexp


@pytest.fixture(scope="module")
def matrix(ci_repo, tmp_path_factory) -> CoaddMatrix:
    repo = link_copy(ci_repo, tmp_path_factory.mktemp("bad_coadd") / "repo")
    butler = Butler(repo, rerun="ci")
    science = Registry(repo / REGISTRY_NAME).exposures(obstype="science")
    index = {band: overlap_index(Table.read(butler.output_path("deepCoadd_overlaps", filter=band)))
             for band in ("HSC-R", "HSC-I")}
    r_visits = sorted({e["visit"] for e in science if e["filter"] == "HSC-R"})
    touched: dict[str, set[tuple[int, str]]] = {"HSC-R": set(), "HSC-I": set()}

    def patches_of(band, visit):
        return {key for key, visits in index[band].items() if visit in visits}

    def drop_patch(band, tract, patch):
        touched[band].add((tract, patch))
        for dataset in PATCH_PRODUCTS:
            butler_path = Path(butler.output_path(dataset, filter=band, tract=tract, patch=patch))
            butler_path.unlink(missing_ok=True)

    # HSC-R: a calexp with a failed astrometric fit, and a visit masked BAD everywhere
    wcs_visit, masked_visit = r_visits[0], r_visits[1]
    exposure = next(e for e in science if e["visit"] == wcs_visit)
    failed = _failed_astrometry_calexp(repo, exposure)
    calexp_path = Path(butler.output_path("calexp", visit=wcs_visit, ccd=exposure["ccd"]))
    replace_keeping_mtime(calexp_path, failed.write)
    for e in (e for e in science if e["visit"] == masked_visit):
        path = Path(butler.output_path("calexp", visit=masked_visit, ccd=e["ccd"]))
        calexp = Exposure.read(path)
        calexp.mask |= np.int32(mask_bit("BAD"))
        replace_keeping_mtime(path, calexp.write)
    Path(butler.output_path("deepCoadd_overlaps", filter="HSC-R")).unlink()
    for visit in (wcs_visit, masked_visit):
        for tract, patch in patches_of("HSC-R", visit):
            Path(butler.output_path("deepCoadd_directWarp", filter="HSC-R", tract=tract, patch=patch,
                                    visit=visit)).unlink()
            drop_patch("HSC-R", tract, patch)

    # HSC-I: a truncated warp of a patch with several visits
    (tract, patch), visits = next((key, v) for key, v in index["HSC-I"].items() if len(v) >= 3)
    warp = Path(butler.output_path("deepCoadd_directWarp", filter="HSC-I", tract=tract, patch=patch,
                                   visit=next(iter(visits))))
    data = warp.read_bytes()
    replace_keeping_mtime(warp, lambda path: path.write_bytes(data[: len(data) // 2]))
    drop_patch("HSC-I", tract, patch)

    before = snapshot(repo)
    proc = snakemake_run.run("--cores", "2", "--keep-going", "coadd", "--config", f"repo={repo}", *CI_RUN_CONFIG,
                             timeout=RUN_TIMEOUT, what="the coadd bad-input run")
    return CoaddMatrix(repo=repo, proc=proc, wcs_failed=(wcs_visit, exposure["ccd"]), masked_visit=masked_visit,
                       truncated=(tract, patch, warp), touched=touched, before=before, after=snapshot(repo))


def test_only_the_patch_with_the_truncated_warp_fails(matrix):
    assert matrix.proc.returncode != 0
    assert "Traceback" not in matrix.output, matrix.output[-6000:]
    errors = re.findall(r"^Error in rule (\w+):", matrix.output, re.M)
    assert Counter(errors) == {"assemble_coadd": 1}, matrix.output[-6000:]
    tract, patch, warp = matrix.truncated
    line = (rf"assemble_coadd filter=HSC-I tract={tract} patch={patch}: {re.escape(str(warp))}: "
            r"truncated \(\d+ bytes, headers and data need \d+\)")
    assert re.search(rf"^{line}", matrix.proc.stderr, re.M), matrix.output[-4000:]
    log = matrix.log("assemble_coadd", filter="HSC-I", tract=tract, patch=patch)
    assert [t for t in log.splitlines() if " ERROR: " in t] and "Traceback" not in log, log[-3000:]
    for dataset in ("deepCoadd", "deepCoadd_calexp", "deepCoadd_det"):
        assert not matrix.path(dataset, filter="HSC-I", tract=tract, patch=patch).exists()


def test_every_other_patch_is_built(matrix):
    bad = ("HSC-I", *matrix.truncated[:2])
    for band, patches in matrix.touched.items():
        for tract, patch in patches:
            if (band, tract, patch) == bad:
                continue
            for dataset in ("deepCoadd_inputs", "deepCoadd_calexp", "deepCoadd_det"):
                path = matrix.path(dataset, filter=band, tract=tract, patch=patch)
                assert path.is_file() and path.stat().st_size > 0, path


def test_failed_astrometry_calexp_is_left_out_with_a_warning(matrix):
    visit, ccd = matrix.wcs_failed
    log = matrix.log("make_overlaps", filter="HSC-R")
    warnings = [t for t in log.splitlines() if " WARNING: " in t]
    assert len(warnings) == 1 and f"(visit={visit} ccd={ccd}): astrometric fit failed" in warnings[0], log
    overlaps = Table.read(matrix.path("deepCoadd_overlaps", filter="HSC-R"))
    pairs = set(zip(np.asarray(overlaps["visit"]).tolist(), np.asarray(overlaps["ccd"]).tolist()))
    assert (visit, ccd) not in pairs and any(v == visit for v, _ in pairs)
    for tract, patch in matrix.touched["HSC-R"]:
        inputs = Table.read(matrix.path("deepCoadd_inputs", filter="HSC-R", tract=tract, patch=patch))
        assert (visit, ccd) not in set(zip(inputs["visit"].tolist(), inputs["ccd"].tolist()))


def test_masked_visit_is_left_out_of_each_coadd_with_a_warning(matrix):
    visit = matrix.masked_visit
    left_out = 0
    for tract, patch in matrix.touched["HSC-R"]:
        warp = matrix.path("deepCoadd_directWarp", filter="HSC-R", tract=tract, patch=patch, visit=visit)
        if not warp.exists():
            continue  # the patch is touched by the failed-astrometry visit only
        log = matrix.log("assemble_coadd", filter="HSC-R", tract=tract, patch=patch)
        assert f"{warp}: no usable pixel" in log, log[-3000:]
        inputs = Table.read(matrix.path("deepCoadd_inputs", filter="HSC-R", tract=tract, patch=patch))
        assert visit not in inputs["visit"].tolist()
        left_out += 1
    assert left_out >= 1


def test_nothing_else_is_rewritten(matrix):
    rebuilt = {"deepCoadd/overlaps/overlaps-HSC-R.fits"}
    for band, patches in matrix.touched.items():
        for tract, patch in patches:
            for dataset in PATCH_PRODUCTS:
                rebuilt.add(str(matrix.path(dataset, filter=band, tract=tract, patch=patch)
                                .relative_to(matrix.repo / "rerun" / "ci")))
    changed = {p for p, v in matrix.after.items() if matrix.before.get(p) != v}
    # new files: the deleted products made again and the warps of the two bad HSC-R visits
    warps = {p for p in changed if re.search(rf"warp-HSC-R-.*-({matrix.wcs_failed[0]}|{matrix.masked_visit})\.fits$", p)}
    assert changed - rebuilt - warps == set()
    assert set(matrix.before) - set(matrix.after) == set()
