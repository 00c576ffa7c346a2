"""The coadd validation measures each star with the coadd PSF that covers it (snakedrp.validate.coadd).

A synthetic coadd of two inputs with the same WCS as the coadd: a narrow Gaussian input over
the whole image and a wide one over its left part only, so that the coadd PSF is the narrow
one on the right (where the patch centre is) and a 50/50 mix on the left, as a patch of a
0.5" visit and a 1.3" one.
"""
from dataclasses import replace

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from snakedrp.coadd.coadd_psf import CoaddPsf, CoaddPsfInput
from snakedrp.repo.exposure import Exposure, mask_bit
from snakedrp.repo.psf_model import GaussianPsf
from snakedrp.validate.coadd import (PsfMixes, clipped_stars_figure, measured, measured_depth, star_measurements,
                                    star_metrics)
from snakedrp.validate.config import CoaddValidateConfig

NY, NX = 360, 720
SPLIT = 340          # the wide input covers x < SPLIT [pixel]
ZEROPOINT = 30.0
MAG = 19.0
SIGMA_NARROW, SIGMA_WIDE = 1.2, 4.0   # [pixel]
MIXED_XY = [(x, y) for y in (90, 180) for x in (90, 150, 210, 270)]
NARROW_XY = [(x, y) for y in (90, 180, 270) for x in (420, 480, 540, 600, 660)]


def _wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [NX / 2, NY / 2]
    wcs.wcs.cd = np.array([[-0.168, 0.0], [0.0, 0.168]]) / 3600
    return wcs


def _box(x1):
    return np.array([[-0.5, -0.5], [x1 - 0.5, -0.5], [x1 - 0.5, NY - 0.5], [-0.5, NY - 0.5]])


@pytest.fixture(scope="module")
def coadd():
    wcs = _wcs()
    # a Gaussian has no light beyond 4 FWHM (9.4 sigma) to speak of: no wing beyond the calibration aperture
    psf = CoaddPsf(wcs, [CoaddPsfInput(1, 0, 1.0, GaussianPsf(SIGMA_NARROW, 61), wcs, _box(NX), 0.0),
                         CoaddPsfInput(2, 0, 1.0, GaussianPsf(SIGMA_WIDE, 61), wcs, _box(SPLIT), 0.0)])
    rng = np.random.default_rng(3)
    noise = 0.5
    image = rng.normal(0.0, noise, (NY, NX))
    flux = 10 ** (-0.4 * (MAG - ZEROPOINT))
    # stars off the pixel centres, drawn with the coadd PSF model itself: the model is exact
    xy = np.array(MIXED_XY + NARROW_XY, float) + rng.uniform(-0.5, 0.5, (len(MIXED_XY) + len(NARROW_XY), 2))
    for x, y in xy:
        stamp, x0, y0 = psf.draw(x, y)
        n = stamp.shape[0]
        image[y0:y0 + n, x0:x0 + n] += flux * stamp
    calexp = Exposure(image.astype(np.float32), np.zeros((NY, NX), np.int32),
                      np.full((NY, NX), noise**2, np.float32), wcs=wcs, psf=psf, zeropoint=ZEROPOINT)
    ra, dec = wcs.all_pix2world(xy[:, 0], xy[:, 1], 0)
    objects = Table(dict(ra=ra, dec=dec, type=["star"] * len(xy), mag_r=np.full(len(xy), MAG)))
    return calexp, objects, xy


def _mixed(stars):
    return stars["x"] < SPLIT


def test_psf_mixes_follow_the_covering_inputs(coadd):
    calexp, _, _ = coadd
    mixes = PsfMixes(calexp.psf)
    narrow, mixed = mixes.at(500.0, 180.0), mixes.at(150.0, 180.0)
    assert narrow.visits == (1,) and mixed.visits == (1, 2)
    assert narrow.fwhm == pytest.approx(2.3548 * SIGMA_NARROW, rel=0.03)
    assert narrow.widest_fwhm == pytest.approx(narrow.fwhm, rel=1e-6)
    assert mixed.widest_fwhm == pytest.approx(2.3548 * SIGMA_WIDE, rel=0.02)
    assert narrow.fwhm < mixed.fwhm < mixed.widest_fwhm


def test_each_star_measured_with_its_psf_mix(coadd):
    """Per-region fluxes right to 2 mmag; the patch-centre aperture (narrow) and one curve of growth lose ~10 mmag of the mixed stars."""
    calexp, objects, _ = coadd
    config = CoaddValidateConfig()
    stars = star_measurements(calexp, objects, "r", config)
    mixed = _mixed(stars)
    assert mixed.sum() == len(MIXED_XY) and (~mixed).sum() == len(NARROW_XY)
    assert set(stars["mix"][mixed]) == {"1+2"} and set(stars["mix"][~mixed]) == {"1"}
    # aperture: aperture_fwhm x the widest covering input's FWHM at the star
    assert np.allclose(stars["radius"][mixed], config.aperture_fwhm * 2.3548 * SIGMA_WIDE, rtol=0.02)
    assert np.allclose(stars["radius"][~mixed], config.aperture_fwhm * 2.3548 * SIGMA_NARROW, rtol=0.03)
    for group in (mixed, ~mixed):
        assert np.isfinite(stars["dmag"][group]).all()
        assert abs(np.median(stars["dmag"][group])) < 0.002
        assert abs(np.median(stars["fwhm_ratio"][group]) - 1) < 0.01
    assert not stars["inexact_psf"].any() and not stars["mix_boundary"].any()


def test_an_input_without_a_curve_of_growth_gives_nan(coadd):
    """The wide input's calexp had no curve of growth: its stars get NaN, not a guess; the others are measured."""
    calexp, objects, _ = coadd
    psf = CoaddPsf(calexp.psf.coadd_wcs, [replace(i, aperture_wing=np.nan) if i.visit == 2 else i
                                          for i in calexp.psf.inputs], calexp.psf.size)
    stars = star_measurements(replace(calexp, psf=psf), objects, "r", CoaddValidateConfig())
    mixed = _mixed(stars)
    assert mixed.sum() == len(MIXED_XY)
    assert np.isnan(stars["dmag"][mixed]).all()
    assert np.isfinite(stars["dmag"][~mixed]).all()


def test_local_sky_under_the_stars_is_fitted_out(coadd):
    """A sky level left under the stars (0.1 flux units a pixel, 1.8 % of a mixed star in its aperture) moves the totals by < 3 mmag."""
    calexp, objects, _ = coadd
    config = CoaddValidateConfig()
    sky = replace(calexp, image=calexp.image + np.float32(0.1))
    plain = star_measurements(calexp, objects, "r", config)
    lifted = star_measurements(sky, objects, "r", config)
    aperture = star_measurements(sky, objects, "r", CoaddValidateConfig.from_dict({"curve_of_growth": {"enabled": False}}))
    mixed = _mixed(lifted)
    assert np.median(aperture["dmag"][mixed]) < -0.015         # the aperture alone takes in the sky
    assert abs(np.median(lifted["dmag"][mixed] - plain["dmag"][mixed])) < 0.003
    assert abs(np.median(lifted["dmag"][~mixed] - plain["dmag"][~mixed])) < 0.003


def test_enclosed_light_is_the_weighted_inputs_curves_of_growth():
    """Two inputs with wings of 1 % and 3 % beyond their 4-FWHM apertures, weights 1 and 3."""
    wcs = _wcs()
    psf = CoaddPsf(wcs, [CoaddPsfInput(1, 0, 1.0, GaussianPsf(SIGMA_NARROW, 61), wcs, _box(NX), 0.01),
                         CoaddPsfInput(2, 0, 3.0, GaussianPsf(SIGMA_WIDE, 61), wcs, _box(NX), 0.03)])
    r_narrow, r_wide = 4 * 2.3548 * SIGMA_NARROW, 4 * 2.3548 * SIGMA_WIDE
    radii = np.array([r_wide, 2 * r_wide, 1e6])
    got = psf.enclosed_light(360.0, 180.0, radii, 4.0, 1.7)
    narrow = (1 + 0.01 * (1 - (radii / r_narrow) ** -1.7)) / 1.01
    wide = (1 + 0.03 * (1 - (radii / r_wide) ** -1.7)) / 1.03
    assert got == pytest.approx((narrow + 3 * wide) / 4, rel=2e-4)       # the kernels' moments: FWHM to < 1 %
    assert got[0] == pytest.approx((narrow[0] + 3 / 1.03) / 4, rel=2e-4)
    assert got[-1] == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(psf.enclosed_light(360.0, 180.0, [0.5 * r_wide], 4.0, 1.7)).all()


def test_region_counts_stars_in_it_only(coadd):
    calexp, objects, _ = coadd
    region = np.zeros((NY, NX), bool)
    region[:, :SPLIT] = True
    config = CoaddValidateConfig()
    stars = star_measurements(calexp, objects, "r", config, region=region)
    assert stars["in_region"].sum() == len(MIXED_XY) and (stars["x"][stars["in_region"]] < SPLIT).all()
    assert measured(stars).sum() == len(MIXED_XY)
    assert all(m.n == len(MIXED_XY) for m in star_metrics(stars, config))


def test_inexact_psf_stars_left_out(coadd):
    calexp, objects, xy = coadd
    config = CoaddValidateConfig()
    flagged = Exposure(calexp.image, calexp.mask.copy(), calexp.variance, calexp.wcs, calexp.psf, calexp.zeropoint)
    x, y = xy[len(MIXED_XY)]      # a narrow star: INEXACT_PSF 1.5 FWHM from it, and one 3 FWHM from another
    flagged.mask[int(round(y)), int(round(x + 1.5 * 2.3548 * SIGMA_NARROW))] |= mask_bit("INEXACT_PSF")
    x, y = xy[len(MIXED_XY) + 1]
    flagged.mask[int(round(y)), int(round(x + 3 * 2.3548 * SIGMA_NARROW))] |= mask_bit("INEXACT_PSF")
    stars = star_measurements(flagged, objects, "r", config)
    assert stars["inexact_psf"].sum() == 1
    assert measured(stars).sum() == len(MIXED_XY) + len(NARROW_XY) - 1
    assert star_metrics(stars, config)[1].n == len(MIXED_XY) + len(NARROW_XY) - 1


def test_clipped_stars_local_fwhm_and_trail(coadd):
    """A CLIPPED pixel within 2 local FWHM of a mixed star (beyond 2 patch-centre FWHM) counts; one on the trail does not."""
    calexp, objects, xy = coadd
    config = CoaddValidateConfig.from_dict({"clipped_mag_max": 20.0})
    mixes = PsfMixes(calexp.psf)
    mask = calexp.mask.copy()
    x, y = xy[0]
    ix, iy, d = int(round(x)), int(round(y)), 6
    assert 2 * mixes.at(NX / 2, NY / 2).fwhm < d < 2 * mixes.at(x, y).fwhm
    mask[iy, ix + d] |= mask_bit("CLIPPED")
    clipped = Exposure(calexp.image, mask, calexp.variance, calexp.wcs, calexp.psf, calexp.zeropoint)
    assert clipped_stars_figure(clipped, objects, "r", config).value == 1
    trail = np.zeros((NY, NX), bool)
    trail[iy, :] = True
    assert clipped_stars_figure(clipped, objects, "r", config, trail=trail).value == 0
    # the trail's clipped band reaches 3 rows beyond the trail strip, up to the star's 2-FWHM disc:
    # the trail's rejection, not the star's
    band = mask.copy()
    band[iy - 4:iy + 1, ix + d + 1] |= mask_bit("CLIPPED")     # joins the pixel next to the star
    strip = np.zeros((NY, NX), bool)
    strip[iy - 4, :] = True              # the trail strip, 4 rows from the star; the clipped band joins it
    grown = Exposure(calexp.image, band, calexp.variance, calexp.wcs, calexp.psf, calexp.zeropoint)
    assert clipped_stars_figure(grown, objects, "r", config, trail=strip).value == 0
    # a piece of the trail's clipped band holed apart by a star's protection, 3 rows off the strip
    near = np.zeros((NY, NX), bool)
    near[iy - 3, :] = True
    assert clipped_stars_figure(clipped, objects, "r", config, trail=near).value == 0
    # a clipped region apart from the trail strip counts
    apart = np.zeros((NY, NX), bool)
    apart[iy - 20, :] = True
    assert clipped_stars_figure(grown, objects, "r", config, trail=apart).value == 1
    assert clipped_stars_figure(clipped, objects, "r", CoaddValidateConfig.from_dict(
        {"clipped_mag_max": 20.0, "trail_clip_margin": 0}), trail=near).value == 1


def _crowded_noise(spacing, seed=4):
    """Pure white noise (sigma 1) with DETECTED discs of radius 2 pixels on a grid of ``spacing`` pixels."""
    ny = nx = 600
    rng = np.random.default_rng(seed)
    mask = np.zeros((ny, nx), np.int32)
    yy, xx = np.mgrid[:ny, :nx]
    near = (np.hypot((xx + spacing / 2) % spacing - spacing / 2, (yy + spacing / 2) % spacing - spacing / 2) <= 2)
    mask[near] = mask_bit("DETECTED")
    psf = GaussianPsf(2.0, 41)
    return Exposure(rng.normal(0.0, 1.0, (ny, nx)).astype(np.float32), mask, np.ones((ny, nx), np.float32),
                    wcs=_wcs(), psf=psf, zeropoint=ZEROPOINT)


def test_depth_positions_in_a_crowded_patch():
    """Detections every 34 pixels leave no 41-pixel kernel box free, but positions 3 FWHM (14 pixels)
    from every detection: the depth is that of the white noise; detections every 12 pixels leave
    none, and there is no depth figure."""
    calexp = _crowded_noise(34)
    kernel = calexp.psf.kernel(300.0, 300.0)
    kernel = kernel / kernel.sum()
    expected = 1.0 / np.sqrt(np.sum(kernel**2))         # PSF-weighted flux noise of unit white noise
    depth = measured_depth(calexp, CoaddValidateConfig())
    sigma = 10 ** (-0.4 * (depth - ZEROPOINT)) / 5
    assert sigma == pytest.approx(expected, rel=0.05)
    assert np.isnan(measured_depth(_crowded_noise(12), CoaddValidateConfig()))
