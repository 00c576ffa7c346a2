"""Coadd assembly: one weight per warp, propagated variance, artifact rejection that spares star cores."""
import numpy as np
import pytest

from test_warp import aperture_sums, make_calexp, make_sky, patch_grid

from snakedrp.coadd import assemble
from snakedrp.coadd.assemble import assemble_coadd, classify_footprints, clipped_mean, open_warp, warp_variance
from snakedrp.coadd.config import AssembleConfig, WarpConfig
from snakedrp.coadd.warp import warp_exposures
from snakedrp.repo.exposure import mask_bit, mask_bits

SEEING = [1.2, 1.6, 2.2, 2.8, 3.4]          # PSF sigma [pixel] per visit: FWHM 2.8-8 pixels (a factor 2.8)
SKY_VAR = [20.0, 30.0, 25.0, 40.0, 35.0]


def _warps(sky, *, seeings=SEEING, sky_vars=SKY_VAR, artifact_visit=None, artifact=None, noise=True, shape=(240, 240)):
    wcs, shape = patch_grid(shape=shape)
    out = []
    for k, (sigma, sv) in enumerate(zip(seeings, sky_vars)):
        calexp = make_calexp(sky, sigma=sigma, sky_var=sv, seed=10 + k, visit=k + 1, noise=noise,
                             rotation=2.0 + k, zeropoint=27.5 + 0.1 * k,
                             artifact=artifact if k == artifact_visit else None)
        out.append(warp_exposures([calexp], [{"visit": k + 1, "ccd": 0}], wcs, shape,
                                  config=WarpConfig()).exposure)
    return out, wcs, shape


def _near(x, y, shape, radius):
    """Pixels within ``radius`` [pixel] of any of the positions ``x``, ``y`` (bool, ``shape``)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, bool)
    for xc, yc in zip(x, y):
        out |= np.hypot(xx - xc, yy - yc) < radius
    return out


def _trail(image, peak=300.0):
    """A satellite-like trail: a Gaussian line (sigma 1 pixel, ``peak`` e-) across the calexp."""
    ny, nx = image.shape
    yy, xx = np.mgrid[:ny, :nx]
    d = np.abs(0.6 * xx - 0.8 * yy + 100.0)
    image += peak * np.exp(-0.5 * d**2)


def test_one_weight_per_warp_and_unbiased_star_fluxes():
    sky = make_sky(16, seed=2, margin=0.005)
    warps, wcs, shape = _warps(sky)
    result = assemble_coadd(warps, config=AssembleConfig())
    # one weight per warp = 1 / its clipped-mean variance
    expected = [1 / warp_variance(w, AssembleConfig()) for w in warps]
    np.testing.assert_allclose(result.inputs["weight"], expected)
    assert len(set(np.round(result.inputs["weight"], 12))) == len(warps)
    ra, dec, flux = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    inside = (x > 30) & (x < shape[1] - 30) & (y > 30) & (y < shape[0] - 30)
    # 25-pixel apertures hold 1 - 1e-11 of the widest (sigma 3.4) star
    sums = aperture_sums(result.coadd.image, x[inside], y[inside], 25.0)
    noise = np.sqrt(aperture_sums(result.coadd.variance, x[inside], y[inside], 25.0))
    ratio = sums / flux[inside]
    # per-pixel weights would bias bright stars low by ~1-2 % here; one weight per warp leaves noise only
    assert abs(np.average(ratio - 1, weights=(flux[inside] / noise) ** 2)) < 3 * np.sqrt(1 / np.sum((flux[inside] / noise) ** 2))
    # the bright stars' cores are never clipped, whatever the seeing differences
    assert (result.coadd.mask & mask_bit("CLIPPED")).sum() == 0
    assert result.coadd.psf is not None and len(result.coadd.psf.inputs) == len(warps)


def test_coadd_variance_predicts_noise_of_pure_noise_warps():
    warps, wcs, shape = _warps(make_sky(0), shape=(260, 260))
    result = assemble_coadd(warps)
    full = result.n_image == len(warps)
    assert full.sum() > 20000
    measured = np.var(result.coadd.image[full])
    predicted = np.mean(result.coadd.variance[full])
    # ~30000 correlated pixels: the ratio is known to ~2 %
    assert abs(measured / predicted - 1) < 0.05
    # and the weighted mean is better than the best warp alone
    assert predicted < min(np.nanmean(w.variance[full]) for w in warps)


def test_artifact_in_one_warp_is_clipped_not_star_cores():
    sky = make_sky(16, seed=2, margin=0.005)
    warps, wcs, shape = _warps(sky, artifact_visit=2, artifact=_trail)
    result = assemble_coadd(warps)
    clipped = (result.coadd.mask & mask_bit("CLIPPED")) != 0
    # the trail's pixels (on the patch grid: map the calexp's line through the WCSs)
    clean, _, _ = _warps(sky)
    excess = warps[2].image - clean[2].image                    # the trail as resampled (same noise)
    trail = np.nan_to_num(excess) > 30.0
    ra, dec, flux = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    near_star = _near(x, y, shape, 2 * 2.3548 * max(SEEING))
    assert trail.sum() > 300
    # away from the stars the trail is clipped, and only in the warp that has it
    away = trail & ~near_star & (result.n_image >= 4)
    assert clipped[away].mean() > 0.97
    row = result.inputs[result.inputs["visit"] == 3]
    assert row["n_clipped"][0] > 0.9 * away.sum()
    assert result.inputs["n_clipped"][result.inputs["visit"] != 3].sum() == 0
    # no star core has a clipped pixel within 2 FWHM of the best seeing
    for xc, yc in zip(x, y):
        core = np.hypot(xx - xc, yy - yc) < 2 * 2.3548 * min(SEEING)
        assert not (clipped & core & ~trail).any()
    # the coadd on the trail (off stars) is consistent with zero: the trail is gone
    values = result.coadd.image[away]
    sigma = np.sqrt(np.mean(result.coadd.variance[away]) / len(values)) * 2   # x2: correlated noise
    assert abs(values.mean()) < 3 * sigma


def test_variable_star_is_not_eaten():
    # one star 3 mag brighter in two of five visits (a flare): present in the reference region -> kept
    sky = make_sky(9, seed=6, margin=0.004)
    wcs, shape = patch_grid(shape=(240, 240))
    ra, dec, flux = sky
    warps = []
    for k in range(5):
        f = flux.copy()
        if k in (1, 3):
            f[0] *= 16.0
        calexp = make_calexp((ra, dec, f), sigma=SEEING[k], sky_var=25.0, seed=30 + k, visit=k + 1, rotation=2 + k)
        warps.append(warp_exposures([calexp], [{"visit": k + 1, "ccd": 0}], wcs, shape).exposure)
    result = assemble_coadd(warps)
    x, y = wcs.all_world2pix(ra[:1], dec[:1], 0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    core = np.hypot(xx - x[0], yy - y[0]) < 2 * 2.3548 * min(SEEING)
    assert not ((result.coadd.mask & mask_bit("CLIPPED")) != 0)[core].any()


def test_memory_is_streamed_from_files(tmp_path):
    warps, wcs, shape = _warps(make_sky(6, seed=1), shape=(200, 200))
    paths = []
    for k, w in enumerate(warps):
        paths.append(tmp_path / f"warp-{k}.fits")
        w.write(paths[-1])
    in_memory = assemble_coadd(warps, config=AssembleConfig(block_memory_mb=16))
    lazy = [open_warp(p) for p in paths]
    # the smallest block: a few rows of every warp at a time
    from_files = assemble_coadd(lazy, config=AssembleConfig(block_memory_mb=16))
    np.testing.assert_allclose(from_files.coadd.image, in_memory.coadd.image, equal_nan=True, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(from_files.n_image, in_memory.n_image)


def test_no_data_where_no_warp_and_mask_planes():
    warps, wcs, shape = _warps(make_sky(4), shape=(420, 420))
    result = assemble_coadd(warps)
    nod = (result.coadd.mask & mask_bit("NO_DATA")) != 0
    np.testing.assert_array_equal(nod, result.n_image == 0)
    assert np.isnan(result.coadd.image[nod]).all() and np.isfinite(result.coadd.image[~nod]).all()


def test_clipped_mean_ignores_outliers():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 1, 10000), np.full(50, 1000.0)])
    assert clipped_mean(values, 3.0, 5) == pytest.approx(10.0, abs=0.05)


def _faint_and_bright_sky():
    """Bright stars (18-20 mag) on a 32-pixel grid and faint ones (21.5-23.5 mag) on a 14-pixel grid."""
    bright = make_sky(16, seed=2, margin=0.005)
    ra, dec, _ = make_sky(150, seed=5, margin=0.0056, spacing=0.0008)
    mag = np.random.default_rng(5).uniform(21.5, 23.5, len(ra))
    faint = (ra, dec, 10 ** (-0.4 * (mag - 27.0)))
    return bright, faint, tuple(np.concatenate([b, f]) for b, f in zip(bright, faint))


def test_trail_over_faint_sources_is_removed_whole():
    # seeing 0.5"-1.3" at 0.2"/pixel: FWHM 2.5-6.5 pixels
    seeings = [1.06, 1.6, 2.2, 2.2, 2.76]
    bright, faint, sky = _faint_and_bright_sky()
    warps, wcs, shape = _warps(sky, seeings=seeings, artifact_visit=2, artifact=_trail)
    clean, _, _ = _warps(sky, seeings=seeings)
    result, reference = assemble_coadd(warps), assemble_coadd(clean)
    clipped = (result.coadd.mask & mask_bit("CLIPPED")) != 0
    trail = np.nan_to_num(warps[2].image - clean[2].image) > 30.0
    x, y = wcs.all_world2pix(bright[0], bright[1], 0)
    xf, yf = wcs.all_world2pix(faint[0], faint[1], 0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    near_bright = _near(x, y, shape, 2 * 2.3548 * max(seeings))
    near_faint = _near(xf, yf, shape, 2 * 2.3548 * max(seeings))
    on = trail & ~near_bright & (result.n_image + clipped >= 4)
    assert (on & near_faint).sum() > 0.5 * on.sum() > 100       # the trail crosses many faint sources
    # the whole trail is clipped, over the faint sources too
    assert clipped[on].mean() > 0.98
    # and the coadd there equals the trail-free coadd within the noise
    delta = (result.coadd.image - reference.coadd.image)[on]
    sigma = np.sqrt(np.mean(result.coadd.variance[on]) / on.sum()) * 3    # x3: correlated noise
    assert abs(delta.mean()) < 3 * sigma
    # no bright-star core clipped; the trail-free coadd clips nothing at all
    for xc, yc in zip(x, y):
        core = np.hypot(xx - xc, yy - yc) < 2 * 2.3548 * min(seeings)
        assert not (clipped & core & ~trail).any()
    assert reference.inputs["n_clipped"].sum() == 0


def _faint_trail(image):
    """A trail as faint as a bright sky leaves it: peak 23 e-, 5.2 sigma of the warp's noise a pixel."""
    _trail(image, peak=23.0)


def test_trail_pieces_are_the_thin_footprints_along_a_long_trail():
    labels = np.zeros((60, 200), np.int32)
    yy, xx = np.mgrid[:60, :200]
    line = 0.2 * xx + 10.0                                       # the trail's axis
    labels[(np.abs(yy - line) < 1.5) & (xx < 100)] = 1           # a long piece: the trail footprint
    labels[(np.abs(yy - line) < 1.5) & (xx > 120) & (xx < 135)] = 2     # a short piece along it
    labels[np.hypot(xx - 160, yy - (0.2 * 160 + 10)) < 6] = 3   # a star's residual on the axis: wider
    labels[(np.abs(yy - line - 15) < 1.5) & (xx > 120) & (xx < 135)] = 4   # a short piece off the axis
    z = np.where(labels > 0, 4.0, 0.0)
    config = AssembleConfig()
    assert set(assemble.trail_pieces(labels, np.array([1]), z, config)) == {1, 2}
    assert len(assemble.trail_pieces(labels, np.array([2]), z, config)) == 0   # too short to lead


@pytest.mark.parametrize("join", [3.0, 0.0])
def test_faint_trail_pieces_along_its_axis_are_clipped(join):
    """Pixel by pixel a faint trail dips below the footprint threshold and breaks into pieces; the long
    ones are trails, the short ones were kept by the sources near them. Pieces along the axis of a long
    one are the trail (assemble.trail_join_width): 91 % of it clipped, the coadd on it as without it
    (1.4 sigma), against 78 % and 3.6 sigma."""
    seeings, sky_vars = [1.06, 1.6, 2.2], [25.0, 30.0, 25.0]
    bright, _, sky = _faint_and_bright_sky()
    warps, wcs, shape = _warps(sky, seeings=seeings, sky_vars=sky_vars, artifact_visit=2, artifact=_faint_trail)
    clean, _, _ = _warps(sky, seeings=seeings, sky_vars=sky_vars)
    config = AssembleConfig(trail_join_width=join)
    result, reference = assemble_coadd(warps, config=config), assemble_coadd(clean, config=config)
    clipped = (result.coadd.mask & mask_bit("CLIPPED")) != 0
    excess = np.nan_to_num(warps[2].image - clean[2].image)
    trail = excess > 0.5 * excess.max()
    x, y = wcs.all_world2pix(bright[0], bright[1], 0)
    on = trail & ~_near(x, y, shape, 2 * 2.3548 * max(seeings)) & (result.n_image + clipped >= 3)
    assert on.sum() > 100
    delta = (result.coadd.image - reference.coadd.image)[on]
    sigma = np.sqrt(np.mean(result.coadd.variance[on]) / on.sum()) * 3    # x3: correlated noise
    if not join:
        assert clipped[on].mean() < 0.85 and delta.mean() > 3 * sigma     # what the joining is for
        return
    assert clipped[on].mean() > 0.88
    assert abs(delta.mean()) < 3 * sigma
    assert reference.inputs["n_clipped"].sum() == 0
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for xc, yc in zip(x, y):
        core = np.hypot(xx - xc, yy - yc) < 2 * 2.3548 * min(seeings)
        assert not (clipped & core & ~trail).any()


@pytest.mark.parametrize("bright_visits", [(0,), (4,), (1, 3)])
def test_variable_star_is_kept_whatever_the_seeing_of_its_bright_epochs(bright_visits):
    # one star 2.5 mag brighter in the best-seeing, the worst-seeing or two visits (a flare)
    seeings = [1.06, 1.6, 2.2, 2.2, 2.76]
    sky = make_sky(9, seed=6, margin=0.004)
    wcs, shape = patch_grid(shape=(240, 240))
    ra, dec, flux = sky
    warps = []
    for k in range(5):
        f = flux.copy()
        if k in bright_visits:
            f[0] *= 10.0
        calexp = make_calexp((ra, dec, f), sigma=seeings[k], sky_var=25.0, seed=30 + k, visit=k + 1, rotation=2 + k)
        warps.append(warp_exposures([calexp], [{"visit": k + 1, "ccd": 0}], wcs, shape).exposure)
    result = assemble_coadd(warps)
    x, y = wcs.all_world2pix(ra[:1], dec[:1], 0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    near = np.hypot(xx - x[0], yy - y[0]) < 4 * 2.3548 * max(seeings)
    assert not ((result.coadd.mask & mask_bit("CLIPPED")) != 0)[near].any()
    # its coadd flux is the weighted mean of the epochs' fluxes
    weights = np.asarray(result.inputs["weight"])
    expected = flux[0] * np.sum(weights * np.where(np.isin(np.arange(5), bright_visits), 10.0, 1.0)) / weights.sum()
    measured = aperture_sums(result.coadd.image, x, y, 25.0)[0]
    noise = np.sqrt(aperture_sums(result.coadd.variance, x, y, 25.0)[0])
    assert abs(measured - expected) < 5 * noise


def test_compact_outlier_off_sources_is_clipped():
    # a ghost / missed cosmic ray: a compact blob in one warp, far from any source
    def ghost(image):
        ny, nx = image.shape
        yy, xx = np.mgrid[:ny, :nx]
        image += 200.0 * np.exp(-0.5 * ((xx - 60.5) ** 2 + (yy - 47.3) ** 2) / 1.5**2)

    sky = make_sky(4, seed=8, margin=0.002)
    warps, wcs, shape = _warps(sky, artifact_visit=1, artifact=ghost)
    clean, _, _ = _warps(sky)
    blob = np.nan_to_num(warps[1].image - clean[1].image) > 40.0
    result = assemble_coadd(warps)
    assert blob.sum() > 5
    assert ((result.coadd.mask & mask_bit("CLIPPED")) != 0)[blob].all()


def _cut_coverage(warp, keep):
    """The warp without data where ``keep`` is False (as beyond a CCD edge)."""
    warp.image[~keep] = np.nan
    warp.variance[~keep] = np.nan
    warp.mask[~keep] |= mask_bit("NO_DATA")


def _coverage_ending_at_stars(x, y, shape):
    """Coverage that ends 3 pixels short of each star's centre (x, y [pixel]), over 25 pixels on."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    covered = np.ones(shape, bool)
    for xc, yc in zip(x, y):
        covered &= ~((np.abs(yy - yc) < 25) & (xx > xc - 3) & (xx < xc + 25))
    return covered


def test_star_at_the_edge_of_the_other_warps_coverage_keeps_its_wings():
    # two warps (sharp and wide seeing); the sharp one's coverage ends 3 pixels short of each bright
    # star's centre, so the reference of the wide one has the wing but not the core there
    sky = make_sky(16, seed=2, margin=0.005)
    warps, wcs, shape = _warps(sky, seeings=[1.2, 3.4], sky_vars=[20.0, 25.0])
    ra, dec, flux = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    covered = _coverage_ending_at_stars(x, y, shape)
    _cut_coverage(warps[0], covered)
    result = assemble_coadd(warps)
    clipped = (result.coadd.mask & mask_bit("CLIPPED")) != 0
    for xc, yc in zip(x, y):
        assert not clipped[np.hypot(xx - xc, yy - yc) < 2 * 2.3548 * 3.4].any()


def test_trail_across_the_edge_of_the_other_warps_coverage_is_still_clipped():
    # the same cut coverage; a trail in the wide-seeing warp crosses the edges: it stays an artifact
    sky = make_sky(16, seed=2, margin=0.005)
    warps, wcs, shape = _warps(sky, seeings=[1.2, 1.6, 3.4], sky_vars=[20.0, 30.0, 25.0], artifact_visit=2,
                               artifact=_trail)
    clean, _, _ = _warps(sky, seeings=[1.2, 1.6, 3.4], sky_vars=[20.0, 30.0, 25.0])
    ra, dec, flux = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    covered = _coverage_ending_at_stars(x, y, shape)
    for w in warps[:2]:
        _cut_coverage(w, covered)
    trail = np.nan_to_num(warps[2].image - clean[2].image) > 30.0
    near_star = _near(x, y, shape, 2 * 2.3548 * 3.4)
    result = assemble_coadd(warps)
    clipped = (result.coadd.mask & mask_bit("CLIPPED")) != 0
    judged = trail & ~near_star & covered
    assert judged.sum() > 200 and clipped[judged].mean() > 0.97


def test_warp_without_usable_pixels_is_left_out_not_fatal():
    sky = make_sky(4, seed=1)
    warps, wcs, shape = _warps(sky, seeings=[1.2, 1.6, 2.0], sky_vars=[20.0, 30.0, 25.0])
    _cut_coverage(warps[1], np.zeros(shape, bool))           # e.g. a CCD masked whole (saturated, NaN amps)
    result = assemble_coadd(warps)
    assert result.dropped == (1,)
    assert sorted(result.inputs["visit"]) == [1, 3] and result.coadd.metadata["NWARP"] == 2
    expected = assemble_coadd([warps[0], warps[2]])
    np.testing.assert_array_equal(result.coadd.image, expected.coadd.image)
    _cut_coverage(warps[0], np.zeros(shape, bool))
    _cut_coverage(warps[2], np.zeros(shape, bool))
    with pytest.raises(ValueError, match="none of the 3 warps has a usable pixel"):
        assemble_coadd(warps)


def _bad_columns_beside_stars(warp, x, y, offset, width=2, half_length=40):
    """A BAD column (``width`` pixels, zeroed) ``offset`` pixels to the right of each star (x, y [pixel])."""
    ny, nx = warp.image.shape
    yy, xx = np.mgrid[:ny, :nx]
    column = np.zeros((ny, nx), bool)
    for xc, yc in zip(x, y):
        c = int(round(xc + offset))
        column |= (xx >= c) & (xx < c + width) & (np.abs(yy - yc) < half_length)
    warp.mask[column] |= mask_bit("BAD")
    warp.image[column] = 0.0
    return column


@pytest.mark.parametrize("offset", [5, 6])
def test_bad_column_beside_a_star_in_the_wide_warp_does_not_clip_its_wing(offset):
    # sharp and wide seeing (FWHM 2.8 and 7.5 pixels), bright stars (peak S/N ~ 500 as in the
    # simulated visits); a bad column 1.8-2.1 FWHM of the sharp PSF from each star, in the wide
    # warp, cuts a strip of its wing off from the core: the strip stands out from the sharp
    # reference, off its protected core, but is the star's wing and must be kept
    sky = make_sky(16, seed=2, margin=0.005)
    warps, wcs, shape = _warps(sky, seeings=[1.2, 3.2], sky_vars=[0.05, 0.05])
    ra, dec, flux = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    _bad_columns_beside_stars(warps[1], x, y, offset)
    result = assemble_coadd(warps)
    clipped = (result.coadd.mask & mask_bit("CLIPPED")) != 0
    for xc, yc in zip(x, y):
        assert not clipped[np.hypot(xx - xc, yy - yc) < 2 * 2.3548 * 3.2].any()
    # where a warp with data is masked (the bad columns, the CCD's EDGE), the other's PSF only is
    # in the coadd: INEXACT_PSF
    inexact = (result.coadd.mask & mask_bit("INEXACT_PSF")) != 0
    left_out = np.zeros(shape, bool)
    for w in warps:
        left_out |= ((w.mask & mask_bit("NO_DATA")) == 0) & ((w.mask & mask_bits(*AssembleConfig().bad_mask_planes)) != 0)
    assert left_out.sum() > 16 * 2 * 70
    np.testing.assert_array_equal(inexact, left_out)


def test_trail_beside_bad_columns_near_stars_is_still_clipped():
    # the bad columns of the test above, and a trail in the wide warp: pieces of the trail cut by
    # the columns are no star's wing
    seeings, sky_vars = [1.2, 1.6, 3.2], [20.0, 30.0, 25.0]
    sky = make_sky(16, seed=2, margin=0.005)
    warps, wcs, shape = _warps(sky, seeings=seeings, sky_vars=sky_vars, artifact_visit=2, artifact=_trail)
    clean, _, _ = _warps(sky, seeings=seeings, sky_vars=sky_vars)
    ra, dec, flux = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    column = _bad_columns_beside_stars(warps[2], x, y, 6)
    trail = np.nan_to_num(warps[2].image - clean[2].image) > 30.0
    near_star = _near(x, y, shape, 2 * 2.3548 * 3.2)
    result = assemble_coadd(warps)
    clipped = (result.coadd.mask & mask_bit("CLIPPED")) != 0
    judged = trail & ~near_star & ~column & (result.n_image + clipped >= 3)
    assert judged.sum() > 200 and clipped[judged].mean() > 0.97
    # the clipped trail pixels are INEXACT_PSF; where no warp left anything out, none is
    inexact = (result.coadd.mask & mask_bit("INEXACT_PSF")) != 0
    assert inexact[clipped].all()
    assert not inexact[~clipped & ~column & (result.n_image == 3)].any()


def test_star_whose_core_is_under_the_warps_own_mask_is_protected():
    # a cosmic-ray mask over the core of each star in the wide warp: the reference (the other
    # warps) still has the star there, so the wide warp's wing around the mask is kept
    seeings, sky_vars = [1.2, 1.6, 3.2], [0.05, 0.06, 0.05]
    sky = make_sky(16, seed=2, margin=0.005)
    warps, wcs, shape = _warps(sky, seeings=seeings, sky_vars=sky_vars)
    ra, dec, flux = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for xc, yc in zip(x, y):
        core = (np.abs(xx - xc) < 5) & (np.abs(yy - yc) < 5)
        warps[2].mask[core] |= mask_bit("CR")
    result = assemble_coadd(warps)
    clipped = (result.coadd.mask & mask_bit("CLIPPED")) != 0
    for xc, yc in zip(x, y):
        assert not clipped[np.hypot(xx - xc, yy - yc) < 2 * 2.3548 * 3.2].any()


def test_footprint_centred_on_a_reference_source_is_kept_unless_a_trail():
    # an outlier ring about a protected core (a wide star's wing against a sharp reference) peaks
    # beyond the protected pixels but is centred on them: the source, kept; a blob off the sources
    # and a trail through them are artifacts
    shape = (80, 120)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(xx - 30, yy - 40)
    protect = r < 5
    ring = (r > 4) & (r < 9)
    z = np.where(ring, 6.0, 0.0)
    z[40, 38] = 9.0                                          # the ring's peak, off the protected core
    blob = np.hypot(xx - 100, yy - 20) < 3
    z[blob] = 8.0
    trail = (np.abs(yy - 0.1 * xx - 55) < 1.5) & (xx > 5) & (xx < 110)
    z[trail] = 7.0
    protect |= np.hypot(xx - 60, yy - 61) < 5                 # a source the trail crosses
    labels = np.zeros(shape, int)
    labels[ring], labels[blob], labels[trail] = 1, 2, 3
    assert not protect[40, 38]
    artifact = classify_footprints(labels, np.array([1, 2, 3]), z, protect, AssembleConfig())
    np.testing.assert_array_equal(artifact, [False, True, True])


def test_trail_piece_between_a_cosmic_ray_and_the_other_warps_edge_is_clipped():
    # as in the full-HSC mixed-seeing run: cosmic-ray masks on the trail every 35 pixels, and the
    # other warps' coverage ending halfway between two of them, cut the trail into pieces ~30
    # pixels long that straddle the edge; such a piece, as a source of the trail warp's own image,
    # is no star (axis ratio ~3.7 against ~1 for a star), though not elongated enough to be taken
    # for a trail as an outlier footprint
    seeings, sky_vars = [1.2, 1.6, 3.2], [20.0, 30.0, 25.0]
    sky = make_sky(4, seed=8, margin=0.002)
    warps, wcs, shape = _warps(sky, seeings=seeings, sky_vars=sky_vars, artifact_visit=2, artifact=_trail)
    clean, _, _ = _warps(sky, seeings=seeings, sky_vars=sky_vars)
    trail = np.nan_to_num(warps[2].image - clean[2].image) > 30.0
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ty, tx = np.nonzero(trail)
    spacing = 35
    cr_x = np.arange(tx.min() + 10, tx.max() - 10, spacing)
    covered = np.ones(shape, bool)
    for x0 in cr_x:
        yc = ty[np.argmin(np.abs(tx - x0))]
        warps[2].mask[(np.abs(xx - x0) < 4) & (np.abs(yy - yc) < 6)] |= mask_bit("CR")
    for x0 in cr_x[::2]:
        covered &= ~((xx > x0 + 0.5 * spacing) & (xx < x0 + 2 * spacing))
    for w in warps[:2]:
        _cut_coverage(w, covered)
    result = assemble_coadd(warps)
    clipped = (result.coadd.mask & mask_bit("CLIPPED")) != 0
    judged = trail & covered & ((warps[2].mask & mask_bit("CR")) == 0) & (result.n_image + clipped >= 2)
    assert judged.sum() > 200 and clipped[judged].mean() > 0.97


def test_psf_weighting_gives_the_deeper_coadd_for_point_sources():
    """Visits of PSF sigma 1.2-3.4 pixels: weights 1 / variance give the widest visits as much say as
    the sharpest; weights sum(P^2) / variance (the inverse PSF-flux variance) make the coadd's
    PSF-flux noise smaller (predicted and measured on pure noise), and star fluxes stay unbiased."""
    warps, wcs, shape = _warps(make_sky(0), shape=(260, 260))
    results = {w: assemble_coadd(warps, config=AssembleConfig(weighting=w, do_clip=False)) for w in ("variance", "psf")}
    power = np.array([assemble.psf_power(w) for w in warps])
    np.testing.assert_allclose(np.asarray(results["psf"].inputs["weight"]),
                               np.asarray(results["variance"].inputs["weight"]) * power)
    assert power[0] > 5 * power[-1]                  # (3.4 / 1.2)^2 = 8 for Gaussians

    def psf_flux_noise(result):
        full = result.n_image == len(warps)
        c = (shape[1] // 2, shape[0] // 2)
        kernel = result.coadd.psf.kernel(*c)
        kernel = kernel / kernel.sum()
        h = kernel.shape[0] // 2
        image = np.where(full, result.coadd.image, np.nan)
        fluxes = [np.sum(kernel * image[y - h:y + h + 1, x - h:x + h + 1]) / np.sum(kernel**2)
                  for y in range(h, shape[0] - h, 3) for x in range(h, shape[1] - h, 3)]
        fluxes = np.asarray(fluxes)[np.isfinite(fluxes)]
        return np.std(fluxes), len(fluxes)

    (noise_var, n), (noise_psf, _) = psf_flux_noise(results["variance"]), psf_flux_noise(results["psf"])
    print(f"PSF-flux noise on pure noise: weights 1/variance {noise_var:.3f}, sum(P^2)/variance {noise_psf:.3f} "
          f"({2.5 * np.log10(noise_var / noise_psf):.3f} mag deeper; {n} positions)")
    # Gaussians of these widths and sky variances predict 0.063 mag; the same noise enters both coadds
    assert noise_psf < 0.985 * noise_var

    sky = make_sky(16, seed=2, margin=0.005)
    stars, wcs, shape = _warps(sky)
    coadd = assemble_coadd(stars, config=AssembleConfig(weighting="psf")).coadd
    ra, dec, flux = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    inside = (x > 30) & (x < shape[1] - 30) & (y > 30) & (y < shape[0] - 30)
    ratio = aperture_sums(coadd.image, x[inside], y[inside], 25.0) / flux[inside]
    noise = np.sqrt(aperture_sums(coadd.variance, x[inside], y[inside], 25.0))
    assert abs(np.average(ratio - 1, weights=(flux[inside] / noise) ** 2)) < 3 * np.sqrt(1 / np.sum((flux[inside] / noise) ** 2))
