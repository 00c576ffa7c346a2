"""Warping calexps onto a patch grid: flux, positions, distortion, mask bits, persistence.

The synthetic-data builders here (``make_sky``, ``make_calexp``, ``patch_grid``) are shared by
the other coadd tests (``from test_warp import ...``).
"""
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

from snakedrp.coadd.config import WarpConfig
from snakedrp.coadd.coadd_psf import CoaddPsf
from snakedrp.coadd.warp import N_PHASE, LanczosResampler, pixel_mapping, warp_exposures
from snakedrp.repo.exposure import Exposure, mask_bit
from snakedrp.repo.psf_model import GaussianPsf
from snakedrp.stamps import lanczos

RA0, DEC0 = 150.0, 2.0
SCALE = 0.2 / 3600.0                    # deg / pixel


def tan_wcs(crpix, crval, scale_deg, rotation_deg, sip=None) -> WCS:
    """A TAN (or TAN-SIP with ``sip={'A_2_0': .., ...}``) WCS; ``crpix`` zero-based."""
    h = fits.Header()
    t = np.deg2rad(rotation_deg)
    h["NAXIS"] = 2
    h["CTYPE1"], h["CTYPE2"] = ("RA---TAN-SIP", "DEC--TAN-SIP") if sip else ("RA---TAN", "DEC--TAN")
    h["CRPIX1"], h["CRPIX2"] = crpix[0] + 1.0, crpix[1] + 1.0
    h["CRVAL1"], h["CRVAL2"] = crval
    h["CD1_1"], h["CD1_2"] = -scale_deg * np.cos(t), scale_deg * np.sin(t)
    h["CD2_1"], h["CD2_2"] = scale_deg * np.sin(t), scale_deg * np.cos(t)
    if sip:
        h["A_ORDER"] = h["B_ORDER"] = 2
        for key, value in sip.items():
            h[key] = value
    return WCS(h)


def make_sky(n_stars=12, seed=0, margin=0.01, spacing=0.0018):
    """Isolated stars: positions (ra, dec) [deg] on a jittered grid (``spacing`` deg, ~32 pixels)
    within ``margin`` deg of the field centre, and fluxes (AB 27 units, magnitudes 18-20)."""
    rng = np.random.default_rng(seed)
    nodes = np.arange(-margin, margin + 1e-12, spacing)
    gx, gy = np.meshgrid(nodes, nodes)
    pick = rng.permutation(gx.size)[:n_stars]
    jitter = 0.15 * spacing
    dx = gx.ravel()[pick] + rng.uniform(-jitter, jitter, len(pick))
    dy = gy.ravel()[pick] + rng.uniform(-jitter, jitter, len(pick))
    ra = RA0 + dx / np.cos(np.deg2rad(DEC0))
    dec = DEC0 + dy
    mag = rng.uniform(18.0, 20.0, len(pick))
    return ra, dec, 10 ** (-0.4 * (mag - 27.0))


def gaussian_stars(shape, x, y, flux, sigma):
    """Pixel-integrated circular Gaussians (exact total flux)."""
    ny, nx = shape
    img = np.zeros(shape)
    s = sigma * np.sqrt(2.0)
    for xc, yc, f in zip(x, y, flux):
        ix, iy = int(round(xc)), int(round(yc))
        half = int(np.ceil(6 * sigma))
        xs = np.arange(max(0, ix - half), min(nx, ix + half + 1))
        ys = np.arange(max(0, iy - half), min(ny, iy + half + 1))
        if len(xs) == 0 or len(ys) == 0:
            continue
        ex = 0.5 * (erf((xs - xc + 0.5) / s) - erf((xs - xc - 0.5) / s))
        ey = 0.5 * (erf((ys - yc + 0.5) / s) - erf((ys - yc - 0.5) / s))
        img[np.ix_(ys, xs)] += f * np.outer(ey, ex)
    return img


def make_calexp(sky, *, shape=(300, 200), rotation=3.0, offset=(0.0, 0.0), sigma=1.5, zeropoint=28.0,
                sky_var=25.0, seed=1, sip=None, noise=True, visit=1, ccd=0, artifact=None):
    """A calexp of ``sky``: Gaussian stars (sigma [pixel]), flat variance, GaussianPsf, TAN(-SIP) WCS.

    ``zeropoint`` is the calexp's (flux scale to AB 27: 10**(0.4 (27 - zeropoint)));
    ``artifact(image)`` may add something to the image before the noise.
    """
    ny, nx = shape
    crval = (RA0 + offset[0] / np.cos(np.deg2rad(DEC0)), DEC0 + offset[1])
    wcs = tan_wcs(((nx - 1) / 2, (ny - 1) / 2), crval, SCALE, rotation, sip)
    ra, dec, flux27 = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    flux_e = flux27 * 10 ** (0.4 * (zeropoint - 27.0))
    image = gaussian_stars(shape, x, y, flux_e, sigma)
    if artifact is not None:
        artifact(image)
    rng = np.random.default_rng(seed)
    variance = np.full(shape, sky_var, np.float32)
    if noise:
        image = image + rng.normal(0, np.sqrt(sky_var), shape)
    metadata = fits.Header({"VISIT": visit, "CCD": ccd, "FILTER": "HSC-R"})
    return Exposure(image=image.astype(np.float32), mask=np.zeros(shape, np.int32), variance=variance,
                    wcs=wcs, psf=GaussianPsf(sigma, 25), zeropoint=zeropoint, zeropoint_err=0.0,
                    metadata=metadata)


def patch_grid(shape=(320, 320), rotation=-1.0):
    """The patch: a TAN grid at the calexps' pixel scale, rotated a bit, centred on the field."""
    ny, nx = shape
    return tan_wcs(((nx - 1) / 2, (ny - 1) / 2), (RA0, DEC0), SCALE, rotation), shape


def aperture_sums(image, x, y, radius):
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    out = []
    for xc, yc in zip(x, y):
        r = np.hypot(xx - xc, yy - yc) < radius
        out.append(np.nansum(image[r]))
    return np.array(out)


def centroids(image, x, y, sigma, n_iter=10):
    """Gaussian-weighted centroids iterated to the fixed point (unbiased for symmetric profiles)."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    out = []
    for xc, yc in zip(x, y):
        for _ in range(n_iter):
            w = np.exp(-0.5 * ((xx - xc) ** 2 + (yy - yc) ** 2) / sigma**2)
            w[np.hypot(xx - xc, yy - yc) > 5 * sigma] = 0
            d = np.nan_to_num(image) * w
            xc, yc = (d * xx).sum() / d.sum(), (d * yy).sum() / d.sum()
        out.append((xc, yc))
    return np.array(out).T


def _inside(x, y, shape, margin):
    return (x > margin) & (x < shape[1] - 1 - margin) & (y > margin) & (y < shape[0] - 1 - margin)


SIP = {"A_2_0": 2e-5, "A_0_2": -1.5e-5, "A_1_1": 1e-5, "B_2_0": -1e-5, "B_0_2": 2e-5, "B_1_1": 1.2e-5}


@pytest.mark.parametrize("sip", [None, SIP])
def test_flux_and_positions_through_the_warp(sip):
    sky = make_sky(20, seed=3, margin=0.006)
    calexp = make_calexp(sky, noise=False, sip=sip, zeropoint=28.0, sigma=2.0)
    wcs, shape = patch_grid()
    warp = warp_exposures([calexp], [{"visit": 1, "ccd": 0}], wcs, shape, config=WarpConfig()).exposure
    ra, dec, flux27 = sky
    xin, yin = calexp.wcs.all_world2pix(ra, dec, 0)
    x, y = wcs.all_world2pix(ra, dec, 0)
    # whole stars on both grids (the 6x6 kernel and 12-pixel apertures inside)
    use = _inside(xin, yin, calexp.shape, 20) & _inside(x, y, shape, 20)
    assert use.sum() >= 8
    sums = aperture_sums(warp.image, x[use], y[use], 12.0)
    # the aperture holds all but 1e-9 of a sigma-2 Gaussian: the rest is the warp's (Lanczos-3's
    # sum over output pixels ripples by a few 1e-4 with the phase; without the pixel-area factor
    # the SIP case is off by 0.7 %)
    np.testing.assert_allclose(sums, flux27[use], rtol=1e-3)
    assert abs(np.mean(sums / flux27[use] - 1)) < 2e-4
    xc, yc = centroids(warp.image, x[use], y[use], 2.0)
    # SIP terms of 2e-5 move pixels by up to ~1 pixel at the corners: ignoring them would fail by far;
    # Lanczos-3 itself shifts a sigma-2 star by up to 0.011 pixel with the phase (Lanczos-5: 0.002)
    assert np.hypot(xc - x[use], yc - y[use]).max() < 0.02


def test_distortion_is_honoured():
    wcs, shape = patch_grid()
    with_sip = make_calexp(make_sky(1), sip=SIP, noise=False).wcs
    xs, ys = np.array([5.0, 190.0, 100.0]), np.array([5.0, 290.0, 150.0])
    x1, y1 = pixel_mapping(with_sip, wcs, xs, ys)
    plain = make_calexp(make_sky(1), sip=None, noise=False).wcs
    x2, y2 = pixel_mapping(plain, wcs, xs, ys)
    assert np.hypot(x1 - x2, y1 - y2).max() > 0.3            # SIP matters at the corners
    # round trip through the exact mapping
    xb, yb = pixel_mapping(wcs, with_sip, x1, y1)
    np.testing.assert_allclose(xb, xs, atol=1e-6)
    np.testing.assert_allclose(yb, ys, atol=1e-6)


def test_no_data_edge_and_mask_spread():
    sky = make_sky(5, seed=4)
    calexp = make_calexp(sky, noise=False)
    calexp.mask[150, 100] = mask_bit("BAD")
    wcs, shape = patch_grid(shape=(400, 400))
    result = warp_exposures([calexp], [{"visit": 1, "ccd": 0}], wcs, shape, config=WarpConfig())
    warp = result.exposure
    no_data = (warp.mask & mask_bit("NO_DATA")) != 0
    # the calexp (200 x 300) covers part of the 400 x 400 patch: the rest has no data, NaN planes
    assert 0.3 < no_data.mean() < 0.75
    assert np.isnan(warp.image[no_data]).all() and np.isnan(warp.variance[no_data]).all()
    assert np.isfinite(warp.image[~no_data]).all()
    # EDGE: a band along the CCD border, inside the data
    edge = ((warp.mask & mask_bit("EDGE")) != 0) & ~no_data
    xin, yin = pixel_mapping(wcs, calexp.wcs, *np.nonzero(edge)[::-1])
    dist = np.minimum(np.minimum(xin, 199 - xin), np.minimum(yin, 299 - yin))
    assert edge.sum() > 0 and dist.max() < WarpConfig().edge_width + 1e-6
    # the bad pixel spreads to the output pixels whose 6x6 kernel touches it: about 36 of them
    bad = np.nonzero((warp.mask & mask_bit("BAD")) != 0)
    assert 25 <= len(bad[0]) <= 49
    xb, yb = pixel_mapping(calexp.wcs, wcs, np.array([100.0]), np.array([150.0]))
    assert np.hypot(bad[1] - xb[0], bad[0] - yb[0]).max() < 4.3
    # inputs table and the warp's PSF: one CCD
    assert list(result.inputs["ccd"]) == [0] and result.inputs["n_pixels"][0] == (~no_data).sum()
    assert isinstance(warp.psf, CoaddPsf) and len(warp.psf.inputs) == 1


def test_variance_propagation_matches_noise():
    # pure noise: the warped variance plane predicts the warped pixels' scatter
    sky = make_sky(0)
    calexp = make_calexp(sky, shape=(300, 300), sky_var=100.0, seed=7, rotation=10.0)
    wcs, shape = patch_grid(shape=(200, 200))
    warp = warp_exposures([calexp], [{"visit": 1, "ccd": 0}], wcs, shape, config=WarpConfig()).exposure
    good = warp.mask == 0
    ratio = np.var(warp.image[good]) / np.mean(warp.variance[good])
    # 40000 correlated pixels: ~1.5 % scatter of the ratio
    assert abs(ratio - 1) < 0.05
    scale2 = 10 ** (0.8 * (27 - 28.0))
    assert 0.5 * 100 * scale2 < np.mean(warp.variance[good]) < 100 * scale2


def test_two_ccds_fill_one_warp_and_round_trip(tmp_path):
    sky = make_sky(20, seed=5, margin=0.012)
    left = make_calexp(sky, offset=(-0.0058, 0.0), ccd=0, seed=1)
    right = make_calexp(sky, offset=(0.0058, 0.0), ccd=1, seed=2)
    wcs, shape = patch_grid(shape=(300, 380))
    result = warp_exposures([left, right], [{"visit": 7, "ccd": 0}, {"visit": 7, "ccd": 1}], wcs, shape)
    assert sorted(result.inputs["ccd"]) == [0, 1]
    path = tmp_path / "warp.fits"
    result.exposure.write(path)
    back = Exposure.read(path)
    np.testing.assert_array_equal(back.mask, result.exposure.mask)
    assert back.zeropoint == 27.0
    assert isinstance(back.psf, CoaddPsf) and [i.ccd for i in back.psf.inputs] == [0, 1]
    # the WCSs go through header strings (~1e-7 relative precision of their cards)
    np.testing.assert_allclose(back.psf.kernel(150, 150), result.exposure.psf.kernel(150, 150), rtol=1e-5, atol=1e-9)


def test_calexp_off_the_patch_gives_an_empty_warp_that_assemble_leaves_out(tmp_path):
    from snakedrp.coadd.assemble import assemble_coadd, open_warp

    sky = make_sky(3)
    wcs, shape = patch_grid()
    far = make_calexp(sky, offset=(1.0, 1.0), visit=2)                 # a degree away from the patch
    result = warp_exposures([far], [{"visit": 2, "ccd": 0}], wcs, shape)
    warp = result.exposure
    assert result.empty and warp.shape == shape and warp.psf is None
    assert (warp.mask == mask_bit("NO_DATA")).all()
    assert np.isnan(warp.image).all() and np.isnan(warp.variance).all()
    assert list(result.inputs["visit"]) == [2] and list(result.inputs["n_pixels"]) == [0]
    assert np.isnan(result.inputs["variance_mean"][0]) and warp.metadata["NCCDWARP"] == 0
    # a calexp on the patch whose pixels are all without data gives the same
    blank = make_calexp(sky, visit=3)
    blank.image[:] = np.nan
    blank_result = warp_exposures([blank], [{"visit": 3, "ccd": 0}], wcs, shape)
    assert blank_result.empty and (blank_result.exposure.mask & mask_bit("NO_DATA") != 0).all()
    assert np.isnan(blank_result.exposure.image).all()

    good = warp_exposures([make_calexp(sky)], [{"visit": 1, "ccd": 0}], wcs, shape)
    assert not good.empty
    warp.write(tmp_path / "warp-2.fits")
    good.exposure.write(tmp_path / "warp-1.fits")
    coadd = assemble_coadd([open_warp(tmp_path / "warp-1.fits"), open_warp(tmp_path / "warp-2.fits")])
    assert coadd.dropped == (1,) and list(coadd.inputs["visit"]) == [1]
    alone = assemble_coadd([good.exposure])
    np.testing.assert_array_equal(coadd.coadd.image, alone.coadd.image)


def test_identity_warp_returns_the_input():
    # the patch grid is the calexp's own grid at the calexp's zeropoint: every output pixel maps onto
    # an input pixel centre (to ~1e-10 pixel through the WCS round trip), so the kernel is a unit tap
    calexp = make_calexp(make_sky(12, seed=6), shape=(120, 90), zeropoint=27.0, sigma=1.5)
    calexp.mask[40, 30] = mask_bit("SAT")
    warp = warp_exposures([calexp], [{"visit": 1, "ccd": 0}], calexp.wcs, calexp.shape).exposure
    inner = np.s_[3:-4, 3:-4]          # kernel wholly on the CCD: order - 1 = 2 below, order = 3 above
    np.testing.assert_allclose(warp.image[inner], calexp.image[inner], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(warp.variance[inner], calexp.variance[inner], rtol=1e-6)
    # the kernel never fits at the first and last 2 columns; the third from either end is on its limit
    # and goes either way with the round trip
    assert (warp.mask[:, :2] & mask_bit("NO_DATA")).all() and (warp.mask[:, -2:] & mask_bit("NO_DATA")).all()
    assert not (warp.mask[inner] & mask_bit("NO_DATA")).any()
    # the SAT pixel's bit reaches the output pixels whose 6 x 6 footprint holds it: 6 x 6 of them,
    # 2-3 before and after it (a position 1e-10 below an integer floors one pixel lower)
    sat_y, sat_x = np.nonzero(warp.mask & mask_bit("SAT"))
    assert len(sat_y) == 36 and np.ptp(sat_y) == 5 and np.ptp(sat_x) == 5
    assert 2 <= 40 - sat_y.min() <= 3 and 2 <= 30 - sat_x.min() <= 3


def _direct_lanczos(image, variance, mask, x, y, order):
    """Reference: the 2 order x 2 order sum written out, with exactly evaluated (not tabulated) weights."""
    taps = np.arange(-order + 1, order + 1)
    out = np.zeros((3, len(x)))
    bits = np.zeros(len(x), np.int64)
    for n, (xc, yc) in enumerate(zip(x, y)):
        ix, iy = int(np.floor(xc)), int(np.floor(yc))
        wx = lanczos(ix + taps - xc, order)
        wy = lanczos(iy + taps - yc, order)
        w = np.outer(wy / wy.sum(), wx / wx.sum())
        box = np.s_[iy - order + 1:iy + order + 1, ix - order + 1:ix + order + 1]
        out[:, n] = (w * image[box]).sum(), (w**2 * variance[box]).sum(), 0
        bits[n] = np.bitwise_or.reduce(mask[box].ravel())
    return out[0], out[1], bits


@pytest.mark.parametrize("order", [3, 5])
def test_resampler_matches_the_direct_kernel_sum(order):
    rng = np.random.default_rng(11)
    shape = (60, 70)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    variance = rng.uniform(1.0, 2.0, shape).astype(np.float32)
    mask = np.zeros(shape, np.int32)
    mask[20, 30], mask[41, 12] = mask_bit("CR"), mask_bit("SAT")
    image[33, 50] = np.nan
    resampler = LanczosResampler(image, variance, mask, order)
    # phases on the kernel table's 1/N_PHASE grid: the table is then exact and only float32 sums differ;
    # more positions than one chunk, so the chunking is covered too
    n = LanczosResampler.chunk + 500
    x = rng.integers(order - 1, shape[1] - order, n) + rng.integers(0, N_PHASE, n) / N_PHASE
    y = rng.integers(order - 1, shape[0] - order, n) + rng.integers(0, N_PHASE, n) / N_PHASE
    assert resampler.valid(x, y).all()
    got_i, got_v, got_bits = resampler(x, y)
    pick = rng.choice(n, 2000, replace=False)
    # a pixel without data counts as 0 in both planes and flags NO_DATA and BAD
    lost = np.isnan(image)
    ref_i, ref_v, ref_bits = _direct_lanczos(np.where(lost, 0, image), np.where(lost, 0, variance),
                                             np.where(lost, mask | mask_bit("NO_DATA") | mask_bit("BAD"), mask),
                                             x[pick], y[pick], order)
    # float32 sums of 2 order^2 terms of unit size: a few 1e-7
    np.testing.assert_allclose(got_i[pick], ref_i, atol=2e-6)
    np.testing.assert_allclose(got_v[pick], ref_v, rtol=2e-6)
    np.testing.assert_array_equal(got_bits[pick], ref_bits)
    assert (got_bits & mask_bit("NO_DATA")).any() and (got_bits & mask_bit("CR")).any()
    # the kernel's edge: the first and last valid positions along each axis
    lo, hi = order - 1.0, np.nextafter(shape[1] - order, 0)
    assert resampler.valid(np.array([lo, hi]), np.array([lo, lo])).all()
    assert not resampler.valid(np.array([lo - 1e-9, shape[1] - order]), np.array([lo, lo])).any()


def test_resampling_a_smooth_image_is_accurate():
    # a well-sampled analytic image (Gaussian of sigma 2.5 pixels plus a gradient): Lanczos-3 at
    # random positions recovers it to within 0.4 % of the peak (the kernel's own interpolation error,
    # 3.6e-3 at worst here; the phase table adds at most |gradient| / 2048 ~ 1e-4)
    def truth(x, y):
        return np.exp(-0.5 * ((x - 44.3) ** 2 + (y - 39.6) ** 2) / 2.5**2) + 0.01 * x

    yy, xx = np.mgrid[:80, :90].astype(float)
    image = truth(xx, yy).astype(np.float32)
    resampler = LanczosResampler(image, np.ones_like(image), np.zeros(image.shape, np.int32), 3)
    rng = np.random.default_rng(2)
    x, y = rng.uniform(30, 60, 5000), rng.uniform(25, 55, 5000)
    got, var, _ = resampler(x, y)
    assert np.abs(got - truth(x, y)).max() < 5e-3
    assert np.sqrt(np.mean((got - truth(x, y)) ** 2)) < 1e-3
    # variance of a white-noise field through the kernel: sum of squared weights, between ~0.5 and 1
    assert 0.45 < var.min() and var.max() <= 1.0 + 1e-6


def test_rotated_ccd_fills_its_whole_footprint():
    # at 40 degrees the CCD covers about half of its bounding box on the patch; the rows are resampled
    # over the columns the CCD reaches only, and no pixel it reaches is left out
    calexp = make_calexp(make_sky(8, seed=9), shape=(200, 150), rotation=40.0, noise=False)
    wcs, shape = patch_grid(shape=(300, 300), rotation=0.0)
    warp = warp_exposures([calexp], [{"visit": 1, "ccd": 0}], wcs, shape).exposure
    filled = (warp.mask & mask_bit("NO_DATA")) == 0
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    xin, yin = (a.reshape(shape) for a in pixel_mapping(wcs, calexp.wcs, xx.ravel(), yy.ravel()))
    reach = (xin >= 2) & (xin < 150 - 3) & (yin >= 2) & (yin < 200 - 3)
    # only pixels whose exact position lies within the coarse grid's interpolation error of the
    # kernel's limit may differ
    dist = np.minimum.reduce([xin - 2, 147 - xin, yin - 2, 197 - yin])
    assert np.all(np.abs(dist[filled != reach]) < 1e-3)
    assert 0.3 < filled.sum() / (200 * 150) * 1.0 < 1.0
