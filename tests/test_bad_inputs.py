"""The bad-input matrix of the single-frame stages (issue 13, item 1), as one workflow run.

Each bad input must give one line naming the data ID, the file at fault and the reason, fail
only the jobs that read it, and leave the registry and the earlier products as they were; with
``--keep-going`` every other product is made.

One small repository (2 ``ci`` CCDs, 4 visits in each of HSC-R and HSC-G, one frame per master
calibration, reference shards at HEALPix nside 8192, 26", so that a shard can belong to one CCD
of one visit) is simulated, ingested and calibrated once per module. A copy of it gets every bad input
at once, each in its own (visit, ccd), and one ``snakemake --keep-going`` processes it; the tests
then read that run's output, logs and products (about 2.5 minutes on 2 cores for the module).

Cases tested elsewhere, not repeated here: a CCD with no stars (test_workflow.py
``test_ccd_without_stars_fails_alone``, through the workflow); a reference catalog not covering
the CCD (test_workflow.py ``test_refcat_not_covering_the_ccd``); an unknown data ID and an unknown
data-ID key (test_workflow.py ``test_bad_data_id_stops_before_any_job``); a truncated raw, a raw
missing a key and a duplicate (visit, ccd) at ingest (test_registry.py, test_workflow.py
``test_ingest_truncated_raw``); malformed ``--id`` syntax in the parser (test_dataid.py); an
all-NaN CCD in ISR (test_isr.py).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from snakedrp.repo.butler import Butler
from snakedrp.repo.camera import Camera
from snakedrp.repo.exposure import Exposure, mask_bit
from snakedrp.repo.ingest import IngestConfig, ingest
from snakedrp.repo.io import write_table
from snakedrp.repo.raw import RawFrame
from snakedrp.repo.refcat import RefcatError, load_refcat, pixels_in_cone, read_index, write_refcat
from snakedrp.repo.registry import REGISTRY_NAME, Registry, write_registry
from snakedrp.single_frame.calibrate import CalibrateConfig
from snakedrp.single_frame.process_ccd import refcat_circle

import snakemake_run

pytestmark = pytest.mark.workflow

RUN_TIMEOUT = 15 * 60  # s; each run takes 1-2 minutes on 2 cores
DRY_TIMEOUT = 3 * 60
CCDS = (0, 1)
FILTERS = ("HSC-R", "HSC-G")
N_VISITS = 4
#: --config words of every run on the matrix repository (a change re-runs the jobs it concerns)
CONFIG = (
    f"simulate={{ccds: [{', '.join(map(str, CCDS))}], filters: [{', '.join(FILTERS)}], n_visits: {N_VISITS}, "
    "n_bias: 1, n_dark: 1, n_flat: 1, refcat_nside: 8192}",
    "calibs={bias: {min_inputs: 1}, dark: {min_inputs: 1}, flat: {min_inputs: 1}}",
    "coadd={enabled: false}",
    "validation={enabled: false}",
)
REFCAT = "sim_gaia"
#: a reference shard belongs to a (visit, ccd) if it overlaps its circle shrunk by this much and no
#: other circle grown by it [deg]: room for the difference between the raw header's WCS (used here)
#: and the camera model's that process_ccd starts from (2.3" in radius on the ci camera)
SHARD_MARGIN = 5.0 / 3600.0
#: the master flat made unreadable, and the one deleted (the workflow must make it again)
CORRUPT_FLAT = dict(filter="HSC-G", ccd=0)
MISSING_FLAT = dict(filter="HSC-R", ccd=1)
UNKNOWN_FILTER = "HSC-Z9"
DEAD_AMP = "B"


# ------------------------------------------------------------------ helpers
def snakemake(repo: Path, *args: str, config: tuple[str, ...] = (), timeout: float = RUN_TIMEOUT
              ) -> subprocess.CompletedProcess:
    """Run snakemake (from the workflow directory) on ``repo`` with :data:`CONFIG` and ``config``.

    ``args`` (flags, targets) come before ``--config``, which takes every following word as key=value.
    """
    return snakemake_run.run("--cores", "2", *args, "--config", f"repo={repo}", *CONFIG, *config, timeout=timeout)


def copy_repo(src: Path, dest: Path) -> Path:
    """A copy of a repository: inputs hard-linked (every writer replaces files, never rewrites them
    in place; so do the injections here), the registry and logs copied; modification times kept."""
    linked = ("raw", "CALIB", "truth", "ref_cats")

    def copy(s, d):
        if Path(s).relative_to(src).parts[0] in linked:
            try:
                os.link(s, d)
                return d
            except OSError:  # another file system
                pass
        return shutil.copy2(s, d)

    shutil.copytree(src, dest, symlinks=True, copy_function=copy)
    return dest


def replace_keeping_mtime(path: Path, write, *args) -> None:
    """Replace ``path`` by what ``write(path, *args)`` writes, as a new file with the old modification time.

    The old time keeps Snakemake from re-running ingest or a master calibration on a file that
    went bad after it was made (the bad input is then met where it is read).
    """
    st = path.stat()
    path.unlink()
    write(path, *args)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def write_raw(path: Path, adu: np.ndarray, header: fits.Header, dtype=np.uint16) -> None:
    header = header.copy()
    for key in ("BZERO", "BSCALE", "CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True)
    data = np.clip(np.round(adu), 0, 65535).astype(np.uint16) if dtype == np.uint16 else adu.astype(dtype)
    fits.PrimaryHDU(data=data, header=header).writeto(path)


def snapshot(repo: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of the registry and every file under raw/, CALIB/, ref_cats/ and truth/."""
    files = [repo / REGISTRY_NAME] + [p for d in ("raw", "CALIB", "ref_cats", "truth")
                                       for p in (repo / d).rglob("*") if p.is_file()]
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def nominal_circle(raw_path: Path, camera: Camera, margin_arcsec: float) -> tuple[float, float, float]:
    header = fits.getheader(raw_path)
    wcs = WCS(header)
    return refcat_circle(wcs, tuple(camera.ccd_shape), margin_arcsec)


# ------------------------------------------------------------------ the repository, once
@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    return {}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, timings) -> Path:
    """Simulated, ingested, with every master calibration; no single-frame product."""
    # SNAKEDRP_TEST_BAD_INPUTS_REPO=<dir> keeps it there between sessions (local iteration: the run
    # finds it up to date in seconds); CI leaves it unset. The tests only read it or copy it.
    given = os.environ.get("SNAKEDRP_TEST_BAD_INPUTS_REPO")
    repo = Path(given).resolve() if given else tmp_path_factory.mktemp("bad_inputs") / "pristine"
    butler = Butler(repo)
    targets = [str(repo / REGISTRY_NAME)]
    for ccd in CCDS:
        targets += [butler.output_path("bias", ccd=ccd), butler.output_path("dark", ccd=ccd)]
        targets += [butler.output_path("flat", ccd=ccd, filter=f) for f in FILTERS]
    t0 = time.monotonic()
    proc = snakemake(repo, *targets, "-q", "rules")
    timings["simulate, ingest, calibs [s]"] = time.monotonic() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return repo


@dataclass
class Case:
    """One bad input: where it is, the file the error must name, the reason it must give."""

    name: str
    visit: int
    ccd: int
    file: Path | None = None
    reason: str = ""


@dataclass
class Matrix:
    repo: Path
    proc: subprocess.CompletedProcess
    cases: dict[str, list[Case]]
    good: list[tuple[int, int]]
    masked: dict[str, tuple[int, int]]
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]
    replaced: set[str] = field(default_factory=set)

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def path(self, dataset: str, visit: int, ccd: int) -> Path:
        return Path(Butler(self.repo, rerun="ci").output_path(dataset, visit=visit, ccd=ccd))

    def log(self, visit: int, ccd: int) -> str:
        return (self.repo / "rerun/ci/logs/process_ccd" / f"{visit}-{ccd}.log").read_text()


def _shard_owners(repo: Path, science: list[dict], camera: Camera, margin_arcsec: float):
    """Shard pixel → the one (visit, ccd) whose reference circle holds it, for shards of one exposure only."""
    index = read_index(repo / "ref_cats" / REFCAT)
    nside, present = index["nside"], {int(s["pixel"]) for s in index["shards"]}
    inner, outer = {}, Counter()
    for e in science:
        ra, dec, radius = nominal_circle(repo / e["path"], camera, margin_arcsec)
        key = (e["visit"], e["ccd"])
        inner[key] = set(pixels_in_cone(nside, ra, dec, radius - SHARD_MARGIN).tolist()) & present
        outer.update(set(pixels_in_cone(nside, ra, dec, radius + SHARD_MARGIN).tolist()) & present)
    return {p: key for key, pixels in inner.items() for p in sorted(pixels) if outer[p] == 1}


@pytest.fixture(scope="module")
def matrix(pristine, tmp_path_factory, timings) -> Matrix:
    """Every bad input injected into one copy, and one ``snakemake --keep-going`` over it."""
    repo = copy_repo(pristine, tmp_path_factory.mktemp("bad_inputs") / "matrix")
    butler = Butler(repo)
    camera = Camera.from_yaml(repo / "_camera.yaml")
    science = Registry(repo / REGISTRY_NAME).exposures(obstype="science")
    slots = [(e["visit"], e["ccd"]) for e in science]
    filter_of = {(e["visit"], e["ccd"]): e["filter"] for e in science}
    raw = {(e["visit"], e["ccd"]): repo / e["path"] for e in science}
    cases: dict[str, list[Case]] = {}

    # a corrupt master flat: every exposure of its CCD and filter fails, reading it
    flat = Path(butler.output_path("flat", **CORRUPT_FLAT))
    data = flat.read_bytes()
    replace_keeping_mtime(flat, write_bytes, data[: len(data) // 2])
    cases["corrupt_master"] = [Case("corrupt_master", v, c, flat, r"master flat is unusable: truncated \(\d+ bytes")
                               for v, c in slots if c == CORRUPT_FLAT["ccd"] and filter_of[v, c] == CORRUPT_FLAT["filter"]]
    free = [s for s in slots if s not in {(k.visit, k.ccd) for k in cases["corrupt_master"]}]
    # a missing master flat: made again from its raws, its exposures processed as usual
    Path(butler.output_path("flat", **MISSING_FLAT)).unlink()

    # reference shards that belong to one exposure each: one deleted, one emptied
    owners = _shard_owners(repo, science, camera, margin_arcsec=CalibrateConfig().refcat_margin)
    shard_of = {}
    for pixel, key in owners.items():
        if key in free and key not in shard_of:
            shard_of[key] = pixel
    if len(shard_of) < 2:
        pytest.fail(f"no two exposures own a reference shard ({owners}); change the simulation of the matrix")
    (missing_slot, missing_pixel), (empty_slot, empty_pixel) = list(shard_of.items())[:2]
    refcat_dir = repo / "ref_cats" / REFCAT
    (refcat_dir / f"{missing_pixel}.fits").unlink()
    empty = refcat_dir / f"{empty_pixel}.fits"
    columns = Table.read(empty)[:0]
    replace_keeping_mtime(empty, lambda path, table: write_table(table, path), columns)
    cases["refcat_missing"] = [Case("refcat_missing", *missing_slot, refcat_dir / f"{missing_pixel}.fits",
                                    r"shard listed in index.json is missing")]
    cases["refcat_empty"] = [Case("refcat_empty", *empty_slot, empty, r"shard has 0 rows, index.json lists \d+")]
    free = [s for s in free if s not in (missing_slot, empty_slot)]

    # good exposures, one of each (filter, ccd) with a whole flat: the MISSING_FLAT one among them
    good = list({(filter_of[s], s[1]): s for s in reversed(free)}.values())[::-1]
    free = [s for s in free if s not in good]
    # bad raw frames, one exposure each; the duplicate is a copy of the first good exposure
    names = ("truncated", "missing_key", "saturated", "unknown_filter", "duplicate", "nan_amp", "zero_amp")
    if len(free) < len(names):
        pytest.fail(f"too few exposures for the matrix: {len(free)} left for {len(names)} bad raw frames")
    assigned = dict(zip(names, free))
    good += free[len(names):]
    source = good[0]
    for name, slot in assigned.items():
        path = raw[slot]
        frame = RawFrame.read(path)
        if name == "truncated":
            data = path.read_bytes()
            replace_keeping_mtime(path, write_bytes, data[: len(data) * 2 // 3])
            reason = r"truncated \(\d+ bytes, header and data need \d+\)"
        elif name == "missing_key":
            header = frame.header.copy()
            del header["EXPTIME"]
            replace_keeping_mtime(path, write_raw, frame.data, header)
            reason = r"missing required header key\(s\) EXPTIME"
        elif name == "saturated":
            replace_keeping_mtime(path, write_raw, np.full_like(frame.data, 65535.0), frame.header)
            reason = r"no usable pixel \(amplifier A: every pixel saturated \(>= \d+ ADU\); amplifier B: every pixel saturated"
        elif name == "unknown_filter":
            header = frame.header.copy()
            header["FILTER"] = UNKNOWN_FILTER
            replace_keeping_mtime(path, write_raw, frame.data, header)
            reason = rf"FILTER '{UNKNOWN_FILTER}' is not a filter of camera 'ci' \("
        elif name == "duplicate":
            replace_keeping_mtime(path, write_bytes, raw[source].read_bytes())
            reason = (rf"the header says visit={source[0]} ccd={source[1]}, not visit={slot[0]} ccd={slot[1]} "
                      r"\(a duplicate of that exposure, or a misfiled file\)")
        elif name in ("nan_amp", "zero_amp"):
            amp = next(a for a in camera.ccds[slot[1]].amplifiers if a.name == DEAD_AMP)
            adu = frame.data.copy()
            value = np.nan if name == "nan_amp" else 0.0
            adu[amp.raw_data.slices] = value
            adu[amp.raw_overscan.slices] = value
            dtype = np.float32 if name == "nan_amp" else np.uint16  # NaN needs a floating-point raw
            replace_keeping_mtime(path, write_raw, adu, frame.header, dtype)
            continue
        cases[name] = [Case(name, *slot, path, reason)]
    masked = {name: assigned[name] for name in ("nan_amp", "zero_amp")}

    before = snapshot(repo)
    t0 = time.monotonic()
    proc = snakemake(repo, "--keep-going")
    timings["the matrix run [s]"] = time.monotonic() - t0
    return Matrix(repo=repo, proc=proc, cases=cases, good=good, masked=masked, before=before, after=snapshot(repo),
                  replaced={str(Path(butler.output_path("flat", **MISSING_FLAT)).relative_to(repo))})


# ------------------------------------------------------------------ the matrix run
ERROR_CASES = ("truncated", "missing_key", "saturated", "unknown_filter", "duplicate", "corrupt_master",
               "refcat_missing", "refcat_empty")


@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_input_fails_its_job_with_one_line(matrix, name):
    for case in matrix.cases[name]:
        line = rf"process_ccd visit={case.visit} ccd={case.ccd}: {re.escape(str(case.file))}: {case.reason}"
        # the job's stderr, which Snakemake passes on, and its log (the same line after the time stamp)
        assert re.search(rf"^{line}", matrix.proc.stderr, re.M), f"{name}: no line /{line}/ in:\n{matrix.output[-4000:]}"
        log = matrix.log(case.visit, case.ccd)
        assert "Traceback" not in log, log[-3000:]
        errors = [text for text in log.splitlines() if " ERROR: " in text]
        assert len(errors) == 1 and re.match(line, errors[0].split(" ERROR: ", 1)[1]), log[-3000:]
        assert not matrix.path("calexp", case.visit, case.ccd).exists(), f"{name}: a calexp was written"


def test_the_run_fails_only_the_bad_jobs(matrix):
    assert matrix.proc.returncode != 0
    assert "Traceback" not in matrix.output, matrix.output[-6000:]
    failed = set(re.findall(r"^process_ccd visit=(\d+) ccd=(\d+): ", matrix.proc.stderr, re.M))
    expected = {(str(c.visit), str(c.ccd)) for cases in matrix.cases.values() for c in cases}
    assert failed == expected
    errors = re.findall(r"^Error in rule (\w+):", matrix.output, re.M)
    assert Counter(errors) == {"process_ccd": len(expected)}, errors


def test_every_other_exposure_is_processed(matrix):
    for visit, ccd in [*matrix.good, *matrix.masked.values()]:
        for dataset in ("calexp", "src", "icSrc", "calexpBackground", "srcMatch"):
            path = matrix.path(dataset, visit, ccd)
            assert path.is_file() and path.stat().st_size > 0, path
    assert (matrix.repo / "rerun/ci/config.yaml").is_file()


@pytest.mark.parametrize("name", ["nan_amp", "zero_amp"])
def test_amplifier_without_signal_is_masked_with_one_warning(matrix, name):
    visit, ccd = matrix.masked[name]
    raw = matrix.repo / "raw" / str(visit) / f"raw-{visit}-{ccd}.fits"
    log = matrix.log(visit, ccd)
    reason = "no finite pixel" if name == "nan_amp" else "every pixel reads 0 ADU"
    lines = [line for line in log.splitlines() if " WARNING: " in line and "masked NO_DATA" in line]
    assert len(lines) == 1, log[-3000:]
    assert f"process_ccd visit={visit} ccd={ccd}: {raw}: amplifier {DEAD_AMP} masked NO_DATA: {reason}" in lines[0]
    calexp = Exposure.read(matrix.path("calexp", visit, ccd))
    camera = Camera.from_yaml(matrix.repo / "_camera.yaml")
    for amp in camera.ccds[ccd].amplifiers:
        nodata = (calexp.mask[amp.assembled.slices] & mask_bit("NO_DATA")) != 0
        if amp.name == DEAD_AMP:
            assert nodata.all()
        else:
            assert nodata.mean() < 0.01
    assert calexp.metadata["NODATAMP"] == DEAD_AMP
    assert calexp.zeropoint is not None and 0 < calexp.zeropoint_err < 0.05


def test_missing_master_calibration_is_made_again(matrix):
    flat = matrix.repo / next(iter(matrix.replaced))
    assert flat.is_file() and next(iter(matrix.replaced)) not in matrix.before
    jobs = re.findall(r"^(?:local)?rule (master_\w+):\n(?:.*\n)*?\s+wildcards: (.*)$", matrix.output, re.M)
    assert jobs == [("master_flat", f"filter={MISSING_FLAT['filter']}, ccd={MISSING_FLAT['ccd']}")], jobs
    science = Registry(matrix.repo / REGISTRY_NAME).exposures(obstype="science", **MISSING_FLAT)
    made = [(e["visit"], e["ccd"]) for e in science if matrix.path("calexp", e["visit"], e["ccd"]).is_file()]
    assert set(made) >= {s for s in matrix.good if s in {(e["visit"], e["ccd"]) for e in science}} and made


def test_registry_and_earlier_products_are_untouched(matrix):
    changed = {k for k in matrix.before.keys() | matrix.after.keys() if matrix.before.get(k) != matrix.after.get(k)}
    assert changed == matrix.replaced


def test_ingest_names_each_bad_raw(matrix, tmp_path, caplog):
    """The same raw files through ingest (into a scratch registry): one warning line per bad header."""
    shutil.copy(matrix.repo / "_camera.yaml", tmp_path / "_camera.yaml")
    rows = Registry(matrix.repo / REGISTRY_NAME).exposures()
    with caplog.at_level(logging.WARNING, logger="snakedrp.ingest"):
        report = ingest(tmp_path, [matrix.repo / r["path"] for r in rows], IngestConfig(on_error="skip"))
    skipped = dict(report.skipped)
    expected = {name: matrix.cases[name][0] for name in ("truncated", "missing_key", "unknown_filter", "duplicate")}
    assert set(skipped) == {str(c.file) for c in expected.values()}
    assert "truncated" in skipped[str(expected["truncated"].file)]
    assert "EXPTIME" in skipped[str(expected["missing_key"].file)]
    unknown = expected["unknown_filter"]
    assert skipped[str(unknown.file)].startswith(f"visit={unknown.visit} ccd={unknown.ccd}: FILTER '{UNKNOWN_FILTER}'")
    assert "duplicate visit=" in skipped[str(expected["duplicate"].file)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(expected)
    assert len(report.ingested) == len(rows) - len(expected)


def test_timings(matrix, timings, capsys):
    with capsys.disabled():
        print("", *(f"[bad inputs: {name}: {value:.0f}]" for name, value in timings.items()), sep="\n")


# ------------------------------------------------------------------ before any job: dry runs
@pytest.mark.parametrize("data_id, words", [
    ("visit=903334..", "malformed range"),
    ("visit", "not key=value"),
])
def test_malformed_id_stops_before_any_job_in_one_line(pristine, data_id, words):
    before = snapshot(pristine)
    proc = snakemake(pristine, "-n", config=(f"id={data_id}",), timeout=DRY_TIMEOUT)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [line for line in text.splitlines() if "data ID error" in line]
    assert len(lines) == 1 and words in lines[0] and data_id in lines[0], text[-3000:]
    assert "Traceback" not in text and "Job stats" not in text, text[-3000:]
    assert snapshot(pristine) == before


def test_master_calibration_without_raws_fails_only_its_jobs(pristine, tmp_path):
    repo = copy_repo(pristine, tmp_path / "repo")
    registry = repo / REGISTRY_NAME
    rows = [r for r in Registry(registry).exposures()
            if not (r["obstype"] == "flat" and r["ccd"] == CORRUPT_FLAT["ccd"] and r["filter"] == CORRUPT_FLAT["filter"])]
    write_registry(registry, rows)
    Path(Butler(repo).output_path("flat", **CORRUPT_FLAT)).unlink()
    proc = snakemake(repo, "-n", "-q", "rules", timeout=DRY_TIMEOUT)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text


# ------------------------------------------------------------------ reference shards (no workflow)
def test_damaged_reference_shards_are_named(tmp_path):
    table = Table(dict(id=np.arange(40), ra=150.0 + np.linspace(-0.01, 0.01, 40), dec=np.full(40, 2.0)))
    index = write_refcat(table, tmp_path, nside=4096)
    shard = tmp_path / f"{index['shards'][0]['pixel']}.fits"
    good = shard.read_bytes()
    for damage, words in ((b"", "not a readable FITS file"), (good[: len(good) - 100], "truncated")):
        shard.unlink()
        shard.write_bytes(damage)
        with pytest.raises(RefcatError, match=re.escape(str(shard)) + ".*" + words):
            load_refcat(tmp_path, 150.0, 2.0, 0.05)
