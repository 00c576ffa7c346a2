"""Background: recovery of a smooth sky under stars, agreement with sep, the calexpBackground product."""
import galsim
import numpy as np
import pytest
import sep
from astropy.io import fits

from snakedrp.meas.background import Background, BackgroundConfig, estimate_background, subtract_background
from snakedrp.repo.exposure import mask_bit

SIGMA_PSF = 1.8


def _sky(shape):
    """A smooth sky: a gradient of +-60 e- over the image and a gentle wave [e-/pixel]."""
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(float)
    return 800.0 + 0.06 * (xx - nx / 2) + 0.03 * (yy - ny / 2) + 15.0 * np.sin(yy / 300.0)


@pytest.fixture(scope="module")
def field():
    """1024 x 1536 sky with 300 Gaussian stars (GalSim), Poisson-like noise, true star footprints."""
    rng = np.random.default_rng(11)
    shape = (1536, 1024)
    sky = _sky(shape)
    image = galsim.ImageF(shape[1], shape[0], scale=1.0)
    n = 300
    x = rng.uniform(10, shape[1] - 10, n)
    y = rng.uniform(10, shape[0] - 10, n)
    flux = np.exp(rng.uniform(np.log(2e3), np.log(3e5), n))
    psf = galsim.Gaussian(sigma=SIGMA_PSF)
    for xi, yi, fi in zip(x, y, flux):
        ix, iy = int(round(xi)), int(round(yi))
        bounds = galsim.BoundsI(ix - 12 + 1, ix + 12 + 1, iy - 12 + 1, iy + 12 + 1) & image.bounds
        psf.withFlux(fi).drawImage(image=image[bounds], add_to_image=True,
                                   center=galsim.PositionD(xi + 1, yi + 1))
    stars = image.array.astype(float)
    noisy = sky + stars + rng.normal(size=shape) * np.sqrt(sky + stars)
    # the footprints a detection pass would mark: stars brighter than 1 e-/pixel, grown
    detected = stars > 1.0
    return noisy.astype(np.float32), sky, detected


def test_recovers_gradient_under_stars(field):
    image, sky, detected = field
    mask = np.where(detected, mask_bit("DETECTED"), 0).astype(np.int32)
    bkg = estimate_background(image, mask, BackgroundConfig(box_size=128))
    resid = bkg.evaluate() - sky
    noise = np.sqrt(sky.mean())
    # the mesh averages 128^2 pixels: its noise is ~noise/128 ~ 0.2 e-; the spline adds a little
    # curvature error on the wave, and the edges extrapolate half a box
    inner = resid[64:-64, 64:-64]
    assert abs(inner.mean()) < 0.02 * noise
    assert np.sqrt((inner**2).mean()) < 0.05 * noise
    assert np.abs(resid).max() < 0.15 * noise
    assert bkg.global_rms == pytest.approx(noise, rel=0.05)
    assert np.median(bkg.rms()) == pytest.approx(noise, rel=0.05)


def test_stars_unmasked_bias_is_small(field):
    # without DETECTED the histogram mode still resists the stars (clipped mode, median filter)
    image, sky, _ = field
    bkg = estimate_background(image, None, BackgroundConfig(box_size=128))
    resid = (bkg.evaluate() - sky)[64:-64, 64:-64]
    assert abs(resid.mean()) < 0.03 * np.sqrt(sky.mean())


def test_masked_planes_are_ignored(field):
    image, sky, detected = field
    image = image.copy()
    mask = np.where(detected, mask_bit("DETECTED"), 0).astype(np.int32)
    image[300:340, :] = 60000.0                  # a saturated bleed across the CCD
    mask[300:340, :] |= mask_bit("SAT")
    image[:, 500] = -5000.0                      # a bad column
    mask[:, 500] |= mask_bit("BAD")
    image[1000, 700] = np.nan
    resid = estimate_background(image, mask).evaluate() - sky
    assert np.sqrt((resid[64:-64, 64:-64] ** 2).mean()) < 0.05 * np.sqrt(sky.mean())
    # the same defects, not masked, do pull the background
    resid_unmasked = estimate_background(np.nan_to_num(image), np.zeros_like(mask)).evaluate() - sky
    assert np.abs(resid_unmasked).max() > 5 * np.abs(resid[64:-64, 64:-64]).max()


def test_ignored_pixels_as_sep_mask(field):
    # ignored pixels go to sep as NaN in a copy, not as a mask: the same background as sep's mask gives
    image, _, detected = field
    image = image.copy()
    mask = np.where(detected, mask_bit("DETECTED"), 0).astype(np.int32)
    mask[:, 500] |= mask_bit("BAD")
    image[:, 500] = -5000.0
    image[1000, 700] = np.inf
    before = image.copy()
    bkg = estimate_background(image, mask)
    np.testing.assert_array_equal(image, before)                  # the input is not modified
    ref = sep.Background(image, mask=(mask != 0) | ~np.isfinite(image), bw=128, bh=128, fw=3, fh=3)
    assert np.abs(bkg.evaluate() - ref.back()).max() < 1e-5 * np.abs(ref.back()).max()
    assert np.abs(bkg.rms() - ref.rms()).max() < 1e-4 * ref.rms().max()
    assert bkg.global_background == ref.globalback and bkg.global_rms == ref.globalrms


def test_subsampled_mesh_is_the_same_mesh_twice_as_noisy(field):
    image, sky, detected = field
    mask = np.where(detected, mask_bit("DETECTED"), 0).astype(np.int32)
    config = BackgroundConfig(box_size=128)
    full = estimate_background(image, mask, config)
    half = estimate_background(image, mask, config, subsample=2)
    assert half.mesh.shape == full.mesh.shape and half.shape == full.shape and half.box_size == 128
    noise = np.sqrt(sky.mean())
    resid = (half.evaluate() - sky)[64:-64, 64:-64]
    # a quarter of the pixels: the mesh noise doubles, still far below the pixel noise
    assert abs(resid.mean()) < 0.04 * noise
    assert np.sqrt((resid**2).mean()) < 0.1 * noise
    assert np.abs(half.mesh - full.mesh).max() < 0.1 * noise
    assert half.rms().shape == image.shape
    with pytest.raises(ValueError, match="not a multiple"):
        estimate_background(image, mask, BackgroundConfig(box_size=100), subsample=3)


def test_first_evaluation_is_handed_over(field):
    # estimate_background evaluates the model once; evaluate() hands that array over, then evaluates anew
    image, _, _ = field
    bkg = estimate_background(image)
    first, second = bkg.evaluate(), bkg.evaluate()
    assert first is not second
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("shape, box", [((1536, 1024), 128), ((300, 401), 64), ((129, 257), 32), ((50, 70), 128)])
def test_evaluation_equals_sep(shape, box):
    # the mesh read back from sep's map, re-evaluated in numpy, is sep's own background to float32 precision
    rng = np.random.default_rng(3)
    image = (_sky(shape) + rng.normal(0, 25, shape)).astype(np.float32)
    bkg = estimate_background(image, None, BackgroundConfig(box_size=box))
    ref = sep.Background(image, bw=box, bh=box, fw=3, fh=3)
    assert np.abs(bkg.evaluate() - ref.back()).max() < 1e-5 * np.abs(ref.back()).max()
    assert np.abs(bkg.rms() - ref.rms()).max() < 1e-4 * ref.rms().max()
    assert bkg.mesh.shape == ((shape[0] - 1) // box + 1, (shape[1] - 1) // box + 1)


def test_calexp_background_round_trip(field, tmp_path):
    image, _, _ = field
    config = BackgroundConfig(box_size=256, filter_size=5, ignored_mask_planes=["BAD", "SAT"])
    bkg = estimate_background(image, np.zeros(image.shape, np.int32), config)
    path = tmp_path / "calexpBackground.fits"
    bkg.to_hdulist().writeto(path)
    with fits.open(path) as hdul:
        back = Background.from_hdulist(hdul)
    assert back.config == config
    assert back.shape == image.shape
    np.testing.assert_array_equal(back.evaluate(), bkg.evaluate())
    np.testing.assert_array_equal(back.rms(), bkg.rms())


def test_subtract_background(field):
    image, sky, _ = field
    bkg = estimate_background(image)
    out = subtract_background(image, bkg)
    assert out is not image and out.dtype == np.float32
    np.testing.assert_allclose(out, image - bkg.evaluate(), atol=1e-3)
    work = image.copy()
    assert subtract_background(work, bkg, in_place=True) is work
    with pytest.raises(ValueError, match="covers"):
        subtract_background(image[:100], bkg)


def test_config_rejects_unknown_plane_and_even_filter():
    with pytest.raises(ValueError, match="unknown mask plane"):
        BackgroundConfig(ignored_mask_planes=["BAD", "NOPE"]).validate()
    with pytest.raises(ValueError, match="odd"):
        BackgroundConfig(filter_size=4).validate()


def test_sky_mean_level_far_from_the_footprints_leaves_the_wings_out():
    # bright Moffat stars (beta 3.5) whose wings reach far beyond their footprints, on a sky with
    # 0.3 e-/pixel of undetected light: the mean of every sky pixel is mostly wing light, which is
    # light of those stars (and no background of an isolated star); the pixels 2 FWHM beyond the
    # footprints hold the undetected light alone (the wings there ~0.1 e-/pixel)
    from snakedrp.meas.background import sky_mean_level

    rng = np.random.default_rng(11)
    shape, fwhm, beta, pedestal = (600, 600), 6.0, 3.5, 0.3
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    yy, xx = np.indices(shape)
    gx, gy = np.meshgrid(np.arange(75.0, 600.0, 150.0), np.arange(75.0, 600.0, 150.0))
    light = np.zeros(shape)
    footprint = np.zeros(shape, bool)
    for x, y in zip(gx.ravel(), gy.ravel()):
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        light += 3e6 * (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** -beta
        footprint |= r2 < 15.0**2
    var = np.full(shape, 400.0, np.float32)
    image = (light + pedestal + rng.normal(0.0, 20.0, shape)).astype(np.float32)
    mask = np.where(footprint, mask_bit("DETECTED"), 0).astype(np.int32)
    everywhere = sky_mean_level(image, var, mask, ["BAD"])
    far = sky_mean_level(image, var, mask, ["BAD"], footprints=footprint, exclude_radius=int(2 * fwhm))
    print(f"sky mean level: all sky pixels {everywhere:.3f}, 2 FWHM beyond the footprints {far:.3f} "
          f"(undetected light {pedestal})")
    assert everywhere > pedestal + 0.5
    assert abs(far - pedestal) < 0.15
    assert sky_mean_level(image, var, mask, ["BAD"], footprints=footprint, exclude_radius=600) == 0.0


@pytest.mark.parametrize("radius, step", [(0, 1), (3, 1), (5, 3), (16, 4), (700, 2)])
def test_grown_rows_are_the_sampled_rows_of_the_grown_mask(radius, step):
    from snakedrp.meas.background import _grown_rows
    from snakedrp.meas.detect import grow_mask

    mask = np.random.default_rng(3).random((301, 203)) > 0.999
    mask[0, 0] = mask[-1, -1] = True                       # footprints on the edges
    assert np.array_equal(_grown_rows(mask, radius, step), grow_mask(mask, radius)[::step])
