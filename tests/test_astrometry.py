"""Tests of snakedrp.calib.astrometry on synthetic fields made with the camera's true pixel→sky mapping.

The true mapping (``Camera.pixel_to_sky``) includes the optical distortion; the guess WCS is the
camera's nominal TAN at a pointing 1.5 arcsec off, rotated by 0.015 deg, without distortion —
what a raw header gives.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from snakedrp.calib.astrometry import AstrometryConfig, AstrometryError, match_and_fit
from snakedrp.calib.wcs_fit import (MAS_PER_DEG, angular_separation_mas, fit_tangent, gnomonic, inverse_gnomonic,
                                    predicted_grid_error, world_to_pixel_sip)
from snakedrp.repo.camera import Camera

CAMERAS = Path(__file__).resolve().parents[1] / "config" / "cameras"


def camera(name: str) -> Camera:
    return Camera.from_yaml(CAMERAS / f"{name}.yaml")


def make_field(cam: Camera, ccd: int, *, seed: int = 1, ra0: float = 150.0, dec0: float = 2.0, rot0: float = 0.0,
               n_stars: int = 400, n_extra_factor: float = 3.0, missing_fraction: float = 0.1,
               n_outliers: int = 0, outlier_shift: float = 1.0, pointing_error: float = 1.5, rotation_error: float = 0.015,
               ref_err_mas: float = 10.0, centroid_floor: float = 0.02):
    """A CCD's sources and reference stars with their truth.

    Stars are spread over the CCD grown by 150 pixels (so some reference stars are off-chip);
    a fraction of on-chip stars is not detected (masked); ``n_extra_factor`` times as many
    unmatched sources (galaxies, faint) are added; ``n_outliers`` detected stars are moved by
    ``outlier_shift`` arcsec (blends, mismatches). Returns (sources, refcat, wcs_guess, truth dict).
    """
    rng = np.random.default_rng(seed)
    ny, nx = cam.ccd_shape
    pad = 150
    x_t = rng.uniform(-pad, nx - 1 + pad, n_stars)
    y_t = rng.uniform(-pad, ny - 1 + pad, n_stars)
    mag = 16.0 + 5.0 * rng.power(2.5, n_stars)  # more faint than bright stars, 16 to 21
    ra_t, dec_t = cam.pixel_to_sky(ccd, x_t, y_t, ra0, dec0, rot0)
    cosd = np.cos(np.deg2rad(dec_t))
    refcat = Table()
    refcat["id"] = np.arange(n_stars) + 10_000
    refcat["ra"] = (ra_t + rng.normal(0, ref_err_mas, n_stars) / 3.6e6 / cosd) % 360.0
    refcat["dec"] = dec_t + rng.normal(0, ref_err_mas, n_stars) / 3.6e6
    refcat["ra_err"] = np.full(n_stars, ref_err_mas)
    refcat["dec_err"] = np.full(n_stars, ref_err_mas)
    refcat["mag_r"] = mag + rng.normal(0, 0.01, n_stars)
    refcat["mag_r_err"] = np.full(n_stars, 0.01)

    on = (x_t >= 0) & (x_t <= nx - 1) & (y_t >= 0) & (y_t <= ny - 1)
    detected = on & (rng.uniform(size=n_stars) > missing_fraction)
    star = np.nonzero(detected)[0]
    snr = 5000.0 * 10 ** (-0.4 * (mag[star] - 16.0))
    err = np.hypot(centroid_floor, 2.4 / snr)
    xs = x_t[star] + rng.normal(0, 1, len(star)) * err
    ys = y_t[star] + rng.normal(0, 1, len(star)) * err
    outlier = np.zeros(len(star), bool)
    if n_outliers:
        k = rng.choice(len(star), n_outliers, replace=False)
        phi = rng.uniform(0, 2 * np.pi, n_outliers)
        shift = outlier_shift / cam.pixel_scale
        xs[k] += shift * np.cos(phi)
        ys[k] += shift * np.sin(phi)
        outlier[k] = True

    n_extra = int(n_extra_factor * len(star))
    # galaxy counts rise steeply to the faint end: N(m) ~ 10^(0.35 m) from 16.5 to 25
    lo, hi = 10 ** (0.35 * 16.5), 10 ** (0.35 * 25.0)
    mag_extra = np.log10(lo + rng.uniform(size=n_extra) * (hi - lo)) / 0.35
    snr_extra = 5000.0 * 10 ** (-0.4 * (mag_extra - 16.0))
    x_all = np.concatenate([xs, rng.uniform(0, nx - 1, n_extra)])
    y_all = np.concatenate([ys, rng.uniform(0, ny - 1, n_extra)])
    snr_all = np.concatenate([snr, snr_extra])
    err_all = np.concatenate([err, np.hypot(0.05, 4.0 / snr_extra)])
    order = rng.permutation(len(x_all))
    sources = Table()
    sources["id"] = np.arange(len(x_all)) + 1
    sources["x_centroid"] = x_all[order]
    sources["y_centroid"] = y_all[order]
    sources["x_centroid_err"] = err_all[order]
    sources["y_centroid_err"] = err_all[order]
    sources["psf_flux"] = snr_all[order] * 100.0
    sources["psf_flux_err"] = np.full(len(x_all), 100.0)
    sources["flag_saturated"] = np.zeros(len(x_all), bool)
    is_star = np.concatenate([np.ones(len(star), bool), np.zeros(n_extra, bool)])[order]
    star_ref = np.concatenate([star, np.full(n_extra, -1)])[order]
    out = np.concatenate([outlier, np.zeros(n_extra, bool)])[order]

    # header pointing: off by `pointing_error` arcsec in a random direction, rotated
    phi = rng.uniform(0, 2 * np.pi)
    dra = pointing_error / 3600.0 * np.cos(phi) / np.cos(np.deg2rad(dec0))
    ddec = pointing_error / 3600.0 * np.sin(phi)
    wcs_guess = cam.nominal_wcs(ccd, (ra0 + dra) % 360.0, dec0 + ddec, rot0 + rotation_error)
    truth = {"ra0": ra0, "dec0": dec0, "rot0": rot0, "ccd": ccd, "is_star": is_star, "star_ref": star_ref,
             "outlier": out, "centroid_err": err_all[order]}
    return sources, refcat, wcs_guess, truth


def wcs_error_mas(cam: Camera, wcs, truth, step: int = 64) -> np.ndarray:
    """Separation [mas] of fitted and true sky positions on a grid over the CCD."""
    ny, nx = cam.ccd_shape
    gy, gx = np.mgrid[0:ny:step, 0:nx:step]
    gx, gy = gx.ravel().astype(float), gy.ravel().astype(float)
    ra_t, dec_t = cam.pixel_to_sky(truth["ccd"], gx, gy, truth["ra0"], truth["dec0"], truth["rot0"])
    ra_f, dec_f = wcs.all_pix2world(gx, gy, 0)
    return angular_separation_mas(ra_f, dec_f, ra_t, dec_t)


def rms(values) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


# ------------------------------------------------------------------ the ci camera
@pytest.fixture(scope="module")
def ci_field():
    cam = camera("ci")
    # outliers 0.3" off: inside the match radius, so sigma-clipping must reject them
    sources, refcat, guess, truth = make_field(cam, 0, n_stars=400, n_outliers=5, outlier_shift=0.3, seed=3)
    result = match_and_fit(sources, refcat, guess, AstrometryConfig(), shape=cam.ccd_shape)
    return cam, sources, refcat, guess, truth, result


def test_ci_match_and_wcs_accuracy(ci_field):
    cam, sources, refcat, guess, truth, result = ci_field
    n_true = int(np.sum(truth["is_star"] & ~truth["outlier"]))
    # all detected stars but the displaced ones match (a few of the faintest may be clipped)
    assert result.n_matches >= 0.95 * n_true
    err = wcs_error_mas(cam, result.wcs, truth)
    # 10 mas reference errors over ~150 stars, 10 coefficients per axis: ~2 mas expected
    assert rms(err) < 5.0, rms(err)
    assert result.sip_order == 3
    # the matcher found the injected pointing error (1.5") and rotation (0.015 deg)
    assert 0.5 < result.offset_arcsec < 5.0
    assert abs(abs(result.rotation_deg) - 0.015) < 0.005


def test_ci_matches_are_correct_and_outliers_rejected(ci_field):
    cam, sources, refcat, guess, truth, result = ci_field
    m = result.matches
    rows = np.asarray(m["source_row"])
    used = np.asarray(m["used"], bool)
    true_ref = truth["star_ref"][rows]
    # a galaxy may lie within the match radius of an undetected star, but is never used
    assert np.all(true_ref[used] >= 0), "a galaxy was used"
    star = true_ref >= 0
    assert np.all(refcat["id"][true_ref[star]] == m["ref_id"][star]), "a star matched the wrong reference"
    assert np.sum(truth["outlier"][rows]) == 5, "the 0.3-arcsec outliers should be matched ..."
    assert not np.any(truth["outlier"][rows] & used), "... and rejected"
    # columns for the photometric fit travel with the matches
    for name in ("psf_flux", "psf_flux_err", "mag_r", "mag_r_err", "separation_mas"):
        assert name in m.colnames


def test_ci_rms_consistent_with_noise(ci_field):
    cam, sources, refcat, guess, truth, result = ci_field
    m = result.matches[np.asarray(result.matches["used"], bool)]
    cerr = truth["centroid_err"][np.asarray(m["source_row"])] * cam.pixel_scale * 1e3
    expected = np.sqrt(np.mean(2 * (cerr**2 + 10.0**2)))  # 2-D separation: two axes
    assert 0.8 * expected < result.rms_mas < 1.2 * expected, (result.rms_mas, expected)


def test_ci_inverse_sip_round_trip(ci_field):
    cam, sources, refcat, guess, truth, result = ci_field
    ny, nx = cam.ccd_shape
    rng = np.random.default_rng(5)
    x, y = rng.uniform(0, nx - 1, 2000), rng.uniform(0, ny - 1, 2000)
    ra, dec = result.wcs.all_pix2world(x, y, 0)
    x2, y2 = world_to_pixel_sip(result.wcs, ra, dec)
    assert np.max(np.hypot(x2 - x, y2 - y)) < 0.01
    # and the header round trip keeps the SIP
    from astropy.wcs import WCS
    w2 = WCS(result.wcs.to_header(relax=True))
    ra2, dec2 = w2.all_pix2world(x, y, 0)
    assert np.max(angular_separation_mas(ra, dec, ra2, dec2)) < 0.1
    x3, y3 = world_to_pixel_sip(w2, ra, dec)
    assert np.max(np.hypot(x3 - x, y3 - y)) < 0.01
    # astropy's own inverse-SIP path (focal coordinates relative to the one-based CRPIX)
    foc = w2.wcs_world2pix(np.column_stack([ra, dec]), 0) - w2.sip.crpix
    pix = w2.sip_foc2pix(foc, 0)
    assert np.max(np.hypot(pix[:, 0] - x, pix[:, 1] - y)) < 0.01


# ------------------------------------------------------------------ the hsc camera
@pytest.mark.parametrize("ccd", [1, 7])
def test_hsc_full_ccd_with_distortion(ccd):
    """Full 2048x4176 CCDs; ccd 7 is a corner CCD where the guess misses ~25" of distortion."""
    cam = camera("hsc")
    sources, refcat, guess, truth = make_field(cam, ccd, n_stars=330, seed=10 + ccd, n_outliers=5, n_extra_factor=7.5)
    sources = sources[:2000] if len(sources) > 2000 else sources
    t0 = time.perf_counter()
    result = match_and_fit(sources, refcat, guess, AstrometryConfig(), shape=cam.ccd_shape)
    dt = time.perf_counter() - t0
    err = wcs_error_mas(cam, result.wcs, truth)
    print(f"\nhsc ccd {ccd}: {len(sources)} sources, {len(refcat)} refs, {result.n_matches} matches, "
          f"grid WCS error rms {rms(err):.2f} max {err.max():.2f} mas, match rms {result.rms_mas:.1f} mas, "
          f"offset {result.offset_arcsec:.2f}\", rotation {result.rotation_deg:.4f} deg, "
          f"d3 {result.radial_distortion:.3f}, {dt * 1e3:.0f} ms")
    assert rms(err) < 5.0
    assert result.n_matches > 200
    rows = np.asarray(result.matches["source_row"])
    assert not np.any(truth["outlier"][rows] & np.asarray(result.matches["used"], bool))
    bright = np.asarray(result.matches["psf_flux"] / result.matches["psf_flux_err"]) > 50
    bright &= np.asarray(result.matches["used"], bool)
    # S/N > 50 stars: 0.02-0.05 px centroids and 10 mas refs; the CI goal is 10 mas per star (RMS)
    assert rms(result.matches["separation_mas"][bright]) < 25.0
    assert dt < 1.0  # budget 0.3 s for astrometry + photometry; generous for loaded CI machines
    ra, dec = result.wcs.all_pix2world(sources["x_centroid"], sources["y_centroid"], 0)
    x2, y2 = world_to_pixel_sip(result.wcs, ra, dec)
    assert np.max(np.hypot(x2 - sources["x_centroid"], y2 - sources["y_centroid"])) < 0.01


# ------------------------------------------------------------------ special places
@pytest.mark.parametrize("ra0, dec0", [(0.02, -5.0), (359.99, 30.0), (120.0, 89.0), (300.0, -88.9)])
def test_wrap_and_pole(ra0, dec0):
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 3, ra0=ra0, dec0=dec0, rot0=30.0, seed=7)
    result = match_and_fit(sources, refcat, guess, shape=cam.ccd_shape)
    assert rms(wcs_error_mas(cam, result.wcs, truth)) < 5.0


def test_larger_rotation_and_offset_with_config():
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 1, seed=8, pointing_error=25.0, rotation_error=0.4)
    with pytest.raises(AstrometryError):
        match_and_fit(sources, refcat, guess, AstrometryConfig(), shape=cam.ccd_shape)
    cfg = AstrometryConfig(max_offset=40.0, max_rotation=0.5)
    result = match_and_fit(sources, refcat, guess, cfg, shape=cam.ccd_shape)
    assert rms(wcs_error_mas(cam, result.wcs, truth)) < 5.0
    assert abs(abs(result.rotation_deg) - 0.4) < 0.01


# ------------------------------------------------------------------ failures
def test_too_few_reference_stars():
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 0, seed=4, n_stars=8)
    with pytest.raises(AstrometryError, match=r"reference stars fall on the CCD \(need 10"):
        match_and_fit(sources, refcat, guess, shape=cam.ccd_shape)


def test_refcat_not_covering_the_ccd():
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 0, seed=4)
    refcat["dec"] += 0.5  # the catalog of another field
    with pytest.raises(AstrometryError, match="only 0 reference stars fall on the CCD"):
        match_and_fit(sources, refcat, guess, shape=cam.ccd_shape)


def test_pattern_match_fails_on_unrelated_catalog():
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 0, seed=4)
    rng = np.random.default_rng(0)
    ny, nx = cam.ccd_shape
    ra, dec = guess.all_pix2world(rng.uniform(0, nx, len(refcat)), rng.uniform(0, ny, len(refcat)), 0)
    refcat["ra"], refcat["dec"] = ra, dec  # stars where no source is
    with pytest.raises(AstrometryError, match="pattern match failed: best offset vote"):
        match_and_fit(sources, refcat, guess, shape=cam.ccd_shape)


def test_too_few_sources():
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 0, seed=4)
    sources["flag_saturated"][5:] = True
    with pytest.raises(AstrometryError, match="usable sources"):
        match_and_fit(sources, refcat, guess, shape=cam.ccd_shape)


# ------------------------------------------------------------------ on the camera's distortion
def camera_guess(cam: Camera, guess, truth):
    """The camera's initial WCS (distortion included) at the guess's pointing and rotation."""
    return cam.initial_wcs(truth["ccd"], *guess.wcs.crval, truth["rot0"] + 0.015)


@pytest.mark.parametrize("name, ccd", [("ci", 0), ("hsc", 7)])
def test_initial_wcs_is_the_camera_model(name, ccd):
    cam = camera(name)
    ny, nx = cam.ccd_shape
    gx, gy = (g.ravel().astype(float) for g in np.mgrid[0:nx:128, 0:ny:128])
    ra_t, dec_t = cam.pixel_to_sky(ccd, gx, gy, 150.0, 2.0, 30.0)
    ra, dec = cam.initial_wcs(ccd, 150.0, 2.0, 30.0).all_pix2world(gx, gy, 0)
    assert np.max(angular_separation_mas(ra, dec, ra_t, dec_t)) < 1e-3  # the SIP is the model, exactly
    ra, dec = cam.nominal_wcs(ccd, 150.0, 2.0, 30.0).all_pix2world(gx, gy, 0)
    assert np.max(angular_separation_mas(ra, dec, ra_t, dec_t)) > 1000.0  # the raw header's WCS lacks it


def test_sparse_field_on_the_camera_distortion():
    """~15 matches (a high-latitude CCD): the camera model leaves 4 parameters to the stars."""
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 0, n_stars=24, seed=26)
    result = match_and_fit(sources, refcat, camera_guess(cam, guess, truth), AstrometryConfig(), shape=cam.ccd_shape)
    assert 12 <= result.n_matches <= 18
    assert result.kept_guess_distortion and result.fit_parameters == 4  # shift, rotation, scale
    assert result.forward_error_px < 1e-6  # an affine correction of a cubic distortion is a cubic SIP
    # 10 mas per axis of reference error (14 mas per star) over ~15 stars, 2 parameters per axis:
    # ~5 mas expected; 8 leaves room for the corners' extrapolation
    assert rms(wcs_error_mas(cam, result.wcs, truth)) < 8.0
    # from the raw header's TAN, the stars must fit the distortion too, and 15 are too few
    tan = match_and_fit(sources, refcat, guess, AstrometryConfig(), shape=cam.ccd_shape)
    assert rms(wcs_error_mas(cam, tan.wcs, truth)) > 30.0


def test_order_1_does_not_crash():
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 0, n_stars=400, seed=3)
    cfg = AstrometryConfig(sip_order=1)
    # from a TAN guess, order 1 cannot hold the distortion: a plain TAN WCS, ~0.1-0.2" off at the corners
    tan = match_and_fit(sources, refcat, guess, cfg, shape=cam.ccd_shape)
    assert tan.sip_order == 1 and tan.wcs.sip is None
    assert rms(wcs_error_mas(cam, tan.wcs, truth)) < 300.0
    # on the camera's distortion, order 1 is all that is needed
    result = match_and_fit(sources, refcat, camera_guess(cam, guess, truth), cfg, shape=cam.ccd_shape)
    assert result.fit_order == 1 and result.sip_order == 3
    assert rms(wcs_error_mas(cam, result.wcs, truth)) < 3.0  # 10 mas refs over ~240 stars: ~1.5 mas


def test_linear_term_beyond_the_camera_model_is_fitted():
    """A squeeze along eta the camera model does not know (as differential refraction makes):
    the F-test takes the affine correction."""
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 0, n_stars=400, seed=3)
    squeeze = 3e-4  # 54 mas across the CCD's 0.1 deg
    ra0, dec0 = truth["ra0"], truth["dec0"]

    def squeezed(ra, dec):
        xi, eta = gnomonic(ra, dec, ra0, dec0)
        return inverse_gnomonic(xi, eta * (1.0 - squeeze), ra0, dec0)

    refcat["ra"], refcat["dec"] = squeezed(np.asarray(refcat["ra"]), np.asarray(refcat["dec"]))
    result = match_and_fit(sources, refcat, camera_guess(cam, guess, truth), AstrometryConfig(), shape=cam.ccd_shape)
    assert result.fit_parameters >= 6
    ny, nx = cam.ccd_shape
    gx, gy = (g.ravel().astype(float) for g in np.mgrid[0:nx:64, 0:ny:64])
    ra_t, dec_t = squeezed(*cam.pixel_to_sky(0, gx, gy, ra0, dec0, truth["rot0"]))
    ra_f, dec_f = result.wcs.all_pix2world(gx, gy, 0)
    assert rms(angular_separation_mas(ra_f, dec_f, ra_t, dec_t)) < 3.0


def test_sparse_field_with_a_bad_match_keeps_the_low_order():
    """~18 matches with one 0.45" off (a blend, inside the match radius): the F-test alone takes a
    polynomial correction that bends to it and swings by 0.1-0.2" over the CCD's empty parts;
    its predicted grid error keeps the shift + rotation + scale, and clipping drops the bad match."""
    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 0, n_stars=30, seed=3, n_outliers=1, outlier_shift=0.45)
    result = match_and_fit(sources, refcat, camera_guess(cam, guess, truth), AstrometryConfig(), shape=cam.ccd_shape)
    assert result.fit_parameters == 4
    assert rms(wcs_error_mas(cam, result.wcs, truth)) < 8.0  # was 152 mas with an order-2 correction
    # the option off: the old choice
    loose = match_and_fit(sources, refcat, camera_guess(cam, guess, truth),
                          AstrometryConfig(max_predicted_error=1e9), shape=cam.ccd_shape)
    assert loose.fit_parameters > 4 and rms(wcs_error_mas(cam, loose.wcs, truth)) > 50.0


@pytest.mark.parametrize("order, similar", [(2, False), (1, True)])
def test_predicted_grid_error_matches_the_scatter_of_refits(order, similar):
    """20 points in one corner of a 1024 x 2048 CCD: the predicted RMS error over the CCD equals
    the RMS over noise realizations of the refitted model's error there."""
    rng = np.random.default_rng(5)
    n, sig = 20, 10.0  # mas per axis
    u, v = rng.uniform(-512, 0, n), rng.uniform(-1024, 0, n)
    gu, gv = (g.ravel() for g in np.meshgrid(np.linspace(-512, 512, 11), np.linspace(-1024, 1024, 11)))
    cd = np.array([[-0.17, 0.0], [0.0, 0.17]]) / 3600.0  # deg per pixel
    xi0, eta0 = cd @ np.stack([u, v])
    gxi, geta = cd @ np.stack([gu, gv])
    sx = np.full(n, sig / MAS_PER_DEG)
    similar_to = cd if similar else None
    errs, predicted = [], []
    for _ in range(200):
        ra, dec = inverse_gnomonic(xi0 + rng.normal(0, 1, n) * sx, eta0 + rng.normal(0, 1, n) * sx, 30.0, 10.0)
        fit = fit_tangent(u, v, ra, dec, sx, sx, order if not similar else 1, 1024.0, 30.0, 10.0,
                          similar_to=similar_to)
        fxi, feta = fit.tangent(gu, gv)
        tra, tdec = inverse_gnomonic(gxi, geta, 30.0, 10.0)
        fra, fdec = inverse_gnomonic(fxi, feta, fit.ra0, fit.dec0)
        errs.append(angular_separation_mas(fra, fdec, tra, tdec) ** 2)
        predicted.append(predicted_grid_error(fit, u, v, sx, sx, gu, gv, 0.0, similar_to=similar_to))
    actual = float(np.sqrt(np.mean(errs)))
    assert np.ptp(predicted) < 1e-6 * predicted[0]  # chi2 0: the errors alone, the same each time
    assert abs(predicted[0] / actual - 1.0) < 0.1
    # an underestimated error scale is scaled up, an overestimated one is not scaled down
    dof = 2 * n - fit.n_parameters
    assert predicted_grid_error(fit, u, v, sx, sx, gu, gv, 4.0 * dof, similar_to=similar_to) \
        == pytest.approx(2.0 * predicted[0])
    assert predicted_grid_error(fit, u, v, sx, sx, gu, gv, 0.25 * dof, similar_to=similar_to) \
        == pytest.approx(predicted[0])
