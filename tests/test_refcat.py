"""HEALPix-sharded reference catalogs: round trip, cone loading, RA wrap and poles, simulator coverage."""
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from snakedrp import simulate as sim
from snakedrp.repo.camera import Camera
from snakedrp.repo.refcat import (RefcatError, angular_distance, healpix_of, load_refcat, pixels_in_cone,
                             read_index, refcat_shards, write_refcat)

ROOT = Path(__file__).resolve().parents[1]


def random_catalog(ra0, dec0, radius, n, seed=0):
    rng = np.random.default_rng(seed)
    # uniform in a spherical cap, built about the pole then rotated: fine at RA 0/360 and the poles
    z = rng.uniform(np.cos(np.deg2rad(radius)), 1, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    s = np.sqrt(1 - z**2)
    x, y = s * np.cos(phi), s * np.sin(phi)
    d, a = np.deg2rad(dec0), np.deg2rad(ra0)
    xr, zr = x * np.sin(d) + z * np.cos(d), -x * np.cos(d) + z * np.sin(d)
    t = Table()
    t["id"] = np.arange(n)
    t["ra"] = np.rad2deg(np.arctan2(y, xr) + a) % 360
    t["dec"] = np.rad2deg(np.arcsin(zr))
    t["ra"].unit = t["dec"].unit = "deg"
    t["ra_err"] = t["dec_err"] = np.full(n, 10.0)
    t["ra_err"].unit = t["dec_err"].unit = "mas"
    t["mag_r"] = rng.uniform(14, 21, n)
    t["mag_r_err"] = np.full(n, 0.01)
    t["mag_r"].unit = t["mag_r_err"].unit = "mag"
    return t


@pytest.mark.parametrize("ra0, dec0", [(359.95, 0.0), (0.02, -30.0), (123.0, 89.7), (250.0, -89.9)])
def test_load_refcat_equals_brute_force(tmp_path, ra0, dec0):
    cat = random_catalog(ra0, dec0, 3.0, 20000)
    index = write_refcat(cat, tmp_path, nside=32)
    assert index["nside"] == 32 and index["order"] == "nested"
    assert sum(s["n"] for s in index["shards"]) == len(cat)
    assert index["columns"]["ra_err"] == "mas" and index["columns"]["dec"] == "deg"
    assert read_index(tmp_path) == json.loads((tmp_path / "index.json").read_text())
    rng = np.random.default_rng(1)
    for _ in range(5):
        k = rng.integers(len(cat))
        ra, dec, radius = float(cat["ra"][k]), float(cat["dec"][k]), rng.uniform(0.05, 1.5)
        got = load_refcat(tmp_path, ra, dec, radius)
        want = cat[angular_distance(ra, dec, cat["ra"], cat["dec"]) <= radius]
        assert sorted(got["id"]) == sorted(want["id"])
        assert got["ra_err"].unit == "mas"
        # only shards that touch the circle are read, and they are all needed or adjacent
        shards = refcat_shards(tmp_path, ra, dec, radius)
        assert len(shards) < len(index["shards"]) or radius > 1.0
        assert set(healpix_of(want["ra"], want["dec"], 32)) <= {int(p.stem) for p in shards}


def test_pixels_in_cone_includes_partial_overlaps():
    # a tiny circle right on a pixel boundary must return both neighbours
    pix = pixels_in_cone(8, 45.0, 0.0, 0.01)
    assert len(pix) >= 2


def test_empty_cone_and_bad_index(tmp_path):
    cat = random_catalog(10.0, 10.0, 0.5, 100)
    write_refcat(cat, tmp_path, nside=64)
    far = load_refcat(tmp_path, 200.0, -40.0, 0.1)
    assert len(far) == 0 and "mag_r" in far.colnames
    with pytest.raises(RefcatError, match="power of 2"):
        write_refcat(cat, tmp_path / "x", nside=48)
    with pytest.raises(RefcatError, match="no reference catalog"):
        load_refcat(tmp_path / "missing", 0, 0, 1)


@pytest.mark.parametrize("ra, dec", [(359.9, 0.5), (10.0, 89.5)])
def test_simulated_refcat_covers_every_ccd_of_every_visit(tmp_path, ra, dec):
    camera = Camera.from_yaml(ROOT / "config/cameras/ci.yaml")
    params = sim.resolve_config(sim.SimulateConfig(ra=ra, dec=dec, n_visits=2))
    f = sim.make_field(params, camera)
    write_refcat(f.refcat, tmp_path, nside=params.refcat_nside)
    radius = 45.0 / 3600
    for v in f.visits:
        for c in camera.ccd_ids:
            cra, cdec = camera.ccd_corners_sky(c, v["ra"], v["dec"], v["rotation"])
            for a, d in zip(cra, cdec):
                got = load_refcat(tmp_path, a, d, radius)
                want = f.refcat[angular_distance(a, d, f.refcat["ra"], f.refcat["dec"]) <= radius]
                assert len(got) > 0 and sorted(got["id"]) == sorted(want["id"])
    if ra > 359:
        assert (f.refcat["ra"] > 359).any() and (f.refcat["ra"] < 1).any()


def test_simulated_refcat_errors_are_as_recorded():
    camera = Camera.from_yaml(ROOT / "config/cameras/ci.yaml")
    params = sim.resolve_config(sim.SimulateConfig(n_visits=1, filters=["HSC-R"]))
    f = sim.make_field(params, camera)
    ref = f.refcat
    assert (ref["mag_r"] < params.refcat_mag_limit + 0.1).all() and len(ref) > 1000
    truth = f.objects[np.searchsorted(f.objects["id"], ref["id"])]
    assert (truth["type"] == "star").all()
    dra = (ref["ra"] - truth["ra"]) * np.cos(np.deg2rad(truth["dec"])) * 3.6e6
    ddec = (ref["dec"] - truth["dec"]) * 3.6e6
    # sample RMS of ~3500 Gaussian draws: within 5 % of the recorded error
    assert np.std(dra) == pytest.approx(np.median(ref["ra_err"]), rel=0.05)
    assert np.std(ddec) == pytest.approx(np.median(ref["dec_err"]), rel=0.05)
    for band in ("g", "r", "i"):
        assert np.std(ref[f"mag_{band}"] - truth[f"mag_{band}"]) == pytest.approx(0.01, rel=0.05)
