"""Survey metrics from the pipeline's own catalogs: LSST SRD repeatability (validate_drp definitions).

Bright, unflagged, point-like sources of every visit of one filter are matched across visits
(:func:`match_visits`); the matched stars give

- **PA1** photometric repeatability [mmag]: for each star the magnitude difference of a random
  pair of its visits, divided by sqrt(2); PA1 is the scaled inter-quartile range
  (IQR / 1.349) of those values over the stars, averaged over ``n_shuffles`` random draws
  (validate_drp ``calcPa1``; the plain RMS is reported beside it);
- **PF1** [%]: fraction of those values larger than the PA2 design value, and **PA2** [mmag]: the
  value that only PF1-design % of them exceed;
- **AM1** astrometric repeatability [mas]: for each pair of stars whose mean positions are
  ``D ± width/2`` apart (D = 5'), the sample RMS (ddof 1) over their common visits of the
  distance between them; AM1 is the median over pairs (validate_drp ``calcRmsDistances``);
- **AF1** [%]: pairs whose RMS exceeds AM1 + AD1-design; **AD1** [mas]: the excess over AM1
  that only AF1-design % of the pairs reach.

Each :class:`SrdMetric` carries its LSST specification (minimum, design, stretch, LPM-17) and is
marked against the level chosen in :class:`MetricsConfig`. A metric that cannot be computed (too
few stars, no pairs at 5' in a small field) has value NaN and says why.
"""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord, angular_separation
from astropy.io import fits
from astropy.table import Table, vstack

from snakedrp.meas.columns import flagged
from snakedrp.validate.config import LEVELS, MetricsConfig, SRD_SPECS


@dataclass
class SrdMetric:
    """One SRD metric of one filter, with its specification and pass mark.

    ``value`` is NaN when the metric could not be computed; ``note`` then says why.
    """

    name: str
    filter: str
    value: float
    unit: str
    n: int
    spec: dict[str, float] = field(default_factory=dict)
    goal_level: str = "design"
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def computed(self) -> bool:
        return bool(np.isfinite(self.value))

    @property
    def level(self) -> str:
        """Best SRD level reached: ``stretch``, ``design``, ``minimum``, ``none`` or ``not computed``."""
        if not self.computed:
            return "not computed"
        for lvl in reversed(LEVELS):
            if lvl in self.spec and self.value <= self.spec[lvl]:
                return lvl
        return "none" if self.spec else "no spec"

    @property
    def goal(self) -> float:
        return float(self.spec.get(self.goal_level, np.nan))

    @property
    def passed(self) -> bool | None:
        """True/False against the goal level; None for metrics without a spec or not computed."""
        if not self.computed or not self.spec:
            return None
        return bool(self.value <= self.goal)

    @property
    def miss(self) -> float:
        """How far past the goal (value - goal, in ``unit``; 0 when passed, NaN if unknown)."""
        if self.passed is None:
            return float("nan")
        return max(0.0, float(self.value - self.goal))

    def status(self) -> str:
        if self.passed is None:
            return "n/a" if self.computed else "NOT COMPUTED"
        return "PASS" if self.passed else "FAIL"

    def line(self) -> str:
        if not self.computed:
            return f"NOT COMPUTED {self.name} [{self.filter}]: {self.note}"
        text = f"{self.status()} {self.name} [{self.filter}]: {self.value:.3g} {self.unit} (n={self.n}"
        if self.spec:
            text += (f"; {self.goal_level} <= {self.goal:g}, spec min/design/stretch "
                     f"{self.spec['minimum']:g}/{self.spec['design']:g}/{self.spec['stretch']:g}; "
                     f"reaches {self.level}")
            if self.passed is False:
                text += f"; misses by {self.miss:.3g} {self.unit}"
        text += ")"
        return text + (f" — {self.note}" if self.note else "")

    def to_dict(self) -> dict:
        return dict(name=self.name, filter=self.filter, value=_json_float(self.value), unit=self.unit, n=int(self.n),
                    spec=self.spec, goal_level=self.goal_level, goal=_json_float(self.goal),
                    level=self.level, passed=self.passed, miss=_json_float(self.miss), note=self.note,
                    **{k: _json_float(v) if isinstance(v, float) else v for k, v in self.extra.items()})


def _json_float(value: float):
    return float(value) if np.isfinite(value) else None


# ------------------------------------------------------------------ inputs
def star_candidates(src: Table, config: MetricsConfig) -> np.ndarray:
    """Rows of a src catalog that may enter the metrics: unflagged, finite, bright enough to matter.

    The S/N and extendedness cuts on the median over a star's visits come after matching
    (:func:`select_stars`); here a source needs finite coordinates and PSF magnitude, no pixel
    flag (``flag_*``), no failed centroid or PSF flux, and S/N above half ``snr_min`` (a star
    near the cut must not lose the visits where noise put it just below).
    """
    ok = ~flagged(src, also=("centroid_flag", "psf_flux_flag"))
    for name in ("coord_ra", "coord_dec", "psf_mag", "psf_snr"):
        ok &= np.isfinite(np.ma.filled(np.asarray(src[name], float), np.nan))
    ok &= np.nan_to_num(np.ma.filled(np.asarray(src["psf_snr"], float), 0.0)) >= 0.5 * config.snr_min
    return ok


def read_visit_sources(paths, data_ids, config: MetricsConfig) -> Table:
    """Stack the candidate stars of many src catalogs, adding ``visit``, ``ccd`` and ``filter``.

    Parameters
    ----------
    paths : list of str
        src catalogs (FITS).
    data_ids : list of dict
        ``visit``, ``ccd``, ``filter`` of each catalog, in the same order.
    """
    keep = ("coord_ra", "coord_dec", "psf_mag", "psf_mag_err", "psf_snr", "extendedness", "x_centroid", "y_centroid")
    parts = []
    for path, data_id in zip(paths, data_ids):
        if "WCSFAIL" in fits.getheader(path, 1):  # no fitted WCS nor zeropoint (calibrate.require_astrometry)
            continue
        src = _read_columns(path, lambda n: n in keep or n.startswith("flag_") or n in ("centroid_flag", "psf_flux_flag"))
        rows = src[star_candidates(src, config)]
        part = Table({name: np.asarray(rows[name], float) for name in keep})
        part["visit"] = np.full(len(part), int(data_id["visit"]), np.int64)
        part["ccd"] = np.full(len(part), int(data_id["ccd"]), np.int64)
        part["filter"] = np.full(len(part), str(data_id["filter"]))
        parts.append(part)
    if not parts:
        return Table(names=(*keep, "visit", "ccd", "filter"), dtype=(*[float] * len(keep), int, int, str))
    return vstack(parts, metadata_conflicts="silent")


def _read_columns(path, wanted) -> Table:
    """The columns of a FITS table whose names pass ``wanted`` (NaN for null floats).

    Reads through the FITS record array: astropy's Table.read converts every one of the src's
    ~80 columns (0.3 s per catalog), this only the dozen the metrics use.
    """
    with fits.open(path, memmap=True) as hdul:
        data = hdul[1].data
        return Table({name: np.array(data[name]) for name in data.columns.names if wanted(name)})


# ------------------------------------------------------------------ matching
def match_visits(sources: Table, radius_arcsec: float) -> np.ndarray:
    """Group one filter's sources of many visits into objects (LSST MultiMatch-like).

    Visits are taken in order; each visit's sources are matched to the running mean positions of
    the objects found so far, nearest first within ``radius_arcsec``, at most one source per
    object and visit; the rest start new objects.

    Returns
    -------
    ndarray of int, shape (n_sources,)
        Object index of every source.
    """
    obj = np.full(len(sources), -1, np.int64)
    ra = np.asarray(sources["coord_ra"], float)
    dec = np.asarray(sources["coord_dec"], float)
    visits = np.asarray(sources["visit"])
    sum_ra, sum_dec, count = [], [], []  # running sums; a 1" group never straddles RA 0/360 in practice
    for visit in np.unique(visits):
        rows = np.flatnonzero(visits == visit)
        if count:
            n = np.asarray(count, float)
            mean = SkyCoord(np.asarray(sum_ra) / n, np.asarray(sum_dec) / n, unit="deg")
            idx, sep, _ = SkyCoord(ra[rows], dec[rows], unit="deg").match_to_catalog_sky(mean)
            sep_arcsec = sep.to_value(u.arcsec)
            taken = set()
            for k in np.argsort(sep_arcsec):  # nearest first: a crowded object keeps its best source
                if sep_arcsec[k] > radius_arcsec:
                    break
                if idx[k] in taken:
                    continue
                taken.add(int(idx[k]))
                obj[rows[k]] = idx[k]
        for r in rows:
            if obj[r] < 0:
                obj[r] = len(count)
                sum_ra.append(0.0), sum_dec.append(0.0), count.append(0)
            sum_ra[obj[r]] += ra[r]
            sum_dec[obj[r]] += dec[r]
            count[obj[r]] += 1
    return obj


@dataclass
class MatchedStars:
    """Stars of one filter matched across visits.

    Attributes
    ----------
    visits : ndarray of int, shape (n_visit,)
    mag, mag_err, ra, dec : ndarray, shape (n_star, n_visit)
        PSF magnitude and its error [mag] and position [deg] per star and visit, NaN where not
        measured.
    """

    visits: np.ndarray
    mag: np.ndarray
    mag_err: np.ndarray
    ra: np.ndarray
    dec: np.ndarray

    @property
    def n_stars(self) -> int:
        return self.mag.shape[0]

    def mean_position(self) -> SkyCoord:
        dec = np.nanmean(self.dec, axis=1)
        # mean of RA about the star's first finite value, so that RA 0/360 cannot split a star
        ref = np.array([row[np.isfinite(row)][0] for row in self.ra])
        ra = ref + np.nanmean((self.ra - ref[:, None] + 180.0) % 360.0 - 180.0, axis=1)
        return SkyCoord(ra % 360.0, dec, unit="deg")


def select_stars(sources: Table, objects: np.ndarray, config: MetricsConfig) -> MatchedStars:
    """The bright, point-like objects seen in at least ``min_visits`` visits, as per-visit arrays.

    A star's median PSF S/N must reach ``snr_min`` and its median extendedness stay below
    ``max_extendedness`` (an object without any shape measurement is not kept: it cannot be told
    from a galaxy).
    """
    visits = np.unique(np.asarray(sources["visit"]))
    col = np.searchsorted(visits, np.asarray(sources["visit"]))
    n_obj = int(objects.max()) + 1 if len(objects) else 0
    shape = (n_obj, len(visits))
    grids = {}
    for name in ("psf_mag", "psf_mag_err", "coord_ra", "coord_dec", "psf_snr", "extendedness"):
        grid = np.full(shape, np.nan)
        grid[objects, col] = np.asarray(sources[name], float)
        grids[name] = grid
    n_seen = np.isfinite(grids["psf_mag"]).sum(axis=1)
    with _quiet_nan_warnings():
        snr = np.nanmedian(grids["psf_snr"], axis=1)
        ext = np.nanmedian(grids["extendedness"], axis=1)
    keep = (n_seen >= config.min_visits) & (snr >= config.snr_min) & (ext < config.max_extendedness)
    return MatchedStars(visits=visits, mag=grids["psf_mag"][keep], mag_err=grids["psf_mag_err"][keep],
                        ra=grids["coord_ra"][keep],
                        dec=grids["coord_dec"][keep])


@contextmanager
def _quiet_nan_warnings():
    """Silence numpy's all-NaN-slice warnings (a row without values gives NaN, which is what we want)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ------------------------------------------------------------------ photometric repeatability
def random_pair_differences(mag: np.ndarray, rng: np.random.Generator, mag_err: np.ndarray | None = None):
    """Per star, the difference of two randomly chosen finite magnitudes, / sqrt(2), in mmag.

    Parameters
    ----------
    mag : ndarray, shape (n_star, n_visit)
        Magnitudes [mag], NaN where a star was not measured; every row has at least two finite.
    rng : numpy.random.Generator
    mag_err : ndarray, shape (n_star, n_visit), optional
        Magnitude errors [mag]; when given, also return the error of each difference [mmag].
    """
    finite = np.isfinite(mag)
    keys = np.where(finite, rng.random(mag.shape), np.inf)
    order = np.argsort(keys, axis=1)[:, :2]  # two random finite visits per star
    rows = np.arange(mag.shape[0])
    diff = (mag[rows, order[:, 0]] - mag[rows, order[:, 1]]) * 1000.0 / np.sqrt(2.0)
    if mag_err is None:
        return diff
    err = np.hypot(mag_err[rows, order[:, 0]], mag_err[rows, order[:, 1]]) * 1000.0 / np.sqrt(2.0)
    return diff, err


def iqr_sigma(values: np.ndarray) -> float:
    """Gaussian-equivalent width from the inter-quartile range (IQR / 1.349)."""
    q25, q75 = np.percentile(values, [25.0, 75.0])
    return float((q75 - q25) / 1.349)


def photometric_repeatability(stars: MatchedStars, filter_name: str, config: MetricsConfig) -> list[SrdMetric]:
    """PA1, PF1 and PA2 of one filter (validate_drp ``calcPa1``/``calcPa2``/``calcPf1``)."""
    spec = {k: config.spec(k) for k in ("PA1", "PF1", "PA2")}
    n = stars.n_stars
    if n < config.min_stars:
        note = f"only {n} stars matched in >= {config.min_visits} visits with S/N >= {config.snr_min:g} (need {config.min_stars})"
        return [SrdMetric(k, filter_name, float("nan"), unit, n, spec[k], config.goal_level, note)
                for k, unit in (("PA1", "mmag"), ("PF1", "%"), ("PA2", "mmag"))]
    rng = np.random.default_rng(config.seed)
    draws, errors = zip(*(random_pair_differences(stars.mag, rng, stars.mag_err) for _ in range(config.n_shuffles)))
    pa1_iqr = float(np.mean([iqr_sigma(d) for d in draws]))
    # the same statistic on differences drawn from the catalog's own errors: PA1 of pure measurement noise
    pa1_noise = float(np.mean([iqr_sigma(rng.normal(0.0, e)) for e in errors]))
    pa1_rms = float(np.mean([np.sqrt(np.mean(d**2)) for d in draws]))
    pa2_design, pf1_design = spec["PA2"]["design"], spec["PF1"]["design"]
    pf1 = float(np.mean([100.0 * np.mean(np.abs(d) > pa2_design) for d in draws]))
    pa2 = float(np.mean([np.percentile(np.abs(d), 100.0 - pf1_design) for d in draws]))
    mean_mag = np.nanmean(stars.mag, axis=1)
    extra = dict(rms_mmag=pa1_rms, expected_from_errors_mmag=pa1_noise,
                 mag_range=[float(np.min(mean_mag)), float(np.max(mean_mag))], n_shuffles=config.n_shuffles)
    return [
        SrdMetric("PA1", filter_name, pa1_iqr, "mmag", n, spec["PA1"], config.goal_level,
                  f"IQR/1.349 of random visit-pair differences / sqrt(2) (RMS {pa1_rms:.3g}); the catalog's "
                  f"psf_mag_err alone give {pa1_noise:.3g} mmag", extra),
        SrdMetric("PF1", filter_name, pf1, "%", n, spec["PF1"], config.goal_level,
                  f"fraction of pair differences / sqrt(2) > PA2 design {pa2_design:g} mmag"),
        SrdMetric("PA2", filter_name, pa2, "mmag", n, spec["PA2"], config.goal_level,
                  f"exceeded by PF1 design {pf1_design:g} % of pair differences / sqrt(2)"),
    ]


def bright_pa1(sources: Table, filter_name: str, config: MetricsConfig) -> SrdMetric:
    """PA1's statistic on the stars above ``bright_snr_min``, where photon noise matters less.

    Named ``PA1@SNR<cut>`` and without an SRD spec: the SRD's PA1 is the S/N >= 50 one.
    """
    bright = dataclasses.replace(config, snr_min=config.bright_snr_min)
    stars = select_stars(sources, match_visits(sources, config.match_radius), bright)
    pa1 = photometric_repeatability(stars, filter_name, bright)[0]
    return SrdMetric(f"PA1@SNR{config.bright_snr_min:g}", filter_name, pa1.value, "mmag", pa1.n, {},
                     config.goal_level, pa1.note, pa1.extra)


# ------------------------------------------------------------------ astrometric repeatability
def pair_distance_rms(stars: MatchedStars, d_min_arcmin: float, d_max_arcmin: float) -> np.ndarray:
    """Per star pair with mean separation in ``[d_min, d_max)``: RMS (ddof 1) over common visits of their distance [mas].

    Pairs with fewer than two common visits are left out (no sample RMS).
    """
    if stars.n_stars < 2:
        return np.array([])
    mean = stars.mean_position()
    i, j, sep, _ = mean.search_around_sky(mean, d_max_arcmin * u.arcmin)
    sep = sep.to_value(u.arcmin)
    keep = (i < j) & (sep >= d_min_arcmin) & (sep < d_max_arcmin)
    i, j = i[keep], j[keep]
    ra1, dec1, ra2, dec2 = (np.deg2rad(a) for a in (stars.ra[i], stars.dec[i], stars.ra[j], stars.dec[j]))
    dist = np.rad2deg(angular_separation(ra1, dec1, ra2, dec2)) * 3.6e6  # (n_pair, n_visit) mas; NaN if either missing
    common = np.isfinite(dist).sum(axis=1)
    ok = common >= 2
    with _quiet_nan_warnings():
        return np.nanstd(dist[ok], axis=1, ddof=1)


def astrometric_repeatability(stars: MatchedStars, filter_name: str, config: MetricsConfig) -> list[SrdMetric]:
    """AM1, AF1, AD1 of one filter; when AM1 has too few pairs, also AM@D at ``small_field_distance``."""
    half = config.am_width / 2.0
    spec = {k: config.spec(k) for k in ("AM1", "AF1", "AD1")}
    out = _amx(stars, filter_name, config, ("AM1", "AF1", "AD1"), config.am1_distance, half, spec)
    small = config.small_field_distance
    if not out[0].computed and small > 0 and small != config.am1_distance:
        # the field is smaller than D: the same statistic at a shorter separation, named for it and without an SRD spec
        tag = f"@{small:g}arcmin"
        out += _amx(stars, filter_name, config, (f"AM{tag}", f"AF{tag}", f"AD{tag}"), small, min(half, small / 2.0),
                    {k: {} for k in (f"AM{tag}", f"AF{tag}", f"AD{tag}")},
                    ad_design=spec["AD1"]["design"], af_design=spec["AF1"]["design"])
    return out


def _amx(stars, filter_name, config, names, distance, half, spec, *, ad_design=None, af_design=None):
    am_name, af_name, ad_name = names
    lo, hi = distance - half, distance + half
    rms = pair_distance_rms(stars, lo, hi)
    window = f"pairs {lo:g}-{hi:g}' apart"
    if rms.size < config.min_pairs:
        size = _field_size_arcmin(stars)
        note = (f"only {rms.size} star pairs {lo:g}-{hi:g}' apart with >= 2 common visits (need {config.min_pairs}); "
                f"the matched stars span {size[0]:.1f}' x {size[1]:.1f}'")
        return [SrdMetric(n, filter_name, float("nan"), unit, int(rms.size), spec[n], config.goal_level, note)
                for n, unit in ((am_name, "mas"), (af_name, "%"), (ad_name, "mas"))]
    ad_design = spec[ad_name]["design"] if ad_design is None else ad_design
    af_design = spec[af_name]["design"] if af_design is None else af_design
    am = float(np.median(rms))
    af = float(100.0 * np.mean(rms > am + ad_design))
    ad = float(np.percentile(rms - am, 100.0 - af_design))
    return [
        SrdMetric(am_name, filter_name, am, "mas", int(rms.size), spec[am_name], config.goal_level,
                  f"median over {window} of the RMS of their distance over common visits"),
        SrdMetric(af_name, filter_name, af, "%", int(rms.size), spec[af_name], config.goal_level,
                  f"pairs whose RMS exceeds {am_name} + {ad_design:g} mas"),
        SrdMetric(ad_name, filter_name, ad, "mas", int(rms.size), spec[ad_name], config.goal_level,
                  f"RMS excess over {am_name} reached by {af_design:g} % of the pairs"),
    ]


def _field_size_arcmin(stars: MatchedStars) -> tuple[float, float]:
    if stars.n_stars == 0:
        return 0.0, 0.0
    mean = stars.mean_position()
    dec0 = np.deg2rad(np.median(mean.dec.deg))
    dra = ((mean.ra.deg - np.median(mean.ra.deg) + 180.0) % 360.0 - 180.0) * np.cos(dec0)
    return float(np.ptp(dra) * 60.0), float(np.ptp(mean.dec.deg) * 60.0)


# ------------------------------------------------------------------ all filters
def compute_metrics(sources: Table, config: MetricsConfig) -> tuple[list[SrdMetric], dict]:
    """Every SRD metric for every filter in ``sources`` (from :func:`read_visit_sources`).

    Returns
    -------
    metrics : list of SrdMetric
    summary : dict
        Per filter: visits, candidate sources, matched stars, field size [arcmin].
    """
    metrics, summary = [], {}
    filters = np.asarray(sources["filter"]).astype(str)
    for filter_name in sorted(set(filters)):
        part = sources[filters == filter_name]
        stars = select_stars(part, match_visits(part, config.match_radius), config)
        size = _field_size_arcmin(stars)
        summary[filter_name] = dict(visits=[int(v) for v in np.unique(part["visit"])], sources=len(part),
                                    stars=stars.n_stars, field_arcmin=[round(size[0], 2), round(size[1], 2)])
        metrics += photometric_repeatability(stars, filter_name, config)
        if config.bright_snr_min > config.snr_min:
            metrics.append(bright_pa1(part, filter_name, config))
        metrics += astrometric_repeatability(stars, filter_name, config)
    return metrics, summary


def format_table(metrics: list[SrdMetric]) -> str:
    """The metrics as a markdown table (the log's and the report's)."""
    lines = ["| metric | filter | value | unit | n | minimum / design / stretch | reaches | goal | status | note |",
             "|---|---|---:|---|---:|---|---|---|---|---|"]
    for m in metrics:
        value = f"{m.value:.3g}" if m.computed else "—"
        spec = "/".join(f"{m.spec[k]:g}" for k in LEVELS) if m.spec else "—"
        goal = f"{m.goal_level} ≤ {m.goal:g}" if m.spec else "—"
        status = m.status() + (f" (by {m.miss:.3g})" if m.passed is False else "")
        lines.append(f"| {m.name} | {m.filter} | {value} | {m.unit} | {m.n} | {spec} | {m.level} | {goal} | "
                     f"{status} | {m.note} |")
    return "\n".join(lines)
