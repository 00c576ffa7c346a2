"""The workflow end to end: Snakemake on the ci demo (the CI accuracy gate), dry runs, reruns, bad input.

One session fixture runs the real default ci demo once into a temporary repository (simulate,
ingest, master calibrations, process_ccd on 24 CCDs, validation against truth; 3-4 minutes on 2
cores). Every other test dry-runs the workflow, reads that repository, or works on a copy of it,
so the fixture's repository stays as the run left it. Run only these with ``-m workflow``, or skip
them with ``-m "not workflow"``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from snakedrp import simulate
from snakedrp.repo.butler import Butler
from snakedrp.single_frame.calibrate import CalibrateError
from snakedrp.repo.camera import Camera
from snakedrp.repo.exposure import MASK_PLANES, Exposure
from snakedrp.single_frame.process_ccd import ProcessCcdConfig, ProcessCcdTask
from snakedrp.repo.raw import RawFrame
from snakedrp.repo.ingest import IngestConfig, IngestError, ingest
from snakedrp.repo.registry import REGISTRY_NAME, Registry

import snakemake_run
from conftest import moved_refcat, raw_and_calibs

pytestmark = pytest.mark.workflow

ROOT = Path(__file__).resolve().parents[1]  # the Snakefile's directory
SHORT_TIMEOUT = 5 * 60  # s; dry runs, lint, show_config, two process_ccd jobs
CALIB_RULES = ("master_bias", "master_dark", "master_flat", "master_fringe")
UPSTREAM_RULES = ("simulate_field", "simulate_raw", "ingest", *CALIB_RULES)
PRODUCTS = ("calexp", "src", "icSrc", "calexpBackground", "srcMatch")
LINKED = ("raw", "CALIB", "truth", "ref_cats")  # repository inputs hard-linked by copy_repo

# ------------------------------------------------------------------ helpers
def run_snakemake(*args, timeout: float = SHORT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run snakemake from the workflow directory; stdout and stderr captured as text."""
    return snakemake_run.run(*args, timeout=timeout)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def job_counts(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule name → job count from the "Job stats" table of a (dry) run; {} if nothing to do."""
    text = output_of(proc)
    m = re.search(r"^Job stats:\n(.*?)^total\s+(\d+)\s*$", text, re.M | re.S)
    if m is None:
        assert "Nothing to be done" in text, f"no job-stats table in snakemake's output:\n{text[-3000:]}"
        return {}
    counts = {}
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert sum(counts.values()) == int(m.group(2)), m.group(0)
    return counts


def dry_run(repo: Path, *config: str, flags=("-q", "rules")) -> subprocess.CompletedProcess:
    """``snakemake -n`` on ``repo`` with ``--config`` overrides; by default only the job table."""
    return run_snakemake("-n", *flags, "--config", f"repo={repo}", *config)


def ci_camera() -> Camera:
    return Camera.from_yaml(ROOT / "config/cameras/ci.yaml")


def science_exposures(repo: Path) -> list[dict]:
    return Registry(repo / REGISTRY_NAME).exposures(obstype="science")


def product_path(repo: Path, dataset: str, **data_id) -> Path:
    return Path(Butler(repo, rerun="ci").output_path(dataset, **data_id))


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a new file (never through an existing inode)."""
    path.unlink()
    path.write_bytes(data)


def copy_repo(src: Path, dest: Path) -> Path:
    """A private copy of a finished repository, without its rerun products (the rerun config stays).

    The registry comes along, so the workflow does not re-simulate. Files under :data:`LINKED`
    are hard links to save time and disk: nothing writes into them in place (every product is
    replaced atomically, Snakemake unlinks outputs before a job, and the tests replace files with
    :func:`replace_file`); logs, benchmarks and the registry are real copies. Modification times
    are kept, so Snakemake sees the same up-to-date files.
    """
    src, dest = Path(src), Path(dest)

    def copy(s, d):
        if Path(s).relative_to(src).parts[0] in LINKED:
            try:
                os.link(s, d)
                return d
            except OSError:  # another file system
                pass
        return shutil.copy2(s, d)

    def ignore(directory, names):
        return [n for n in names if n != "config.yaml"] if Path(directory) == src / "rerun" / "ci" else []

    shutil.copytree(src, dest, symlinks=True, copy_function=copy, ignore=ignore)
    return dest


# ------------------------------------------------------------------ the full ci run (session)
# ci_repo (the demo run once) and ci_timings are session fixtures in conftest.py, shared with test_slurm.py.
@pytest.fixture(scope="session")
def ci_science(ci_repo) -> list[dict]:
    rows = science_exposures(ci_repo)
    assert len(rows) == 24
    return rows


# ------------------------------------------------------------------ 1-2: dry run of a fresh repo, lint
def test_dry_run_of_a_fresh_repo_lists_every_job(tmp_path):
    repo = tmp_path / "fresh"
    n_raw = len(simulate.plan_exposures(simulate.resolve_config(simulate.SimulateConfig()), ci_camera()))
    proc = dry_run(repo)
    assert proc.returncode == 0, output_of(proc)[-3000:]
    counts = job_counts(proc)
    expected = dict(simulate_field=1, simulate_raw=n_raw, ingest=1, master_bias=4, master_dark=4, master_flat=8,
                    master_fringe=4, process_ccd=24, validate_single_frame=1)
    assert {rule: counts.get(rule, 0) for rule in expected} == expected, counts
    assert not repo.exists(), "a dry run must not write into the repository"


def test_lint_is_clean(tmp_path):
    proc = run_snakemake("--lint", "--config", f"repo={tmp_path / 'fresh'}")
    assert proc.returncode == 0, f"snakemake --lint:\n{output_of(proc)[-6000:]}"


# ------------------------------------------------------------------ 6: data IDs (fresh repo, dry runs)
def test_data_id_selects_jobs(tmp_path):
    proc = dry_run(tmp_path / "fresh", "id=visit=903334 ccd=0^1")
    assert proc.returncode == 0, output_of(proc)[-3000:]
    counts = job_counts(proc)
    assert counts.get("process_ccd") == 2, counts
    assert counts.get("master_bias") == 2, counts  # only the calibrations the selected CCDs need


@pytest.mark.parametrize("data_id, words", [
    ("visit=1234", ["visit=1234", "visits are 903334"]),
    ("vist=903334", ["unknown data ID key 'vist'", "visit, ccd, filter"]),
])
def test_bad_data_id_stops_before_any_job(tmp_path, data_id, words):
    repo = tmp_path / "fresh"
    proc = dry_run(repo, f"id={data_id}")
    text = output_of(proc)
    assert proc.returncode != 0
    assert "data ID error" in text
    for word in words:
        assert word in text, text[-3000:]
    assert "Job stats" not in text
    assert not repo.exists()


@pytest.mark.parametrize("rerun, words", [
    ("c:b", "rerun b already chains onto a; cannot re-point it to c"),
    ("../outside", "../outside"),
])
def test_bad_rerun_stops_before_any_job_in_one_line(tmp_path, rerun, words):
    """A rerun that contradicts the recorded chain, or would leave the repository, is refused."""
    repo = tmp_path / "repo"
    Butler(repo, rerun="a")
    Butler(repo, rerun="a:b")
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    proc = dry_run(repo, f"rerun={rerun}")
    text = output_of(proc)
    assert proc.returncode != 0
    lines = [line for line in text.splitlines() if "rerun error" in line]
    assert len(lines) == 1 and words in lines[0], text[-3000:]
    assert "Traceback" not in text and "Job stats" not in text, text[-3000:]
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    assert not (tmp_path / "outside").exists()


# ------------------------------------------------------------------ 3: the full run's products
def test_validation_passes_every_goal(ci_repo, ci_timings, capsys):
    report = json.loads((ci_repo / "rerun/ci/validation/single_frame.json").read_text())
    metrics = report["metrics"]
    lines = [f"{'PASS' if m['passed'] else 'FAIL'} {m['name']}: {m['value']:.4g} {m['unit']} "
             f"(goal {m['goal']}, n={m['n']})" for m in metrics]
    with capsys.disabled():  # every CI log shows the figures, passed or not
        print("\n[ci validation: rerun/ci/validation/single_frame.json]", *lines,
              *(f"[{name}: {value:.0f}]" for name, value in ci_timings.items()), sep="\n")
    assert len(metrics) >= 5
    failed = [line for line, m in zip(lines, metrics) if not m["passed"]]
    assert failed == [], "validation goals missed:\n" + "\n".join(failed)
    assert len(report["zeropoint_errors_mmag"]) == 24


def test_every_product_exists(ci_repo, ci_science):
    camera = ci_camera()
    for e in ci_science:
        for dataset in PRODUCTS:
            path = product_path(ci_repo, dataset, visit=e["visit"], ccd=e["ccd"])
            assert path.is_file() and path.stat().st_size > 0, path
        src = product_path(ci_repo, "src", visit=e["visit"], ccd=e["ccd"])
        assert src.with_suffix(".parq").is_file()
    filters = sorted({e["filter"] for e in ci_science})
    for ccd in camera.ccd_ids:
        for dataset in ("bias", "dark"):
            assert product_path(ci_repo, dataset, ccd=ccd).is_file(), (dataset, ccd)
        for f in filters:
            assert product_path(ci_repo, "flat", ccd=ccd, filter=f).is_file(), (f, ccd)
            fringe = product_path(ci_repo, "fringe", ccd=ccd, filter=f)
            assert fringe.is_file() == camera.filters[f].fringe, fringe
    assert (ci_repo / REGISTRY_NAME).is_file()
    assert len(Registry(ci_repo / REGISTRY_NAME)) == len(
        simulate.plan_exposures(simulate.resolve_config(simulate.SimulateConfig()), camera))
    assert (ci_repo / "rerun/ci/config.yaml").is_file()


def test_calexp_is_complete(ci_repo, ci_science):
    e = ci_science[0]
    path = product_path(ci_repo, "calexp", visit=e["visit"], ccd=e["ccd"])
    calexp = Exposure.read(path)
    assert calexp.wcs is not None and calexp.wcs.has_celestial
    assert calexp.psf is not None
    kernel = np.asarray(calexp.psf.kernel(500.0, 1000.0))
    assert kernel.ndim == 2 and np.all(np.isfinite(kernel)) and abs(kernel.sum() - 1) < 0.05
    truth = Table.read(ci_repo / "truth/exposures.fits")
    true_zp = float(truth[(truth["visit"] == e["visit"]) & (truth["ccd"] == e["ccd"])]["zeropoint"][0])
    assert calexp.zeropoint == pytest.approx(true_zp, abs=0.01)
    assert calexp.zeropoint_err is not None and 0 < calexp.zeropoint_err < 0.05
    assert (int(calexp.metadata["VISIT"]), int(calexp.metadata["CCD"])) == (e["visit"], e["ccd"])


def test_calexp_headers_declare_masks_and_provenance(ci_repo, ci_science):
    config_hash = ProcessCcdConfig().hash()  # the ci run used the defaults
    for e in ci_science:
        path = product_path(ci_repo, "calexp", visit=e["visit"], ccd=e["ccd"])
        with fits.open(path) as hdul:  # headers only: the data are read lazily
            primary, mask_header = hdul[0].header, hdul["MASK"].header
            extensions = [h.name for h in hdul[1:]]
        assert extensions[:3] == ["IMAGE", "MASK", "VARIANCE"] and "PSF" in extensions, path
        assert {k.removeprefix("MP_"): v for k, v in mask_header.items() if k.startswith("MP_")} == MASK_PLANES
        assert np.isfinite(primary["ZEROPT"]) and primary["ZEROPTER"] > 0, path
        # provenance: the config section and its hash, the software versions
        assert primary["CFGSECT"] == "process_ccd"
        assert primary["CFGHASH"] == config_hash, path
        names = {primary[k] for k in primary if k.startswith("SWNAM")}
        assert {"snakedrp", "numpy", "astropy"} <= names
        assert all(str(primary[f"SWVER{k[5:]}"]).strip() for k in primary if k.startswith("SWNAM"))


def test_src_columns_have_units_and_descriptions(ci_repo, ci_science):
    e = ci_science[0]
    path = product_path(ci_repo, "src", visit=e["visit"], ccd=e["ccd"])
    fits_table, parquet = Table.read(path), Table.read(path.with_suffix(".parq"))
    assert len(fits_table) > 50
    assert fits_table.colnames == parquet.colnames and len(fits_table) == len(parquet)
    for name in ("x_centroid", "y_centroid", "coord_ra", "coord_dec", "psf_flux", "psf_flux_err", "psf_mag"):
        assert name in fits_table.colnames, name
    # Parquet keeps every unit (dimensionless as ""), FITS keeps the descriptions too (astropy's
    # serialized-column comments), but reads a dimensionless TUNITn = '' back as no unit.
    no_unit = [c.name for c in parquet.itercols() if c.unit is None]
    assert no_unit == []
    with fits.open(path) as hdul:
        header = hdul[1].header
    assert all(f"TUNIT{i}" in header for i in range(1, header["TFIELDS"] + 1))
    for table, where in ((fits_table, "FITS"), (parquet, "Parquet")):
        undescribed = [c.name for c in table.itercols() if not (c.description or "").strip()]
        assert undescribed == [], f"{where} columns without description"
    for name in fits_table.colnames:
        if fits_table[name].unit is not None:
            assert fits_table[name].unit == parquet[name].unit, name
    assert str(fits_table["coord_ra"].unit) == "deg"


# ------------------------------------------------------------------ 4: determinism
def test_simulated_raw_is_byte_identical_when_rendered_again(ci_repo, ci_science, tmp_path):
    params = simulate.resolve_config(simulate.SimulateConfig())
    camera = Camera.from_yaml(ci_repo / "_camera.yaml")
    plan = simulate.plan_exposures(params, camera)
    e = ci_science[5]
    row = plan[(np.asarray(plan["visit"]) == e["visit"]) & (np.asarray(plan["ccd"]) == e["ccd"])][0]
    objects, visits = Table.read(ci_repo / "truth/objects.fits"), Table.read(ci_repo / "truth/visits.fits")
    again = tmp_path / "raw.fits"
    simulate.write_raw(simulate.render_exposure(params, camera, row, objects, visits), again)
    raw = ci_repo / e["path"]
    assert again.read_bytes() == raw.read_bytes()
    # and the test can tell: another seed gives other bytes
    other = simulate.resolve_config(simulate.SimulateConfig(seed=params.seed + 1))
    simulate.write_raw(simulate.render_exposure(other, camera, row, objects, visits), again)
    assert again.read_bytes() != raw.read_bytes()


# ------------------------------------------------------------------ 5: reruns after a config change
def test_calibration_option_change_rebuilds_calexps_not_calibs(ci_repo):
    assert job_counts(dry_run(ci_repo)).get("process_ccd", 0) == 0, "the finished repo should be up to date"
    proc = dry_run(ci_repo, "clobber_config=true", "calibrate={photometry: {clip_sigma: 2.5}}")
    assert proc.returncode == 0, output_of(proc)[-3000:]
    counts = job_counts(proc)
    assert counts.get("process_ccd") == 24, counts
    assert counts.get("validate_single_frame") == 1, counts
    assert [rule for rule in UPSTREAM_RULES if rule in counts] == [], counts


def test_config_change_without_clobber_stops_before_any_job(ci_repo):
    proc = dry_run(ci_repo, "calibrate={photometry: {clip_sigma: 2.5}}")
    text = output_of(proc)
    assert proc.returncode != 0
    assert "calibrate.photometry.clip_sigma" in text and "clobber_config=true" in text, text[-3000:]
    assert "Job stats" not in text


def test_dotted_option_change_rebuilds_calexps_without_flats(ci_repo):
    proc = dry_run(ci_repo, "set=isr.do_flat=false", "clobber_config=true", flags=())
    assert proc.returncode == 0, output_of(proc)[-3000:]
    counts = job_counts(proc)
    assert counts.get("process_ccd") == 24, counts
    assert [rule for rule in UPSTREAM_RULES if rule in counts] == [], counts
    blocks = re.findall(r"^rule process_ccd:\n(.*?)^\s*jobid:", output_of(proc), re.M | re.S)
    assert len(blocks) == 24
    inputs = [re.search(r"^\s*input: (.*)$", b, re.M).group(1) for b in blocks]
    assert all("/CALIB/bias/" in i for i in inputs)
    assert not any("/CALIB/flat/" in i for i in inputs), inputs[0]


# ------------------------------------------------------------------ 7: bad input
@pytest.fixture
def repo_copy(ci_repo, tmp_path) -> Path:
    return copy_repo(ci_repo, tmp_path / "repo")


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_ingest_truncated_raw(repo_copy, caplog):
    rows = Registry(repo_copy / REGISTRY_NAME).exposures()
    bad = next(r for r in rows if r["obstype"] == "science")
    bad_path = repo_copy / bad["path"]
    data = bad_path.read_bytes()
    replace_file(bad_path, data[: len(data) // 2])
    raws = [repo_copy / r["path"] for r in rows]
    registry = repo_copy / REGISTRY_NAME
    before = registry.read_bytes()

    with pytest.raises(IngestError, match=re.escape(str(bad_path))):
        ingest(repo_copy, raws, IngestConfig(on_error="fail"))
    assert registry.read_bytes() == before

    with caplog.at_level("WARNING", logger="snakedrp"):
        report = ingest(repo_copy, raws, IngestConfig(on_error="skip"))
    assert [p for p, _ in report.skipped] == [str(bad_path)]
    assert "truncated" in report.skipped[0][1]
    assert str(bad_path) in caplog.text
    kept = Registry(registry).exposures()
    assert len(kept) == len(rows) - 1
    assert (bad["visit"], bad["ccd"]) not in {(r["visit"], r["ccd"]) for r in kept}


def test_ccd_without_stars_fails_alone(repo_copy):
    science = science_exposures(repo_copy)
    bad = next(e for e in science if e["ccd"] == 1)
    good = next(e for e in science if e["ccd"] == 2 and e["visit"] != bad["visit"])
    bias = Registry(repo_copy / REGISTRY_NAME).exposures(obstype="bias", ccd=bad["ccd"])[0]
    # the science header (pointing, exposure time) over a bias frame: bias + read noise, no star
    bad_raw = repo_copy / bad["path"]
    header = fits.getheader(bad_raw)
    for key in ("CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True)
    data = fits.getdata(repo_copy / bias["path"])
    bad_raw.unlink()
    fits.PrimaryHDU(data=data, header=header).writeto(bad_raw)
    assert RawFrame.read(bad_raw).header["OBSTYPE"] == "science"
    targets = [product_path(repo_copy, "calexp", visit=e["visit"], ccd=e["ccd"]) for e in (bad, good)]
    for path in targets:
        path.unlink(missing_ok=True)  # copy_repo leaves the rerun products behind anyway

    # targets before --config, which takes every following word as a key=value
    proc = run_snakemake("--cores", "2", "--keep-going", *targets, "--config", f"repo={repo_copy}",
                         "clobber_config=true")
    text = output_of(proc)
    assert proc.returncode != 0, text[-3000:]
    assert targets[1].is_file(), f"the good CCD was not processed:\n{text[-3000:]}"
    assert not targets[0].exists()
    where = f"visit={bad['visit']} ccd={bad['ccd']}"
    m = re.search(rf"process_ccd {where}: (.+)", text)
    assert m is not None, text[-3000:]
    reason = m.group(1)
    assert len(reason) > 20 and re.search(r"no source|PSF|star", reason, re.I), reason
    log = repo_copy / "rerun/ci/logs/process_ccd" / f"{bad['visit']}-{bad['ccd']}.log"
    assert where in log.read_text()


def test_refcat_not_covering_the_ccd(ci_repo, ci_science):
    e = ci_science[0]
    butler, raw, calibs = raw_and_calibs(ci_repo, e)
    refcat_dir = ci_repo / "ref_cats/sim_gaia"
    index = json.loads((refcat_dir / "index.json").read_text())
    refcat = Table.read(refcat_dir / f"{index['shards'][0]['pixel']}.fits")[:0]  # the columns, no star
    assert len(refcat) == 0
    with pytest.raises(CalibrateError) as err:
        ProcessCcdTask().run(raw, camera=butler.camera, calibs=calibs, refcat=refcat)
    message = str(err.value)
    assert re.search(rf"visit[ =]{e['visit']}\b", message) and re.search(rf"ccd[ =]{e['ccd']}\b", message), message
    assert "reference catalog does not cover" in message


def test_failed_astrometric_fit_gives_a_flagged_calexp(ci_repo, ci_science):
    # the reference stars of the CCD moved 0.5 deg: no pattern match, no WCS fit
    e = ci_science[1]
    butler, raw, calibs = raw_and_calibs(ci_repo, e)
    refcat = moved_refcat(ci_repo, e)
    result = ProcessCcdTask().run(raw, camera=butler.camera, calibs=calibs, refcat=refcat)
    assert "WCSFAIL" in result.calexp.metadata and result.calexp.zeropoint is None
    assert len(result.matches) == 0 and "WCSFAIL" in result.sources.meta
    config = ProcessCcdConfig()
    config.calibrate.require_astrometry = True
    with pytest.raises(CalibrateError, match=rf"visit {e['visit']} ccd {e['ccd']}: astrometry failed"):
        ProcessCcdTask(config).run(raw, camera=butler.camera, calibs=calibs, refcat=refcat)


# ------------------------------------------------------------------ 8: the Task API and show_config
def test_task_api_reproduces_the_workflow(ci_repo, ci_science):
    e = ci_science[3]
    result = ProcessCcdTask(ProcessCcdConfig()).run_data_id(Butler(ci_repo, rerun="ci"), visit=e["visit"],
                                                            ccd=e["ccd"])
    src = Table.read(product_path(ci_repo, "src", visit=e["visit"], ccd=e["ccd"]))
    calexp = Exposure.read(product_path(ci_repo, "calexp", visit=e["visit"], ccd=e["ccd"]))
    assert len(result.sources) == len(src) > 50
    np.testing.assert_allclose(np.asarray(result.sources["psf_flux"]), np.asarray(src["psf_flux"]), rtol=1e-6)
    assert result.calexp.zeropoint == pytest.approx(calexp.zeropoint, abs=1e-9)


def test_characterize_overwrite_gives_the_same_exposure(ci_repo, ci_science):
    from snakedrp.isr.isr import IsrTask
    from snakedrp.single_frame.characterize import CharacterizeTask

    butler, raw, calibs = raw_and_calibs(ci_repo, ci_science[2])
    exposure = IsrTask().run(raw, camera=butler.camera, **calibs).exposure
    before = exposure.image.copy()
    task = CharacterizeTask()
    copied = task.run(exposure)
    assert np.array_equal(exposure.image, before)                    # the input left alone
    in_place = task.run(exposure, overwrite=True)
    assert in_place.exposure.image is exposure.image                 # no copy made
    assert np.array_equal(in_place.exposure.image, copied.exposure.image)
    assert np.array_equal(in_place.exposure.mask, copied.exposure.mask)
    assert np.array_equal(np.asarray(in_place.psf_sources["psf_flux"]), np.asarray(copied.psf_sources["psf_flux"]))


def test_show_config_prints_options_with_descriptions(ci_repo):
    proc = run_snakemake("show_config", "--cores", "1", "--config", f"repo={ci_repo}", "pattern=isr.*")
    assert proc.returncode == 0, output_of(proc)[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("#", "isr."))]
    options = [line for line in lines if line.startswith("isr.")]
    assert "isr.do_flat: true" in options
    assert len(options) >= 10
    for line in options:
        described = lines[lines.index(line) - 1]
        assert described.startswith("# ") and "default" in described and "[from " in described, described
    assert not any(line.startswith(("calibrate.", "characterize.", "calibs.")) for line in proc.stdout.splitlines())
