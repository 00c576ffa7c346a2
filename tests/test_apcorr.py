"""Aperture correction (snakedrp.meas.apcorr): fit, evaluation, persistence."""
from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.io import fits

from snakedrp.meas.apcorr import ApCorrConfig, ApCorrError, ApCorrMap, fit_aperture_correction
from snakedrp.pexconfig import ConfigError

SHAPE = (4176, 2048)


def true_ratio(x, y):
    """A smooth injected ratio calib/psf flux: ~1.01, tilting by +-0.6 % over the CCD."""
    ny, nx = SHAPE
    u, v = (x - (nx - 1) / 2) / ((nx - 1) / 2), (y - (ny - 1) / 2) / ((ny - 1) / 2)
    return 1.01 + 0.004 * u - 0.006 * v


def stars(n=200, seed=5, n_outliers=10):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, SHAPE[1] - 1, n), rng.uniform(0, SHAPE[0] - 1, n)
    psf_flux = 10 ** rng.uniform(4, 6.5, n)
    psf_err = np.sqrt(psf_flux + 1e5)                  # S/N 30 to 1800
    ap_true = psf_flux * true_ratio(x, y)
    ap_err = np.sqrt(ap_true + 6e5)                     # the big aperture holds more sky
    ap_flux = ap_true + rng.normal(size=n) * ap_err
    psf_obs = psf_flux + rng.normal(size=n) * psf_err
    ap_flux[:n_outliers] *= 1.2                         # blends: extra light in the big aperture
    return x, y, psf_obs, psf_err, ap_flux, ap_err


def test_recovers_injected_smooth_ratio():
    x, y, pf, pe, af, ae = stars()
    ap = fit_aperture_correction(x, y, pf, pe, af, ae, shape=SHAPE, config=ApCorrConfig())
    gx, gy = np.meshgrid(np.linspace(0, SHAPE[1] - 1, 9), np.linspace(0, SHAPE[0] - 1, 17))
    err = ap.evaluate(gx, gy) - true_ratio(gx, gy)
    print(f"apcorr: {ap.n_stars} stars, max error {np.abs(err).max():.5f}, "
          f"scatter {ap.scatter:.4f}, error {ap.error:.5f}")
    assert ap.evaluate(gx, gy).shape == gx.shape
    # the stars with S/N >= 100 have ratio errors <~ 1 %: the fit is good to ~1e-3
    assert np.abs(err).max() < 2.5e-3
    assert np.sqrt(np.mean(err**2)) < 1.2e-3
    assert ap.n_stars < 190                             # the 20 % blends are clipped
    assert ap.degree == 1
    assert 0 < ap.error < 1e-3


def test_degree_zero_is_a_constant():
    x, y, pf, pe, af, ae = stars()
    ap = fit_aperture_correction(x, y, pf, pe, af, ae, shape=SHAPE, config=ApCorrConfig(degree=0))
    assert len(ap.coeffs) == 1
    assert ap.evaluate(0.0, 0.0) == pytest.approx(ap.evaluate(2047.0, 4175.0))
    assert ap.evaluate(1023.5, 2087.5) == pytest.approx(1.01, abs=1.5e-3)


def test_degree_lowered_with_few_stars():
    x, y, pf, pe, af, ae = stars(n=5, n_outliers=0)
    pe = pf / 500.0                                      # all bright enough
    ap = fit_aperture_correction(x, y, pf, pe, af, ae, shape=SHAPE, config=ApCorrConfig(degree=2))
    assert ap.degree == 0


def test_no_usable_star_raises():
    x, y, pf, pe, af, ae = stars(n=20)
    with pytest.raises(ApCorrError, match="S/N"):
        fit_aperture_correction(x, y, pf, pf, af, ae, shape=SHAPE)       # S/N 1 everywhere
    with pytest.raises(ApCorrError):
        fit_aperture_correction(x, y, np.full(20, np.nan), pe, af, ae, shape=SHAPE)


def test_apply_and_round_trip():
    x, y, pf, pe, af, ae = stars()
    ap = fit_aperture_correction(x, y, pf, pe, af, ae, shape=SHAPE)
    flux, err = ap.apply(x, y, pf, pe)
    np.testing.assert_allclose(flux, pf * ap.evaluate(x, y))
    assert (err >= pe * ap.evaluate(x, y)).all()
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), ap.to_hdu()]).writeto(buf)
    buf.seek(0)
    with fits.open(buf) as hdul:
        back = ApCorrMap.from_hdu(hdul["APCORR"])
    np.testing.assert_array_equal(back.evaluate(x, y), ap.evaluate(x, y))
    assert (back.degree, back.n_stars) == (ap.degree, ap.n_stars)
    assert (back.error, back.scatter) == pytest.approx((ap.error, ap.scatter), rel=1e-12)   # header precision


def test_config_range_is_checked():
    with pytest.raises(ConfigError):
        ApCorrConfig.from_dict({"degree": 7})


def test_median_centre_resists_one_sided_contamination():
    """Faint neighbours add light to 40 % of the apertures (0-3 %): the median centring keeps the bias small."""
    x, y, pf, pe, af, ae = stars(n=400, seed=9, n_outliers=0)
    rng = np.random.default_rng(2)
    hit = rng.uniform(size=400) < 0.4
    af = af + hit * rng.uniform(0, 0.03, 400) * af
    gx, gy = np.meshgrid(np.linspace(0, SHAPE[1] - 1, 5), np.linspace(0, SHAPE[0] - 1, 9))
    bias = {}
    for centre in (False, True):
        ap = fit_aperture_correction(x, y, pf, pe, af, ae, shape=SHAPE, config=ApCorrConfig(median_center=centre))
        bias[centre] = np.mean(ap.evaluate(gx, gy) - true_ratio(gx, gy))
    print(f"mean apcorr bias with contamination: mean fit {bias[False]:+.4f}, median-centred {bias[True]:+.4f}")
    assert abs(bias[True]) < 0.6 * abs(bias[False])
    assert abs(bias[True]) < 3e-3


def test_aperture_loss_recovers_the_light_beyond_the_calibration_aperture():
    # Kolmogorov (x) obscured Airy stars, not truncated: about 1 % of the light lies beyond 4 FWHM
    import galsim

    from snakedrp.meas.apcorr import ApertureLossConfig, measure_aperture_loss

    rng = np.random.default_rng(3)
    shape, sky = (700, 700), 500.0
    psf = galsim.Convolve(galsim.Kolmogorov(fwhm=4.0), galsim.Airy(lam_over_diam=0.09, obscuration=0.28))
    image = galsim.ImageF(shape[1], shape[0], scale=1.0)
    xs, ys = np.meshgrid(np.arange(100, 650, 150.0), np.arange(100, 650, 150.0))
    xs, ys = xs.ravel() + rng.uniform(-0.5, 0.5, xs.size), ys.ravel() + rng.uniform(-0.5, 0.5, xs.size)
    flux = 10 ** rng.uniform(6.3, 6.8, xs.size)
    for x, y, f in zip(xs, ys, flux):
        psf.withFlux(f).drawImage(image=image, add_to_image=True, center=galsim.PositionD(x + 1, y + 1))
    model = image.array.astype(float)
    data = (model + rng.normal(size=shape) * np.sqrt(sky + model)).astype(np.float32)
    var = (sky + model).astype(np.float32)
    fwhm = psf.calculateFWHM()
    radius = np.full(xs.size, 4 * fwhm)
    yy, xx = np.indices(shape)
    calib = np.array([data[np.hypot(xx - x, yy - y) < r].sum() for x, y, r in zip(xs, ys, radius)])
    err = np.sqrt(np.pi * radius**2 * sky + calib)
    loss = measure_aperture_loss(data, var, np.zeros(shape, bool), None, np.arange(1, xs.size + 1), xs, ys,
                                 radius, calib, err, ApertureLossConfig(radius_max_pixels=60))
    true = np.median(flux / np.array([model[np.hypot(xx - x, yy - y) < r].sum()
                                      for x, y, r in zip(xs, ys, radius)]))
    assert loss.n_stars == xs.size
    assert true - 1 > 0.008                           # the light the aperture misses is real ...
    assert abs(loss.factor - true) < 0.003            # ... and measured to 3 mmag
    assert dict((k, v) for k, v, _ in loss.cards())["APLOSSN"] == xs.size


@pytest.mark.parametrize("seeing", [0.5, 1.5])
def test_aperture_loss_in_a_crowded_field_with_a_sky_offset(seeing):
    # Kolmogorov (x) obscured Airy at 0.168"/pixel; 36 bright stars among 300 faint neighbours, and
    # 0.5 e-/pixel the background left in (in a 4-FWHM aperture at 1.5": ~0.5 % of these stars)
    import galsim

    from snakedrp.meas.apcorr import ApertureLossConfig, measure_aperture_loss
    from snakedrp.meas.detect import detect_sources

    rng = np.random.default_rng(3)
    scale, shape, sky, pedestal = 0.168, (1000, 1000), 400.0, 0.5
    psf = galsim.Convolve(galsim.Kolmogorov(fwhm=seeing), galsim.Airy(lam_over_diam=0.0176, obscuration=0.28))
    fwhm = psf.calculateFWHM() / scale
    image = galsim.ImageF(shape[1], shape[0], scale=scale)
    gx, gy = np.meshgrid(np.arange(125.0, 900.0, 150.0), np.arange(125.0, 900.0, 150.0))
    n = gx.size                                                # 36: a CCD's curve of growth has 40-60
    xs, ys = gx.ravel() + rng.uniform(-0.5, 0.5, n), gy.ravel() + rng.uniform(-0.5, 0.5, n)
    flux = 10 ** rng.uniform(5.3, 5.8, n)
    fx, fy = rng.uniform(5, 995, 300), rng.uniform(5, 995, 300)
    far = np.min(np.hypot(fx[:, None] - xs[None], fy[:, None] - ys[None]), axis=1) > 1.5 * fwhm
    fx, fy = fx[far], fy[far]
    ff = 10 ** rng.uniform(3.0, 3.7, fx.size)                # r ~ 23-24 next to r ~ 18.5

    def draw(x, y, f, half):
        ix, iy = int(round(x)), int(round(y))
        b = galsim.BoundsI(ix - half + 1, ix + half + 1, iy - half + 1, iy + half + 1) & image.bounds
        psf.withFlux(f).drawImage(image=image[b], add_to_image=True, center=galsim.PositionD(x + 1, y + 1))

    for x, y, f in zip(xs, ys, flux):
        draw(x, y, f, 140)
    bright_model = image.array.astype(float).copy()
    for x, y, f in zip(fx, fy, ff):
        draw(x, y, f, 40)
    model = image.array.astype(float)
    var = (sky + model).astype(np.float32)
    data = (model + pedestal + rng.normal(size=shape) * np.sqrt(var)).astype(np.float32)
    det = detect_sources(data, var, np.zeros(shape, np.int32), psf_sigma=fwhm / 2.3548)
    ids = det.segmentation[np.round(ys).astype(int), np.round(xs).astype(int)]
    assert (ids > 0).all()
    radius = np.full(n, 4 * fwhm)
    yy, xx = np.indices(shape)
    inside = [np.hypot(xx - x, yy - y) < r for x, y, r in zip(xs, ys, radius)]
    own = [np.isin(det.segmentation, [0, i]) for i in ids]
    # calibration fluxes as measure gives them: the neighbours' footprints replaced by the star's model
    calib = np.array([np.where(o & c, data, 0).sum() + (bright_model * (c & ~o)).sum() for o, c in zip(own, inside)])
    err = np.sqrt(np.pi * radius**2 * sky + calib)
    loss = measure_aperture_loss(data, var, np.zeros(shape, bool), det.segmentation, ids, xs, ys, radius, calib, err,
                                 ApertureLossConfig(radius_max_pixels=140))
    true = np.median(flux / calib)                           # total flux / calibration-aperture flux
    beyond = np.median(flux / np.array([(bright_model * c).sum() for c in inside])) - 1
    print(f"seeing {seeing}\": light beyond 4 FWHM {100 * beyond:.2f} %, total/calib true {true:.4f}, "
          f"measured {loss.factor:.4f} (sky term {loss.sky:+.4f})")
    assert loss.n_stars >= 20 and fx.size > 200               # (annuli too full of footprints are left out)
    assert 0.005 < beyond < 0.02                             # the light the aperture misses is real ...
    assert abs(loss.factor - true) < 0.003                   # ... and, with the sky offset, measured to 3 mmag
    if seeing > 1:
        assert loss.sky < -0.002                             # the offset was seen


def test_crowded_field_calibration_ties_the_flux_scale_to_the_aperture_loss_stars():
    # A sky level left under every star (the zero level 1.5 e-/pixel below the sky, as the mean of
    # the sky pixels makes it when it holds bright stars' wings): a 4-FWHM calibration aperture
    # loses ~4 % of an S/N-100 star but 0.2 % of a bright one. The aperture loss fits that level
    # around its (bright) stars; the aperture correction's constant must come from the same stars,
    # or apcorr x aperture loss is the fainter stars' ratio, not any star's total / PSF flux.
    from snakedrp.meas.detect import detect_sources
    from snakedrp.meas.measure import measure_sources
    from snakedrp.repo.exposure import Exposure
    from snakedrp.repo.psf_model import GaussianPsf
    from snakedrp.single_frame.calibrate import CalibrateTask

    rng = np.random.default_rng(5)
    sigma, sky, pedestal = 2.0, 400.0, -1.5
    shape = (720, 840)
    yy, xx = np.indices(shape)
    gx, gy = np.meshgrid(np.arange(90.0, 800.0, 130.0), np.arange(90.0, 700.0, 130.0))
    bx, by = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size), gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    # three times as many S/N-100 stars between them
    fx = np.concatenate([(bx + 65.0)[:-6], bx + 65.0, bx])
    fy = np.concatenate([(by + 65.0)[:-6], by, by + 65.0])
    inside = (fx < shape[1] - 40) & (fy < shape[0] - 40)
    fx, fy = fx[inside], fy[inside]
    xs, ys = np.concatenate([bx, fx]), np.concatenate([by, fy])
    flux = np.concatenate([10 ** rng.uniform(6.0, 6.3, bx.size), 10 ** rng.uniform(4.6, 4.8, fx.size)])
    model = np.zeros(shape)
    for x, y, f in zip(xs, ys, flux):
        box = (slice(int(y) - 30, int(y) + 31), slice(int(x) - 30, int(x) + 31))
        model[box] += f * np.exp(-0.5 * ((xx[box] - x) ** 2 + (yy[box] - y) ** 2) / sigma**2) / (2 * np.pi * sigma**2)
    var = (sky + model).astype(np.float32)
    data = (model + pedestal + rng.normal(size=shape) * np.sqrt(var)).astype(np.float32)
    mask = np.zeros(shape, np.int32)
    psf = GaussianPsf(sigma)
    det = detect_sources(data, var, mask, psf_sigma=sigma)
    task = CalibrateTask()
    src = measure_sources(data, var, det.mask, det.sources, psf, task.config.measure,
                          segmentation=det.segmentation, footprints=det.sources)
    exposure = Exposure(image=data, mask=det.mask, variance=var, psf=psf)
    unit = ApCorrMap([1.0], 0, 419.5, 419.5, 359.5, 359.5)
    apcorr, loss = task._crowded_field_calibration(exposure, det, src, unit)
    im, it = match_nearest(src, xs, ys)
    snr = np.asarray(src["psf_snr"])[im]
    assert np.median(snr[it >= bx.size]) > 100 and (snr[it >= bx.size] < 250).all()
    assert loss.n_stars >= 20 and abs(loss.sky) > 0.001       # the local sky is there, and fitted
    total = (np.asarray(src["psf_flux"])[im] * apcorr.evaluate(np.asarray(src["x_centroid"])[im],
                                                               np.asarray(src["y_centroid"])[im]) * loss.factor)
    bright = it < bx.size
    bias = 2.5 * np.log10(np.median(total[bright] / flux[it[bright]])) * 1000
    print(f"bright-star PSF flux x apcorr x aperture loss vs truth: {bias:+.2f} mmag "
          f"(apcorr {apcorr.coeffs[0]:.4f}, aperture loss {loss.factor:.4f}, {loss.n_stars} stars)")
    assert abs(bias) < 2.0


def match_nearest(src, xs, ys, radius=1.0):
    """(src rows, truth rows) of the truth positions with a source within ``radius`` pixels."""
    from scipy.spatial import cKDTree

    d, i = cKDTree(np.c_[src["x_centroid"], src["y_centroid"]]).query(np.c_[xs, ys])
    ok = d < radius
    return i[ok], np.flatnonzero(ok)
