"""IsrTask: overscan, assembly, bias/gain/dark/flat/fringe, defects, saturation, NaN masking.

Raw frames are built here (``make_raw``) from the ci camera geometry, independently of the
simulator: electrons → ADU per amp, bias level with a row drift, read noise, the raw
readout layout (flip_x amps mirrored), overscan, saturation clipping, uint16 rounding.
"""
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from snakedrp.repo.camera import Camera
from snakedrp.repo.exposure import Exposure, mask_bit
from snakedrp.isr.isr import IsrConfig, IsrError, IsrTask, fit_fringe_amplitude
from snakedrp.isr.overscan import fit_overscan
from snakedrp.pexconfig import ConfigError
from snakedrp.repo.raw import REQUIRED_KEYS, RawFrame

ROOT = Path(__file__).resolve().parents[1]
CI = Camera.from_yaml(ROOT / "config/cameras/ci.yaml")
BAD, SAT, INTRP, NO_DATA, EDGE = (mask_bit(n) for n in ("BAD", "SAT", "INTRP", "NO_DATA", "EDGE"))

#: every step off; tests switch on what they exercise
NOTHING = dict(do_overscan=False, do_saturation=False, do_bias=False, do_gain=False, do_variance=False,
               do_dark=False, do_flat=False, do_fringe=False, do_defect=False, do_interpolate=False,
               do_nan_masking=False, edge_width=0)


def isr_config(**kwargs) -> IsrConfig:
    return IsrConfig(**{**NOTHING, **kwargs})


# ------------------------------------------------------------------ synthetic raw frames
def make_header(camera, ccd, *, visit=123, filter="HSC-R", obstype="science", exptime=30.0, darktime=None):
    values = {
        "VISIT": visit, "CCD": ccd, "FILTER": filter, "OBSTYPE": obstype,
        "DATE-OBS": "2024-03-01T03:00:00.000", "MJD-OBS": 60370.125, "EXPTIME": exptime,
        "DARKTIME": exptime if darktime is None else darktime, "AIRMASS": 1.2,
        "TELRA": 150.0, "TELDEC": 2.2, "ROTANG": 10.0, "CAMERA": camera.name,
    }
    assert set(values) == set(REQUIRED_KEYS)
    header = fits.Header(list(values.items()))
    header.update(camera.nominal_wcs(ccd, 150.0, 2.2, 10.0).to_header())
    return header


def make_raw(camera, ccd=0, signal=None, *, rng=None, noise=True, drift=None, bias_pattern=None,
             nan_amps=(), quantize=True, **header_kw) -> RawFrame:
    """Raw frame from a signal in electrons on the assembled grid.

    Parameters
    ----------
    signal : ndarray (ny, nx) [e-], optional
        Expected charge per pixel (flat response, dark current, fringes included); Poisson
        noise is drawn from it if ``noise``.
    drift : ndarray (ny,) [ADU], optional
        Bias drift along the rows, seen identically in data and overscan.
    bias_pattern : ndarray (ny, nx) [ADU], optional
        2-D bias structure (not seen in the overscan; the master bias removes it).
    """
    rng = rng or np.random.default_rng(0)
    geom = camera.ccds[ccd]
    ny, nx = camera.ccd_shape
    e = np.zeros((ny, nx)) if signal is None else np.asarray(signal, float)
    if noise:
        e = rng.poisson(np.clip(e, 0, None)).astype(float)
    raw = np.zeros(camera.raw_shape)
    for amp in geom.amplifiers:
        a = amp.assembled
        level = amp.bias_level + (0.0 if drift is None else drift[a.y0:a.y1, None])
        data = e[a.slices] / amp.gain + level
        if bias_pattern is not None:
            data = data + bias_pattern[a.slices]
        over = np.broadcast_to(level, amp.raw_overscan.shape).astype(float)
        if noise:
            data = data + rng.normal(0, amp.read_noise / amp.gain, data.shape)
            over = over + rng.normal(0, amp.read_noise / amp.gain, over.shape)
        data = np.minimum(data, amp.saturation)
        # readout order: a flip_x amp reads its assembled column j into raw column x1 - 1 - j
        cols = np.arange(amp.raw_data.x0, amp.raw_data.x1)
        if amp.flip_x:
            cols = cols[::-1]
        raw[amp.raw_data.y0:amp.raw_data.y1, cols] = data
        raw[amp.raw_overscan.slices] = over
    if quantize:
        raw = np.round(raw)
    raw = raw.astype(np.float32)
    for name in nan_amps:
        amp = next(a for a in geom.amplifiers if a.name == name)
        raw[amp.raw_data.slices] = np.nan
        raw[amp.raw_overscan.slices] = np.nan
    return RawFrame(data=raw, header=make_header(camera, ccd, **header_kw))


def add_star(signal, x, y, flux, sigma=2.0, fullwell=None):
    """Add a Gaussian star [e-]; charge above ``fullwell`` bleeds up and down its column."""
    ny, nx = signal.shape
    h = int(6 * sigma) + 1
    y0, y1, x0, x1 = max(y - h, 0), min(y + h + 1, ny), max(x - h, 0), min(x + h + 1, nx)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    signal[y0:y1, x0:x1] += flux / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    if fullwell is None:
        return
    for col in range(x0, x1):
        column = signal[:, col]
        over = column > fullwell
        if not over.any():
            continue
        excess = (column[over] - fullwell).sum()
        column[over] = fullwell
        top, bottom = np.flatnonzero(over)[[-1, 0]]
        for direction, start in ((1, top + 1), (-1, bottom - 1)):
            left, yy_ = excess / 2, start
            while left > 0 and 0 <= yy_ < ny:
                add = min(fullwell - column[yy_], left)
                column[yy_] += add
                left -= add
                yy_ += direction


def fullwell_e(camera, ccd=0):
    # a little above every amp's saturation, so that full-well pixels read >= saturation despite noise
    return 1.03 * max((a.saturation - a.bias_level) * a.gain for a in camera.ccds[ccd].amplifiers)


# ------------------------------------------------------------------ overscan and assembly
def test_overscan_median_and_poly_remove_level_and_drift():
    ny = CI.ccd_shape[0]
    rows = np.arange(ny)
    drift = 6.0 * (rows / ny) + 3.0 * np.sin(rows / ny * np.pi)  # ADU, smooth in rows
    raw = make_raw(CI, 0, drift=drift, rng=np.random.default_rng(1))
    row_means = {}
    for fit in ("median", "poly", "spline"):
        out = IsrTask(isr_config(do_overscan=True, overscan_fit=fit)).run(raw, camera=CI).exposure.image
        row_means[fit] = out.mean(axis=1)
        # the bias level (~930-985 ADU) is gone in every mode
        assert abs(np.mean(out)) < 0.5, fit
    # per-row mean noise is read_noise/gain/sqrt(1024) ~ 0.05 ADU: poly and spline follow the drift
    assert np.std(row_means["poly"]) < 0.1
    assert np.std(row_means["spline"]) < 0.1
    # one median level leaves the drift (std ~ 2.5 ADU) in the rows
    assert np.std(row_means["median"]) > 1.5
    assert np.corrcoef(row_means["median"], drift)[0, 1] > 0.99


def test_fit_overscan_rejects_hot_rows_and_ignores_nan():
    rng = np.random.default_rng(2)
    rows = np.arange(2000)
    truth = 1000 + 0.002 * rows
    over = truth[:, None] + rng.normal(0, 1.5, (2000, 32))
    over[500:510] += 300.0  # e.g. charge trailed from a saturated row
    over[::7, 3] = np.nan
    model = fit_overscan(over, fit="poly", order=2, clip_sigma=3.0, clip_iterations=3)
    assert model.dtype == np.float32 and model.shape == (2000,)
    assert np.max(np.abs(model - truth)) < 0.2


def test_assembly_places_amps_where_the_yaml_says():
    ny, nx = CI.ccd_shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    ramp = 100.0 + 10.0 * xx + 0.01 * yy  # unique and increasing with x everywhere [e-]
    raw = make_raw(CI, 0, ramp, noise=False, quantize=False)
    amp_b = CI.ccds[0].amplifiers[1]
    assert amp_b.flip_x
    # in the raw frame the flip_x amp's ramp runs backwards ...
    assert np.all(np.diff(raw.data[10, amp_b.raw_data.x0:amp_b.raw_data.x1]) < 0)
    out = IsrTask(isr_config(do_overscan=True, overscan_fit="median", do_gain=True)).run(raw, camera=CI).exposure
    assert out.image.shape == (ny, nx)
    # ... and the assembled image is the ramp again, amp by amp
    np.testing.assert_allclose(out.image, ramp, rtol=0, atol=0.05)
    for amp in CI.ccds[0].amplifiers:
        block = out.image[amp.assembled.slices]
        assert np.all(np.diff(block, axis=1) > 0), amp.name


def test_gain_conversion_per_amp():
    raw = make_raw(CI, 0, np.full(CI.ccd_shape, 20000.0), rng=np.random.default_rng(3))
    amps = CI.ccds[0].amplifiers
    electrons = IsrTask(isr_config(do_overscan=True, do_gain=True)).run(raw, camera=CI).exposure
    adu = IsrTask(isr_config(do_overscan=True, do_gain=False)).run(raw, camera=CI).exposure
    assert electrons.metadata["BUNIT"] == "electron" and adu.metadata["BUNIT"] == "adu"
    for amp in amps:
        # Poisson + read noise on 1M pixels: the mean is good to ~0.01 %
        assert np.mean(electrons.image[amp.assembled.slices]) == pytest.approx(20000.0, rel=2e-4)
        assert np.mean(adu.image[amp.assembled.slices]) == pytest.approx(20000.0 / amp.gain, rel=2e-4)


# ------------------------------------------------------------------ calibrations
def _uniform_flat_field(shape):
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    response = 1.0 + 0.12 * ((xx - nx / 2) / nx) - 0.08 * ((yy - ny / 2) / ny) ** 2
    response *= 1.0 + 0.02 * np.random.default_rng(7).standard_normal(shape)
    return response


def _calib(image, variance=None):
    image = np.asarray(image, np.float32)
    return Exposure(image=image, mask=np.zeros(image.shape, np.int32),
                    variance=np.zeros_like(image) if variance is None else np.asarray(variance, np.float32))


def test_dark_scaled_by_darktime():
    shape = CI.ccd_shape
    dark = np.full(shape, 0.05)
    dark[100:110, 300:310] = 5.0  # warm pixels [e-/s]
    # DARKTIME differs from EXPTIME: the dark must scale with DARKTIME
    raw = make_raw(CI, 0, 200.0 + dark * 400.0, rng=np.random.default_rng(4), exptime=300.0, darktime=400.0)
    cfg = isr_config(do_overscan=True, do_gain=True, do_dark=True)
    master = _calib(dark)
    master.mask[7, 8] = NO_DATA | BAD  # a pixel the master has no data for
    result = IsrTask(cfg).run(raw, camera=CI, dark=master).exposure
    out = result.image
    assert result.mask[7, 8] == BAD and (result.mask != 0).sum() == 1  # propagated to the science frame
    assert np.mean(out[100:110, 300:310]) == pytest.approx(200.0, abs=3.0)  # 2000 e- removed
    assert np.mean(out) == pytest.approx(200.0, abs=0.2)
    off = IsrTask(replace(cfg, do_dark=False)).run(raw, camera=CI).exposure.image
    assert np.mean(off[100:110, 300:310]) == pytest.approx(2200.0, abs=10.0)


def test_flat_division_restores_uniform_illumination():
    response = _uniform_flat_field(CI.ccd_shape)
    flat = response / np.median(response)
    sky = 20000.0
    raw = make_raw(CI, 0, sky * response, rng=np.random.default_rng(5))
    cfg = isr_config(do_overscan=True, do_gain=True, do_flat=True)
    out = IsrTask(cfg).run(raw, camera=CI, flat=_calib(flat)).exposure.image
    # flattened: only Poisson + read noise remain (sqrt(20000)/20000 = 0.7 %)
    assert np.std(out) / np.mean(out) < 0.009
    assert np.mean(out) == pytest.approx(sky * np.median(response), rel=1e-3)
    # do_flat=False leaves the 2 % pixel response and the 12 % gradient in
    off = IsrTask(replace(cfg, do_flat=False)).run(raw, camera=CI).exposure.image
    assert np.std(off) / np.mean(off) > 0.03


def test_bias_subtraction_removes_2d_structure():
    ny, nx = CI.ccd_shape
    pattern = np.zeros((ny, nx))
    pattern[:, 100:104] = 25.0  # a warm-column bias feature [ADU]
    pattern[:20] += 8.0
    raw = make_raw(CI, 0, np.full((ny, nx), 1000.0), bias_pattern=pattern, rng=np.random.default_rng(6))
    cfg = isr_config(do_overscan=True, do_gain=True, do_bias=True)
    out = IsrTask(cfg).run(raw, camera=CI, bias=_calib(pattern)).exposure.image
    assert np.mean(out[:, 100:104]) == pytest.approx(1000.0, abs=2.0)
    assert np.mean(out[:20]) == pytest.approx(1000.0, abs=2.0)
    off = IsrTask(replace(cfg, do_bias=False)).run(raw, camera=CI).exposure.image
    assert np.mean(off[:, 100:104]) > 1060.0


def test_missing_calibration_is_an_error():
    raw = make_raw(CI, 0, noise=False)
    for step in ("bias", "dark", "flat"):
        cfg = isr_config(do_overscan=True, do_gain=True, **{f"do_{step}": True})
        with pytest.raises(IsrError, match=f"visit 123 ccd 0: do_{step} is true but no {step} was given"):
            IsrTask(cfg).run(raw, camera=CI)
    fringing = make_raw(CI, 0, noise=False, filter="HSC-I")
    with pytest.raises(IsrError, match="visit 123 ccd 0: do_fringe is true.*no fringe was given"):
        IsrTask(isr_config(do_fringe=True)).run(fringing, camera=CI)
    # HSC-R does not fringe: no template needed
    IsrTask(isr_config(do_fringe=True)).run(raw, camera=CI)


def test_unassembled_output_keeps_the_raw_layout():
    raw = make_raw(CI, 0, np.full(CI.ccd_shape, 3000.0), rng=np.random.default_rng(13))
    cfg = IsrConfig(do_assemble=False, do_bias=False, do_dark=False, do_flat=False, do_fringe=False, do_defect=False)
    out = IsrTask(cfg).run(raw, camera=CI).exposure
    assert out.image.shape == CI.raw_shape and out.metadata["ISRASSEM"] is False
    for amp in CI.ccds[0].amplifiers:
        assert abs(np.mean(out.image[amp.raw_overscan.slices])) < 0.2  # overscan level removed
        assert np.mean(out.image[amp.raw_data.slices]) == pytest.approx(3000.0, rel=1e-3)  # gain applied


def test_config_validation():
    with pytest.raises(ConfigError, match="do_assemble"):
        IsrTask(IsrConfig(do_assemble=False))
    with pytest.raises(ConfigError, match="do_dark needs do_gain"):
        IsrTask(isr_config(do_dark=True))
    with pytest.raises(ConfigError):
        IsrConfig.from_dict({"overscan_fit": "cubic"})


# ------------------------------------------------------------------ fringe
def _fringe_template(shape):
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    t = np.sin(xx / 37.0 + 0.3 * np.sin(yy / 90.0)) * np.cos(yy / 53.0)
    return t - t.mean()


def test_fringe_amplitude_recovered():
    rng = np.random.default_rng(8)
    template = 0.02 * _fringe_template(CI.ccd_shape)  # per unit sky: fringes of +-2 % of the sky
    sky = 3000.0
    amplitude = 1.3 * sky  # fringes 1.3 times stronger, relative to the sky, than in the template
    signal = sky + amplitude * template
    for _ in range(60):  # stars the fit must reject
        add_star(signal, rng.integers(20, 1000), rng.integers(20, 2030), 10 ** rng.uniform(4, 6))
    raw = make_raw(CI, 0, signal, rng=rng, filter="HSC-I")
    cfg = isr_config(do_overscan=True, do_gain=True, do_fringe=True)
    fringe = _calib(template)
    result = IsrTask(cfg).run(raw, camera=CI, fringe=fringe)
    assert result.fringe_amplitude == pytest.approx(amplitude, rel=0.03)
    assert result.exposure.metadata["ISRFRNG"] is True
    # pattern removed: correlation with the template gone
    out = result.exposure.image
    assert abs(np.corrcoef(out[::4, ::4].ravel(), template[::4, ::4].ravel())[0, 1]) < 0.01
    # a non-fringing filter never gets a fringe subtracted, even with a template
    raw_r = make_raw(CI, 0, signal, rng=rng, filter="HSC-R")
    res_r = IsrTask(cfg).run(raw_r, camera=CI, fringe=fringe)
    assert res_r.fringe_amplitude is None and res_r.exposure.metadata["ISRFRNG"] is False


def test_fringe_amplitude_unbiased_with_a_noisy_template():
    """A template from 4 night-sky frames of 1600 e- (as the simulator's) carries noise of 1.25 % of
    the sky per pixel, comparable in 5x5-box medians to fringes of 0.7 % RMS: least squares alone
    would leave ~20 % of the fringes in the image; with the template's variance plane (the 4
    frames' sample variance over 4, as construct_fringe writes it) the amplitude is right."""
    rng = np.random.default_rng(21)
    shape = CI.ccd_shape
    pattern = 0.007 * _fringe_template(shape) / np.std(_fringe_template(shape))
    sky, n_frames = 1600.0, 4
    frames = pattern + rng.normal(0.0, 1.0 / np.sqrt(sky), (n_frames,) + shape)
    template = frames.mean(axis=0)
    fringe = _calib(template - template.mean(), frames.var(axis=0, ddof=1) / n_frames)
    del frames
    amplitude = 1.1 * sky
    image = (sky + amplitude * pattern + rng.normal(0.0, np.sqrt(sky), shape)).astype(np.float32)
    mask = np.zeros(shape, np.int32)
    fit = fit_fringe_amplitude(image, mask, fringe.image, template_variance=fringe.variance)
    naive = fit_fringe_amplitude(image, mask, fringe.image)
    print(f"fringe amplitude / truth: {fit.amplitude / amplitude:.4f} (+-{fit.amplitude_err / amplitude:.4f}); "
          f"without the template's noise: {naive.amplitude / amplitude:.4f}")
    assert naive.amplitude < 0.9 * amplitude
    assert fit.amplitude == pytest.approx(amplitude, rel=0.03)


# ------------------------------------------------------------------ defects, saturation, NaN
@pytest.fixture(scope="module")
def science():
    """A flat sky with hot defect columns and saturated stars with bleed trails, through full ISR."""
    rng = np.random.default_rng(9)
    shape = CI.ccd_shape
    signal = np.full(shape, 1500.0)
    for box in CI.ccds[0].defects:
        signal[box.slices] += 30000.0  # hot pixels/columns
    fw = fullwell_e(CI)
    stars = [(700, 400), (200, 1500), (900, 1800)]
    for x, y in stars:
        add_star(signal, x, y, 4e7, sigma=2.0, fullwell=fw)
    raw = make_raw(CI, 0, signal, rng=rng)
    cfg = isr_config(do_overscan=True, do_gain=True, do_variance=True, do_saturation=True, do_defect=True,
                     do_interpolate=True, do_nan_masking=True, edge_width=2)
    out = IsrTask(cfg).run(raw, camera=CI).exposure
    return dict(signal=signal, raw=raw, out=out, fullwell=fw, stars=stars, cfg=cfg)


def test_defects_masked_bad_and_interpolated(science):
    out = science["out"]
    expected = np.zeros(CI.ccd_shape, bool)
    for box in CI.ccds[0].defects:
        expected[box.slices] = True
    bad = (out.mask & BAD) != 0
    np.testing.assert_array_equal(bad, expected)
    intrp = (out.mask & INTRP) != 0
    assert np.all(intrp[expected])
    # interpolated from the 1500 e- sky around them (not the 31500 e- hot value)
    vals = out.image[expected & ((out.mask & SAT) == 0)]
    assert np.abs(np.median(vals) - 1500.0) < 5.0 and vals.max() < 1800.0


def test_saturated_star_and_bleed_trail_masked_sat(science):
    out, signal, fw = science["out"], science["signal"], science["fullwell"]
    sat = (out.mask & SAT) != 0
    at_fullwell = signal >= fw  # cores and bleed trails in the truth
    assert at_fullwell.sum() > 300
    assert np.all(sat[at_fullwell])
    for x, y in science["stars"]:
        column = at_fullwell[:, x]
        trail = np.flatnonzero(column)
        assert trail.size > 30  # a real bleed trail along the column
        # SAT covers the whole trail and a few rows beyond its ends (partial-charge ends)
        assert sat[trail[0] - 3:trail[-1] + 4, x].all()
    # grown mostly along columns: not wildly more than the saturated area
    assert sat.sum() < 4 * at_fullwell.sum()
    assert np.all((out.mask[sat] & INTRP) != 0)
    assert np.isfinite(out.image).all() and np.isfinite(out.variance).all()


def test_edge_mask_and_metadata(science):
    out, raw = science["out"], science["raw"]
    edge = (out.mask & EDGE) != 0
    assert edge[:2].all() and edge[:, -2:].all() and not edge[2:-2, 2:-2].any()
    for key in ("VISIT", "CCD", "FILTER", "DATE-OBS", "MJD-OBS", "EXPTIME", "AIRMASS", "TELRA", "TELDEC", "ROTANG", "OBSTYPE"):
        assert out.metadata[key] == raw.header[key]
    for key in ("ISROSCAN", "ISRBIAS", "ISRFLAT", "ISRDARK", "ISRGAIN", "ISRDEFCT", "ISRSAT", "ISRINTRP"):
        assert key in out.metadata
    assert out.metadata["ISRFLAT"] is False and out.metadata["ISRDEFCT"] is True
    assert out.image.dtype == np.float32 and out.variance.dtype == np.float32 and out.mask.dtype == np.int32
    nominal = CI.nominal_wcs(0, 150.0, 2.2, 10.0)
    np.testing.assert_allclose(out.wcs.pixel_to_world_values(10.0, 2000.0), nominal.pixel_to_world_values(10.0, 2000.0))
    assert out.wcs.pixel_shape == (CI.ccd_shape[1], CI.ccd_shape[0])


def test_variance_matches_pixel_scatter(science):
    out = science["out"]
    clean = out.mask == 0
    for amp in CI.ccds[0].amplifiers:
        sl = amp.assembled.slices
        sel = clean[sl]
        pix = out.image[sl][sel]
        empirical = np.var(pix[np.abs(pix - 1500.0) < 300])
        # 1500 e- sky + read noise^2: ~1530 e-^2; 1M pixels give the variance to < 1 %
        assert np.median(out.variance[sl][sel]) == pytest.approx(empirical, rel=0.03), amp.name
        assert np.median(out.variance[sl][sel]) == pytest.approx(1500.0 + amp.read_noise**2, rel=0.03)


def test_nan_amplifier_masked_no_data_in_that_amp_only():
    raw = make_raw(CI, 0, np.full(CI.ccd_shape, 1000.0), nan_amps=("B",), rng=np.random.default_rng(10))
    raw.data[50, 20] = np.inf  # a single bad pixel in amp A
    cfg = isr_config(do_overscan=True, do_gain=True, do_variance=True, do_nan_masking=True, do_interpolate=True,
                     do_defect=True)
    out = IsrTask(cfg).run(raw, camera=CI).exposure
    amp_a, amp_b = CI.ccds[0].amplifiers
    nodata = (out.mask & NO_DATA) != 0
    assert nodata[amp_b.assembled.slices].all()
    assert ((out.mask[amp_b.assembled.slices] & BAD) != 0).all()
    a_nodata = nodata[amp_a.assembled.slices]
    assert a_nodata.sum() == 1 and a_nodata[50, 20]
    assert np.all(out.image[nodata] == 0) and np.all(np.isinf(out.variance[nodata]))
    assert np.isfinite(out.image).all()
    assert out.metadata["NNODATA"] == amp_b.assembled.shape[0] * amp_b.assembled.shape[1] + 1
    # defects inside amp B are NO_DATA, not interpolated
    assert not ((out.mask & INTRP)[amp_b.assembled.slices]).any()


def test_all_nan_ccd_is_an_error():
    raw = make_raw(CI, 2, noise=False, nan_amps=("A", "B"), visit=4567)
    with pytest.raises(IsrError, match="visit 4567 ccd 2"):
        IsrTask(IsrConfig(do_bias=False, do_dark=False, do_flat=False)).run(raw, camera=CI)


# ------------------------------------------------------------------ every switch
@pytest.fixture(scope="module")
def everything():
    """A frame with every signature, and its calibrations."""
    rng = np.random.default_rng(11)
    shape = CI.ccd_shape
    response = _uniform_flat_field(shape)
    flat = response / np.median(response)
    dark = np.full(shape, 0.5)
    bias = np.zeros(shape)
    bias[:, 600:610] = 20.0
    template = _fringe_template(shape)
    signal = (2000.0 + 60.0 * template) * response + dark * 100.0
    for box in CI.ccds[0].defects:
        signal[box.slices] += 30000.0
    add_star(signal, 300, 1000, 4e7, fullwell=fullwell_e(CI))
    raw = make_raw(CI, 0, signal, rng=rng, bias_pattern=bias, filter="HSC-I", exptime=100.0)
    raw.data[raw.data.shape[0] // 2, 5] = np.nan
    calibs = dict(bias=_calib(bias), dark=_calib(dark), flat=_calib(flat), fringe=_calib(template))
    full = IsrTask(IsrConfig()).run(raw, camera=CI, **calibs).exposure
    return dict(raw=raw, calibs=calibs, full=full, flat=flat, template=template)


def _region_mean(img, sl):
    return float(np.mean(img[sl]))


@pytest.mark.parametrize("switch", ["do_overscan", "do_bias", "do_gain", "do_dark", "do_flat", "do_fringe", "do_defect",
                                    "do_saturation", "do_interpolate", "do_nan_masking", "do_variance"])
def test_each_switch_skips_its_step(everything, switch):
    raw, calibs, full = everything["raw"], everything["calibs"], everything["full"]
    changes = {switch: False}
    if switch == "do_gain":
        changes["do_dark"] = False  # the dark is in electrons
    out = IsrTask(replace(IsrConfig(), **changes)).run(raw, camera=CI, **calibs).exposure
    img, mask = out.image, out.mask
    clean = (full.mask == 0)
    if switch == "do_overscan":
        assert np.median(img[clean]) - np.median(full.image[clean]) > 2000.0  # ~1000 ADU * 3 e-/ADU left
        assert out.metadata["ISROSCAN"] == "none"
    elif switch == "do_bias":
        cols = (slice(100, 1900), slice(600, 610))
        assert _region_mean(img, cols) - _region_mean(full.image, cols) > 40.0
    elif switch == "do_gain":
        assert np.median(img[clean]) < 0.5 * np.median(full.image[clean])
    elif switch == "do_dark":
        assert np.median(img[clean]) - np.median(full.image[clean]) > 40.0  # 50 e- of dark left
    elif switch == "do_flat":
        r = np.corrcoef(img[clean][::7], everything["flat"][clean][::7])[0, 1]
        assert r > 0.5 and np.corrcoef(full.image[clean][::7], everything["flat"][clean][::7])[0, 1] < 0.1
    elif switch == "do_fringe":
        t = everything["template"][clean][::5]
        assert np.corrcoef(img[clean][::5], t)[0, 1] > 0.3
        assert abs(np.corrcoef(full.image[clean][::5], t)[0, 1]) < 0.05
        assert "FRNGAMP" not in out.metadata and "FRNGAMP" in full.metadata
    elif switch == "do_defect":
        assert not (mask & BAD).any() or (mask & BAD).sum() < 5  # only the NaN pixel
        assert ((full.mask & BAD) != 0).sum() > 1000
    elif switch == "do_saturation":
        assert not (mask & SAT).any() and (full.mask & SAT).any()
    elif switch == "do_interpolate":
        assert not (mask & INTRP).any() and (full.mask & INTRP).any()
        box = CI.ccds[0].defects[0]
        assert np.median(img[box.slices]) > 20000.0  # hot column left in
    elif switch == "do_nan_masking":
        assert np.isnan(img).sum() == 1 and not (mask & NO_DATA).any()
        assert ((full.mask & NO_DATA) != 0).sum() == 1
    elif switch == "do_variance":
        nodata = (out.mask & NO_DATA) != 0
        assert not out.variance[~nodata].any() and np.median(full.variance) > 1000.0


# ------------------------------------------------------------------ speed
def test_full_hsc_ccd_speed():
    """A full HSC CCD (raw 4176 x 2176, 4 amps) with every step; the target is < 0.5 s on one core."""
    hsc = Camera.from_yaml(ROOT / "config/cameras/hsc.yaml")
    shape = hsc.ccd_shape
    rng = np.random.default_rng(12)
    raw = make_raw(hsc, 0, noise=False, filter="HSC-I")
    raw.data[...] += rng.normal(0, 2.0, raw.data.shape).astype(np.float32) + 300.0
    ones = _calib(np.ones(shape, np.float32), np.full(shape, 1e-6, np.float32))
    calibs = dict(bias=_calib(np.zeros(shape)), dark=_calib(np.zeros(shape)), flat=ones,
                  fringe=_calib(_fringe_template(shape)))
    task = IsrTask(IsrConfig())
    task.run(raw, camera=hsc, **calibs)
    best = min(_timed(task, raw, hsc, calibs) for _ in range(3))
    print(f"full HSC CCD ISR: {best:.3f} s")
    assert best < 1.5  # generous for loaded CI machines; measured ~0.2-0.3 s on one core


def _timed(task, raw, camera, calibs):
    t0 = time.perf_counter()
    task.run(raw, camera=camera, **calibs)
    return time.perf_counter() - t0
