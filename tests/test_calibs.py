"""Master bias/dark/flat/fringe construction on synthetic raw frames (ci geometry, fewer rows)."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from snakedrp.isr.calibs import (CalibError, CalibsConfig, combine_clipped, construct_bias, construct_dark,
                             construct_flat, construct_fringe)
from snakedrp.repo.camera import Camera
from snakedrp.repo.exposure import mask_bit
from snakedrp.isr.isr import IsrConfig, IsrTask

from test_isr import add_star, make_raw  # the raw-frame maker shared with the ISR tests

ROOT = Path(__file__).resolve().parents[1]
ROWS = 256


def small_ci(rows: int = ROWS) -> Camera:
    """The ci camera with only its first ``rows`` rows (same amps, flip_x, gains, overscan)."""
    spec = yaml.safe_load((ROOT / "config/cameras/ci.yaml").read_text())
    spec["ccd_shape"][0] = rows
    spec["raw_shape"][0] = rows
    for amp in spec["amplifiers"]:
        for key in ("raw_data", "raw_overscan", "assembled"):
            amp[key][1] = rows
    for ccd in spec["ccds"]:
        ccd["defects"] = [[y0, min(y1, rows), x0, x1] for y0, y1, x0, x1 in ccd["defects"] if y0 < rows]
    spec["ccds"][0]["defects"] += [[40, rows, 100, 101], [60, 62, 700, 702]]  # a bad column, a hot pixel
    return Camera.from_dict(spec)


CAM = small_ci()
AMPS = CAM.ccds[0].amplifiers


def biases(n, seed=0):
    rng = np.random.default_rng(seed)
    return [make_raw(CAM, 0, rng=rng, visit=1000 + i, obstype="bias", filter="NONE", exptime=0.0) for i in range(n)]


def test_master_bias_noise_falls_as_one_over_sqrt_n():
    frames = biases(16)
    for n in (2, 4, 8, 16):
        master = construct_bias(frames[:n], CAM, CalibsConfig.from_dict({"bias": {"min_inputs": 2}}))
        assert master.metadata["NCOMBINE"] == n and master.metadata["BUNIT"] == "adu"
        for amp in AMPS:
            measured = np.std(master.image[amp.assembled.slices])
            # read noise in ADU, plus the 1/12 ADU^2 of integer quantisation of the raw values
            expected = np.sqrt((amp.read_noise / amp.gain) ** 2 + 1 / 12) / np.sqrt(n)
            assert measured == pytest.approx(expected, rel=0.10), (n, amp.name)
            # overscan removed: the master is centred on zero, not on the ~1000 ADU bias level
            assert abs(np.mean(master.image[amp.assembled.slices])) < 0.05


def test_master_variance_agrees_with_scatter():
    frames = biases(12, seed=1)
    master = construct_bias(frames, CAM)
    for amp in AMPS:
        sl = amp.assembled.slices
        # mean of the per-pixel variance of the mean vs the empirical variance of the master
        assert np.mean(master.variance[sl]) == pytest.approx(np.var(master.image[sl]), rel=0.05)
    assert master.image.dtype == np.float32 and master.variance.dtype == np.float32
    assert not (master.mask & mask_bit("NO_DATA")).any()


def test_master_bias_keeps_2d_structure_and_rejects_outliers():
    rng = np.random.default_rng(2)
    pattern = np.zeros(CAM.ccd_shape)
    pattern[:, 300:303] = 15.0
    frames = [make_raw(CAM, 0, rng=rng, bias_pattern=pattern, visit=i, obstype="bias", filter="NONE")
              for i in range(7)]
    frames[3].data[100, 50] += 5000.0  # a cosmic ray in one frame (amp A: raw x = assembled x)
    master = construct_bias(frames, CAM)
    assert np.mean(master.image[:, 300:303]) == pytest.approx(15.0, abs=0.2)
    assert abs(master.image[100, 50]) < 5.0  # clipped, not 5000/7 = 714


def test_master_dark_in_electrons_per_second():
    rng = np.random.default_rng(3)
    rate = np.full(CAM.ccd_shape, 0.02)
    rate[50:60, 700:710] = 3.0  # warm pixels [e-/s]
    bias = construct_bias(biases(5, seed=4), CAM)
    frames = [make_raw(CAM, 0, rate * t, rng=rng, visit=10 + i, obstype="dark", filter="NONE", exptime=t, darktime=t)
              for i, t in enumerate((300.0, 600.0, 600.0, 900.0, 1200.0))]
    dark = construct_dark(frames, CAM, bias=bias)
    assert dark.metadata["BUNIT"] == "electron/s"
    assert np.mean(dark.image[50:60, 700:710]) == pytest.approx(3.0, rel=0.01)
    clean = np.ones(CAM.ccd_shape, bool)
    clean[50:60, 700:710] = False
    # 0.02 e-/s: read noise (~5 e- per frame) averages down to ~0.004 e-/s per pixel
    assert np.mean(dark.image[clean]) == pytest.approx(0.02, abs=0.001)
    with pytest.raises(CalibError, match="DARKTIME"):
        construct_dark([make_raw(CAM, 0, obstype="dark", filter="NONE", darktime=0.0)] * 3, CAM, bias=bias)


def _response(shape, seed=5):
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    smooth = 1.0 + 0.1 * (xx / nx - 0.5) + 0.05 * np.cos(yy / ny * np.pi)
    pixels = 1.0 + 0.02 * np.random.default_rng(seed).standard_normal(shape)
    return smooth * pixels


def test_master_flat_median_one_and_recovers_pixel_response():
    rng = np.random.default_rng(6)
    response = _response(CAM.ccd_shape)
    response[40:, 100] *= 0.2  # the camera's bad column responds at 20 %
    levels = (15000.0, 20000.0, 25000.0, 18000.0, 22000.0, 30000.0, 16000.0, 21000.0)
    frames = [make_raw(CAM, 0, level * response, rng=rng, visit=200 + i, obstype="flat", filter="HSC-R", exptime=10.0)
              for i, level in enumerate(levels)]
    frames[2].data[30, 40] = 65535.0  # a saturated hit in one frame: left out, not clipped into the mean
    flat = construct_flat(frames, CAM, bias=None, dark=None)
    good = flat.mask == 0
    defect = np.zeros(CAM.ccd_shape, bool)
    for box in CAM.ccds[0].defects:
        defect[box.slices] = True
    # the defects are BAD in the master and left out of its median (the simulator's convention)
    np.testing.assert_array_equal(good, ~defect)
    assert np.median(flat.image[good]) == pytest.approx(1.0, abs=1e-6)
    truth = response / np.median(response[~defect])
    assert np.mean(flat.image[40:, 100]) == pytest.approx(np.mean(truth[40:, 100]), rel=0.01)
    err = flat.image - truth
    # photon noise of the combined flat ~ 1/sqrt(8 * 20000) = 0.25 %
    assert np.std(err) < 0.0035
    assert np.corrcoef(flat.image.ravel(), truth.ravel())[0, 1] > 0.98
    # the variance plane predicts that error (per pixel variance of the clipped mean)
    assert np.mean(flat.variance) == pytest.approx(np.var(err), rel=0.1)
    assert abs(flat.image[30, 40] - truth[30, 40]) < 0.02
    assert flat.metadata["NCOMBINE"] == 8 and flat.metadata["FILTER"] == "HSC-R"
    # a flat-fielded uniform illumination comes out uniform
    science = make_raw(CAM, 0, 20000.0 * response, rng=rng, filter="HSC-R")
    cfg = IsrConfig(do_bias=False, do_dark=False, do_fringe=False, do_defect=False)
    out = IsrTask(cfg).run(science, camera=CAM, flat=flat).exposure
    assert not (out.mask & mask_bit("BAD")).any()  # master BAD (defects) does not propagate; NO_DATA would
    assert np.std(out.image) / np.mean(out.image) < 0.009  # Poisson 0.7 % plus the master's 0.25 %


def test_master_fringe_template_and_isr_fit():
    rng = np.random.default_rng(7)
    ny, nx = CAM.ccd_shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    pattern = 0.02 * np.sin(xx / 23.0 + yy / 41.0) * np.cos(yy / 31.0)
    pattern -= pattern.mean()  # fringes of +-2 % of the sky
    frames = []
    for i, sky in enumerate((2000.0, 2600.0, 3100.0, 2300.0, 2800.0, 3500.0, 2100.0, 2500.0)):
        signal = sky * (1.0 + pattern)
        for _ in range(15):  # stars on different pixels in each (dithered) frame
            add_star(signal, rng.integers(10, nx - 10), rng.integers(10, ny - 10), 10 ** rng.uniform(4.5, 6))
        frames.append(make_raw(CAM, 0, signal, rng=rng, visit=300 + i, obstype="fringe", filter="HSC-I"))
    fringe = construct_fringe(frames, CAM, bias=None, dark=None, flat=None)
    template = fringe.image
    good = fringe.mask == 0
    assert abs(np.mean(template[good])) < 1e-6 and not good.all()
    # per unit sky: the template is the injected pattern, amplitude within 3 %
    slope = np.sum(template * pattern) / np.sum(pattern**2)
    assert slope == pytest.approx(1.0, rel=0.03)
    # what is left is the noise of the combined frames, as the variance plane says
    # (sqrt(sky * 8) ~ 145: ~0.7 % per pixel against a pattern rms of 1 %)
    assert np.mean(fringe.variance[good]) == pytest.approx(np.var((template - pattern)[good]), rel=0.1)
    # ISR fits its amplitude in a science frame with 1.4x stronger fringes
    sky = 3000.0
    science = make_raw(CAM, 0, sky * (1.0 + 1.4 * pattern), rng=rng, filter="HSC-I")
    cfg = IsrConfig(do_bias=False, do_dark=False, do_flat=False, do_defect=False)
    result = IsrTask(cfg).run(science, camera=CAM, fringe=fringe)
    assert result.fringe_amplitude == pytest.approx(1.4 * sky, rel=0.04)
    # what remains is sky + read noise plus the template's own noise (8 frames), which the
    # variance plane carries: (amplitude * template noise)^2 is added to it
    out = result.exposure
    inner = (slice(4, -4), slice(4, -4))
    assert np.std(out.image[inner]) == pytest.approx(np.sqrt(np.mean(out.variance[inner])), rel=0.03)
    assert np.mean(out.variance[inner]) > sky + 20.0 + (1.4 * sky) ** 2 * 0.8 * np.mean(fringe.variance)


def test_masters_report_no_data_where_every_input_is_masked():
    frames = biases(3, seed=8)
    for f in frames:
        f.data[10, 20] = np.nan
    master = construct_bias(frames, CAM)
    assert master.mask[10, 20] == mask_bit("NO_DATA") | mask_bit("BAD")
    assert master.image[10, 20] == 0.0 and master.metadata["NNODATA"] == 1
    assert ((master.mask & mask_bit("NO_DATA")) != 0).sum() == 1


def test_inputs_are_checked():
    frames = biases(2)
    with pytest.raises(CalibError, match="ccd 0: 2 input frame"):
        construct_bias(frames, CAM)
    with pytest.raises(CalibError, match="OBSTYPE"):
        construct_flat(biases(3), CAM, bias=None, dark=None)
    mixed = biases(3) + [make_raw(CAM, 1, obstype="bias", filter="NONE")]
    with pytest.raises(CalibError, match="several ccds"):
        construct_bias(mixed, CAM)


def test_combine_clipped_rejects_outlier_and_handles_nan():
    rng = np.random.default_rng(9)
    images = [rng.normal(10.0, 1.0, (64, 64)).astype(np.float32) for _ in range(9)]
    images[4][5, 5] = 1000.0
    images[2][7, 7] = np.nan
    res = combine_clipped(images, clip_sigma=3.0, clip_iterations=3)
    assert abs(res.mean[5, 5] - 10.0) < 1.5 and res.n_used[5, 5] == 8
    assert res.n_used[7, 7] == 8 and np.isfinite(res.mean[7, 7])
    assert np.mean(res.variance) == pytest.approx(1.0 / 9, rel=0.1)


def test_calibration_chain_bias_dark_flat_then_science():
    """Masters built here, then used by IsrTask: a flat-fielded sky comes out flat, with its noise."""
    rng = np.random.default_rng(10)
    shape = CAM.ccd_shape
    pattern = np.zeros(shape)
    pattern[:, 500:506] = 12.0  # bias structure [ADU]
    rate = np.full(shape, 0.05)
    rate[100:104, 200:204] = 4.0  # warm pixels [e-/s]
    response = _response(shape, seed=11)

    def frames(kind, n, signal, **kw):
        return [make_raw(CAM, 0, signal, rng=rng, bias_pattern=pattern, obstype=kind, visit=500 + i, **kw)
                for i in range(n)]

    bias = construct_bias(frames("bias", 8, None, filter="NONE", exptime=0.0, darktime=0.0), CAM)
    dark = construct_dark(frames("dark", 6, rate * 600.0, filter="NONE", exptime=600.0), CAM, bias=bias)
    flat = construct_flat(frames("flat", 8, 25000.0 * response + rate * 5.0, filter="HSC-R", exptime=5.0), CAM,
                          bias=bias, dark=dark)
    sky, t = 1200.0, 120.0
    science = make_raw(CAM, 0, sky * response + rate * t, rng=rng, bias_pattern=pattern, filter="HSC-R", exptime=t)
    cfg = IsrConfig(do_fringe=False, edge_width=0)
    out = IsrTask(cfg).run(science, camera=CAM, bias=bias, dark=dark, flat=flat).exposure
    good = out.mask == 0
    level = sky * np.median(response)
    assert np.median(out.image[good]) == pytest.approx(level, rel=2e-3)
    assert np.mean(out.image[:, 500:506]) == pytest.approx(level, rel=5e-3)  # bias column gone
    assert np.mean(out.image[100:104, 200:204]) == pytest.approx(level, rel=0.05)  # warm pixels gone
    # the remaining scatter is what the variance plane says (sky, read noise, masters' noise)
    assert np.var(out.image[good]) == pytest.approx(np.mean(out.variance[good]), rel=0.05)
