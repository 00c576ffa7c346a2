"""The sky map: discrete tracts about the data, fixed rings over the whole sky, patch WCSs, files."""
from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from spherical_geometry.polygon import SphericalPolygon

from snakedrp.coadd.overlaps import Footprint, calexp_polygon, find_overlaps, overlap_index
from snakedrp.coadd.skymap import (DiscreteSkyMap, RingsSkyMap, SkyMap, SkyMapConfig, SkyMapError, make_skymap,
                                   parse_patch, polygon_lonlat)
from snakedrp.pexconfig import ConfigError
from snakedrp.repo.camera import Camera
from snakedrp.simulate import SimulateConfig, resolve_config
from snakedrp.simulate.field import plan_visits

ROOT = Path(__file__).resolve().parents[1]
CI_SCALE = 0.168  # arcsec/pixel, the ci camera's


def ci_footprints(**overrides) -> list[SphericalPolygon]:
    """The ci demo's 24 CCD footprints (6 visits x 4 CCDs) from the simulator's planned pointings."""
    camera = Camera.from_yaml(ROOT / "config/cameras/ci.yaml")
    visits = plan_visits(resolve_config(SimulateConfig(**overrides)), camera)
    out = []
    for v in visits:
        for ccd in camera.ccd_ids:
            ra, dec = camera.ccd_corners_sky(ccd, float(v["ra"]), float(v["dec"]), float(v["rotation"]))
            out.append(SphericalPolygon.from_lonlat(ra, dec))
    return out


def rings(**kwargs) -> RingsSkyMap:
    values = dict(n_rings=120, tract_overlap=1 / 60, projection="TAN", pixel_scale=CI_SCALE, patch_inner=2000,
                  patch_border=100)
    values.update(kwargs)
    return RingsSkyMap(**values)


def square(ra, dec, half) -> SphericalPolygon:
    """A small square field of half-width ``half`` deg about (ra, dec) (corners offset along RA and Dec)."""
    c = SkyCoord(ra, dec, unit="deg")
    pts = [c.spherical_offsets_by(dx * half * u.deg, dy * half * u.deg)
           for dx, dy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    return SphericalPolygon.from_lonlat([p.ra.deg for p in pts], [p.dec.deg for p in pts], center=(ra, dec))


# ------------------------------------------------------------------ discrete
def test_discrete_covers_the_ci_field_with_about_3x3_patches():
    fps = ci_footprints()
    cfg = SkyMapConfig()
    skymap = make_skymap(cfg, camera_pixel_scale=CI_SCALE, footprints=fps)
    assert skymap.kind == "discrete" and len(skymap.tracts) == 1
    tract = skymap.tracts[0]
    assert tract.n_patches == (3, 3), tract.describe()
    # every footprint vertex lies inside the union of the patches' inner boxes
    ra, dec = (np.concatenate(v) for v in zip(*(polygon_lonlat(p) for p in fps)))
    x, y = tract.wcs.all_world2pix(ra, dec, 0)
    b, n = tract.patch_border, tract.patch_inner
    assert x.min() > b - 0.5 and x.max() < b + 3 * n - 0.5 and y.min() > b - 0.5 and y.max() < b + 3 * n - 0.5
    # ...and every patch has data (the grid is not padded with empty patches)
    table = find_overlaps(skymap, [Footprint(1, i, "HSC-R", p) for i, p in enumerate(fps)])
    assert sorted(overlap_index(table)) == [(0, f"{x},{y}") for x in range(3) for y in range(3)]
    assert "3 x 3 patches" in tract.describe() and "centre RA 150.0" in tract.describe()


def test_discrete_centre_and_size_do_not_depend_on_the_field_rotation():
    a = DiscreteSkyMap.from_footprints(ci_footprints(), projection="TAN", pixel_scale=CI_SCALE, patch_inner=2000, patch_border=100)
    b = DiscreteSkyMap.from_footprints(ci_footprints(rotation=90.0), projection="TAN", pixel_scale=CI_SCALE,
                                       patch_inner=2000, patch_border=100)
    assert a.tracts[0].n_patches == b.tracts[0].n_patches
    # the dithers turn with the field, so the centres agree to a fraction of a dither (1/3 CCD = 57")
    sep = SkyCoord(a.tracts[0].ra, a.tracts[0].dec, unit="deg").separation(SkyCoord(b.tracts[0].ra, b.tracts[0].dec, unit="deg"))
    assert sep.arcsec < 60


@pytest.mark.parametrize("ra, dec", [(0.02, 1.0), (359.98, -30.0), (123.0, 89.95), (10.0, -89.9)])
def test_discrete_works_across_ra_0_and_at_the_poles(ra, dec):
    fp = square(ra, dec, 0.05)
    skymap = DiscreteSkyMap.from_footprints([fp], projection="STG", pixel_scale=0.2, patch_inner=1000, patch_border=50)
    tract = skymap.tracts[0]
    assert SkyCoord(tract.ra, tract.dec, unit="deg").separation(SkyCoord(ra, dec, unit="deg")).arcsec < 5
    patches = tract.find_patches(fp)
    # 0.1 deg = 1800 px at 0.2"/px: the square needs 2 x 2 patches (or a ring of 3 x 3 about the centre)
    assert len(patches) >= 4
    assert all(tract.patch_info(p).outer_polygon.intersects_poly(fp) for p in patches)


def test_config_checks_its_options():
    with pytest.raises(ConfigError):
        SkyMapConfig.from_dict({"type": "healpix"})
    with pytest.raises(ConfigError):
        SkyMapConfig.from_dict({"projection": "SIN"})
    with pytest.raises(SkyMapError, match="at least one calexp"):
        make_skymap(SkyMapConfig(), camera_pixel_scale=CI_SCALE, footprints=[])


# ------------------------------------------------------------------ rings
def test_rings_ids_are_stable_and_cells_tile_the_sky():
    a, b = rings(), rings()
    assert a.n_tracts == b.n_tracts and a.to_dict() == b.to_dict()
    rng = np.random.default_rng(5)
    ra = rng.uniform(0, 360, 400)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, 400)))
    for r, d in zip(ra, dec):
        t = a.find_tract(r, d)
        assert t == b.find_tract(r, d)
        ring, (r0, r1), (d0, d1) = a.cell(t)
        assert d0 <= d <= d1
        if 0 <= ring < a.n_rings:
            assert (r - r0) % 360 <= r1 - r0  # inside the cell's RA range, modulo 360
        # the owning tract's grid holds the point, away from its edge by about the overlap
        x, y = a.tracts[t].wcs.all_world2pix([r], [d], 0)
        ny, nx = a.tracts[t].shape
        margin = a.tract_overlap * 3600 / a.pixel_scale * 0.9
        assert margin < x[0] < nx - margin and margin < y[0] < ny - margin


def test_rings_tract_ids_mean_the_same_sky_after_a_round_trip(tmp_path):
    a = rings()
    a.write(tmp_path / "skyMap.yaml")
    b = SkyMap.read(tmp_path / "skyMap.yaml")
    assert isinstance(b, RingsSkyMap) and a == b
    for t in (0, 1, 5000, 9811, a.n_tracts - 1):
        pa, pb = a.patch_info(t, (1, 2)), b.patch_info(t, "1,2")
        assert np.allclose(pa.wcs.wcs.crval, pb.wcs.wcs.crval) and np.allclose(pa.wcs.wcs.crpix, pb.wcs.wcs.crpix)
    assert (tmp_path / "skyMap.yaml").read_text() == (a.write(tmp_path / "again.yaml") or (tmp_path / "again.yaml").read_text())


@pytest.mark.parametrize("ra, dec", [(0.0, 0.0), (359.99, 10.0), (0.01, -45.0)])
def test_rings_field_at_ra_0_is_found_in_the_tracts_on_both_sides(ra, dec):
    skymap = rings()
    fp = square(ra, dec, 0.15)
    found = skymap.find_patches(fp)
    assert found
    tracts = {t for t, _ in found}
    assert skymap.find_tract(ra, dec) in tracts
    # every part of the field is in some patch: its corners and centre
    lon, lat = polygon_lonlat(fp)
    for r, d in list(zip(lon, lat)) + [(ra, dec)]:
        assert any(skymap.patch_info(t, p).outer_polygon.contains_lonlat(r, d) for t, p in found), (r, d)
    # and nothing far away is listed
    for t, p in found:
        assert skymap.patch_info(t, p).outer_polygon.intersects_poly(fp)


@pytest.mark.parametrize("dec", [89.95, -89.99, 88.9])
def test_rings_field_near_a_pole(dec):
    skymap = rings()
    fp = square(45.0, dec, 0.1) if abs(dec) < 89.9 else SphericalPolygon.from_cone(45.0, dec, 0.1)
    found = skymap.find_patches(fp)
    assert found
    cap = 0 if dec < 0 else skymap.n_tracts - 1
    if abs(dec) > 90 - skymap.ring_height / 2 + 0.2:
        assert {t for t, _ in found} == {cap}
    lon, lat = polygon_lonlat(fp)
    for r, d in zip(lon[::4], lat[::4]):
        assert any(skymap.patch_info(t, p).outer_polygon.contains_lonlat(r, d) for t, p in found), (r, d)


def test_neighbouring_ring_tracts_overlap():
    skymap = rings()
    t = skymap.find_tract(150.0, 2.0)
    ring, (r0, r1), (d0, d1) = skymap.cell(t)
    east = skymap.find_tract(r1 + 0.01, 2.0)
    assert east != t
    # a point just east of the boundary lies in both tracts' grids
    for tract_id in (t, east):
        assert skymap.tracts[tract_id].polygon.contains_lonlat(r1 + 0.005, 2.0)


def test_bad_ids_are_refused():
    skymap = rings()
    with pytest.raises(SkyMapError, match="no tract"):
        skymap.patch_info(skymap.n_tracts, (0, 0))
    with pytest.raises(SkyMapError, match="no patch 99,0"):
        skymap.patch_info(9811, (99, 0))
    with pytest.raises(SkyMapError, match="x,y"):
        parse_patch("1;1")


# ------------------------------------------------------------------ patches
def test_patch_wcs_is_the_tract_wcs_shifted_to_the_outer_corner():
    skymap = rings()
    tract = skymap.tracts[9811]
    info = skymap.patch_info(9811, (3, 5))
    assert info.outer_shape == (2200, 2200) and info.inner_bbox == (100, 100, 2000, 2000)
    assert info.outer_origin == (3 * 2000, 5 * 2000)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-0.5, 2199.5, 50), rng.uniform(-0.5, 2199.5, 50)
    ra, dec = info.wcs.all_pix2world(x, y, 0)
    tx, ty = tract.wcs.all_world2pix(ra, dec, 0)
    assert np.allclose(tx - x, 6000, atol=1e-6) and np.allclose(ty - y, 10000, atol=1e-6)
    # inner polygon inside the outer one; neighbours' outer boxes overlap by twice the border
    ys, xs = info.inner_slices
    assert (ys.stop - ys.start, xs.stop - xs.start) == (2000, 2000)
    centre = info.wcs.all_pix2world([1100], [1100], 0)
    assert info.outer_polygon.contains_lonlat(float(centre[0][0]), float(centre[1][0]))
    right = skymap.patch_info(9811, (4, 5))
    rx, _ = right.wcs.all_world2pix(*info.wcs.all_pix2world([2199.0], [1100.0], 0), 0)
    assert rx[0] == pytest.approx(2199.0 - 2000.0, abs=1e-6)
    assert info.polygon.area() < info.outer_polygon.area()


def test_calexp_polygon_reads_only_the_header():
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [512.5, 1024.5]
    w.wcs.cd = [[-CI_SCALE / 3600, 0], [0, CI_SCALE / 3600]]
    header = w.to_header()
    header["NAXIS1"], header["NAXIS2"] = 1024, 2048
    poly = calexp_polygon(header)
    area_deg2 = poly.area() * (180 / np.pi) ** 2
    assert area_deg2 == pytest.approx(1024 * 2048 * (CI_SCALE / 3600) ** 2, rel=1e-3)
    assert poly.contains_lonlat(150.0, 2.0) and not poly.contains_lonlat(150.0, 2.2)
