"""CoaddPsf: warped, weighted input PSFs match the coadd of the PSF images."""
import numpy as np
from astropy.io import fits

from test_warp import RA0, DEC0, make_calexp, patch_grid

from snakedrp.coadd.assemble import assemble_coadd
from snakedrp.coadd.coadd_psf import CoaddPsf, warp_kernel
from snakedrp.coadd.warp import warp_exposures
from snakedrp.repo.psf_model import GaussianPsf, psf_from_hdu
from snakedrp.stamps import kernel_moments


def test_warp_kernel_scales_and_rotates():
    k = GaussianPsf(2.0, 31).kernel(0, 0)
    # coadd pixels 1.1x larger than the input's: the PSF is 1.1x narrower on the coadd grid, and
    # convolved with the coadd's pixel (sigma^2 += 1/12)
    out = warp_kernel(k, np.array([[1.1, 0.0], [0.0, 1.1]]), 31)
    assert abs(out.sum() - 1) < 1e-12
    assert abs(kernel_moments(out)[0] / np.sqrt((2.0 / 1.1) ** 2 + 1 / 12) - 1) < 0.003
    # a rotation leaves a round PSF round and its size unchanged
    t = np.deg2rad(30)
    out = warp_kernel(k, np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]), 31)
    sigma, e1, e2 = kernel_moments(out)
    assert abs(sigma / kernel_moments(k)[0] - 1) < 0.003 and np.hypot(e1, e2) < 0.005


def test_coadd_psf_matches_the_coadd_of_psf_images():
    # one bright noise-free star per visit, different seeing and rotation: the coadd of its images
    # is the coadd PSF there
    sky = (np.array([RA0 + 0.0002]), np.array([DEC0 - 0.0003]), np.array([1e6]))
    wcs, shape = patch_grid(shape=(160, 160))
    warps = []
    for k, (sigma, sky_var) in enumerate([(1.4, 20.0), (2.0, 40.0), (2.6, 30.0)]):
        calexp = make_calexp(sky, sigma=sigma, sky_var=sky_var, noise=False, rotation=5.0 + 10 * k, visit=k + 1)
        warps.append(warp_exposures([calexp], [{"visit": k + 1, "ccd": 0}], wcs, shape).exposure)
    result = assemble_coadd(warps)
    x, y = (float(v[0]) for v in wcs.all_world2pix(sky[0], sky[1], 0))
    stamp, x0, y0 = result.coadd.psf.draw(x, y)
    n = stamp.shape[0]
    data = result.coadd.image[y0:y0 + n, x0:x0 + n] / sky[2][0]
    # the model and the coadd agree to 1 % of the peak pixel by pixel: both are Lanczos-3 resamplings of
    # the same pixelated PSFs, but at different phases (the sharpest input, FWHM 3.3 pixels, is barely sampled)
    assert np.abs(data - stamp).max() < 1e-2 * stamp.max()
    s_data, s_model = kernel_moments(data)[0], kernel_moments(stamp)[0]
    assert abs(s_model / s_data - 1) < 0.003
    # the weights are the coadd's: the model is not the plain mean of the inputs
    plain = np.mean([w.psf.kernel(x, y) for w in warps], axis=0)
    weighted = result.coadd.psf.kernel(x, y)
    assert np.abs(plain - weighted).max() > 10 * np.abs(weighted - result.coadd.psf.kernel(x, y)).max()


def test_coadd_psf_round_trip_through_fits():
    sky = (np.array([RA0]), np.array([DEC0]), np.array([1e5]))
    wcs, shape = patch_grid(shape=(120, 120))
    warps = [warp_exposures([make_calexp(sky, sigma=s, visit=k + 1, noise=False)], [{"visit": k + 1, "ccd": 0}],
                            wcs, shape).exposure for k, s in enumerate([1.5, 2.5])]
    psf = assemble_coadd(warps).coadd.psf
    back = psf_from_hdu(fits.BinTableHDU(psf.to_hdu().data, psf.to_hdu().header))
    assert isinstance(back, CoaddPsf)
    assert [i.visit for i in back.inputs] == [1, 2]
    np.testing.assert_allclose([i.weight for i in back.inputs], [i.weight for i in psf.inputs])
    np.testing.assert_allclose(back.kernel(60.0, 61.0), psf.kernel(60.0, 61.0), atol=1e-12)


def test_inputs_carry_their_calexps_curve_of_growth():
    """The light beyond each calexp's calibration aperture (APLOSS - 1 - APLOSSSK) reaches the coadd PSF and its FITS form; without a curve of growth it is NaN."""
    sky = (np.array([RA0]), np.array([DEC0]), np.array([1e5]))
    wcs, shape = patch_grid(shape=(120, 120))
    warps = []
    for k, (loss, sky_term, n) in enumerate([(1.012, -0.002, 40), (1.0, 0.0, 0)]):
        calexp = make_calexp(sky, sigma=1.5 + k, visit=k + 1, noise=False)
        calexp.metadata["APLOSS"], calexp.metadata["APLOSSSK"], calexp.metadata["APLOSSN"] = loss, sky_term, n
        warps.append(warp_exposures([calexp], [{"visit": k + 1, "ccd": 0}], wcs, shape).exposure)
    psf = assemble_coadd(warps).coadd.psf
    back = psf_from_hdu(fits.BinTableHDU(psf.to_hdu().data, psf.to_hdu().header))
    for model in (psf, back):
        wings = {i.visit: i.aperture_wing for i in model.inputs}
        assert wings[1] == np.float64(1.012 - 1 - (-0.002)) and np.isnan(wings[2])
