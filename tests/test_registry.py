"""The SQLite registry: ingest of raw headers, queries, and atomic rewriting on bad input."""
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from snakedrp.repo import registry as regmod
from snakedrp.pexconfig import ConfigError
from snakedrp.repo.raw import REQUIRED_KEYS
from snakedrp.repo.ingest import IngestConfig, IngestError, ingest
from snakedrp.repo.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
# astropy warns when it opens the deliberately truncated file
pytestmark = pytest.mark.filterwarnings("ignore:File may have been truncated")

# Two science visits per filter on a 2-CCD toy camera, plus bias and flats.
EXPOSURES = (
    [dict(visit=v, ccd=c, filter="HSC-R", obstype="science") for v in (100, 102) for c in (0, 1)]
    + [dict(visit=v, ccd=c, filter="HSC-I", obstype="science") for v in (104, 106) for c in (0, 1)]
    + [dict(visit=10, ccd=c, filter="NONE", obstype="bias") for c in (0, 1)]
    + [dict(visit=20, ccd=c, filter="HSC-R", obstype="flat") for c in (0, 1)]
)


def write_raw(path, visit, ccd, filter, obstype, *, camera="ci", drop=(), shape=(6, 8)):
    """A tiny raw frame with every required header key (uint16 ADU as the camera writes it)."""
    header = fits.Header()
    values = {
        "VISIT": visit, "CCD": ccd, "FILTER": filter, "OBSTYPE": obstype,
        "DATE-OBS": f"2024-03-01T0{visit % 10}:00:00.000", "MJD-OBS": 60370.0 + visit * 1e-3,
        "EXPTIME": 0.0 if obstype == "bias" else 30.0, "DARKTIME": 30.0, "AIRMASS": 1.0 + visit * 1e-3,
        "TELRA": 150.0 + visit * 1e-4, "TELDEC": 2.2, "ROTANG": 0.5 * ccd, "CAMERA": camera,
    }
    assert set(values) == set(REQUIRED_KEYS)
    for key, value in values.items():
        if key not in drop:
            header[key] = value
    data = np.random.default_rng(visit * 10 + ccd).integers(900, 1100, size=shape).astype(np.uint16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data=data, header=header).writeto(path, overwrite=True)
    return path


def raw_path(repo, visit, ccd):
    return Path(repo) / "raw" / str(visit) / f"raw-{visit}-{ccd}.fits"


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    for e in EXPOSURES:
        write_raw(raw_path(repo, e["visit"], e["ccd"]), **e)
    return repo


def all_raws(repo):
    return sorted((Path(repo) / "raw").rglob("*.fits"))


@pytest.fixture
def reg(repo):
    report = ingest(repo, all_raws(repo), IngestConfig())
    assert report.skipped == []
    assert len(report.ingested) == len(EXPOSURES)
    return Registry(repo / "registry.sqlite3")


# ------------------------------------------------------------------ queries
def test_rows_carry_header_values_and_relative_paths(reg):
    row = reg.row(102, 1)
    assert row == {
        "visit": 102, "ccd": 1, "filter": "HSC-R", "obstype": "science",
        "date_obs": "2024-03-01T02:00:00.000", "mjd": pytest.approx(60370.102), "exptime": 30.0,
        "ra": pytest.approx(150.0102), "dec": 2.2, "rotation": 0.5, "airmass": pytest.approx(1.102),
        "path": "raw/102/raw-102-1.fits",
    }
    assert len(reg) == len(EXPOSURES)


def test_query_metadata_tuples_and_single_field(reg):
    assert reg.query_metadata(["visit", "ccd"], filter="HSC-R", obstype="science") == [
        (100, 0), (100, 1), (102, 0), (102, 1)]
    assert reg.query_metadata("visit", filter="HSC-I") == [104, 106]
    assert reg.query_metadata(["filter"]) == ["HSC-I", "HSC-R", "NONE"]
    assert reg.query_metadata("visit", visit=[100, 104, 999], ccd=1) == [100, 104]


def test_convenience_queries(reg):
    assert reg.visits() == [100, 102, 104, 106]
    assert reg.visits(filter="HSC-R") == [100, 102]
    assert reg.visits(obstype="flat") == [20]
    assert reg.visits(obstype=None) == [10, 20, 100, 102, 104, 106]
    assert reg.filters() == ["HSC-I", "HSC-R"]
    assert reg.filters(visit=104) == ["HSC-I"]
    assert reg.ccds() == [0, 1]
    assert reg.ccds(visit=10) == [0, 1]


def test_exposures_and_table(reg):
    bias = reg.exposures(obstype="bias")
    assert [(r["visit"], r["ccd"]) for r in bias] == [(10, 0), (10, 1)]
    assert len(reg.exposures()) == len(EXPOSURES)
    table = reg.table(obstype="science")
    assert len(table) == 8 and table.colnames == list(regmod.COLUMNS)


def test_missing_row_and_unknown_field_are_clear(reg):
    with pytest.raises(KeyError, match="visit=100 ccd=7 .* visit 100 has ccds 0, 1"):
        reg.row(100, 7)
    with pytest.raises(KeyError, match="there is no visit 5"):
        reg.row(5, 0)
    with pytest.raises(KeyError, match="unknown registry field 'raft'; fields are visit, ccd"):
        reg.query_metadata("raft")


def test_registry_is_opened_read_only(reg):
    import sqlite3

    with pytest.raises(sqlite3.OperationalError):
        reg._conn.execute("DELETE FROM raw")


def test_missing_registry_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the ingest step"):
        Registry(tmp_path / "registry.sqlite3")


def test_from_rows_matches_ingested(reg):
    mem = Registry.from_rows(reg.exposures())
    assert mem.exposures() == reg.exposures()
    assert mem.visits(filter="HSC-I") == [104, 106]
    with pytest.raises(ValueError, match="lacks column"):
        Registry.from_rows([{"visit": 1, "ccd": 0}])
    with pytest.raises(ValueError, match="duplicate"):
        Registry.from_rows(reg.exposures(visit=100, ccd=0) * 2)


# ------------------------------------------------------------------ bad input
def truncate(path, nbytes):
    with open(path, "r+b") as f:
        f.truncate(nbytes)


@pytest.fixture
def bad_files(repo):
    truncated = write_raw(raw_path(repo, 200, 0), 200, 0, "HSC-R", "science")
    truncate(truncated, 2880 + 40)  # header complete, data cut short
    nokey = write_raw(raw_path(repo, 202, 0), 202, 0, "HSC-R", "science", drop=("EXPTIME",))
    return truncated, nokey


def test_skip_logs_one_line_per_bad_file(repo, bad_files, caplog):
    truncated, nokey = bad_files
    with caplog.at_level(logging.WARNING, logger="snakedrp.ingest"):
        report = ingest(repo, all_raws(repo), IngestConfig(on_error="skip"))
    assert len(report.ingested) == len(EXPOSURES)
    reasons = dict(report.skipped)
    assert set(reasons) == {str(truncated), str(nokey)}
    assert "truncated" in reasons[str(truncated)]
    assert "missing required header key(s) EXPTIME" in reasons[str(nokey)]
    lines = [r.getMessage() for r in caplog.records if r.name == "snakedrp.ingest" and r.levelno == logging.WARNING]
    assert len(lines) == 2
    assert any(str(truncated) in line and "truncated" in line for line in lines)
    assert any(str(nokey) in line and "EXPTIME" in line for line in lines)
    assert Registry(repo / "registry.sqlite3").visits() == [100, 102, 104, 106]


@pytest.mark.parametrize("which", [0, 1])
def test_fail_mode_raises_and_leaves_registry_byte_identical(repo, reg, bad_files, which):
    before = (repo / "registry.sqlite3").read_bytes()
    bad = bad_files[which]
    good = [p for p in all_raws(repo) if p not in bad_files]
    with pytest.raises(IngestError) as err:
        ingest(repo, good + [bad], IngestConfig(on_error="fail"))
    assert str(bad) in str(err.value)
    assert ("truncated" if which == 0 else "EXPTIME") in str(err.value)
    assert (repo / "registry.sqlite3").read_bytes() == before
    assert not list(repo.glob(".registry.sqlite3.*"))


def test_skip_with_nothing_ingestible_fails_and_leaves_registry(repo, reg, bad_files):
    before = (repo / "registry.sqlite3").read_bytes()
    with pytest.raises(IngestError, match="no raw file could be ingested"):
        ingest(repo, list(bad_files), IngestConfig(on_error="skip"))
    assert (repo / "registry.sqlite3").read_bytes() == before


def test_failure_while_writing_leaves_registry(repo, reg, monkeypatch):
    before = (repo / "registry.sqlite3").read_bytes()

    def broken(conn, rows):
        raise OSError("disk full")

    monkeypatch.setattr(regmod, "_insert", broken)
    with pytest.raises(OSError, match="disk full"):
        ingest(repo, all_raws(repo)[:3], IngestConfig())
    assert (repo / "registry.sqlite3").read_bytes() == before
    assert not list(repo.glob(".registry.sqlite3.*"))


def test_duplicate_visit_ccd_names_both_paths(repo, tmp_path):
    first = raw_path(repo, 100, 0)
    copy = tmp_path / "elsewhere" / "copy.fits"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    with pytest.raises(IngestError) as err:
        ingest(repo, all_raws(repo) + [copy], IngestConfig(on_error="fail"))
    assert str(first) in str(err.value) and str(copy) in str(err.value)
    assert "duplicate visit=100 ccd=0" in str(err.value)
    report = ingest(repo, all_raws(repo) + [copy], IngestConfig(on_error="skip"))
    assert report.skipped[0][0] == str(copy) and str(first) in report.skipped[0][1]


def test_unreadable_file_and_wrong_camera(repo):
    junk = repo / "raw" / "junk.fits"
    junk.write_bytes(b"not a FITS file" * 10)
    shutil.copy(ROOT / "config" / "cameras" / "ci.yaml", repo / "_camera.yaml")
    other = write_raw(raw_path(repo, 300, 0), 300, 0, "HSC-R", "science", camera="hsc")
    badccd = write_raw(raw_path(repo, 302, 9), 302, 9, "HSC-R", "science")
    report = ingest(repo, all_raws(repo), IngestConfig())
    reasons = dict(report.skipped)
    assert "not a readable FITS file" in reasons[str(junk)]
    assert "CAMERA 'hsc' is not this repository's camera 'ci'" in reasons[str(other)]
    assert "CCD 9 is not a detector" in reasons[str(badccd)]
    assert len(report.ingested) == len(EXPOSURES)


def test_ingest_rebuilds_or_appends(repo, reg):
    extra = write_raw(raw_path(repo, 108, 0), 108, 0, "HSC-I", "science")
    ingest(repo, [extra], IngestConfig(append=True))
    assert Registry(repo / "registry.sqlite3").visits() == [100, 102, 104, 106, 108]
    # appending the same files again changes nothing
    report = ingest(repo, [extra], IngestConfig(append=True))
    assert report.ingested == [] and len(Registry(repo / "registry.sqlite3")) == len(EXPOSURES) + 1
    ingest(repo, [extra], IngestConfig())  # rebuild from just this file
    assert Registry(repo / "registry.sqlite3").visits() == [108]


@pytest.mark.parametrize("mode", ["symlink", "copy"])
def test_transfer_into_repository_layout(repo, tmp_path, mode):
    outside = write_raw(tmp_path / "incoming" / "HSCA90333400.fits", 400, 1, "HSC-R", "science")
    report = ingest(repo, [outside], IngestConfig(transfer=mode))
    assert report.ingested == ["raw/400/raw-400-1.fits"]
    dest = repo / "raw" / "400" / "raw-400-1.fits"
    assert dest.is_symlink() == (mode == "symlink")
    assert fits.getheader(dest)["VISIT"] == 400


def test_transfer_none_keeps_files_where_they_are(repo, tmp_path):
    outside = write_raw(tmp_path / "incoming" / "x.fits", 400, 1, "HSC-R", "science")
    report = ingest(repo, [outside], IngestConfig())
    assert (repo / report.ingested[0]).resolve() == outside.resolve()


def test_ingest_config_choices():
    with pytest.raises(ConfigError, match="on_error"):
        IngestConfig.from_dict({"on_error": "ignore"})
    assert IngestConfig().on_error == "skip"
