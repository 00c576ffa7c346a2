"""The simulator: determinism, detector signatures, WCS offsets, rendering positions and fluxes,
the realistic (untruncated) PSF, the observing conditions."""
from pathlib import Path

import galsim
import numpy as np
import pytest
import sep
from astropy.table import Table

from snakedrp import simulate as sim
from snakedrp.repo.camera import Camera
from snakedrp.pexconfig import ConfigError
from snakedrp.repo.raw import RawFrame
from snakedrp.repo.refcat import angular_distance
from snakedrp.simulate import field, instrument

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def camera():
    return Camera.from_yaml(ROOT / "config/cameras/ci.yaml")


@pytest.fixture(scope="module")
def params():
    # the real ci geometry, one CCD and a sparser sky so the file runs in seconds
    cfg = sim.SimulateConfig(ccds=[0], n_visits=2, star_density=40000.0, galaxy_density=10000.0,
                             n_bias=1, n_dark=1, n_flat=2, n_fringe=1)
    return sim.resolve_config(cfg)


@pytest.fixture(scope="module")
def plan(params, camera):
    return sim.plan_exposures(params, camera)


@pytest.fixture(scope="module")
def sky(params, camera):
    return sim.make_field(params, camera)


def row(plan, obstype, index=0, filter_name=None):
    sel = plan[plan["obstype"] == obstype]
    if filter_name:
        sel = sel[sel["filter"] == filter_name]
    return sel[index]


def assemble(raw, camera, ccd):
    """Overscan-subtracted (row by row), gain-corrected, assembled electrons (a minimal ISR)."""
    out = np.zeros(camera.ccd_shape)
    for amp in camera.ccds[ccd].amplifiers:
        overscan = raw[amp.raw_overscan.slices].astype(float).mean(axis=1)[:, None]
        data = (raw[amp.raw_data.slices] - overscan) * amp.gain
        out[amp.assembled.slices] = data[:, ::-1] if amp.flip_x else data
    return out


@pytest.fixture(scope="module")
def science(params, camera, plan, sky):
    return sim.render_exposure(params, camera, row(plan, "science"), sky.objects, sky.visits)


# ------------------------------------------------------------------ config and plan
def test_resolve_config_presets_and_overrides():
    p = sim.resolve_config(sim.SimulateConfig(preset="hsc", seed=7, ra=-0.0, filters=["HSC-I"]))
    assert p.preset == "hsc" and p.seed == 7 and p.filters == ("HSC-I",)
    assert p.n_visits == sim.PRESETS["hsc"]["n_visits"] >= 5
    cfg = sim.SimulateConfig.from_dict({"preset": "ci", "dec": 89.5, "refcat_nside": 32})
    assert sim.resolve_config(cfg).dec == 89.5
    with pytest.raises(ConfigError, match="power of 2"):
        sim.SimulateConfig.from_dict({"refcat_nside": 48})
    with pytest.raises(ConfigError, match="preset"):
        sim.SimulateConfig.from_dict({"preset": "lsst"})


def test_plan_is_deterministic_and_complete(params, camera, plan):
    again = sim.plan_exposures(params, camera)
    assert all((plan[c] == again[c]).all() for c in plan.colnames)
    counts = {t: int((plan["obstype"] == t).sum()) for t in ("science", "bias", "dark", "flat", "fringe")}
    # 2 visits x 2 filters; 2 flats x 2 filters; fringe only in HSC-I (fringe: true)
    assert counts == {"science": 4, "bias": 1, "dark": 1, "flat": 4, "fringe": 1}
    sci = plan[plan["obstype"] == "science"]
    assert sorted(sci["visit"]) == [903334, 903336, 903986, 903988]
    assert (plan["visit"][plan["obstype"] != "science"] < 10000).all()
    assert (plan["filter"][np.isin(plan["obstype"], ["bias", "dark"])] == "NONE").all()


def test_visit_conditions_in_range(sky):
    v = sky.visits
    off = angular_distance(v["ra"], v["dec"], v["tel_ra"], v["tel_dec"]) * 3600
    assert ((off >= 1.0) & (off <= 2.0)).all()
    assert (np.abs(v["rotation"] - v["tel_rotation"]) <= 0.02).all()
    assert ((np.abs(v["rotation"]) >= 0.2) & (np.abs(v["rotation"]) <= 1.0)).all()
    p = sim.resolve_config(sim.SimulateConfig())
    assert ((v["seeing"] >= p.seeing_min) & (v["seeing"] <= p.seeing_max)).all()
    assert (np.abs(v["transparency"]) <= 0.1).all()
    assert v["satellite"].sum() == 1


def test_default_ci_field_meets_its_promises(camera):
    p = sim.resolve_config(sim.SimulateConfig())
    f = sim.make_field(p, camera)
    e = f.exposures
    assert len(e) == 6 * 4
    assert ((e["n_cosmic_rays"] >= 50) & (e["n_cosmic_rays"] <= 150)).all()
    assert (e["n_stars"] > 500).all()
    med = {c: instrument.median_flat_response(instrument.flat_response(p.seed, camera, c), camera, c)
           for c in camera.ccd_ids}
    assert np.allclose(e["zeropoint"], e["zeropoint_raw"] + 2.5 * np.log10([med[c] for c in e["ccd"]]))
    # >= 100 reference stars on every CCD of every visit
    for v in f.visits:
        for c in camera.ccd_ids:
            x, y = camera.sky_to_pixel(c, f.refcat["ra"], f.refcat["dec"], v["ra"], v["dec"], v["rotation"])
            assert field.inside_ccd(camera, x, y).sum() >= 100


# ------------------------------------------------------------------ files
def test_raw_file_is_byte_identical_for_a_seed(tmp_path, params, camera, plan, sky, science):
    r = row(plan, "science")
    sim.write_raw(science, tmp_path / "a.fits")
    # the workflow renders from the truth tables on disk: the same bytes
    sim.write_field(sky, tmp_path / "truth", tmp_path / "ref_cats" / "sim", nside=params.refcat_nside)
    objects, visits = (Table.read(tmp_path / "truth" / f"{name}.fits") for name in ("objects", "visits"))
    sim.write_raw(sim.render_exposure(params, camera, r, objects, visits), tmp_path / "b.fits")
    assert (tmp_path / "a.fits").read_bytes() == (tmp_path / "b.fits").read_bytes()
    other = sim.resolve_config(sim.SimulateConfig(ccds=[0], n_visits=2, star_density=40000.0,
                                                  galaxy_density=10000.0, seed=99))
    f2 = sim.make_field(other, camera)
    r2 = sim.plan_exposures(other, camera)
    sim.write_raw(sim.render_exposure(other, camera, row(r2, "science"), f2.objects, f2.visits), tmp_path / "c.fits")
    assert (tmp_path / "a.fits").read_bytes() != (tmp_path / "c.fits").read_bytes()
    frame = RawFrame.read(tmp_path / "a.fits")  # REQUIRED_KEYS present, right shape
    assert frame.data.shape == camera.raw_shape and frame.header["OBSTYPE"] == "science"
    sim.write_sources(science, tmp_path / "truth.fits")
    sim.write_cr_mask(science, tmp_path / "cr.fits")
    assert len(Table.read(tmp_path / "truth.fits")) == len(science.sources)


# ------------------------------------------------------------------ detector signatures
def test_overscan_level_is_the_bias_level(params, camera, plan):
    res = sim.render_exposure(params, camera, row(plan, "bias"))
    for amp in camera.ccds[0].amplifiers:
        overscan = res.raw[amp.raw_overscan.slices].astype(float)
        sigma = amp.read_noise / amp.gain / np.sqrt(overscan.size)
        # 4 sigma: the drift averages to zero exactly; rounding to integers adds no bias
        assert abs(overscan.mean() - amp.bias_level) < 4 * sigma, amp.name
        per_row = overscan.var(axis=1, ddof=1).mean()  # the drift is constant along a row
        assert np.sqrt(per_row) == pytest.approx(amp.read_noise / amp.gain, rel=0.05)


def test_gain_from_photon_transfer_of_two_flats(params, camera, plan):
    flats = [sim.render_exposure(params, camera, row(plan, "flat", i, "HSC-R")) for i in (0, 1)]
    for amp in camera.ccds[0].amplifiers:
        signal, read_var = [], []
        for res in flats:
            overscan = res.raw[amp.raw_overscan.slices].astype(float)
            signal.append(res.raw[amp.raw_data.slices] - overscan.mean(axis=1)[:, None])
            read_var.append(overscan.var(axis=1, ddof=1).mean())
        diff = signal[0] - signal[1]
        ok = np.abs(diff - np.median(diff)) < 5 * diff.std()  # cosmic rays
        mean = 0.5 * (signal[0][ok] + signal[1][ok]).mean()
        var = 0.5 * diff[ok].var() - np.mean(read_var)
        assert mean / var == pytest.approx(amp.gain, rel=0.03), amp.name


def test_defects_show_in_darks_and_flats(params, camera, plan):
    dark = assemble(sim.render_exposure(params, camera, row(plan, "dark")).raw, camera, 0)
    flat = assemble(sim.render_exposure(params, camera, row(plan, "flat")).raw, camera, 0)
    level = np.median(flat)
    n_hot = n_bad = 0
    for box in camera.ccds[0].defects:
        if instrument.is_bad_column(box):
            ratio = np.median(flat[box.slices]) / level
            assert 0.15 < ratio < 0.25, box
            n_bad += 1
        else:
            expected = instrument.HOT_PIXEL_DARK * params.dark_exptime
            assert np.all(dark[box.slices] > 0.8 * expected), box
            n_hot += 1
    assert n_hot and n_bad
    assert np.median(dark) < 50  # 0.02 e-/s x 300 s elsewhere


def test_nominal_wcs_is_off_by_the_pointing_error(params, camera, plan, sky, science):
    ny, nx = camera.ccd_shape
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    for v in sky.visits:
        exp = plan[(plan["visit"] == v["visit"]) & (plan["ccd"] == 0)][0]
        wcs = camera.nominal_wcs(0, exp["telra"], exp["teldec"], exp["rotang"])
        ra_n, dec_n = wcs.all_pix2world([cx], [cy], 0)
        ra_t, dec_t = camera.pixel_to_sky(0, cx, cy, v["ra"], v["dec"], v["rotation"])
        offset = float(angular_distance(ra_n, dec_n, ra_t, dec_t)[0]) * 3600
        fx, fy = camera.pixel_to_focal_plane(0, cx, cy)
        rho = np.hypot(fx, fy) * camera.pixel_scale / 3600 / camera.pixel_size
        slack = (camera.distortion[0] * rho**3 + np.deg2rad(0.02) * rho) * 3600
        assert 1.0 - slack <= offset <= 2.0 + slack
    hdr = science.header
    assert hdr["CTYPE1"] == "RA---TAN" and hdr["TELRA"] == pytest.approx(float(sky.visits[0]["tel_ra"]))


# ------------------------------------------------------------------ rendering
@pytest.mark.parametrize("x, y", [(500.3, 1000.8), (321.5, 1500.5)])
def test_rendered_star_centroid_is_the_true_position(params, camera, sky, x, y):
    v = sky.visits[0]
    ra, dec = camera.pixel_to_sky(0, x, y, v["ra"], v["dec"], v["rotation"])
    one = sky.objects[:1].copy()
    one["ra"], one["dec"], one["type"] = ra, dec, "star"
    scene = sim.render_scene(params, camera, v, 0, one)
    img = scene.image.astype(float)
    yy, xx = np.indices(img.shape)
    flux = img.sum()
    assert abs((img * xx).sum() / flux - x) < 0.01
    assert abs((img * yy).sum() / flux - y) < 0.01
    assert scene.sources["x"][0] == pytest.approx(x, abs=1e-6)
    # the PSF is not truncated: the stamp holds the light down to the noise, the truth the total
    raw_flux = 10 ** (-0.4 * (one["mag_r"][0] - v["zeropoint"]))
    assert 0.98 * raw_flux < flux <= raw_flux * (1 + 1e-6)
    median = instrument.median_flat_response(instrument.flat_response(params.seed, camera, 0), camera, 0)
    assert scene.sources["flux"][0] == pytest.approx(raw_flux * median, rel=1e-6)
    assert sim.true_psf(v, camera, 0, x, y).flux == pytest.approx(1.0)
    # the image is the true PSF convolved with the pixel
    psf = sim.true_psf(v, camera, 0, x, y).withFlux(raw_flux)
    ix, iy = int(round(x)), int(round(y))
    ref = galsim.ImageD(galsim.BoundsI(ix - 19, ix + 21, iy - 19, iy + 21), scale=1.0)  # zero-based ix-20..ix+20
    psf.drawImage(image=ref, center=galsim.PositionD(x + 1, y + 1), method="auto")
    cut = img[iy - 20:iy + 21, ix - 20:ix + 21]
    assert np.abs(cut - ref.array).max() < 1e-4 * cut.max()
    # and its size is the visit's seeing in pixels (an image without a pixel scale would draw
    # at GalSim's Nyquist scale and shrink every object by ~25 %)
    seeing = galsim.Kolmogorov(fwhm=float(v["seeing"]) / camera.pixel_scale).drawImage(nx=41, ny=41, scale=1.0)
    sigma_image = galsim.hsm.FindAdaptiveMom(galsim.Image(cut)).moments_sigma
    assert sigma_image == pytest.approx(galsim.hsm.FindAdaptiveMom(seeing).moments_sigma, rel=0.1)


def _one_star_scene(camera, seeing, x, y, flux, objects):
    """A one-visit ``ci`` scene at ``seeing`` [arcsec] holding one star of ``flux`` e- at zero-based ``(x, y)``."""
    p = sim.resolve_config(sim.SimulateConfig(ccds=[0], n_visits=1, filters=["HSC-R"], seeing_min=seeing,
                                              seeing_max=seeing))
    v = sim.plan_visits(p, camera)[0]
    ra, dec = camera.pixel_to_sky(0, x, y, v["ra"], v["dec"], v["rotation"])
    one = objects[:1].copy()
    one["ra"], one["dec"], one["type"] = ra, dec, "star"
    one["mag_r"] = float(v["zeropoint"]) - 2.5 * np.log10(flux)
    return p, v, sim.render_scene(p, camera, v, 0, one)


# tolerance: at 0.5" (3 pixels) the half maximum read off the pixels comes out ~3 % wide
@pytest.mark.parametrize("seeing, tol", [(0.5, 0.045), (1.0, 0.015), (1.5, 0.015)])
def test_star_fwhm_is_the_seeing_with_the_optics(camera, sky, seeing, tol):
    x, y = 400.0, 1200.0
    _, v, scene = _one_star_scene(camera, seeing, x, y, 1e6, sky.objects)
    assert float(v["seeing"]) == pytest.approx(seeing)
    measured = galsim.Image(scene.image.astype(float), scale=1.0).calculateFWHM(center=galsim.PositionD(x + 1, y + 1))
    scale, _, _ = field.psf_variation(v, camera, 0, x, y)  # the aberration pattern's dilation here
    jac = field.sky_to_pixel_jacobian(v, camera, 0, x, y)[0]
    pixel = 1.0 / np.sqrt(abs(np.linalg.det(jac)))  # local pixel scale [arcsec]
    diffraction = 1.03 * float(v["wavelength"]) * 1e-9 / field.TELESCOPE_DIAMETER * 180 / np.pi * 3600
    # atmosphere, optics and pixel in quadrature (a 1-pixel box adds sigma^2 = 1/12 pixel^2)
    expected = np.hypot(np.hypot(seeing * float(scale), diffraction), 2.3548 * pixel / np.sqrt(12))
    assert measured * pixel == pytest.approx(expected, rel=tol)


@pytest.mark.parametrize("seeing", [0.5, 1.5])
def test_bright_star_wings_are_not_truncated(camera, sky, seeing):
    """~1 % of the light of the realistic PSF lies beyond 4 FWHM (a truncated PSF has none)."""
    x, y = 512.0, 1024.0
    flux = 1e7
    p, v, scene = _one_star_scene(camera, seeing, x, y, flux, sky.objects)
    img = scene.image.astype(float)
    fwhm = seeing / camera.pixel_scale
    r = np.hypot(*(np.indices(img.shape) - np.array([y, x])[:, None, None]))
    truth = float(scene.sources["flux"][0]) / instrument.median_flat_response(
        instrument.flat_response(p.seed, camera, 0), camera, 0)
    assert truth == pytest.approx(flux, rel=1e-6)  # the truth is the total flux
    beyond_4 = 1 - img[r <= 4 * fwhm].sum() / truth
    beyond_10 = 1 - img[r <= 10 * fwhm].sum() / truth
    assert 0.007 < beyond_4 < 0.015
    assert 0.0015 < beyond_10 < 0.004
    assert img.sum() / truth > 0.999  # the stamp holds nearly all of it
    # the true PSF carries the same wings
    psf = sim.true_psf(v, camera, 0, x, y).withFlux(flux)
    half = int(12 * fwhm)
    ref = psf.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=1.0, center=galsim.PositionD(half + 1, half + 1))
    cut = img[int(y) - half:int(y) + half + 1, int(x) - half:int(x) + half + 1]
    assert np.abs(cut - ref.array).max() < 1e-4 * cut.max()


def test_ci_preset_spreads_the_seeing_over_every_filter(camera):
    p = sim.resolve_config(sim.SimulateConfig())
    visits = sim.plan_visits(p, camera)
    seeing = np.asarray(visits["seeing"])
    assert seeing.min() <= 0.5 + 1e-9 and seeing.max() >= 1.2
    for f in p.filters:
        s = np.sort(seeing[visits["filter"] == f])
        assert s[-1] - s[0] >= 0.5 * (p.seeing_max - p.seeing_min), f
    assert len(set(np.round(seeing, 6))) == len(seeing)  # no two visits alike
    # one visit takes the middle of the range
    one = sim.resolve_config(sim.SimulateConfig(n_visits=1, filters=["HSC-R"], seeing_min=0.6, seeing_max=1.0))
    assert float(sim.plan_visits(one, camera)["seeing"][0]) == pytest.approx(0.8)


def test_conditions_overrides_resolve(camera):
    for name, override in sim.CONDITIONS.items():
        p = sim.resolve_config(sim.SimulateConfig.from_dict(dict(override, ccds=[0], n_visits=2)))
        visits = sim.plan_visits(p, camera)
        assert ((visits["seeing"] >= p.seeing_min) & (visits["seeing"] <= p.seeing_max)).all(), name
    good = sim.resolve_config(sim.SimulateConfig.from_dict(sim.CONDITIONS["good_seeing"]))
    bad = sim.resolve_config(sim.SimulateConfig.from_dict(sim.CONDITIONS["bad_seeing"]))
    assert good.seeing_max <= 0.6 and bad.seeing_min >= 1.4
    sparse = sim.resolve_config(sim.SimulateConfig.from_dict(sim.CONDITIONS["sparse"]))
    dense = sim.resolve_config(sim.SimulateConfig.from_dict(sim.CONDITIONS["dense"]))
    assert sparse.star_density < 0.1 * sim.PRESETS["ci"]["star_density"] < dense.star_density
    with pytest.raises(ConfigError, match="seeing_min"):
        sim.SimulateConfig.from_dict({"seeing_min": 0.3})
    with pytest.raises(ConfigError, match="sky_offset_min"):
        sim.SimulateConfig.from_dict({"sky_offset_min": -1.0, "sky_offset_max": -2.0})


def test_sky_offset_brightens_the_sky(camera):
    dark = sim.plan_visits(sim.resolve_config(sim.SimulateConfig(ccds=[0])), camera)
    bright = sim.plan_visits(sim.resolve_config(sim.SimulateConfig.from_dict(sim.CONDITIONS["bright_sky"])), camera)
    ratio = np.asarray(bright["sky"]) / np.asarray(dark["sky"])
    # -1.5 to -2 mag/arcsec^2, times the +-20 % per-visit variation of each
    assert (ratio > 10 ** 0.6 * 0.8 / 1.2).all() and (ratio < 10 ** 0.8 * 1.2 / 0.8).all()
    offset = np.asarray(bright["sky_brightness"] - dark["sky_brightness"])
    assert ((offset >= -2.0) & (offset <= -1.5)).all()


def test_truth_positions_land_on_detected_flux(camera, science):
    image = assemble(science.raw, camera, 0).astype(np.float32)
    mask = science.cr_mask.astype(bool)
    bkg = sep.Background(image, mask=mask)
    data = image - bkg.back()
    cat = sep.extract(data, 5.0, err=bkg.globalrms, mask=mask, minarea=5)
    src = science.sources
    bright = (src["type"] == "star") & ~src["saturated"] & (src["flux"] > 2e4) & field.inside_ccd(camera, src["x"], src["y"])
    bright &= (src["x"] > 10) & (src["x"] < camera.ccd_shape[1] - 10)
    tx, ty = np.asarray(src["x"][bright]), np.asarray(src["y"][bright])
    assert bright.sum() > 50
    d = np.hypot(tx[:, None] - cat["x"][None, :], ty[:, None] - cat["y"][None, :])
    nearest = d.argmin(axis=1)
    matched = d[np.arange(len(tx)), nearest] < 1.0
    assert matched.mean() > 0.95
    xw, yw, _ = sep.winpos(data, cat["x"][nearest[matched]], cat["y"][nearest[matched]], 1.5)
    assert abs(np.median(xw - tx[matched])) < 0.03 and abs(np.median(yw - ty[matched])) < 0.03


def test_science_frame_has_saturation_cosmic_rays_and_truth(camera, sky, science):
    assert science.raw.dtype == np.uint16 and science.raw.shape == camera.raw_shape
    assert science.cr_mask.shape == camera.ccd_shape and science.cr_mask.dtype == np.uint8
    expected = sky.exposures[(sky.exposures["visit"] == 903334) & (sky.exposures["ccd"] == 0)][0]
    assert science.cr_mask.sum() >= expected["n_cosmic_rays"]
    assert field.inside_ccd(camera, science.sources["x"], science.sources["y"]).sum() == expected["n_objects"]
    for amp in camera.ccds[0].amplifiers:
        assert science.raw[amp.raw_data.slices].max() <= amp.bias_level + amp.saturation + 30
    assert science.sources["saturated"].any()


def test_hsc_preset_plans_enough_visits():
    cam = Camera.from_yaml(ROOT / "config/cameras/hsc.yaml")
    p = sim.resolve_config(sim.SimulateConfig(preset="hsc"))
    plan = sim.plan_exposures(p, cam)
    sci = plan[plan["obstype"] == "science"]
    assert len(set(sci["ccd"])) == 8
    for f in p.filters:
        assert len(set(sci["visit"][sci["filter"] == f])) >= 5
