"""Detection: completeness at S/N 10, false positives in noise, mask bits, deblending, positions."""
import galsim
import numpy as np
import pytest
from scipy.spatial import cKDTree

from snakedrp.meas.detect import DETECTION_FLAGS, DetectionConfig, detect_sources, detection_kernel, estimate_psf_sigma
from snakedrp.repo.exposure import mask_bit

SIGMA_PSF = 1.8
SKY = 900.0                                         # sky variance [e-^2], sky already subtracted


def _draw_stars(shape, x, y, flux, rng, sigma=SIGMA_PSF):
    """Background-subtracted image of Gaussian stars (GalSim, pixel-integrated) with sky + Poisson noise."""
    image = galsim.ImageF(shape[1], shape[0], scale=1.0)
    psf = galsim.Gaussian(sigma=sigma)
    half = int(np.ceil(6 * sigma))
    for xi, yi, fi in zip(x, y, flux):
        ix, iy = int(round(xi)), int(round(yi))
        bounds = galsim.BoundsI(ix - half + 1, ix + half + 1, iy - half + 1, iy + half + 1) & image.bounds
        # zero-based x is GalSim x + 1; center= avoids the half-pixel trap of offset + setCenter
        psf.withFlux(fi).drawImage(image=image[bounds], add_to_image=True, center=galsim.PositionD(xi + 1, yi + 1))
    model = image.array.astype(float)
    variance = SKY + model
    noisy = model + rng.normal(size=shape) * np.sqrt(variance)
    return noisy.astype(np.float32), variance.astype(np.float32)


def _grid_positions(shape, spacing, rng, margin=20):
    ny, nx = shape
    gx, gy = np.meshgrid(np.arange(margin, nx - margin, spacing), np.arange(margin, ny - margin, spacing))
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size)
    return x.astype(float), y.astype(float)


def _snr_to_flux(snr, sigma=SIGMA_PSF):
    """Total flux giving PSF-optimal S/N = F / sqrt(F + 4 pi sigma^2 sky)."""
    b = 4 * np.pi * sigma**2 * SKY
    return 0.5 * (snr**2 + np.sqrt(snr**4 + 4 * snr**2 * b))


@pytest.fixture(scope="module")
def faint_field():
    """Isolated stars at S/N 10 on a grid (40 px apart) plus bright stars, 1024 x 2048."""
    rng = np.random.default_rng(5)
    shape = (2048, 1024)
    x, y = _grid_positions(shape, 40, rng)
    snr = np.where(rng.uniform(size=x.size) < 0.8, 10.0, np.exp(rng.uniform(np.log(50), np.log(2000), x.size)))
    flux = _snr_to_flux(snr)
    image, variance = _draw_stars(shape, x, y, flux, rng)
    return image, variance, x, y, snr


@pytest.fixture(scope="module")
def detected(faint_field):
    image, variance, *_ = faint_field
    mask = np.zeros(image.shape, np.int32)
    return detect_sources(image, variance, mask, DetectionConfig(), psf_sigma=SIGMA_PSF), mask


def _match(sources, x, y, radius=1.5):
    dist, idx = cKDTree(np.column_stack([sources["x"], sources["y"]])).query(np.column_stack([x, y]))
    return dist < radius, idx


def test_completeness_at_snr_10(detected, faint_field):
    result, _ = detected
    _, _, x, y, snr = faint_field
    found, _ = _match(result.sources, x, y)
    faint = snr == 10.0
    assert faint.sum() > 800
    # matched filter of 5x5 pixels keeps ~95 % of the optimal S/N: a S/N-10 star peaks near 9.5 sigma
    assert found[faint].mean() >= 0.97
    assert found[~faint].all()
    # every detection is a star: nothing spurious at 5 sigma
    assert len(result.sources) == found.sum()


def test_false_positives_in_pure_noise():
    rng = np.random.default_rng(8)
    shape = (2048, 1024)                              # 2 Mpix
    image = (rng.normal(size=shape) * np.sqrt(SKY)).astype(np.float32)
    variance = np.full(shape, SKY, np.float32)
    result = detect_sources(image, variance, np.zeros(shape, np.int32), psf_sigma=SIGMA_PSF)
    assert len(result.sources) <= 1                    # expected ~0.02 per Mpix for a Gaussian field
    # the threshold is the filtered S/N: at 3.5 sigma noise peaks do come through, as they should
    low = detect_sources(image, variance, np.zeros(shape, np.int32), DetectionConfig(threshold=3.5),
                         psf_sigma=SIGMA_PSF)
    assert len(low.sources) > 5


def test_detected_mask_bits(detected, faint_field):
    result, mask_in = detected
    _, _, x, y, _ = faint_field
    det = mask_bit("DETECTED")
    assert (mask_in == 0).all()                        # the input mask is not modified
    found, idx = _match(result.sources, x, y)
    ix, iy = np.round(x[found]).astype(int), np.round(y[found]).astype(int)
    assert ((result.mask[iy, ix] & det) != 0).all()
    # footprints, grown by `grow`, are the only DETECTED pixels
    seg = result.segmentation > 0
    assert ((result.mask[seg] & det) != 0).all()
    assert ((result.mask & det) != 0).sum() > seg.sum()
    assert ((result.mask & det) != 0).mean() < 0.15
    # a second detection replaces, rather than accumulates, the DETECTED plane
    again = detect_sources(np.zeros_like(result.mask, np.float32), np.full(result.mask.shape, SKY, np.float32),
                           result.mask)
    assert len(again.sources) == 0 and not ((again.mask & det) != 0).any()


def test_segmentation_and_ids(detected):
    result, _ = detected
    s = result.sources
    np.testing.assert_array_equal(s["id"], np.arange(1, len(s) + 1))
    ix = np.round(s["x"]).astype(int)
    iy = np.round(s["y"]).astype(int)
    assert (result.segmentation[iy, ix] == s["id"]).mean() > 0.99
    assert set(np.unique(result.segmentation)) == set([0]) | set(s["id"])
    np.testing.assert_array_equal(np.bincount(result.segmentation.ravel())[1:] >= s["npix"], True)


def test_windowed_positions_unbiased(detected, faint_field):
    # the half-pixel trap: mean offset must be ~0, and bright-star scatter near sqrt(2) sigma / S/N
    result, _ = detected
    _, _, x, y, snr = faint_field
    found, idx = _match(result.sources, x, y)
    bright = found & (snr > 50)
    dx = result.sources["x"][idx[bright]] - x[bright]
    dy = result.sources["y"][idx[bright]] - y[bright]
    assert abs(dx.mean()) < 0.01 and abs(dy.mean()) < 0.01
    expected = np.sqrt(2) * SIGMA_PSF / snr[bright]
    assert np.sqrt(np.mean((dx / expected) ** 2)) < 1.3
    assert (result.sources["flags"] & DETECTION_FLAGS["window_failed"] == 0).mean() > 0.99


def test_deblends_close_pair():
    rng = np.random.default_rng(2)
    shape = (128, 128)
    x = np.array([60.0, 67.5, 30.0])
    y = np.array([64.0, 65.0, 30.0])
    image, variance = _draw_stars(shape, x, y, np.array([4e4, 2e4, 1e4]), rng)
    result = detect_sources(image, variance, np.zeros(shape, np.int32), psf_sigma=SIGMA_PSF)
    s = result.sources
    found, idx = _match(s, x, y, radius=1.0)
    assert found.all() and len(s) == 3
    pair, single = s[idx[:2]], s[idx[2]]
    assert pair["parent"][0] == pair["parent"][1] > len(s)
    assert (pair["blend_nchild"] == 2).all() and pair["is_blended"].all()
    assert single["parent"] == 0 and single["blend_nchild"] == 1 and not single["is_blended"]
    assert (pair["flags"] & DETECTION_FLAGS["merged"] != 0).all()
    # no deblending: one parent only
    merged = detect_sources(image, variance, np.zeros(shape, np.int32), DetectionConfig(deblend_cont=1.0),
                            psf_sigma=SIGMA_PSF)
    assert len(merged.sources) == 2


def test_bad_pixels_and_negative_detection():
    rng = np.random.default_rng(4)
    shape = (256, 256)
    image, variance = _draw_stars(shape, np.array([100.0]), np.array([100.0]), np.array([3e4]), rng)
    mask = np.zeros(shape, np.int32)
    image[:, 200] = 5e4                                # a hot column, masked BAD
    mask[:, 200] |= mask_bit("BAD")
    image[40:44, 40:44] -= 3000.0                      # a negative blob (e.g. an over-subtracted ghost)
    result = detect_sources(image, variance, mask, DetectionConfig(detect_negative=True), psf_sigma=SIGMA_PSF)
    assert len(result.sources) == 1
    assert abs(result.sources["x"][0] - 100) < 0.1
    assert result.n_negative == 1
    assert (result.mask[41, 41] & mask_bit("DETECTED_NEGATIVE")) != 0
    assert (result.mask[100, 100] & mask_bit("DETECTED_NEGATIVE")) == 0
    assert ((result.mask[:, 200] & mask_bit("BAD")) != 0).all()


def test_columns_have_units_and_descriptions(detected):
    result, _ = detected
    for name in result.sources.colnames:
        col = result.sources[name]
        assert col.unit is not None, name
        assert col.description and len(col.description) > 10, name


def test_config_validation():
    with pytest.raises(ValueError, match="odd"):
        DetectionConfig(filter_size=4).validate()
    with pytest.raises(ValueError, match="unknown mask plane"):
        DetectionConfig(bad_mask_planes=["WHAT"]).validate()


def test_detection_snr_is_the_matched_filter_snr(faint_field, detected):
    _, _, x, y, snr = faint_field
    result, _ = detected
    found, idx = _match(result.sources, x, y, radius=1.5)
    faint = found & (snr == 10.0)
    measured = np.asarray(result.sources["detection_snr"])[idx[faint]]
    # a 5x5 matched filter keeps most of a Gaussian PSF's optimal S/N; noise scatters it by ~1
    assert 7.0 < np.median(measured) < 10.5
    assert (measured >= DetectionConfig().threshold * 0.99).all()
    # the footprint boxes hold their footprints
    s = result.sources
    for k in range(0, len(s), 97):
        yy, xx = np.nonzero(result.segmentation == s["id"][k])
        assert (xx.min(), xx.max(), yy.min(), yy.max()) == (s["x_min"][k], s["x_max"][k], s["y_min"][k], s["y_max"][k])


def test_cosmic_ray_detections_are_dropped_after_repair():
    rng = np.random.default_rng(7)
    shape = (160, 160)
    x = np.array([40.0, 100.0, 120.0])
    y = np.array([40.0, 60.0, 130.0])
    image, variance = _draw_stars(shape, x, y, np.array([3e4, 8e3, 2e4]), rng)
    clean = image.copy()
    # a cosmic-ray track in empty sky, and a hit on the core of the star at (100, 60)
    track = (np.array([90, 91, 92, 93]), np.array([20, 21, 22, 23]))
    image[track] += 3000.0
    core = (np.array([60]), np.array([100]))
    image[core] += 2e4
    mask = np.zeros(shape, np.int32)
    before = detect_sources(image, variance, mask, psf_sigma=SIGMA_PSF)
    assert len(before.sources) == 4
    # what repair leaves: the hit pixels flagged CR and restored (here from the noise-only image)
    repaired = image.copy()
    cr_mask = before.mask.copy()
    for rows, cols in (track, core):
        repaired[rows, cols] = clean[rows, cols]
        cr_mask[rows, cols] |= mask_bit("CR")
    from snakedrp.meas.detect import remove_cosmic_ray_detections

    after = remove_cosmic_ray_detections(before, repaired, variance, cr_mask, psf_sigma=SIGMA_PSF)
    assert len(after.sources) == 3
    found, _ = _match(after.sources, x, y, radius=1.0)
    assert found.all()
    dropped = sorted(set(before.sources["id"]) - set(after.sources["id"]))
    assert len(dropped) == 1 and not (after.segmentation == dropped[0]).any()
    # kept ids still name their footprints
    for sid, sx, sy in zip(after.sources["id"], after.sources["x"], after.sources["y"]):
        assert after.segmentation[int(round(sy)), int(round(sx))] == sid
    # without the CR plane nothing is a cosmic ray
    assert len(remove_cosmic_ray_detections(before, repaired, variance, before.mask,
                                            psf_sigma=SIGMA_PSF).sources) == 4


@pytest.mark.parametrize("sigma", [1.3, 2.5, 4.0])
def test_psf_width_estimate_follows_the_seeing(sigma):
    # bright stars of one size, plus single-pixel hits (cosmic rays) that must not drag it down
    rng = np.random.default_rng(11)
    shape = (400, 400)
    x, y = rng.uniform(30, 370, 40), rng.uniform(30, 370, 40)
    image, variance = _draw_stars(shape, x, y, 10 ** rng.uniform(4.5, 5.5, 40), rng, sigma=sigma)
    hits = rng.integers(5, 395, (10, 2))
    image[hits[:, 0], hits[:, 1]] += 5000.0
    est = estimate_psf_sigma(image, variance, np.zeros(shape, np.int32), fallback=1.9)
    assert est.n_locus >= 5
    assert abs(est.sigma / np.hypot(sigma, 1 / np.sqrt(12)) - 1) < 0.05


def test_psf_width_estimate_of_a_sparse_field_is_not_taken_by_cosmic_ray_tracks():
    # a high-latitude CCD in poor seeing: a few stars, most with peaks below S/N 30, and many
    # more cosmic-ray tracks, whose flat tops hold several local maxima each
    rng = np.random.default_rng(5)
    shape = (600, 600)
    sigma = 3.5
    x, y = rng.uniform(40, 560, 12), rng.uniform(40, 560, 12)
    image, variance = _draw_stars(shape, x, y, 10 ** rng.uniform(4.3, 5.3, 12), rng, sigma=sigma)
    for _ in range(40):
        r0, c0 = rng.integers(30, 570, 2)
        length, (dr, dc) = rng.integers(4, 12), [(0, 1), (1, 0), (1, 1), (1, -1)][rng.integers(4)]
        image[r0 + dr * np.arange(length), c0 + dc * np.arange(length)] += 3000.0
    est = estimate_psf_sigma(image, variance, np.zeros(shape, np.int32), fallback=1.9)
    assert est.n_locus >= 3      # the densest third of the ~9 stars with a peak above S/N 10
    assert abs(est.sigma / np.hypot(sigma, 1 / np.sqrt(12)) - 1) < 0.05


def test_psf_scaled_filter_side():
    config = DetectionConfig()
    assert detection_kernel(1.8, config).shape == (5, 5)
    assert detection_kernel(4.2, config).shape == (11, 11)
    assert detection_kernel(40.0, config).shape == (config.filter_size_max,) * 2
    assert detection_kernel(4.2, DetectionConfig(filter_size=7)).shape == (7, 7)
    assert detection_kernel(4.2, DetectionConfig(filter_size=0)) is None


def test_faint_star_in_a_bright_stars_wing_is_found_on_the_psf_subtracted_image():
    # a S/N-15 star 2 FWHM from a star 1000 times brighter: sep keeps it inside the bright footprint
    from snakedrp.meas.detect import ResidualDetectionConfig, detect_in_residual
    from snakedrp.meas.psf_flux import psf_model_image
    from snakedrp.repo.psf_model import GaussianPsf

    rng = np.random.default_rng(11)
    shape = (160, 160)
    faint = _snr_to_flux(15.0)
    x = np.array([80.0, 80.0 + 2 * 2.3548 * SIGMA_PSF, 30.0])
    y = np.array([80.0, 80.3, 130.0])
    flux = np.array([1000 * faint, faint, 300 * faint])       # the third: a bright star alone
    image, var = _draw_stars(shape, x, y, flux, rng)
    mask = np.zeros(shape, np.int32)
    det = detect_sources(image, var, mask, psf_sigma=SIGMA_PSF)
    near = lambda t, k: np.hypot(np.asarray(t["x"]) - x[k], np.asarray(t["y"]) - y[k]) < 1.5
    assert not near(det.sources, 1).any()                      # the first pass misses it
    bright = [int(np.argmin(np.hypot(det.sources["x"] - x[k], det.sources["y"] - y[k]))) for k in (0, 2)]
    # the models of the two bright stars, 1 % too bright (a PSF model is never exact)
    model = psf_model_image(GaussianPsf(SIGMA_PSF), shape, x[[0, 2]], y[[0, 2]], 1.01 * flux[[0, 2]])
    found, rows = detect_in_residual(image - model, var, mask, model, det, det.sources["id"][bright],
                                     psf_sigma=SIGMA_PSF)
    new = found.sources[rows]
    assert len(new) == 1 and near(new, 1).all()                # the hidden star, and no peak on the lone one
    assert found.sources.meta["NRESID"][0] == 1
    # it is a child of the bright star's footprint and owns its peak pixel
    owner = found.sources[bright[0]]
    assert new["parent"][0] == owner["parent"] > len(found.sources)
    assert found.segmentation[int(new["y_peak"][0]), int(new["x_peak"][0])] == new["id"][0]
    assert (found.mask[found.segmentation == new["id"][0]] & mask_bit("DETECTED")).all()
    # without the neighbour's model nothing new is found: a peak must sit in a subtracted footprint
    _, none = detect_in_residual(image - model, var, mask, model, det, det.sources["id"][[bright[1]]],
                                 psf_sigma=SIGMA_PSF)
    assert len(none) == 0
    # with a 10 % model error the residual core is not a detection either
    off = psf_model_image(GaussianPsf(SIGMA_PSF), shape, x[[0, 2]], y[[0, 2]], 0.9 * flux[[0, 2]])
    found, rows = detect_in_residual(image - off, var, mask, off, det, det.sources["id"][bright], psf_sigma=SIGMA_PSF,
                                     residual_config=ResidualDetectionConfig(model_error=0.1))
    assert all(np.hypot(found.sources["x"][r] - x[[0, 2]], found.sources["y"][r] - y[[0, 2]]).min() > 3 for r in rows)


def test_residual_detection_in_windows_finds_what_the_whole_image_does():
    # faint stars in the wings of bright ones, one near the image edge and one hidden star whose
    # residual footprint is wide: the windows around the subtracted footprints (grown where a
    # footprint of theirs reaches an inner edge) find the same sources as one extraction of the image
    from snakedrp.meas.detect import detect_in_residual
    from snakedrp.meas.psf_flux import psf_model_image
    from snakedrp.repo.psf_model import GaussianPsf

    rng = np.random.default_rng(5)
    shape = (200, 240)
    faint = _snr_to_flux(15.0)
    d = 2 * 2.3548 * SIGMA_PSF
    bx = np.array([60.0, 170.0, 6.0, 120.0])
    by = np.array([50.0, 140.0, 100.0, 185.0])
    x = np.concatenate([bx, bx + d, [bx[1] - 0.7 * d]])
    y = np.concatenate([by, by + 0.4, [by[1] - 0.8 * d]])
    flux = np.concatenate([1000 * faint * np.ones(4), faint * np.array([1.0, 1.5, 1.2, 2.0]), [3 * faint]])
    image, var = _draw_stars(shape, x, y, flux, rng)
    mask = np.zeros(shape, np.int32)
    det = detect_sources(image, var, mask, psf_sigma=SIGMA_PSF)
    bright = [int(np.argmin(np.hypot(det.sources["x"] - bx[k], det.sources["y"] - by[k]))) for k in range(4)]
    model = psf_model_image(GaussianPsf(SIGMA_PSF), shape, bx, by, 1.01 * flux[:4])
    ids = det.sources["id"][bright]
    whole, rows_whole = detect_in_residual(image - model, var, mask, model, det, ids, psf_sigma=SIGMA_PSF,
                                           windowed=False)
    found, rows = detect_in_residual(image - model, var, mask, model, det, ids, psf_sigma=SIGMA_PSF)
    assert len(rows) >= 4 and np.array_equal(rows, rows_whole)
    for name in whole.sources.colnames:
        a, b = np.asarray(whole.sources[name]), np.asarray(found.sources[name])
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-9, err_msg=name)
        else:
            assert np.array_equal(a, b), name
    assert np.array_equal(found.segmentation, whole.segmentation)
    assert np.array_equal(found.mask, whole.mask)


def test_residual_window_grows_until_the_footprint_fits():
    # a wide, bright blob (sigma 6 px) claimed by a 5-pixel footprint box: its residual footprint
    # leaves the first window, which is grown until the blob's object is the whole-image one
    from snakedrp.meas.config import ResidualDetectionConfig
    from snakedrp.meas.detect import _extract_in_windows

    rng = np.random.default_rng(2)
    shape = (180, 200)
    image, var = _draw_stars(shape, [90.0, 30.0], [80.0, 150.0], [3e6, 2e4], rng, sigma=6.0)
    mask = np.zeros(shape, np.int32)
    seg = np.zeros(shape, np.int32)
    seg[78:83, 88:93] = 1
    config, rcfg = DetectionConfig(), ResidualDetectionConfig()
    kernel = detection_kernel(SIGMA_PSF, config)
    args = (image, var, mask, np.zeros(shape, np.float32))
    whole = _extract_in_windows(*args, np.array([[0, 180, 0, 200]]), None, seg, config, rcfg, kernel, winpos_reach=13)
    mine = seg[whole[0]["ycpeak"], whole[0]["xcpeak"]] == 1
    assert mine.sum() == 1 and whole[0]["npix"][mine][0] > (5 + 2 * (2 + 1 + 13)) ** 2  # more than the first window
    found = _extract_in_windows(*args, np.array([[78, 83, 88, 93]]), [1], seg, config, rcfg, kernel, winpos_reach=13)
    objects, rseg = found[0], found[3]
    assert len(objects) == 1 and rseg[0].shape != shape                   # grown, not the whole image
    for name in ("npix", "x", "y", "flux", "a", "b", "theta", "xmin", "xmax", "ymin", "ymax", "xcpeak", "ycpeak"):
        np.testing.assert_allclose(objects[name][0], whole[0][name][mine][0], rtol=1e-12, err_msg=name)
