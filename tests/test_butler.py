"""The butler: dataset templates, typed get/put round trips, rerun chains, registry look-ups."""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from snakedrp.repo.butler import (DATASET_TYPES, TEMPLATE_KEYS, Butler, ButlerError, NoSuchDatasetError,
                             RerunError, load_dataset_types)
from snakedrp.repo.dataid import patch_in_path
from snakedrp.repo.exposure import Exposure, mask_bit
from snakedrp.repo.raw import RawFrame
from snakedrp.repo.registry import Registry

ROOT = Path(__file__).resolve().parents[1]

REQUIRED_TYPES = {
    "raw", "bias", "dark", "flat", "fringe", "defects", "ref_cat", "calexp", "calexpBackground",
    "icSrc", "src", "srcMatch", "deepCoadd_skyMap", "deepCoadd_directWarp", "deepCoadd",
    "deepCoadd_calexp", "deepCoadd_det", "deepCoadd_mergeDet", "deepCoadd_meas", "deepCoadd_ref",
    "deepCoadd_forced_src",
}
SAMPLE_ID = {"visit": 903334, "ccd": 16, "filter": "HSC-R", "tract": 0, "patch": "1,1", "refcat": "sim_gaia"}


def registry_rows():
    return [
        dict(visit=v, ccd=c, filter=f, obstype="science", date_obs="2024-03-01T00:00:00", mjd=60370.0,
             exptime=30.0, ra=150.0, dec=2.2, rotation=0.0, airmass=1.1, path=f"raw/{v}/raw-{v}-{c}.fits")
        for v, f in ((903334, "HSC-R"), (903336, "HSC-R"), (903986, "HSC-I")) for c in (0, 1)
    ] + [
        dict(visit=10, ccd=c, filter="HSC-R", obstype="flat", date_obs="2024-03-01T00:00:00", mjd=60370.0,
             exptime=5.0, ra=0.0, dec=0.0, rotation=0.0, airmass=1.0, path=f"raw/10/raw-10-{c}.fits")
        for c in (0, 1)
    ]


def small_exposure(seed=1):
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 5.0, size=(12, 10)).astype(np.float32)
    mask = np.zeros((12, 10), np.int32)
    mask[3, 4] = mask_bit("SAT")
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.2]
    wcs.wcs.crpix = [5.0, 6.0]
    wcs.wcs.cd = np.array([[-4.7e-5, 0.0], [0.0, 4.7e-5]])
    header = fits.Header({"VISIT": 903334, "CCD": 1, "FILTER": "HSC-R"})
    return Exposure(image=image, mask=mask, variance=np.full((12, 10), 25.0, np.float32), wcs=wcs,
                    zeropoint=31.2, zeropoint_err=0.01, metadata=header)


# ------------------------------------------------------------------ dataset types and templates
def test_every_required_dataset_type_is_declared():
    assert REQUIRED_TYPES <= set(DATASET_TYPES)


def test_templates_use_only_data_id_placeholders():
    for name, dt in DATASET_TYPES.items():
        assert not Path(dt.template).is_absolute() and ".." not in dt.template, name
        assert set(dt.keys) <= set(TEMPLATE_KEYS), name
        assert dt.location == ("root" if name in {"camera", "raw", "bias", "dark", "flat", "fringe",
                                                  "defects", "ref_cat"} else "rerun"), name


def test_layout_of_the_architecture_document(tmp_path):
    b = Butler(tmp_path, rerun="ci")
    assert b.template("raw") == f"{tmp_path}/raw/{{visit}}/raw-{{visit}}-{{ccd}}.fits"
    assert b.template("calexp") == f"{tmp_path}/rerun/ci/calexp/{{visit}}/calexp-{{visit}}-{{ccd}}.fits"
    assert b.template("calexp", absolute=False) == "calexp/{visit}/calexp-{visit}-{ccd}.fits"
    assert b.output_path("flat", ccd=1, filter="HSC-R") == f"{tmp_path}/CALIB/flat/HSC-R/flat-HSC-R-1.fits"
    assert b.output_path("bias", ccd=3) == f"{tmp_path}/CALIB/bias/bias-3.fits"
    assert b.output_path("ref_cat", refcat="sim_gaia") == f"{tmp_path}/ref_cats/sim_gaia/index.json"
    assert b.output_path("deepCoadd_calexp", filter="HSC-I", tract=0, patch="1,1").startswith(
        f"{tmp_path}/rerun/ci/deepCoadd-results/HSC-I/0/1_1/")


def test_relative_root_gives_relative_paths():
    b = Butler("data/repo", rerun="ci", record=False)
    path = b.output_path("raw", visit=5, ccd=1)
    assert path == "data/repo/raw/5/raw-5-1.fits"
    assert str(Path(path).relative_to("data/repo")) == "raw/5/raw-5-1.fits"


def test_templates_are_snakemake_patterns(tmp_path):
    from snakemake.io import regex_from_filepattern

    b = Butler(tmp_path, rerun="ci")
    for name, dt in DATASET_TYPES.items():
        data_id = {k: SAMPLE_ID[k] for k in dt.keys}
        match = re.match(regex_from_filepattern(b.template(name)), b.output_path(name, **data_id))
        assert match is not None, name
        wildcards = match.groupdict()
        assert wildcards == {k: patch_in_path(v) if k == "patch" else str(v) for k, v in data_id.items()}, name
        assert "," not in "".join(wildcards.values()), name  # --target-jobs splits on commas


def test_unknown_type_and_missing_key_are_clear(tmp_path):
    b = Butler(tmp_path, rerun="ci")
    with pytest.raises(ButlerError, match=r"unknown dataset type 'calexpp'; known: bias, calexp, "):
        b.path("calexpp", visit=1, ccd=2)
    with pytest.raises(ButlerError, match=r"calexp lacks ccd \(needs visit, ccd; got visit=1\)"):
        b.output_path("calexp", visit=1)
    with pytest.raises(ButlerError, match="cannot be part of a path"):
        b.output_path("calexp", visit="../x", ccd=1)
    # extra keys (filter for a calexp, as the workflow passes) are ignored
    assert b.output_path("calexp", visit=1, ccd=2, filter="HSC-R").endswith("calexp-1-2.fits")


def test_bad_datasets_yaml_is_refused(tmp_path):
    bad = tmp_path / "datasets.yaml"
    bad.write_text("calexp: {template: 'calexp/{visit:06d}.fits', location: rerun, storage: exposure}\n")
    with pytest.raises(ValueError, match="without format specs"):
        load_dataset_types(bad)
    bad.write_text("calexp: {template: 'calexp/{visit}.fits', location: rerun, storage: pickle}\n")
    with pytest.raises(ValueError, match="storage 'pickle'"):
        load_dataset_types(bad)


# ------------------------------------------------------------------ get / put
def test_exposure_round_trip(tmp_path):
    b = Butler(tmp_path, rerun="ci")
    exp = small_exposure()
    path = b.put(exp, "calexp", visit=903334, ccd=1)
    assert path == b.output_path("calexp", visit=903334, ccd=1) and Path(path).exists()
    assert b.exists("calexp", visit=903334, ccd=1) and not b.exists("calexp", visit=903334, ccd=0)
    back = b.get("calexp", visit=903334, ccd=1)
    np.testing.assert_array_equal(back.image, exp.image)
    np.testing.assert_array_equal(back.mask, exp.mask)
    np.testing.assert_array_equal(back.variance, exp.variance)
    assert back.zeropoint == pytest.approx(31.2) and back.metadata["FILTER"] == "HSC-R"
    np.testing.assert_allclose(back.wcs.pixel_to_world_values(3.0, 4.0), exp.wcs.pixel_to_world_values(3.0, 4.0))
    assert not list(Path(path).parent.glob(".*.tmp"))


def test_table_round_trip_with_parquet_copy(tmp_path):
    b = Butler(tmp_path, rerun="ci")
    table = Table({"id": np.arange(5), "psf_flux": np.linspace(1.0, 5.0, 5)})
    table["psf_flux"].unit = "nJy"
    path = b.put(table, "src", visit=903334, ccd=1)
    assert Path(path).with_suffix(".parq").exists()  # src is written as FITS + Parquet
    back = b.get("src", visit=903334, ccd=1)
    assert list(back["id"]) == list(range(5)) and str(back["psf_flux"].unit) == "nJy"
    b.put(table, "icSrc", visit=903334, ccd=1)
    assert not Path(b.output_path("icSrc", visit=903334, ccd=1)).with_suffix(".parq").exists()


def test_raw_yaml_json_camera_round_trips(tmp_path):
    b = Butler(tmp_path)
    header = fits.Header({"VISIT": 7, "CCD": 0, "OBSTYPE": "bias"})
    data = np.arange(12, dtype=np.float32).reshape(3, 4) + 1000
    raw_path = b.put(RawFrame(data=data, header=header), "raw", visit=7, ccd=0)
    assert fits.getval(raw_path, "BITPIX") == 16  # uint16 on disk, as the camera writes it
    with fits.open(raw_path) as hdul:
        np.testing.assert_array_equal(hdul[0].data, data)
    b.put({"nside": 8, "shards": [1, 2]}, "ref_cat", refcat="sim")
    assert b.get("ref_cat", refcat="sim") == {"nside": 8, "shards": [1, 2]}
    shutil.copy(ROOT / "config" / "cameras" / "ci.yaml", tmp_path / "_camera.yaml")
    assert b.camera.name == "ci" and b.camera.ccd_ids == [0, 1, 2, 3]
    assert b.get("camera").name == "ci"


def test_missing_dataset(tmp_path):
    b = Butler(tmp_path, rerun="ci")
    with pytest.raises(NoSuchDatasetError, match="no calexp for visit=1 ccd=2; looked in") as err:
        b.get("calexp", visit=1, ccd=2)
    assert isinstance(err.value, FileNotFoundError)
    # a dataset not made yet reads from where it will be written (workflow input functions)
    assert b.path("calexp", visit=1, ccd=2) == b.output_path("calexp", visit=1, ccd=2)
    with pytest.raises(ButlerError, match="lives in a rerun"):
        Butler(tmp_path).output_path("calexp", visit=1, ccd=2)


# ------------------------------------------------------------------ reruns
def test_chained_rerun_reads_through_parent(tmp_path):
    a = Butler(tmp_path, rerun="a")
    a.put(small_exposure(1), "calexp", visit=903334, ccd=1)
    b = Butler(tmp_path, rerun="a:b")
    assert b.chain == ["b", "a"] and b.rerun == "b"
    assert (tmp_path / "rerun" / "b" / "_parent").read_text().strip() == "a"
    assert b.path("calexp", visit=903334, ccd=1) == a.output_path("calexp", visit=903334, ccd=1)
    assert b.output_path("calexp", visit=903334, ccd=1).startswith(f"{tmp_path}/rerun/b/")
    assert b.get("calexp", visit=903334, ccd=1).zeropoint == pytest.approx(31.2)
    # writing into the child shadows the parent
    newer = small_exposure(2)
    newer.zeropoint = 30.0
    b.put(newer, "calexp", visit=903334, ccd=1)
    assert b.get("calexp", visit=903334, ccd=1).zeropoint == pytest.approx(30.0)
    assert a.get("calexp", visit=903334, ccd=1).zeropoint == pytest.approx(31.2)
    # root datasets are shared by every rerun
    assert b.output_path("bias", ccd=1) == a.output_path("bias", ccd=1)


def test_recorded_chain_is_reused_and_cannot_be_repointed(tmp_path):
    Butler(tmp_path, rerun="a").put(small_exposure(), "calexp", visit=1, ccd=0)
    Butler(tmp_path, rerun="a:b")
    again = Butler(tmp_path, rerun="b")
    assert again.chain == ["b", "a"] and again.exists("calexp", visit=1, ccd=0)
    assert Butler(tmp_path, rerun="a:b").chain == ["b", "a"]  # same parent: fine
    with pytest.raises(RerunError, match="rerun b already chains onto a; cannot re-point it to c"):
        Butler(tmp_path, rerun="c:b")


def test_grandparent_chain(tmp_path):
    Butler(tmp_path, rerun="a").put(small_exposure(), "calexp", visit=1, ccd=0)
    Butler(tmp_path, rerun="a:b")
    c = Butler(tmp_path, rerun="b:c")
    assert c.chain == ["c", "b", "a"] and c.parents == ["b", "a"]
    assert c.path("calexp", visit=1, ccd=0).startswith(f"{tmp_path}/rerun/a/")


def test_cycles_and_bad_names_are_refused(tmp_path):
    Butler(tmp_path, rerun="a:b")
    with pytest.raises(RerunError, match="cyclic"):
        Butler(tmp_path, rerun="b:a")
    assert not (tmp_path / "rerun" / "a" / "_parent").exists()
    for bad in ("a:a", "x:y:z", "../up", "a b", ":b"):
        with pytest.raises(RerunError):
            Butler(tmp_path, rerun=bad)


def test_record_false_writes_nothing(tmp_path):
    b = Butler(tmp_path, rerun="a:b", record=False)
    assert b.chain == ["b", "a"] and not (tmp_path / "rerun").exists()


# ------------------------------------------------------------------ registry
def test_filter_filled_from_registry_by_visit(tmp_path):
    b = Butler(tmp_path, rerun="coadd", registry=Registry.from_rows(registry_rows()))
    path = b.output_path("deepCoadd_directWarp", visit=903986, tract=0, patch="1,1")
    assert path.endswith("deepCoadd/HSC-I/0/1_1/warp-HSC-I-0-1_1-903986.fits")
    with pytest.raises(ButlerError, match="no value"):
        b.output_path("deepCoadd_directWarp", visit=5, tract=0, patch="1,1")
    with pytest.raises(ButlerError, match="lacks tract"):
        b.output_path("deepCoadd_directWarp", visit=903986, patch="1,1")


def test_query_delegates_to_registry(tmp_path):
    b = Butler(tmp_path, rerun="ci", registry=Registry.from_rows(registry_rows()))
    assert b.query("calexp", filter="HSC-R") == [
        {"visit": 903334, "ccd": 0}, {"visit": 903334, "ccd": 1},
        {"visit": 903336, "ccd": 0}, {"visit": 903336, "ccd": 1}]
    assert b.query("flat") == [{"filter": "HSC-R", "ccd": 0}, {"filter": "HSC-R", "ccd": 1}]
    assert b.query(["visit", "filter"], obstype="science") == [
        (903334, "HSC-R"), (903336, "HSC-R"), (903986, "HSC-I")]
    assert b.query("visit", filter="HSC-I") == [903986]
    with pytest.raises(ButlerError, match="keyed by tract, patch"):
        b.query("deepCoadd")


def test_registry_is_lazy(tmp_path):
    b = Butler(tmp_path, rerun="ci")
    assert b.output_path("calexp", visit=1, ccd=0)  # no registry needed
    with pytest.raises(FileNotFoundError, match="run the ingest step"):
        b.registry
