"""PSF star selection and the spatially varying pixel-basis PSF model (snakedrp.meas.psf, psf_select).

One full HSC-sized CCD (2048 x 4176) is rendered with GalSim: a sheared Moffat (beta 3.5,
truncated at 4 FWHM) whose FWHM (~4.2 px = 0.7") and shear vary quadratically over the CCD,
stars with S/N 10 to a few thousand (the brightest saturate and are masked SAT), Sersic
galaxies, a bad column, cosmic rays, sky 2000 e-. Sources come from sep (10 sigma, windowed
centroids), as the pipeline's bright-source detection gives them.
"""
from __future__ import annotations

import io
import time
import warnings

import galsim
import numpy as np
import pytest
import sep
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from snakedrp.repo.exposure import mask_bit
from snakedrp.pexconfig import ConfigError
from snakedrp.meas.psf import PsfConfig, PsfError, build_psf, predicted_shape_noise
from snakedrp.poly import poly_basis
from snakedrp.meas.psf_select import select_psf_stars
from snakedrp.repo.psf_model import GaussianPsf, PixelPsf, psf_from_hdu
from snakedrp.stamps import gaussian_centroid, kernel_moments, shift_image, shift_stack

pytestmark = pytest.mark.filterwarnings("ignore::galsim.GalSimWarning")

SHAPE = (4176, 2048)
SKY = 2000.0
FWHM0 = 4.2
SATURATION = 150000.0
# one Moffat profile, dilated and sheared per position: GalSim then reuses its Hankel transform
MOFFAT = galsim.Moffat(beta=3.5, fwhm=1.0, trunc=4.0)


def psf_params(x, y):
    """True FWHM [pixel] and reduced shear (g1, g2) at zero-based CCD positions."""
    ny, nx = SHAPE
    u, v = (np.asarray(x) - (nx - 1) / 2) / ((nx - 1) / 2), (np.asarray(y) - (ny - 1) / 2) / ((ny - 1) / 2)
    fwhm = FWHM0 * (1 + 0.04 * u + 0.03 * v + 0.04 * u * u - 0.02 * u * v + 0.05 * v * v)
    g1 = 0.015 + 0.012 * u - 0.012 * v * v
    g2 = -0.01 + 0.015 * v + 0.01 * u * v
    return fwhm, g1, g2


def true_psf(x, y):
    fwhm, g1, g2 = psf_params(x, y)
    return MOFFAT.dilate(float(fwhm)).shear(g1=float(g1), g2=float(g2))


def true_kernel(x, y, n):
    """The true PSF with the pixel, centred on an n x n stamp (what the validation compares with)."""
    return true_psf(x, y).drawImage(nx=n, ny=n, scale=1.0, method="fft").array


def _draw(img, obj, x, y, half):
    b = galsim.BoundsI(int(np.floor(x + 0.5)) + 1 - half, int(np.floor(x + 0.5)) + 1 + half,
                       int(np.floor(y + 0.5)) + 1 - half, int(np.floor(y + 0.5)) + 1 + half) & img.bounds
    obj.drawImage(image=img[b], center=galsim.PositionD(x + 1, y + 1), add_to_image=True, method="fft")


@pytest.fixture(scope="module")
def field():
    rng = np.random.default_rng(20261122)
    ny, nx = SHAPE
    img = galsim.ImageD(nx, ny, scale=1.0)
    n_star, n_gal = 450, 900
    sx, sy = rng.uniform(3, nx - 4, n_star), rng.uniform(3, ny - 4, n_star)
    sflux = 10 ** rng.uniform(np.log10(3e3), np.log10(2e7), n_star)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", galsim.GalSimWarning)
        for x, y, f in zip(sx, sy, sflux):
            _draw(img, true_psf(x, y).withFlux(f), x, y, int(4.4 * FWHM0) + 2)
        gx, gy = rng.uniform(3, nx - 4, n_gal), rng.uniform(3, ny - 4, n_gal)
        gflux = 10 ** rng.uniform(np.log10(3e3), np.log10(3e6), n_gal)
        hlr = 10 ** rng.uniform(np.log10(0.6), np.log10(6.0), n_gal)   # 0.1"-1.0"
        for x, y, f, h in zip(gx, gy, gflux, hlr):
            gal = galsim.Sersic(n=float(rng.choice([1.0, 1.5, 2.5, 4.0])), half_light_radius=1.0, trunc=4.5)
            gal = gal.dilate(h).withFlux(f).shear(e=rng.uniform(0, 0.6), beta=rng.uniform(0, np.pi) * galsim.radians)
            _draw(img, galsim.Convolve(gal, true_psf(x, y)), x, y, int(min(4.5 * h + 2 * FWHM0, 40)))
    signal = img.array
    cr = np.zeros(SHAPE)
    for _ in range(300):   # cosmic rays (not yet masked when the PSF is built)
        x0, y0 = rng.integers(2, nx - 20), rng.integers(2, ny - 20)
        length, theta = rng.integers(1, 15), rng.uniform(0, np.pi)
        t = np.arange(length)
        cr[(y0 + t * np.sin(theta)).astype(int), (x0 + t * np.cos(theta)).astype(int)] += rng.uniform(500, 5000)
    expect = signal + SKY + cr
    data = expect + rng.normal(size=SHAPE) * np.sqrt(expect + 25.0)
    mask = np.zeros(SHAPE, np.int32)
    sat = data > SATURATION
    data[sat] = SATURATION
    mask[sat] |= mask_bit("SAT")
    mask[:, 700] |= mask_bit("BAD")
    data[:, 700] = SKY
    variance = (np.maximum(data, 0) + 25.0).astype(np.float32)
    image = (data - SKY).astype(np.float32)

    # sep: bright sources, windowed centroids, 3-FWHM aperture fluxes
    err = np.sqrt(variance)
    objs = sep.extract(image, 10.0, err=err, minarea=5, mask=(mask & mask_bit("BAD")) != 0)
    xw, yw, _ = sep.winpos(image, objs["x"], objs["y"], np.full(len(objs), FWHM0 / 2.3548))
    flux, flux_err, _ = sep.sum_circle(image, xw, yw, 3 * FWHM0, err=err)
    sources = Table({"x": xw, "y": yw, "flux": flux, "flux_err": flux_err})

    ix, iy = np.floor(sx + 0.5).astype(int), np.floor(sy + 0.5).astype(int)
    saturated = np.array([sat[max(j - 3, 0): j + 4, max(i - 3, 0): i + 4].any() for i, j in zip(ix, iy)])
    truth = Table({"x": np.r_[sx, gx], "y": np.r_[sy, gy], "flux": np.r_[sflux, gflux],
                   "star": np.r_[np.ones(n_star, bool), np.zeros(n_gal, bool)],
                   "saturated": np.r_[saturated, np.zeros(n_gal, bool)]})
    return {"image": image, "variance": variance, "mask": mask, "sources": sources, "truth": truth}


@pytest.fixture(scope="module")
def built(field):
    cfg = PsfConfig()
    t0 = time.perf_counter()
    stars = select_psf_stars(field["sources"], field["image"], field["mask"], cfg)
    t1 = time.perf_counter()
    result = build_psf(field["image"], field["variance"], field["mask"], stars, cfg)
    t2 = time.perf_counter()
    print(f"\n2048x4176 CCD: {len(field['sources'])} sources, select_psf_stars {t1 - t0:.3f} s, "
          f"build_psf {t2 - t1:.3f} s ({result.stars_used.sum()} stars, kernel {result.kernel_size}, "
          f"degree {result.degree}, FWHM {result.fwhm:.2f} px)")
    return stars, result


def _nearest_truth(truth, x, y):
    dist, idx = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(np.column_stack([x, y]))
    return dist, idx


# ---------------------------------------------------------------- selection
def test_selection_picks_stars_and_reserves(field, built):
    stars, _ = built
    truth = field["truth"]
    dist, idx = _nearest_truth(truth, stars["x"], stars["y"])
    purity = np.mean(truth["star"][idx] & (dist < 1.5))
    print(f"selected {len(stars)} stars, purity {100 * purity:.1f} %, reserved {stars['reserved'].sum()}")
    assert len(stars) >= 80
    assert purity > 0.95
    assert not truth["saturated"][idx].any()
    # ~20 % reserved, exactly round(0.2 n), and the same draw every time
    assert stars["reserved"].sum() == round(0.2 * len(stars))
    again = select_psf_stars(field["sources"], field["image"], field["mask"], PsfConfig())
    assert np.array_equal(again["reserved"], stars["reserved"])
    for name in ("source_index", "moments_sigma", "moments_e1", "moments_e2", "psf_candidate", "reserved"):
        assert name in stars.colnames
    assert np.array_equal(field["sources"]["x"][stars["source_index"]], stars["x"])


def test_selection_rejects_masked_cores_and_edges(field, built):
    stars, result = built
    ix = np.floor(np.asarray(stars["x"]) + 0.5).astype(int)
    iy = np.floor(np.asarray(stars["y"]) + 0.5).astype(int)
    half = result.kernel_size // 2
    ny, nx = SHAPE
    assert ((ix - half >= 0) & (ix + half < nx) & (iy - half >= 0) & (iy + half < ny)).all()
    bad = (field["mask"] & (mask_bit("SAT") | mask_bit("BAD"))) != 0
    assert not any(bad[j - 4: j + 5, i - 4: i + 5].any() for i, j in zip(ix, iy))


def test_no_locus_raises(field):
    few = field["sources"][:3]
    with pytest.raises(PsfError, match="no stellar locus"):
        select_psf_stars(few, field["image"], field["mask"], PsfConfig())


# ---------------------------------------------------------------- the model
def test_pixel_psf_shape_at_reserved_stars(built):
    """Goals: FWHM RMS error <= 1 %, e1/e2 RMS error <= 0.005 (adaptive moments, model vs truth)."""
    stars, result = built
    rows = stars[stars["reserved"]]
    dsize, de = [], []
    for x, y in zip(rows["x"], rows["y"]):
        model = result.psf.kernel(x, y)
        sm, e1m, e2m = kernel_moments(model)
        st, e1t, e2t = kernel_moments(true_kernel(x, y, model.shape[0]))
        dsize.append(sm / st - 1)
        de.append((e1m - e1t, e2m - e2t))
    dsize, de = np.array(dsize), np.array(de)
    rms_size = np.sqrt(np.mean(dsize**2))
    rms_e = np.sqrt(np.mean(de**2, axis=0))
    print(f"reserved stars: {len(rows)}; FWHM error bias {100 * dsize.mean():+.3f} % RMS {100 * rms_size:.3f} %; "
          f"e1 RMS {rms_e[0]:.4f}, e2 RMS {rms_e[1]:.4f}")
    assert len(rows) >= 15
    assert rms_size <= 0.01
    assert (rms_e <= 0.005).all()


def test_pixel_psf_spatial_variation_is_needed(built):
    """A constant PSF would miss the goal: the model must follow the ~10 % size variation."""
    _, result = built
    ny, nx = SHAPE
    s_corner = kernel_moments(result.psf.kernel(0, 0))[0]
    s_top = kernel_moments(result.psf.kernel(nx - 1, ny - 1))[0]
    t_corner = kernel_moments(true_kernel(0, 0, result.kernel_size))[0]
    t_top = kernel_moments(true_kernel(nx - 1, ny - 1, result.kernel_size))[0]
    assert abs(t_top / t_corner - 1) > 0.05
    assert s_top / s_corner == pytest.approx(t_top / t_corner, abs=0.015)


def test_psf_flux_bias_of_bright_stars(field, built):
    """Goal: PSF-flux bias of bright isolated stars < 5 mmag (model drawn at the true position)."""
    _, result = built
    truth, image, mask = field["truth"], field["image"], field["mask"]
    tree = cKDTree(np.column_stack([truth["x"], truth["y"]]))
    ratios = []
    for x, y, f, star, sat in zip(truth["x"], truth["y"], truth["flux"], truth["star"], truth["saturated"]):
        snr = f / np.sqrt(f + 4 * np.pi * (FWHM0 / 2.3548) ** 2 * SKY)
        if not star or sat or snr < 100 or len(tree.query_ball_point([x, y], 25)) > 1:
            continue
        stamp, x0, y0 = result.psf.draw(x, y)
        n = stamp.shape[0]
        if x0 < 0 or y0 < 0 or x0 + n > SHAPE[1] or y0 + n > SHAPE[0] or mask[y0:y0 + n, x0:x0 + n].any():
            continue
        data = image[y0:y0 + n, x0:x0 + n]
        # uniform weights (LSST PsfFlux): per-pixel variance weights would bias bright stars low
        ratios.append((stamp * data).sum() / (stamp**2).sum() / f)
    bias_mmag = -2500 * np.log10(np.median(ratios))
    print(f"PSF-flux bias of {len(ratios)} bright isolated stars: {bias_mmag:+.2f} mmag "
          f"(scatter {100 * np.std(ratios):.2f} %)")
    assert len(ratios) >= 30
    assert abs(bias_mmag) < 5.0


def test_draw_places_the_star_at_its_position(built):
    _, result = built
    for x, y in ((1000.3, 2000.6), (512.0, 300.5), (1800.45, 3900.2)):
        stamp, x0, y0 = result.psf.draw(x, y)
        n = stamp.shape[0]
        assert stamp.sum() == pytest.approx(1.0, abs=2e-3)
        dx, dy = gaussian_centroid(stamp[None], 1.8)
        assert x0 + n // 2 + dx[0] == pytest.approx(x, abs=0.01)
        assert y0 + n // 2 + dy[0] == pytest.approx(y, abs=0.01)


def test_kernel_is_normalised_odd_and_centred(built):
    _, result = built
    k = result.psf.kernel(1024.0, 2088.0)
    n = k.shape[0]
    assert n % 2 == 1 and k.shape == (n, n)
    assert k.sum() == pytest.approx(1.0)
    assert np.unravel_index(np.argmax(k), k.shape) == (n // 2, n // 2)
    dx, dy = gaussian_centroid(k[None], 1.8)
    assert abs(dx[0]) < 0.01 and abs(dy[0]) < 0.01


def test_result_stars_table(built):
    stars, result = built
    used = np.asarray(result.stars["psf_used"])
    assert np.array_equal(used, result.stars_used)
    assert not (used & np.asarray(result.stars["reserved"])).any()
    assert used.sum() == result.psf.n_stars >= 50
    assert np.isfinite(result.stars["psf_chi2"][used]).all()


def test_hdu_round_trip_gives_identical_kernels(built):
    _, result = built
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), result.psf.to_hdu()]).writeto(buf)
    buf.seek(0)
    with fits.open(buf) as hdul:
        assert hdul["PSF"].header["PSFTYPE"] == "PixelPsf"
        psf = psf_from_hdu(hdul["PSF"])
    assert isinstance(psf, PixelPsf)
    for x, y in ((0, 0), (1023.5, 2087.5), (2047, 4175), (300.2, 3000.7)):
        np.testing.assert_array_equal(psf.kernel(x, y), result.psf.kernel(x, y))
        np.testing.assert_array_equal(psf.draw(x, y)[0], result.psf.draw(x, y)[0])


def test_too_few_stars_raises(field, built):
    stars, _ = built
    with pytest.raises(PsfError, match="min_stars"):
        build_psf(field["image"], field["variance"], field["mask"], stars[:5], PsfConfig())


def test_degree_is_lowered_when_stars_are_few(field, built):
    stars, _ = built
    few = stars[~stars["reserved"]][:15]
    result = build_psf(field["image"], field["variance"], field["mask"], few, PsfConfig())
    assert result.degree < 2      # 15 stars < 4 per term x 6 terms


def _grid_shape_errors(psf, n_side=5):
    """Model-minus-truth (FWHM ratio - 1, e1, e2) on an n_side x n_side grid spanning the CCD."""
    ny, nx = SHAPE
    out = []
    for y in np.linspace(20, ny - 21, n_side):
        for x in np.linspace(20, nx - 21, n_side):
            model = psf.kernel(x, y)
            sm, e1m, e2m = kernel_moments(model)
            st, e1t, e2t = kernel_moments(true_kernel(x, y, model.shape[0]))
            out.append((sm / st - 1, e1m - e1t, e2m - e2t))
    return np.array(out)


def test_degree_is_lowered_when_stars_leave_the_ccd_empty(field, built):
    """30 faint stars in the lower third: enough for 4 per term, but a quadratic would fit their
    noise and be extrapolated over the empty two thirds."""
    stars, _ = built
    ny, nx = SHAPE
    pool = stars[~stars["reserved"] & (stars["y"] < ny / 3)]
    pool = pool[np.argsort(pool["flux"] / pool["flux_err"])][:30]
    snr = np.asarray(pool["flux"] / pool["flux_err"])
    default = build_psf(field["image"], field["variance"], field["mask"], pool, PsfConfig())
    unlimited = build_psf(field["image"], field["variance"], field["mask"], pool, PsfConfig(max_shape_noise=1e9))
    err_default = np.sqrt(np.mean(_grid_shape_errors(default.psf) ** 2, axis=0))
    err_unlimited = np.sqrt(np.mean(_grid_shape_errors(unlimited.psf) ** 2, axis=0))
    print(f"30 stars S/N {snr.min():.0f}-{snr.max():.0f} in y < {ny / 3:.0f}: degree {default.degree} "
          f"(noise {default.shape_noise:.4f}) grid RMS FWHM {100 * err_default[0]:.2f} % e1 {err_default[1]:.4f} "
          f"e2 {err_default[2]:.4f}; degree {unlimited.degree} (noise {unlimited.shape_noise:.4f}) "
          f"FWHM {100 * err_unlimited[0]:.2f} % e1 {err_unlimited[1]:.4f} e2 {err_unlimited[2]:.4f}")
    assert unlimited.degree == 2 and default.degree == 1
    assert default.shape_noise <= PsfConfig().max_shape_noise < unlimited.shape_noise
    # a plane is kept whatever its noise (a constant PSF would miss the size variation)
    assert build_psf(field["image"], field["variance"], field["mask"], pool, PsfConfig(max_shape_noise=0.0)).degree == 1
    # the quadratic's ellipticity over the empty part of the CCD is mostly noise
    assert np.hypot(*err_default[1:]) < 0.5 * np.hypot(*err_unlimited[1:])


def test_plane_kept_for_ten_bright_stars_spread_over_the_ccd(field, built):
    """A sparse CCD: 10 bright stars (fewer than 4 per term of a plane). Spread over the CCD, their
    plane's predicted noise is within the limit and it follows the PSF's size gradient, which a
    constant model turns into PSF-flux errors; bunched in one corner, the plane would be
    extrapolated over the rest and the model stays constant."""
    stars, _ = built
    ny, nx = SHAPE
    pool = stars[~stars["reserved"]]
    pool = pool[np.argsort(-pool["flux"] / pool["flux_err"])][:80]
    targets = [(x, y) for x in (0.2 * nx, 0.8 * nx) for y in np.linspace(0.1, 0.9, 5) * ny]
    spread = pool[[int(np.argmin(np.hypot(pool["x"] - x, pool["y"] - y))) for x, y in targets]]
    corner = pool[np.argsort(np.hypot(pool["x"], pool["y"]))[:10]]
    cfg = PsfConfig()
    assert len(set(spread["x"])) == 10 and len(spread) < cfg.stars_per_term * 3
    plane = build_psf(field["image"], field["variance"], field["mask"], spread, cfg)
    constant = build_psf(field["image"], field["variance"], field["mask"], spread, PsfConfig(degree=0))
    err_plane = np.sqrt(np.mean(_grid_shape_errors(plane.psf) ** 2, axis=0))
    err_constant = np.sqrt(np.mean(_grid_shape_errors(constant.psf) ** 2, axis=0))
    print(f"10 spread stars: degree {plane.degree} (noise {plane.shape_noise:.4f}) grid RMS FWHM "
          f"{100 * err_plane[0]:.2f} % e {np.hypot(*err_plane[1:]):.4f}; degree 0: FWHM {100 * err_constant[0]:.2f} % "
          f"e {np.hypot(*err_constant[1:]):.4f}")
    assert plane.degree == 1 and plane.shape_noise <= cfg.max_shape_noise
    assert err_plane[0] < 0.8 * err_constant[0]
    bunched = build_psf(field["image"], field["variance"], field["mask"], corner, cfg)
    assert bunched.degree == 0


def test_predicted_shape_noise_matches_noisy_fits():
    """The prediction is the RMS over the CCD of a weighted polynomial fit to ellipticities with errors 2 / S/N."""
    rng = np.random.default_rng(5)
    n = 25
    u, v = rng.uniform(-1, 0.2, n), rng.uniform(-1, 1, n)       # the right part of the CCD is empty
    snr = 10 ** rng.uniform(1.7, 2.7, n)
    g = np.linspace(-1, 1, 11)
    gu, gv = (a.ravel() for a in np.meshgrid(g, g))
    for degree in (0, 1, 2):
        basis, grid = poly_basis(u, v, degree), poly_basis(gu, gv, degree)
        w = (snr / 2) ** 2
        fits_ = [grid @ np.linalg.lstsq(basis * np.sqrt(w)[:, None], rng.normal(0, 2 / snr) * np.sqrt(w), rcond=None)[0]
                 for _ in range(2000)]
        measured = np.sqrt(np.mean(np.square(fits_)))
        assert predicted_shape_noise(u, v, snr, degree) == pytest.approx(measured, rel=0.05)
    assert predicted_shape_noise(u, v, snr, 0) == pytest.approx(2 / np.sqrt(np.sum(snr**2)))
    assert predicted_shape_noise(u, v, 2 * snr, 2) == pytest.approx(0.5 * predicted_shape_noise(u, v, snr, 2))
    # stars on one column do not constrain the variation along x
    assert predicted_shape_noise(np.full(n, 0.3), v, snr, 1) == np.inf
    assert np.isfinite(predicted_shape_noise(np.full(n, 0.3), v, snr, 0))


# ---------------------------------------------------------------- helpers and config
def test_shift_stack_matches_shift_image():
    rng = np.random.default_rng(3)
    stack = rng.normal(size=(4, 21, 25))
    dx, dy = rng.uniform(-0.5, 0.5, 4), rng.uniform(-0.5, 0.5, 4)
    out = shift_stack(stack, dx, dy)
    for k in range(4):
        np.testing.assert_allclose(out[k], shift_image(stack[k], dx[k], dy[k]), atol=1e-12)


def test_lanczos5_resampling_barely_narrows_the_psf():
    """Why resample_order defaults to 5: Lanczos-3 narrows a 3-px FWHM star by ~0.7 % at half a pixel."""
    psf = MOFFAT.dilate(3.0)
    truth = kernel_moments(psf.drawImage(nx=31, ny=31, scale=1.0, method="fft").array)[0]
    off = psf.drawImage(nx=45, ny=45, scale=1.0, method="fft", offset=(0.5, 0.5)).array
    narrow = {o: kernel_moments(shift_stack(off[None], [-0.5], [-0.5], o)[0, 7:-7, 7:-7])[0] / truth - 1
              for o in (3, 5)}
    assert narrow[3] < -0.005
    assert abs(narrow[5]) < 0.002


def test_gaussian_psf_still_round_trips():
    psf = GaussianPsf(1.7, 21)
    back = psf_from_hdu(psf.to_hdu())
    np.testing.assert_array_equal(back.kernel(3, 4), psf.kernel(3, 4))


def test_config_checks():
    with pytest.raises(ConfigError, match="odd"):
        PsfConfig(kernel_size=30).validate()
    with pytest.raises(ConfigError):
        PsfConfig.from_dict({"resample_order": 2})
    assert PsfConfig.from_dict({"kernel_size": 31}).kernel_size == 31


@pytest.mark.parametrize("half", [0, 3, 12])
def test_cutouts_inside_and_off_the_image(half):
    from snakedrp.stamps import cutouts, padded_cutouts

    rng = np.random.default_rng(4)
    image = rng.normal(size=(60, 40)).astype(np.float32)
    ix, iy = rng.integers(-15, 55, 300), rng.integers(-15, 75, 300)
    off = np.arange(-half, half + 1)
    yy, xx = iy[:, None] + off, ix[:, None] + off
    outside = ((yy < 0) | (yy >= 60))[:, :, None] | ((xx < 0) | (xx >= 40))[:, None, :]
    # the pixel-index definition, ``fill`` where a stamp pixel is off the image
    want = np.where(outside, np.float32(-9), image[np.clip(yy, 0, 59)[:, :, None], np.clip(xx, 0, 39)[:, None, :]])
    got = padded_cutouts(image, ix, iy, half, np.float32(-9))
    assert got.dtype == np.float32 and np.array_equal(got, want)
    inside = ~outside.any(axis=(1, 2))
    assert np.array_equal(cutouts(image, ix[inside], iy[inside], half), want[inside])
    assert padded_cutouts(image, ix[:2], iy[:2], 40, np.float32(0)).shape == (2, 81, 81)   # larger than the image
