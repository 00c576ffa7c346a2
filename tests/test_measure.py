"""Measurement against GalSim truth: centroids, PSF/aperture/Kron fluxes, shapes, flags, units, timing."""
import time

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from snakedrp.meas.detect import DetectionConfig, detect_sources
from snakedrp.repo.exposure import mask_bit
from snakedrp.meas.apertures import aperture_name
from snakedrp.meas.measure import MeasureConfig, calibrate_fluxes, measure_sources
from snakedrp.repo.psf_model import GaussianPsf, PsfModel, register

SIGMA_PSF = 1.8
SKY = 900.0                                           # sky variance [e-^2]; the sky itself is subtracted


def _draw(shape, objects, rng, noise=True):
    """Background-subtracted image of GalSim profiles at zero-based (x, y), with sky + Poisson variance.

    ``objects``: iterable of (GSObject with flux, x, y, half-size of the drawing box).
    """
    image = galsim.ImageF(shape[1], shape[0], scale=1.0)
    for prof, x, y, half in objects:
        ix, iy = int(round(x)), int(round(y))
        bounds = galsim.BoundsI(ix - half + 1, ix + half + 1, iy - half + 1, iy + half + 1) & image.bounds
        prof.drawImage(image=image[bounds], add_to_image=True, center=galsim.PositionD(x + 1, y + 1))
    model = image.array.astype(float)
    variance = SKY + model
    out = model + (rng.normal(size=shape) * np.sqrt(variance) if noise else 0.0)
    return out.astype(np.float32), variance.astype(np.float32)


def _snr_to_flux(snr):
    b = 4 * np.pi * SIGMA_PSF**2 * SKY
    return 0.5 * (snr**2 + np.sqrt(snr**4 + 4 * snr**2 * b))


def _detect_and_measure(image, variance, mask=None, config=None, psf=None, **kw):
    mask = np.zeros(image.shape, np.int32) if mask is None else mask
    det = detect_sources(image, variance, mask, DetectionConfig(), psf_sigma=SIGMA_PSF)
    cat = measure_sources(image, variance, det.mask, det.sources, psf or GaussianPsf(SIGMA_PSF),
                          config or MeasureConfig(), segmentation=det.segmentation, **kw)
    return det, cat


def _match(cat, x, y, radius=1.5):
    dist, idx = cKDTree(np.column_stack([cat["x_centroid"], cat["y_centroid"]])).query(np.column_stack([x, y]))
    return dist < radius, idx


@pytest.fixture(scope="module")
def star_field():
    """~1000 isolated Gaussian stars, S/N log-uniform in 20..3000, on a jittered grid (30 px)."""
    rng = np.random.default_rng(21)
    shape = (1024, 1024)
    gx, gy = np.meshgrid(np.arange(20, shape[1] - 20, 32.0), np.arange(20, shape[0] - 20, 32.0))
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size)
    snr = np.exp(rng.uniform(np.log(20), np.log(3000), x.size))
    flux = _snr_to_flux(snr)
    psf = galsim.Gaussian(sigma=SIGMA_PSF)
    image, variance = _draw(shape, [(psf.withFlux(f), xi, yi, 14) for f, xi, yi in zip(flux, x, y)], rng)
    det, cat = _detect_and_measure(image, variance)
    found, idx = _match(cat, x, y)
    assert found.all()
    return cat[idx], x, y, flux, snr


def test_centroids_unbiased_and_precise(star_field):
    cat, x, y, _, snr = star_field
    bright = snr > 50
    dx = np.asarray(cat["x_centroid"] - x)[bright]
    dy = np.asarray(cat["y_centroid"] - y)[bright]
    # the half-pixel trap would show as a mean offset of ~0.5 px
    assert abs(dx.mean()) < 0.005 and abs(dy.mean()) < 0.005
    assert np.sqrt(np.mean(dx**2)) < 0.03 and np.sqrt(np.mean(dy**2)) < 0.03
    # the errors describe the scatter (windowed centroid, linearised)
    chi_x = dx / np.asarray(cat["x_centroid_err"])[bright]
    chi_y = dy / np.asarray(cat["y_centroid_err"])[bright]
    assert 0.85 < np.std(chi_x) < 1.2 and 0.85 < np.std(chi_y) < 1.2
    assert not cat["centroid_flag"].any()


def test_psf_flux_unbiased_with_consistent_errors(star_field):
    cat, _, _, flux, snr = star_field
    bright = snr > 100
    ratio = np.asarray(cat["psf_flux"])[bright] / flux[bright]
    bias_mmag = -2.5e3 * np.log10(np.mean(ratio))
    assert abs(bias_mmag) < 2.0
    chi = (np.asarray(cat["psf_flux"]) - flux) / np.asarray(cat["psf_flux_err"])
    assert 0.85 < np.std(chi) < 1.15
    assert abs(np.mean(chi)) < 0.15
    np.testing.assert_allclose(cat["psf_snr"], cat["psf_flux"] / cat["psf_flux_err"])
    assert 0.8 < np.median(cat["psf_chi2"]) < 1.2
    assert not cat["psf_flux_flag"].any()


def test_large_apertures_give_total_flux(star_field):
    # a Gaussian of sigma 1.8 has 1 - 2e-10 of its flux inside 12 pixels; calib = 4 FWHM = 17 pixels
    cat, _, _, flux, _ = star_field
    for stem in (aperture_name(12.0), "calib"):
        chi = (np.asarray(cat[f"{stem}_flux"]) - flux) / np.asarray(cat[f"{stem}_flux_err"])
        assert abs(np.mean(chi)) < 4 / np.sqrt(len(chi)), stem
        assert 0.85 < np.std(chi) < 1.15, stem
    # FWHM is the Gaussian-equivalent one of the PSF model (PsfModel.fwhm), pixel included
    np.testing.assert_allclose(cat["calib_radius"], 4 * 2.3548 * np.sqrt(SIGMA_PSF**2 + 1 / 12), rtol=0.01)
    # the curve of growth rises with radius, and small apertures hold the expected fraction
    r3 = np.asarray(cat[f"{aperture_name(3.0)}_flux"]) / flux
    assert abs(np.median(r3) - _pixelised_fraction_inside(3.0)) < 0.003
    assert np.median(cat[f"{aperture_name(4.5)}_flux"] / flux) > np.median(r3)


def _pixelised_fraction_inside(radius, n_sub=32):
    """Fraction of a pixelised unit star inside a circle, by super-sampling each pixel (independent of sep).

    Averaged over four sub-pixel positions, as the stars of the field are spread over them.
    """
    fractions = []
    for dx, dy in ((0.0, 0.0), (0.25, -0.2), (-0.4, 0.1), (0.45, 0.45)):
        stamp = galsim.Gaussian(sigma=SIGMA_PSF).drawImage(nx=25, ny=25, scale=1.0, offset=(dx, dy)).array
        sub = (np.arange(n_sub) + 0.5) / n_sub - 0.5
        pix = np.arange(25) - 12
        yy = (pix[:, None, None, None] + sub[None, None, :, None]) - dy
        xx = (pix[None, :, None, None] + sub[None, None, None, :]) - dx
        inside = (xx**2 + yy**2 < radius**2).mean(axis=(2, 3))
        fractions.append((stamp * inside).sum() / stamp.sum())
    return float(np.mean(fractions))


def test_kron_flux_of_a_galaxy():
    rng = np.random.default_rng(3)
    shape = (160, 160)
    gal = galsim.Convolve(galsim.Exponential(half_light_radius=4.0).shear(g1=0.2, g2=0.1),
                          galsim.Gaussian(sigma=SIGMA_PSF)).withFlux(2e5)
    star = galsim.Gaussian(sigma=SIGMA_PSF).withFlux(5e4)
    image, variance = _draw(shape, [(gal, 80.3, 79.6, 70), (star, 30.0, 130.0, 15)], rng)
    _, cat = _detect_and_measure(image, variance)
    found, idx = _match(cat, np.array([80.3, 30.0]), np.array([79.6, 130.0]))
    assert found.all()
    g, s = cat[idx[0]], cat[idx[1]]
    # Kron (k = 2.5) holds 90-98 % of an exponential; more of a star; larger radius for the galaxy
    assert 0.88 < g["kron_flux"] / 2e5 < 1.0
    assert 0.93 < s["kron_flux"] / 5e4 < 1.01
    assert g["kron_radius"] > 1.5 * s["kron_radius"]
    assert not g["kron_flag"] and not s["kron_flag"]
    assert g["kron_flux_err"] > 0


def _expected_moments(sigma_gal, g1, g2):
    """Covariance of a GalSim-sheared Gaussian convolved with the Gaussian PSF and the pixel."""
    a = np.array([[1 + g1, g2], [g2, 1 - g1]]) / np.sqrt(1 - g1**2 - g2**2)
    cov = sigma_gal**2 * a @ a.T + (SIGMA_PSF**2 + 1 / 12) * np.eye(2)
    return cov[0, 0], cov[1, 1], cov[0, 1]


def test_adaptive_moments_recover_injected_shear():
    rng = np.random.default_rng(6)
    shape = (200, 200)
    shears = [(0.2, -0.1), (-0.15, 0.05), (0.0, 0.0)]
    objects = [(galsim.Convolve(galsim.Gaussian(sigma=3.0).shear(g1=g1, g2=g2),
                                galsim.Gaussian(sigma=SIGMA_PSF)).withFlux(3e5), 50.0 + 50 * k, 100.2, 40)
               for k, (g1, g2) in enumerate(shears)]
    image, variance = _draw(shape, objects, rng)
    _, cat = _detect_and_measure(image, variance)
    found, idx = _match(cat, np.array([50.0, 100.0, 150.0]), np.array([100.2] * 3))
    assert found.all()
    for k, (g1, g2) in enumerate(shears):
        row = cat[idx[k]]
        xx, yy, xy = _expected_moments(3.0, g1, g2)
        assert not row["shape_flag"]
        assert row["shape_e1"] == pytest.approx((xx - yy) / (xx + yy), abs=0.01)
        assert row["shape_e2"] == pytest.approx(2 * xy / (xx + yy), abs=0.01)
        assert row["shape_xx"] == pytest.approx(xx, rel=0.03)
        assert row["shape_yy"] == pytest.approx(yy, rel=0.03)
        assert row["shape_xy"] == pytest.approx(xy, abs=0.03 * (xx + yy) / 2)
        assert row["shape_sigma"] == pytest.approx((xx * yy - xy**2) ** 0.25, rel=0.02)


def test_pixel_flags():
    rng = np.random.default_rng(9)
    shape = (200, 300)
    xs = np.array([40.0, 100.0, 160.0, 220.0, 40.0, 100.0, 160.0, 3.0])
    ys = np.array([50.0, 50.0, 50.0, 50.0, 140.0, 140.0, 140.0, 100.0])
    psf = galsim.Gaussian(sigma=SIGMA_PSF)
    image, variance = _draw(shape, [(psf.withFlux(3e4), x, y, 15) for x, y in zip(xs, ys)], rng)
    mask = np.zeros(shape, np.int32)
    mask[50, 40] |= mask_bit("SAT")                    # star 0: saturated centre
    mask[50, 103] |= mask_bit("CR")                    # star 1: cosmic ray 3 px off the centre, in the footprint
    mask[51, 161] |= mask_bit("BAD")                   # star 2: bad pixel in the centre box
    mask[50, 220] |= mask_bit("INTRP")                 # star 3: interpolated centre
    mask[141, 40] |= mask_bit("SUSPECT")               # star 4: suspect pixel in the centre box
    mask[:, :2] |= mask_bit("EDGE")                    # star 7 sits on the EDGE strip
    _, cat = _detect_and_measure(image, variance, mask=mask)
    found, idx = _match(cat, xs, ys)
    assert found.all()
    rows = cat[idx]
    expect = {"saturated": {0}, "cr": {1}, "bad": {2}, "interpolated": {3}, "suspect": {4}, "edge": {7}}
    for name, which in expect.items():
        assert set(np.nonzero(rows[f"flag_{name}"])[0]) == which, name
    assert rows["flag_saturated_center"][0] and rows["flag_bad_center"][2] and rows["flag_interpolated_center"][3]
    assert not rows["flag_cr_center"][1]               # 3 pixels away: footprint, not centre box
    assert not rows["flag_edge"][5] and not rows["flag_edge"][6]
    # masked pixels carry no weight: the SAT and BAD stars' PSF fluxes are still right
    assert rows["psf_flux"][0] == pytest.approx(3e4, rel=0.02)
    assert rows["psf_flux"][2] == pytest.approx(3e4, rel=0.02)
    assert rows[f"{aperture_name(3.0)}_flag"][2]


def test_joint_fit_of_a_deblended_pair():
    rng = np.random.default_rng(12)
    shape = (120, 120)
    x, y, f = np.array([55.0, 62.5]), np.array([60.0, 61.0]), np.array([6e4, 3e4])
    psf = galsim.Gaussian(sigma=SIGMA_PSF)
    image, variance = _draw(shape, [(psf.withFlux(fi), xi, yi, 15) for fi, xi, yi in zip(f, x, y)], rng)
    _, cat = _detect_and_measure(image, variance)
    found, idx = _match(cat, x, y, radius=1.0)
    assert found.all() and len(cat) == 2
    rows = cat[idx]
    assert rows["is_blended"].all() and rows["parent"][0] == rows["parent"][1] != 0
    chi = (rows["psf_flux"] - f) / rows["psf_flux_err"]
    assert np.all(np.abs(chi) < 4), chi
    _, alone = _detect_and_measure(image, variance, config=MeasureConfig(joint_blend_fit=False))
    masked_only = alone[_match(alone, x, y, radius=1.0)[1]]
    assert np.abs(masked_only["psf_flux"] / f - 1).max() > np.abs(rows["psf_flux"] / f - 1).max()


@register
class _KernelOnlyPsf(PsfModel):
    """A Moffat kernel without its own draw: drawn by the default Lanczos-3 shift."""

    def __init__(self, fwhm=4.2, size=31):
        self.size = size
        self._k = galsim.Moffat(beta=3.5, fwhm=fwhm).drawImage(nx=size, ny=size, scale=1.0).array.astype(float)
        self._k /= self._k.sum()

    def kernel(self, x, y):
        return self._k

    def to_hdu(self):
        hdu = fits.ImageHDU(self._k, name="PSF")
        hdu.header["PSFTYPE"] = type(self).__name__
        return hdu

    @classmethod
    def from_hdu(cls, hdu):
        return cls()


def test_grid_models_equal_draw_and_measure_moffat_stars():
    rng = np.random.default_rng(13)
    shape = (400, 400)
    psf_model = _KernelOnlyPsf()
    moffat = galsim.Moffat(beta=3.5, fwhm=4.2)
    gx, gy = np.meshgrid(np.arange(25, 380, 40.0), np.arange(25, 380, 40.0))
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size)
    flux = np.full(x.size, 2e5)
    image, variance = _draw(shape, [(moffat.withFlux(f), xi, yi, 15) for f, xi, yi in zip(flux, x, y)], rng)
    _, grid = _detect_and_measure(image, variance, config=MeasureConfig(psf_evaluation="grid"), psf=psf_model)
    _, draw = _detect_and_measure(image, variance, config=MeasureConfig(psf_evaluation="draw"), psf=psf_model)
    np.testing.assert_allclose(grid["psf_flux"], draw["psf_flux"], rtol=1e-9)
    found, idx = _match(grid, x, y)
    assert found.all()
    # the kernel holds the Moffat out to 15 px; the Lanczos-shifted model is good to ~1e-3
    assert abs(np.median(grid["psf_flux"][idx] / flux) - 1) < 0.01
    np.testing.assert_allclose(grid["psf_sigma"], psf_model.fwhm(0, 0) / 2.3548, rtol=1e-6)


def test_sky_coordinates_use_zero_based_pixels(star_field):
    rng = np.random.default_rng(1)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [512.5, 512.5]
    wcs.wcs.cd = np.array([[-0.168, 0.0], [0.0, 0.168]]) / 3600
    shape = (128, 128)
    x, y = np.array([40.3, 90.0]), np.array([60.7, 20.2])
    image, variance = _draw(shape, [(galsim.Gaussian(sigma=SIGMA_PSF).withFlux(2e5), xi, yi, 14)
                                    for xi, yi in zip(x, y)], rng)
    _, cat = _detect_and_measure(image, variance, wcs=wcs)
    idx = _match(cat, x, y)[1]
    ra, dec = wcs.all_pix2world(x, y, 0)
    sep_mas = np.hypot((cat["coord_ra"][idx] - ra) * np.cos(np.deg2rad(2.0)), cat["coord_dec"][idx] - dec) * 3.6e6
    assert np.all(sep_mas < 5.0)                        # a one-based slip would be 168 mas
    cat0, *_ = star_field
    assert np.isnan(cat0["coord_ra"]).all()              # no WCS, no coordinates


def test_every_column_has_unit_and_description(star_field):
    cat, *_ = star_field
    missing = [n for n in cat.colnames if cat[n].unit is None or not (cat[n].description or "").strip()]
    assert missing == []
    for name in ("x_centroid", "psf_flux", "calib_flux", "kron_flux", "shape_xx", "coord_ra"):
        assert name in cat.colnames
    assert str(cat["psf_flux"].unit) == "electron" and str(cat["shape_xx"].unit) == "pix2"
    cal = calibrate_fluxes(cat, 27.0, 0.01)
    missing = [n for n in cal.colnames if cal[n].unit is None or not (cal[n].description or "").strip()]
    assert missing == []


def test_calibrate_fluxes():
    t = Table({"psf_flux": [1.0, 100.0, -5.0], "psf_flux_err": [0.1, 1.0, 1.0], "calib_flux": [10.0, 10.0, 10.0]})
    out = calibrate_fluxes(t, 27.0, 0.02)
    assert "psf_mag" not in t.colnames
    np.testing.assert_allclose(out["psf_mag"][:2], [27.0, 22.0])
    assert np.isnan(out["psf_mag"][2]) and np.isnan(out["psf_mag_err"][2])
    np.testing.assert_allclose(out["psf_mag_err"][0], np.hypot(2.5 / np.log(10) * 0.1, 0.02))
    assert "calib_mag" in out.colnames and "calib_mag_err" not in out.colnames
    assert str(out["psf_mag"].unit) == "mag"


def test_measure_without_segmentation_and_empty():
    rng = np.random.default_rng(14)
    shape = (100, 100)
    image, variance = _draw(shape, [(galsim.Gaussian(sigma=SIGMA_PSF).withFlux(4e4), 50.2, 49.7, 14)], rng)
    stars = Table({"x": [50.0], "y": [50.0]})
    cat = measure_sources(image, variance, np.zeros(shape, np.int32), stars, GaussianPsf(SIGMA_PSF))
    assert cat["x_centroid"][0] == pytest.approx(50.2, abs=0.05)
    assert cat["psf_flux"][0] == pytest.approx(4e4, rel=0.02)
    empty = measure_sources(image, variance, np.zeros(shape, np.int32), Table({"x": [], "y": []}),
                            GaussianPsf(SIGMA_PSF))
    assert len(empty) == 0 and set(cat.colnames) == set(empty.colnames)


def test_timing_full_hsc_ccd():
    """Background, detection and measurement on a 2048 x 4176 CCD with ~4000 sources (printed, not asserted)."""
    from snakedrp.meas.background import estimate_background

    rng = np.random.default_rng(30)
    shape = (4176, 2048)
    n_star, n_gal = 2500, 1500
    x = rng.uniform(10, shape[1] - 10, n_star + n_gal)
    y = rng.uniform(10, shape[0] - 10, n_star + n_gal)
    snr = np.exp(rng.uniform(np.log(6), np.log(2000), n_star + n_gal))
    flux = _snr_to_flux(snr)
    psf = galsim.Gaussian(sigma=SIGMA_PSF)
    objects = [(psf.withFlux(f), xi, yi, 12) for f, xi, yi in zip(flux[:n_star], x[:n_star], y[:n_star])]
    gal = galsim.Convolve(galsim.Exponential(half_light_radius=2.5), psf)
    objects += [(gal.withFlux(2 * f), xi, yi, 20) for f, xi, yi in zip(flux[n_star:], x[n_star:], y[n_star:])]
    image, variance = _draw(shape, objects, rng)
    image += 400.0
    mask = np.zeros(shape, np.int32)
    clock = time.process_time
    t0 = clock()
    bkg = estimate_background(image, mask)
    image -= bkg.evaluate()
    t1 = clock()
    det = detect_sources(image, variance, mask, psf_sigma=SIGMA_PSF)
    t2 = clock()
    cat = measure_sources(image, variance, det.mask, det.sources, GaussianPsf(SIGMA_PSF),
                          segmentation=det.segmentation)
    t3 = clock()
    cat_grid = measure_sources(image, variance, det.mask, det.sources, GaussianPsf(SIGMA_PSF),
                               MeasureConfig(psf_evaluation="grid"), segmentation=det.segmentation)
    t4 = clock()
    print(f"\n2048x4176, {len(cat)} sources: background {t1 - t0:.3f} s, detection {t2 - t1:.3f} s, "
          f"measurement {t3 - t2:.3f} s (draw) / {t4 - t3:.3f} s (grid), "
          f"total {t3 - t0:.3f} s CPU; {np.isfinite(cat['shape_sigma']).sum()} shapes")
    assert len(cat) > 3000


def test_bulk_models_equal_per_source_draw():
    """The vectorised GaussianPsf / PixelPsf drawing in measure equals PsfModel.draw source by source."""
    from snakedrp.meas.psf_flux import draw_psf_models
    from snakedrp.repo.psf_model import PixelPsf

    rng = np.random.default_rng(5)
    n = 40
    xc, yc = rng.uniform(10, 990, n), rng.uniform(10, 990, n)
    ix, iy = np.floor(xc + 0.5).astype(int), np.floor(yc + 0.5).astype(int)
    k0 = np.asarray(GaussianPsf(2.0, size=21).kernel(0, 0))
    coeffs = np.stack([k0, 0.05 * rng.normal(size=k0.shape) * k0, 0.05 * rng.normal(size=k0.shape) * k0])
    pixel = PixelPsf(coeffs, 1, 500.0, 500.0, 500.0, 500.0, resample_order=5)

    class Loop(PixelPsf):     # a subclass takes the generic per-source path
        pass

    loop = Loop(coeffs, 1, 500.0, 500.0, 500.0, 500.0, resample_order=5)
    for half in (4, 10, 14):  # box smaller than, equal to and larger than the kernel
        fast = draw_psf_models(pixel, xc, yc, ix, iy, half)
        slow = draw_psf_models(loop, xc, yc, ix, iy, half)
        assert fast.shape == slow.shape == (n, 2 * half + 1, 2 * half + 1)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
        gauss = GaussianPsf(1.7, size=15)

        class GaussLoop(GaussianPsf):
            pass

        np.testing.assert_allclose(draw_psf_models(gauss, xc, yc, ix, iy, half),
                                   draw_psf_models(GaussLoop(1.7, size=15), xc, yc, ix, iy, half), rtol=0, atol=1e-14)


def test_minimal_measurement_matches_full(star_field):
    """minimal=True gives the PSF fluxes and pixel flags of a full measurement at the positions it
    is given, takes those as the centroids, and leaves the rest NaN/flagged."""
    rng = np.random.default_rng(8)
    shape = (256, 256)
    x, y = rng.uniform(15, 240, 30), rng.uniform(15, 240, 30)
    psf = galsim.Gaussian(sigma=SIGMA_PSF)
    image, variance = _draw(shape, [(psf.withFlux(f), xi, yi, 14) for f, xi, yi in
                                    zip(_snr_to_flux(rng.uniform(30, 300, 30)), x, y)], rng)
    mask = np.zeros(shape, np.int32)
    mask[100:110, 100:103] = mask_bit("BAD")
    det, full = _detect_and_measure(image, variance, mask=mask)
    # at the full measurement's centroids (where its window failed, at the detection's position
    # and flagged, which a minimal measurement, taking the positions as given, does not flag)
    windowed = ~np.asarray(full["centroid_flag"])
    assert 0 < windowed.sum() < len(full)
    at_centroids = det.sources.copy()
    at_centroids["x"], at_centroids["y"] = full["x_centroid"], full["y_centroid"]
    small = measure_sources(image, variance, det.mask, at_centroids, GaussianPsf(SIGMA_PSF), MeasureConfig(),
                            segmentation=det.segmentation, minimal=True)
    assert full.colnames == small.colnames
    same = ["x_centroid", "y_centroid", "x_centroid_err", "y_centroid_err", "psf_flux", "psf_flux_err",
            "psf_chi2", "centroid_flag", "psf_flux_flag"] + [c for c in full.colnames if c.startswith("flag_")]
    for name in same:
        # the same numbers but for the last bits (the PSF width is evaluated at the given positions)
        np.testing.assert_allclose(np.asarray(full[name])[windowed], np.asarray(small[name])[windowed],
                                   rtol=1e-12, atol=0, err_msg=name)
    # at detection's windowed centroids, which it does not move
    _, from_detection = _detect_and_measure(image, variance, mask=mask, minimal=True)
    assert np.array_equal(from_detection["x_centroid"], det.sources["x"])
    assert np.array_equal(from_detection["y_centroid"], det.sources["y"])
    assert np.isfinite(full["calib_flux"]).all() and np.isnan(small["calib_flux"]).all()
    assert np.asarray(small["kron_flag"]).all() and np.asarray(small["shape_flag"]).all()


def test_psf_model_image_sums_the_models():
    from snakedrp.meas.psf_flux import psf_model_image
    from snakedrp.repo.psf_model import GaussianPsf

    psf = GaussianPsf(2.0)
    x, y, flux = np.array([20.3, 26.0, 0.5]), np.array([30.7, 31.0, 40.0]), np.array([1000.0, 500.0, 200.0])
    image = psf_model_image(psf, (60, 50), x, y, flux)
    assert image.shape == (60, 50)
    assert abs(image[20:45, 10:40].sum() - 1500.0) < 1.0          # two whole models (overlapping boxes add)
    assert 90.0 < image[:, :3].sum() < 110.0                       # the third is cut by the edge: half of it
    assert np.unravel_index(np.argmax(image), image.shape) == (31, 20)
    # with stamps kept: the same image, the models drawn once per position
    stamps = {}
    assert np.array_equal(psf_model_image(psf, (60, 50), x, y, flux, stamps=stamps), image)
    assert len(stamps) == 3
    again = psf_model_image(psf, (60, 50), x[[1, 0]], y[[1, 0]], 2 * flux[[1, 0]], stamps=stamps)
    assert len(stamps) == 3
    assert np.array_equal(again, psf_model_image(psf, (60, 50), x[[1, 0]], y[[1, 0]], 2 * flux[[1, 0]]))


def test_psf_grid_is_made_once_per_model_and_shape():
    # measure_sources asks for the grid of one PSF model several times per CCD; the nodes'
    # kernels and moments are the same each time
    from snakedrp.meas.psf_flux import PsfGrid

    psf, other = GaussianPsf(SIGMA_PSF), GaussianPsf(SIGMA_PSF)
    grid = PsfGrid.of(psf, (600, 400), 128.0)
    assert PsfGrid.of(psf, (600, 400), 128.0) is grid
    assert PsfGrid.of(other, (600, 400), 128.0) is not grid
    assert PsfGrid.of(psf, (600, 400), 256.0) is not grid
    fresh = PsfGrid(psf, (600, 400), 128.0)
    assert np.array_equal(grid.kernels, fresh.kernels) and np.array_equal(grid.sigma_nodes, fresh.sigma_nodes)


def test_append_rows_is_vstack_of_same_columns():
    from astropy.table import vstack

    from snakedrp.meas.columns import append_rows

    a = Table({"id": np.arange(3), "flux": np.array([1.0, np.nan, 3.0], np.float32), "flag": [True, False, True]})
    a["flux"].unit, a["flux"].description = "electron", "a flux"
    a.meta.update(NRESID=0, KEEP=1)
    b = Table({"id": np.array([7], np.int32), "flux": np.array([4.0]), "flag": [False]})
    b.meta["NRESID"] = 1
    got, want = append_rows(a, b), vstack([a, b], metadata_conflicts="silent")
    for name in want.colnames:
        assert got[name].dtype == want[name].dtype
        assert np.array_equal(got[name], want[name], equal_nan=want[name].dtype.kind == "f")
        assert got[name].unit == want[name].unit and got[name].description == want[name].description
    assert dict(got.meta) == dict(want.meta) == {"NRESID": 1, "KEEP": 1}
    with pytest.raises(ValueError, match="columns differ"):
        append_rows(a, b["id", "flag"])
