"""SRD metrics (snakedrp.validate.metrics) on synthetic multi-visit catalogs with known scatter."""
import numpy as np
import pytest
from astropy.table import Table, vstack

from snakedrp.validate.metrics import (MetricsConfig, SrdMetric, compute_metrics, match_visits,
                                       random_pair_differences, select_stars)


def fake_sources(n_star=400, n_visit=4, mag_sigma=0.005, pos_sigma_mas=5.0, size_arcmin=12.0, seed=1, filt="HSC-R"):
    """Stars on a field of ``size_arcmin`` seen in every visit with Gaussian mag and position noise."""
    rng = np.random.default_rng(seed)
    ra0, dec0 = 150.0, 2.0
    ra = ra0 + rng.uniform(-0.5, 0.5, n_star) * size_arcmin / 60 / np.cos(np.deg2rad(dec0))
    dec = dec0 + rng.uniform(-0.5, 0.5, n_star) * size_arcmin / 60
    mag = rng.uniform(17, 20, n_star)
    parts = []
    for v in range(n_visit):
        noise = rng.normal(0, pos_sigma_mas / 3.6e6, (2, n_star))
        parts.append(Table(dict(coord_ra=ra + noise[0] / np.cos(np.deg2rad(dec0)), coord_dec=dec + noise[1],
                                psf_mag=mag + rng.normal(0, mag_sigma, n_star), psf_mag_err=np.full(n_star, mag_sigma),
                                psf_snr=np.full(n_star, 200.0), extendedness=np.zeros(n_star),
                                x_centroid=np.zeros(n_star), y_centroid=np.zeros(n_star),
                                visit=np.full(n_star, 100 + v), ccd=np.zeros(n_star, int),
                                filter=np.full(n_star, filt))))
    return vstack(parts)


def metric(metrics, name, filt="HSC-R"):
    return next(m for m in metrics if m.name == name and m.filter == filt)


def test_match_visits_groups_each_star_once_per_visit():
    src = fake_sources(n_star=200, n_visit=3)
    obj = match_visits(src, 1.0)
    assert len(np.unique(obj)) == 200
    for v in np.unique(src["visit"]):
        assert len(np.unique(obj[src["visit"] == v])) == 200


def test_pa1_recovers_the_injected_scatter():
    # each measurement has sigma 5 mmag: a pair difference / sqrt(2) has sigma 5 mmag as well
    metrics, _ = compute_metrics(fake_sources(mag_sigma=0.005), MetricsConfig())
    pa1 = metric(metrics, "PA1")
    assert pa1.value == pytest.approx(5.0, rel=0.1)
    assert pa1.extra["expected_from_errors_mmag"] == pytest.approx(5.0, rel=0.1)


def test_pa1_pass_and_fail_against_the_spec():
    good, _ = compute_metrics(fake_sources(mag_sigma=0.002), MetricsConfig())
    bad, _ = compute_metrics(fake_sources(mag_sigma=0.010), MetricsConfig())
    assert metric(good, "PA1").passed is True and metric(good, "PA1").level == "stretch"
    assert metric(bad, "PA1").passed is False
    assert metric(bad, "PA1").miss == pytest.approx(metric(bad, "PA1").value - 5.0)
    assert metric(bad, "PF1").value > 10.0  # 10 mmag noise: many differences beyond 15 mmag


def test_am1_recovers_the_injected_scatter():
    # pair distance over visits: each star's position has sigma 5 mas per axis, so the distance
    # between two stars has sigma sqrt(2) * 5 mas along the separation
    metrics, _ = compute_metrics(fake_sources(pos_sigma_mas=5.0), MetricsConfig())
    am1 = metric(metrics, "AM1")
    expected = np.sqrt(2) * 5.0 * 0.94  # the median of a sample RMS over 4 visits is ~6 % below sigma
    assert am1.value == pytest.approx(expected, rel=0.15)
    assert am1.passed is True


def test_small_field_reports_am1_not_computed_and_a_differently_named_metric():
    metrics, summary = compute_metrics(fake_sources(size_arcmin=3.0), MetricsConfig())
    am1 = metric(metrics, "AM1")
    assert not am1.computed and am1.passed is None and "pairs" in am1.note
    small = metric(metrics, "AM@2arcmin")
    assert small.computed and not small.spec and small.passed is None
    assert summary["HSC-R"]["field_arcmin"][0] < 3.1


def test_too_few_stars_are_not_computed():
    metrics, _ = compute_metrics(fake_sources(n_star=10), MetricsConfig())
    pa1 = metric(metrics, "PA1")
    assert not pa1.computed and "only 10 stars" in pa1.note
    assert pa1.to_dict()["value"] is None


def test_galaxies_and_faint_sources_are_left_out():
    src = fake_sources(n_star=100)
    src["extendedness"][::2] = 1.0
    src["psf_snr"][1::4] = 30.0
    stars = select_stars(src, match_visits(src, 1.0), MetricsConfig())
    assert stars.n_stars == 25


def test_random_pair_differences_use_two_distinct_finite_visits():
    mag = np.array([[20.0, np.nan, 20.1], [19.0, 19.0, np.nan]])
    d = random_pair_differences(mag, np.random.default_rng(0))
    assert abs(d[0]) == pytest.approx(100 / np.sqrt(2)) and d[1] == 0.0


def test_config_rejects_a_disordered_spec():
    with pytest.raises(ValueError):
        MetricsConfig(pa1_spec=[3.0, 5.0, 8.0]).validate()


def test_metric_line_says_by_how_much_it_misses():
    m = SrdMetric("PA1", "HSC-R", 6.0, "mmag", 100, {"minimum": 8.0, "design": 5.0, "stretch": 3.0})
    assert "FAIL" in m.line() and "misses by 1 mmag" in m.line() and m.level == "minimum"
