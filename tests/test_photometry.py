"""Tests of snakedrp.calib.photometry: zeropoint from synthetic matched stars with known truth."""
from __future__ import annotations

import time

import numpy as np
import pytest
from astropy.table import Table

from snakedrp.pexconfig import ConfigError
from snakedrp.calib.photometry import PhotometryConfig, PhotometryError, fit_zeropoint, weighted_median

TRUE_ZP = 31.234


def make_matches(n: int = 200, *, seed: int = 0, outlier_fraction: float = 0.1, ref_err: float = 0.01,
                 n_galaxies: int = 0, colour_term: float = 0.0) -> tuple[Table, np.ndarray]:
    """Matched stars: reference g/r/i magnitudes with ``ref_err`` errors and PSF fluxes in e-.

    Outliers are blends (an unresolved neighbour adds 5-100 % to the flux); galaxies carry
    extendedness 1 and fluxes up to 3x the star's. The instrumental flux follows
    ``mag_r + colour_term * (g - i)``. Returns (table, blend excess [mag, 0 if none]).
    """
    rng = np.random.default_rng(seed)
    n_all = n + n_galaxies
    mag_r = rng.uniform(16.5, 22.0, n_all)
    g_i = rng.uniform(0.2, 2.5, n_all)
    true_mag = mag_r + colour_term * g_i
    flux = 10 ** (-0.4 * (true_mag - TRUE_ZP))
    sky = 400.0  # e- of noise-equivalent background in the PSF footprint
    flux_err = np.sqrt(flux + sky**2)
    meas = flux + rng.normal(0, 1, n_all) * flux_err
    excess = np.zeros(n_all)
    k = rng.choice(n, int(round(outlier_fraction * n)), replace=False)
    boost = 1.0 + rng.uniform(0.05, 1.0, len(k))
    meas[k] *= boost
    excess[k] = 2.5 * np.log10(boost)
    ext = np.zeros(n_all)
    ext[n:] = 1.0
    meas[n:] *= rng.uniform(1.0, 3.0, n_galaxies)
    t = Table()
    t["psf_flux"] = meas
    t["psf_flux_err"] = flux_err
    t["mag_r"] = mag_r + rng.normal(0, ref_err, n_all)
    t["mag_r_err"] = np.full(n_all, ref_err)
    t["mag_g"] = t["mag_r"] + 0.6 * g_i
    t["mag_i"] = t["mag_r"] - 0.4 * g_i
    t["mag_g_err"] = t["mag_i_err"] = t["mag_r_err"]
    t["extendedness"] = ext
    t["flag_saturated"] = np.zeros(n_all, bool)
    return t, excess


def test_zeropoint_recovered_with_outliers():
    t, excess = make_matches(seed=1, n_galaxies=20)
    res = fit_zeropoint(t, band="r")
    # 0.01 mag references over ~150 stars: statistical error ~1 mmag, so 2 mmag is ~2 sigma
    assert abs(res.zeropoint - TRUE_ZP) < 0.002
    sigma = np.hypot(0.01, 1.0857 * t["psf_flux_err"] / t["psf_flux"])
    assert not np.any(res.used & (excess > 3.5 * sigma)), "a blend beyond 3.5 sigma was used"
    assert not np.any(res.used[200:]), "galaxies (extendedness 1) are never used"
    snr_ok = np.asarray(t["psf_flux"] / t["psf_flux_err"] >= 20)[:200]
    assert res.n_used >= 0.85 * np.sum(snr_ok & (excess[:200] == 0))
    assert res.zeropoint_err < 0.002
    assert 0.005 < res.scatter_mag < 0.03


def test_error_estimate_consistent():
    pulls, errs = [], []
    for seed in range(200):
        t, _ = make_matches(seed=100 + seed)
        res = fit_zeropoint(t, PhotometryConfig(zeropoint_err_floor=0.0), band="r")
        pulls.append((res.zeropoint - TRUE_ZP) / res.zeropoint_err)
        errs.append(res.zeropoint_err)
    pulls = np.asarray(pulls)
    # 200 realizations: the pull's std is known to ~5 %; mean to ~0.07
    assert 0.85 < np.std(pulls) < 1.2, np.std(pulls)
    assert abs(np.mean(pulls)) < 0.25, np.mean(pulls)
    assert np.median(errs) < 0.0015


def test_extra_scatter_is_absorbed_into_the_error():
    # reference errors quoted 0.005 but really 0.02: the error must grow to match the scatter
    pulls = []
    for seed in range(100):
        t, _ = make_matches(seed=300 + seed, outlier_fraction=0.0, ref_err=0.02)
        t["mag_r_err"] = 0.005
        res = fit_zeropoint(t, PhotometryConfig(zeropoint_err_floor=0.0), band="r")
        pulls.append((res.zeropoint - TRUE_ZP) / res.zeropoint_err)
        assert res.intrinsic_scatter > 0.01
    assert 0.8 < np.std(pulls) < 1.25


def test_selection_cuts():
    t, _ = make_matches(seed=2, outlier_fraction=0.0)
    t["flag_saturated"][:10] = True
    t["psf_flux_err"][10:20] = t["psf_flux"][10:20] / 5.0  # S/N 5
    t["mag_r"][20:25] = 9.0  # brighter than mag_min (saturated in reality)
    t["psf_flux"][25:30] = -1.0
    res = fit_zeropoint(t, band="r")
    assert not res.used[:30].any()
    assert abs(res.zeropoint - TRUE_ZP) < 0.003
    res2 = fit_zeropoint(t, PhotometryConfig(ignore_flags=["flag_saturated"]), band="r")
    assert res2.used[:10].any()


def test_too_few_stars():
    t, _ = make_matches(n=30, seed=3, outlier_fraction=0.0)
    t["flag_saturated"][:27] = True
    with pytest.raises(PhotometryError, match=r"only 3 stars usable for the zeropoint \(need 5\); 30 matches: "
                                              r"flagged 27"):
        fit_zeropoint(t, band="r")


def test_band_required_when_ambiguous_and_colour_terms():
    t, _ = make_matches(seed=4, outlier_fraction=0.0, colour_term=0.05)
    with pytest.raises(PhotometryError, match="give the reference band"):
        fit_zeropoint(t)
    # without the colour term the zeropoint absorbs the mean colour (0.05 * <g-i> ~ 0.07 mag)
    plain = fit_zeropoint(t, band="r", filter_name="HSC-R")
    assert abs(plain.zeropoint - TRUE_ZP) > 0.03
    cfg = PhotometryConfig(colour_terms={"HSC-R": [0.05, "g", "i"]})
    # g - i = 0.6 c + 0.4 c = c (the synthetic colour), so the term is recovered exactly
    res = fit_zeropoint(t, cfg, band="r", filter_name="HSC-R")
    assert abs(res.zeropoint - TRUE_ZP) < 0.002
    assert res.scatter_mag < plain.scatter_mag
    # another filter is untouched
    other = fit_zeropoint(t, cfg, band="r", filter_name="HSC-I")
    assert other.zeropoint == pytest.approx(plain.zeropoint)


def test_config_validation():
    with pytest.raises(ConfigError, match="colour_terms.HSC-R"):
        PhotometryConfig.from_dict({"colour_terms": {"HSC-R": [0.1, "g"]}})
    with pytest.raises(ConfigError, match="mag_min"):
        PhotometryConfig.from_dict({"mag_min": 25.0, "mag_max": 20.0})
    cfg = PhotometryConfig.from_dict({"clip_sigma": 4, "colour_terms": {"HSC-G": [0.02, "g", "r"]}})
    assert cfg.clip_sigma == 4.0


def test_weighted_median():
    assert weighted_median(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])) == 2.0
    assert weighted_median(np.array([1.0, 2.0, 3.0]), np.array([10.0, 1.0, 1.0])) == 1.0


def test_with_astrometry_matches():
    """The astrometric matches table carries what the zeropoint fit needs."""
    from test_astrometry import camera, make_field

    from snakedrp.calib.astrometry import match_and_fit

    cam = camera("ci")
    sources, refcat, guess, truth = make_field(cam, 2, seed=21)
    # fluxes that follow the reference magnitudes through a known zeropoint
    rows = truth["star_ref"]
    star = rows >= 0
    rng = np.random.default_rng(0)
    flux = sources["psf_flux"].copy()
    flux[star] = 10 ** (-0.4 * (np.asarray(refcat["mag_r"])[rows[star]] - TRUE_ZP))
    sources["psf_flux"] = flux * (1 + rng.normal(0, 0.003, len(flux)))
    sources["psf_flux_err"] = 0.003 * sources["psf_flux"]
    astro = match_and_fit(sources, refcat, guess, shape=cam.ccd_shape)
    t0 = time.perf_counter()
    res = fit_zeropoint(astro.matches, band="r")
    dt = time.perf_counter() - t0
    print(f"\nzeropoint from {res.n_used} astrometric matches: {res.zeropoint - TRUE_ZP:+.4f} mag "
          f"(err {res.zeropoint_err:.4f}); {dt * 1e3:.1f} ms")
    assert abs(res.zeropoint - TRUE_ZP) < 0.003  # refcat mags carry 0.01 mag noise in make_field
    assert dt < 0.05


def test_blended_stars_left_out_when_enough_remain():
    # a third of the stars are deblended children whose PSF fluxes hold 2 % of a sibling's light
    t, _ = make_matches(300, seed=4, outlier_fraction=0.0)
    blended = np.zeros(len(t), bool)
    blended[::3] = True
    t["psf_flux"][blended] *= 1.02
    t["is_blended"] = blended
    with_blends = fit_zeropoint(t, PhotometryConfig(exclude_blended=False), band="r")
    without = fit_zeropoint(t, PhotometryConfig(), band="r")
    assert abs(without.zeropoint - TRUE_ZP) < 0.5 * abs(with_blends.zeropoint - TRUE_ZP)
    assert without.n_used <= 200
    # with too few unblended stars the blended ones are kept
    few = fit_zeropoint(t, PhotometryConfig(min_blend_free=250), band="r")
    assert few.n_used > 200
