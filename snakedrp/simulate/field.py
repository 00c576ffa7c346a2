"""The simulated sky and observing plan: visits, exposures, objects, reference catalog, true PSF.

Everything here is cheap and deterministic in the seed; rendering pixels is in
:mod:`snakedrp.simulate.render`.
"""
from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np
from astropy.table import Table
from astropy.time import Time

from snakedrp.repo.camera import Camera
from snakedrp.repo.refcat import angular_distance
from . import instrument
from .instrument import STREAM_EXPOSURE, STREAM_OBJECTS, STREAM_REFCAT, STREAM_VISIT, rng_for
from .presets import SimParams

#: Telescope optics of the PSF: a diffraction-limited 8.2 m primary (Subaru-like) with a central
#: obstruction of 0.28 of its diameter, at the effective wavelength of the filter's band [nm]
#: (HSC filter curves; ``DEFAULT_WAVELENGTH`` for other bands).
TELESCOPE_DIAMETER = 8.2  # m
OBSCURATION = 0.28
EFFECTIVE_WAVELENGTH = {"g": 475.0, "r": 618.0, "i": 771.0, "z": 890.0, "y": 976.0}
DEFAULT_WAVELENGTH = 700.0
#: GalSim's default smallest FFT (128) is 4x the area most stamps need; GalSim still sizes the FFT
#: from the profile (folding_threshold) and the stamp, so only the needless padding goes.
GSPARAMS = galsim.GSParams(minimum_fft_size=32)
#: First science visit number of each filter (HSC-like even numbers); others get 905000 + 1000 k.
FIRST_VISIT = {"HSC-R": 903334, "HSC-I": 903986, "HSC-G": 904400}
#: Calibration visit numbers: bias 100+, dark 200+, flat 1000 + 100 j + i, fringe 2000 + 100 j + i
#: (j = index of the filter in the camera YAML).
BIAS_VISIT0, DARK_VISIT0, FLAT_VISIT0, FRINGE_VISIT0 = 100, 200, 1000, 2000
MJD_START = 57000.25  # first science exposure; calibrations the afternoon before
POINTING_ERROR = (1.0, 2.0)  # header minus true pointing [arcsec]
ROTATION_ERROR = 0.02  # max |header minus true rotation| [deg]
ROTATION_OFFSET = (0.2, 1.0)  # |visit rotation - field rotation| [deg]
DITHER = 1.0 / 3.0  # dither radius in units of the CCD width
TRANSPARENCY = 0.1  # max |zeropoint offset| per visit [mag]
SKY_VARIATION = 0.2  # per-visit sky level varies by +-20 %
PSF_SIZE_VARIATION = (0.05, 0.08)  # max |fractional size change| over the focal plane
PSF_SHEAR_MAX = (0.025, 0.04)  # max |g| over the focal plane
SATELLITE_PEAK = 400.0  # e- per pixel at the trail centre
SATELLITE_SIGMA = 1.0  # Gaussian sigma of the trail profile [pixel]
REFCAT_MARGIN = 60.0  # refcat and objects extend this far beyond the outermost CCD corner [arcsec]
SERSIC_N = np.arange(0.5, 4.01, 0.5)  # GalSim builds a lookup table per n, so n is quantized
SERSIC_N_WEIGHTS = np.array([1, 4, 3, 2, 1.5, 1, 1, 1.5])
GALAXY_TRUNCATION = 4.5  # Sersic profiles are truncated at this many half-light radii


@dataclass(frozen=True)
class FieldResult:
    """The simulated sky: ``objects`` (truth), ``visits`` (truth), ``refcat`` (the reference
    catalog table, before sharding) and ``exposures`` (per science (visit, ccd) truth)."""

    objects: Table
    visits: Table
    refcat: Table
    exposures: Table


# ------------------------------------------------------------------ geometry helpers
def tangent_offset(ra0: float, dec0: float, xi, eta):
    """``(ra, dec)`` [deg] of tangent-plane offsets ``(xi, eta)`` [deg] (xi East) about ``(ra0, dec0)``."""
    w = Camera._tangent_wcs(ra0, dec0)
    ra, dec = w.wcs_pix2world(np.atleast_1d(xi), np.atleast_1d(eta), 0)
    return np.mod(ra, 360.0), dec


def _ccds(params: SimParams, camera: Camera) -> list[int]:
    ccds = list(params.ccds) or camera.ccd_ids
    unknown = sorted(set(ccds) - set(camera.ccd_ids))
    if unknown:
        raise ValueError(f"simulate.ccds: CCD(s) {unknown} not in camera {camera.name} ({camera.ccd_ids})")
    return sorted(ccds)


def _filters(params: SimParams, camera: Camera) -> list[str]:
    unknown = [f for f in params.filters if f not in camera.filters]
    if unknown:
        raise ValueError(f"simulate.filters: {unknown} not in camera {camera.name} ({sorted(camera.filters)})")
    return list(params.filters)


def _science_visit_numbers(params: SimParams, camera: Camera) -> list[tuple[int, str]]:
    out = []
    for k, f in enumerate(_filters(params, camera)):
        first = FIRST_VISIT.get(f, 905000 + 1000 * k)
        out += [(first + 2 * i, f) for i in range(params.n_visits)]
    return out


def _quadratic_terms(u, v):
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=-1)


def _random_quadratic(rng, amplitude: float, n: int = 41) -> np.ndarray:
    """Coefficients of a random quadratic in (u, v) whose max |value| over the unit disk is ``amplitude``."""
    coeffs = rng.standard_normal(6)
    g = np.linspace(-1, 1, n)
    u, v = np.meshgrid(g, g)
    inside = u**2 + v**2 <= 1
    values = _quadratic_terms(u[inside], v[inside]) @ coeffs
    return coeffs * amplitude / np.abs(values).max()


# ------------------------------------------------------------------ visits and plan
def visit_seeings(params: SimParams, camera: Camera) -> list[float]:
    """Seeing [arcsec] of every science visit, in the order of ``plan_visits``.

    The visits of all filters take the values ``linspace(seeing_min, seeing_max, n)`` (the
    midpoint for one visit), dealt out in turn to the filters so that each filter covers the
    range, then shuffled in time within each filter: a uniform draw could cluster, and the demo
    must exercise the whole range.
    """
    filters = _filters(params, camera)
    n = len(filters) * params.n_visits
    grid = (np.linspace(params.seeing_min, params.seeing_max, n) if n > 1
            else np.array([0.5 * (params.seeing_min + params.seeing_max)]))
    rng = rng_for(params.seed, STREAM_VISIT, 0)  # visit numbers are >= 903334: key 0 is free
    out = []
    for k in range(len(filters)):
        out += [float(grid[j]) for j in rng.permutation(np.arange(k, n, len(filters)))]
    return out


def plan_visits(params: SimParams, camera: Camera) -> Table:
    """The science visits with their true observing conditions (see docs "Simulator truth").

    Columns: visit, filter, band, exptime [s], mjd, date_obs, airmass, ra/dec/rotation (true
    pointing, deg), tel_ra/tel_dec/tel_rotation (header pointing, deg), seeing (FWHM of the
    Kolmogorov atmosphere, arcsec; spread evenly over [seeing_min, seeing_max] within each
    filter, see :func:`visit_seeings`), wavelength (effective wavelength of the optics' Airy
    pattern, nm), psf_norm_mm and psf_size/psf_g1/psf_g2 (quadratic coefficients in focal-plane
    ``(u, v) = (x_mm, y_mm) / psf_norm_mm``, terms 1, u, v, u^2, uv, v^2; the PSF is dilated by
    ``1 + size`` and sheared by ``(g1, g2)`` in pixel coordinates), transparency [mag],
    zeropoint (AB mag of 1 e- in the raw exposure), sky_brightness [AB mag/arcsec^2], sky
    [e-/pixel at unit flat response], fringe_scale, and the satellite trail (satellite,
    sat_angle [deg], sat_offset_mm, sat_peak [e-/pixel]).
    """
    numbers = _science_visit_numbers(params, camera)
    seeings = visit_seeings(params, camera)
    ny, nx = camera.ccd_shape
    ccd_width = nx * camera.pixel_scale / 3600.0
    r_fp = instrument.focal_plane_radius(camera)
    rows = []
    n_total = len(numbers)
    for k, (visit, f) in enumerate(numbers):
        rng = rng_for(params.seed, STREAM_VISIT, visit)
        filt = camera.filters[f]
        if k == 0:
            xi = eta = 0.0
        else:
            phi = 2 * np.pi * (k - 1) / max(n_total - 1, 1) + rng.uniform(-0.3, 0.3)
            radius = DITHER * ccd_width * rng.uniform(0.9, 1.1)
            xi, eta = radius * np.cos(phi), radius * np.sin(phi)
        ra, dec = (float(v[0]) for v in tangent_offset(params.ra, params.dec, xi, eta))
        rotation = params.rotation + rng.choice([-1.0, 1.0]) * rng.uniform(*ROTATION_OFFSET)
        err = rng.uniform(*POINTING_ERROR) / 3600.0
        pa = rng.uniform(0, 2 * np.pi)
        tel_ra, tel_dec = (float(v[0]) for v in tangent_offset(ra, dec, err * np.cos(pa), err * np.sin(pa)))
        tel_rotation = rotation + rng.uniform(-ROTATION_ERROR, ROTATION_ERROR)
        seeing = seeings[k]
        psf_size = _random_quadratic(rng, rng.uniform(*PSF_SIZE_VARIATION))
        shear_max = rng.uniform(*PSF_SHEAR_MAX)
        # the two components share the budget so |g| stays below shear_max
        psf_g1 = _random_quadratic(rng, shear_max / np.sqrt(2))
        psf_g2 = _random_quadratic(rng, shear_max / np.sqrt(2))
        transparency = rng.uniform(-TRANSPARENCY, TRANSPARENCY)
        zeropoint = filt.zeropoint + 2.5 * np.log10(params.exptime) + transparency
        sky_brightness = filt.sky_brightness + rng.uniform(params.sky_offset_min, params.sky_offset_max)
        sky_mag_pixel = sky_brightness - 5.0 * np.log10(camera.pixel_scale)
        sky = 10 ** (-0.4 * (sky_mag_pixel - zeropoint)) * (1 + rng.uniform(-SKY_VARIATION, SKY_VARIATION))
        fringe_scale = rng.uniform(0.7, 1.3) if filt.fringe else 0.0
        satellite = bool(params.satellite and k == 1)
        mjd = MJD_START + k * 0.004
        rows.append(dict(
            visit=visit, filter=f, band=filt.band, exptime=params.exptime, mjd=mjd,
            date_obs=Time(mjd, format="mjd", scale="utc").isot, airmass=rng.uniform(1.0, 1.5),
            ra=ra, dec=dec, rotation=rotation, tel_ra=tel_ra, tel_dec=tel_dec, tel_rotation=tel_rotation,
            seeing=seeing, wavelength=EFFECTIVE_WAVELENGTH.get(filt.band, DEFAULT_WAVELENGTH), psf_norm_mm=r_fp,
            psf_size=psf_size, psf_g1=psf_g1, psf_g2=psf_g2, transparency=transparency, zeropoint=zeropoint,
            sky_brightness=sky_brightness, sky=sky, fringe_scale=fringe_scale,
            satellite=satellite, sat_angle=rng.uniform(0, 180.0) if satellite else 0.0,
            sat_offset_mm=rng.uniform(-0.3, 0.3) * r_fp if satellite else 0.0,
            sat_peak=SATELLITE_PEAK if satellite else 0.0,
        ))
    t = Table(rows=rows)
    units = dict(exptime="s", mjd="d", ra="deg", dec="deg", rotation="deg", tel_ra="deg", tel_dec="deg",
                 tel_rotation="deg", seeing="arcsec", wavelength="nm", psf_norm_mm="mm", transparency="mag",
                 zeropoint="mag", sky_brightness="mag / arcsec2", sky="electron", sat_angle="deg", sat_offset_mm="mm",
                 sat_peak="electron")
    for name, unit in units.items():
        t[name].unit = unit
    t.meta["comments"] = ["snakedrp.simulate truth: one row per science visit"]
    return t


def plan_exposures(params: SimParams, camera: Camera) -> Table:
    """Every raw exposure the simulator writes (science and calibration), without rendering.

    Columns: visit, ccd, filter (NONE for bias/dark), obstype, exptime [s], date_obs (ISO UTC),
    mjd, telra, teldec, rotang [deg] (the header pointing), airmass. Deterministic in the seed.
    """
    ccds = _ccds(params, camera)
    visits = plan_visits(params, camera)
    rows = []
    for v in visits:
        for c in ccds:
            rows.append((int(v["visit"]), c, str(v["filter"]), "science", float(v["exptime"]), str(v["date_obs"]),
                         float(v["mjd"]), float(v["tel_ra"]), float(v["tel_dec"]), float(v["tel_rotation"]),
                         float(v["airmass"])))
    calib = []  # (visit, filter, obstype, exptime, ra, dec, airmass)
    calib += [(BIAS_VISIT0 + i, "NONE", "bias", 0.0, params.ra, params.dec, 1.0) for i in range(params.n_bias)]
    calib += [(DARK_VISIT0 + i, "NONE", "dark", params.dark_exptime, params.ra, params.dec, 1.0)
              for i in range(params.n_dark)]
    camera_filters = list(camera.filters)
    for f in _filters(params, camera):
        j = camera_filters.index(f)
        calib += [(FLAT_VISIT0 + 100 * j + i, f, "flat", params.flat_exptime, params.ra, params.dec, 1.0)
                  for i in range(params.n_flat)]
    for f in _filters(params, camera):
        if not camera.filters[f].fringe:
            continue
        j = camera_filters.index(f)
        for i in range(params.n_fringe):
            # blank fields well away from the science field
            ra, dec = tangent_offset(params.ra, params.dec, 1.0 + 0.5 * i, -1.0)
            calib.append((FRINGE_VISIT0 + 100 * j + i, f, "fringe", params.exptime, float(ra[0]), float(dec[0]), 1.2))
    for k, (visit, f, obstype, exptime, ra, dec, airmass) in enumerate(calib):
        mjd = MJD_START - 0.25 + k * 0.003
        date_obs = Time(mjd, format="mjd", scale="utc").isot
        for c in ccds:
            rows.append((visit, c, f, obstype, exptime, date_obs, mjd, ra, dec, params.rotation, airmass))
    names = ("visit", "ccd", "filter", "obstype", "exptime", "date_obs", "mjd", "telra", "teldec", "rotang", "airmass")
    t = Table(rows=rows, names=names,
              dtype=(np.int64, np.int64, str, str, float, str, float, float, float, float, float))
    for name, unit in dict(exptime="s", mjd="d", telra="deg", teldec="deg", rotang="deg").items():
        t[name].unit = unit
    t.sort(["visit", "ccd"])
    return t


# ------------------------------------------------------------------ objects
def _power_law_mags(rng, n: int, m1: float, m2: float, slope: float) -> np.ndarray:
    """``n`` magnitudes with dN/dm proportional to 10**(slope m) on [m1, m2)."""
    a, b = 10 ** (slope * m1), 10 ** (slope * m2)
    return np.log10(a + rng.uniform(0, 1, n) * (b - a)) / slope


def _uniform_in_cap(rng, n: int, ra0: float, dec0: float, radius: float):
    """``n`` points uniform on the sphere within ``radius`` [deg] of ``(ra0, dec0)``."""
    cos_r = np.cos(np.deg2rad(radius))
    z = rng.uniform(cos_r, 1.0, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    s = np.sqrt(1 - z**2)
    x, y = s * np.cos(phi), s * np.sin(phi)  # about the +z pole
    # rotate the pole onto (ra0, dec0)
    a, d = np.deg2rad(ra0), np.deg2rad(dec0)
    xr = x * np.sin(d) + z * np.cos(d)
    zr = -x * np.cos(d) + z * np.sin(d)
    yr = y
    ra = np.rad2deg(np.arctan2(yr, xr) + a) % 360.0
    dec = np.rad2deg(np.arcsin(np.clip(zr, -1, 1)))
    return ra, dec


def _band_mags(band_ref: np.ndarray, colour: np.ndarray, bands: list[str]) -> dict[str, np.ndarray]:
    """Magnitudes per band from the r-band magnitude and a (g-r) colour, along a stellar-locus-like line."""
    ri = 0.05 + 0.45 * colour
    offsets = {"u": 1.8 * colour + 0.6, "g": colour, "r": 0.0, "i": -ri, "z": -1.4 * ri, "y": -1.6 * ri}
    return {b: band_ref + offsets.get(b, 0.0) for b in bands}


def field_radius(params: SimParams, camera: Camera, visits: Table) -> float:
    """Radius [deg] about the field centre holding every simulated CCD of every visit, plus the margin."""
    r = 0.0
    for v in visits:
        for c in _ccds(params, camera):
            ra, dec = camera.ccd_corners_sky(c, v["ra"], v["dec"], v["rotation"])
            r = max(r, float(angular_distance(params.ra, params.dec, ra, dec).max()))
    return r + REFCAT_MARGIN / 3600.0


def make_objects(params: SimParams, camera: Camera, radius: float) -> Table:
    """Stars and galaxies within ``radius`` [deg] of the field centre (the ``objects`` truth)."""
    rng = rng_for(params.seed, STREAM_OBJECTS)
    area = 2 * np.pi * (1 - np.cos(np.deg2rad(radius))) * (180 / np.pi) ** 2
    bands = sorted({f.band for f in camera.filters.values()}, key="ugrizy".find)
    n_star = rng.poisson(params.star_density * area)
    n_bright = rng.poisson(params.bright_star_density * area)
    n_gal = rng.poisson(params.galaxy_density * area)
    mag_star = np.concatenate([
        _power_law_mags(rng, n_star, params.star_mag_min, params.star_mag_max, params.star_slope),
        _power_law_mags(rng, n_bright, params.bright_star_mag_min, params.star_mag_min, params.star_slope),
    ])
    mag_gal = _power_law_mags(rng, n_gal, params.galaxy_mag_min, params.galaxy_mag_max, params.galaxy_slope)
    n_s = n_star + n_bright
    ra, dec = _uniform_in_cap(rng, n_s + n_gal, params.ra, params.dec, radius)
    colour = np.concatenate([rng.uniform(0.2, 1.5, n_s), rng.uniform(0.3, 1.2, n_gal)])
    mags = _band_mags(np.concatenate([mag_star, mag_gal]), colour, bands)
    hlr = np.clip(0.6 * 10 ** (-0.1 * (mag_gal - 20.0)) * np.exp(0.3 * rng.standard_normal(n_gal)), 0.1, 3.0)
    n_sersic = rng.choice(SERSIC_N, size=n_gal, p=SERSIC_N_WEIGHTS / SERSIC_N_WEIGHTS.sum())
    e = np.clip(np.abs(0.25 * rng.standard_normal(n_gal)), 0, 0.7)
    pa = rng.uniform(0, np.pi, n_gal)
    t = Table()
    t["id"] = np.arange(1, n_s + n_gal + 1, dtype=np.int64)
    t["ra"] = ra
    t["dec"] = dec
    t["type"] = np.array(["star"] * n_s + ["galaxy"] * n_gal, dtype="U6")
    for b in bands:
        t[f"mag_{b}"] = mags[b]
        t[f"mag_{b}"].unit = "mag"
        t[f"flux_{b}"] = 10 ** (-0.4 * (mags[b] - 31.4))
        t[f"flux_{b}"].unit = "nJy"
    zeros = np.zeros(n_s)
    t["sersic_n"] = np.concatenate([zeros, n_sersic])
    t["half_light_radius"] = np.concatenate([zeros, hlr])
    t["half_light_radius"].unit = "arcsec"
    t["e1"] = np.concatenate([zeros, e * np.cos(2 * pa)])
    t["e2"] = np.concatenate([zeros, e * np.sin(2 * pa)])
    t["ra"].unit = t["dec"].unit = "deg"
    t.meta["comments"] = [
        "snakedrp.simulate truth objects. e1, e2: distortion (a^2-b^2)/(a^2+b^2) on the sky, "
        "e1 > 0 along East-West; galaxies are truncated Sersic profiles (4.5 half-light radii)."]
    return t


def make_refcat(params: SimParams, objects: Table) -> Table:
    """The Gaia-like reference catalog: stars brighter than ``refcat_mag_limit`` in ``refcat_band``,
    positions perturbed by ``refcat_pos_err`` mas and magnitudes by ``refcat_mag_err`` (Gaussian)."""
    rng = rng_for(params.seed, STREAM_REFCAT)
    stars = objects[(objects["type"] == "star") & (objects[f"mag_{params.refcat_band}"] < params.refcat_mag_limit)]
    n = len(stars)
    bands = [c[4:] for c in stars.colnames if c.startswith("mag_")]
    err = np.full(n, params.refcat_pos_err)
    dxi = rng.standard_normal(n) * err / 3.6e6
    deta = rng.standard_normal(n) * err / 3.6e6
    dec = np.asarray(stars["dec"]) + deta
    ra = np.asarray(stars["ra"]) + dxi / np.cos(np.deg2rad(stars["dec"]))
    over = dec > 90  # crossing the pole flips the RA
    dec = np.where(over, 180 - dec, dec)
    under = dec < -90
    dec = np.where(under, -180 - dec, dec)
    ra = np.where(over | under, ra + 180.0, ra) % 360.0
    t = Table()
    t["id"] = stars["id"]
    t["ra"], t["dec"] = ra, dec
    t["ra"].unit = t["dec"].unit = "deg"
    t["ra_err"], t["dec_err"] = err, err.copy()
    t["ra_err"].unit = t["dec_err"].unit = "mas"
    for b in bands:
        t[f"mag_{b}"] = np.asarray(stars[f"mag_{b}"]) + rng.standard_normal(n) * params.refcat_mag_err
        t[f"mag_{b}_err"] = np.full(n, params.refcat_mag_err)
        t[f"mag_{b}"].unit = t[f"mag_{b}_err"].unit = "mag"
    return t


# ------------------------------------------------------------------ PSF
def _quadratic(coeffs, u, v):
    return _quadratic_terms(np.asarray(u, float), np.asarray(v, float)) @ np.asarray(coeffs, float)


def psf_variation(visit_row, camera: Camera, ccd: int, x, y):
    """PSF size factor and shear ``(scale, g1, g2)`` at zero-based pixel ``(x, y)`` of ``ccd``."""
    fx, fy = camera.pixel_to_focal_plane(ccd, x, y)
    u, v = fx / visit_row["psf_norm_mm"], fy / visit_row["psf_norm_mm"]
    return (1.0 + _quadratic(visit_row["psf_size"], u, v), _quadratic(visit_row["psf_g1"], u, v),
            _quadratic(visit_row["psf_g2"], u, v))


def sky_to_pixel_jacobian(visit_row, camera: Camera, ccd: int, x, y) -> np.ndarray:
    """Local Jacobian ``d(x, y) / d(xi, eta)`` [pixel/arcsec] of the true mapping at pixel ``(x, y)``.

    Shape ``(..., 2, 2)``; ``xi`` points East and ``eta`` North. Includes the optical distortion.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    h = 0.5
    args = (visit_row["ra"], visit_row["dec"], visit_row["rotation"])
    ra0, dec0 = camera.pixel_to_sky(ccd, x, y, *args)
    cosd = np.cos(np.deg2rad(dec0))
    cols = []
    for dx, dy in ((h, 0.0), (0.0, h)):
        rp, dp = camera.pixel_to_sky(ccd, x + dx, y + dy, *args)
        rm, dm = camera.pixel_to_sky(ccd, x - dx, y - dy, *args)
        dra = (rp - rm + 180.0) % 360.0 - 180.0
        cols.append(np.stack([dra * cosd * 3600 / (2 * h), (dp - dm) * 3600 / (2 * h)], axis=-1))
    sky_per_pix = np.stack(cols, axis=-1)  # [..., (xi, eta), (x, y)]
    return np.linalg.inv(sky_per_pix)


def atmospheric_psf(visit_row) -> galsim.GSObject:
    """The visit's atmosphere: a Kolmogorov profile of FWHM = seeing, on the sky in arcsec, unit flux."""
    return galsim.Kolmogorov(fwhm=float(visit_row["seeing"]), gsparams=GSPARAMS)


def optics_psf(visit_row) -> galsim.GSObject:
    """The telescope's diffraction pattern: an Airy of the 8.2 m obscured pupil at the visit's wavelength (arcsec)."""
    return galsim.Airy(lam=float(visit_row["wavelength"]), diam=TELESCOPE_DIAMETER, obscuration=OBSCURATION,
                       scale_unit=galsim.arcsec, gsparams=GSPARAMS)


def sky_psf(visit_row) -> galsim.GSObject:
    """The visit's PSF on the sky before the focal-plane variation: atmosphere (x) optics, arcsec, unit
    flux, not truncated (about 1 % of the light lies beyond 4 FWHM)."""
    return galsim.Convolve(atmospheric_psf(visit_row), optics_psf(visit_row))


def pixel_psf(sky: galsim.GSObject, jacobian: np.ndarray, scale: float, g1: float, g2: float):
    """The PSF in pixel units: the sky PSF mapped by ``jacobian``, dilated by ``scale``, sheared by ``(g1, g2)``."""
    j = jacobian
    # transform() keeps the surface brightness, so its flux changes by |det j|: restore it
    flux = sky.flux
    return sky.transform(j[0, 0], j[0, 1], j[1, 0], j[1, 1]).dilate(scale).shear(g1=g1, g2=g2).withFlux(flux)


def true_psf(visit_row, camera: Camera, ccd: int, x: float, y: float) -> galsim.GSObject:
    """The true PSF at zero-based pixel ``(x, y)`` of ``ccd`` in a visit, in pixel units, unit flux.

    The profile is *before* convolution with the pixel: draw it with GalSim's default
    ``method='auto'`` (which convolves with the pixel) and ``scale=1`` to get the PSF as it
    appears in the image; ``method='no_pixel'`` gives the optical+atmospheric PSF. It is a
    Kolmogorov atmosphere (FWHM = the visit's seeing) convolved with the Airy pattern of an
    8.2 m pupil with a 0.28 central obstruction at the filter's effective wavelength, not
    truncated; mapped to pixels by the local Jacobian of the true sky-to-pixel mapping
    (distortion included); and, standing for the optical aberrations (focus, astigmatism) that
    vary smoothly over the focal plane, dilated by the visit's size pattern and sheared by its
    (g1, g2) pattern at this focal-plane position. The images hold exactly this profile
    (convolved with the pixel), each object drawn on a stamp that holds its wings until the
    light left out is below the noise of its flux (:func:`snakedrp.simulate.render.stamp_half_width`).

    Parameters
    ----------
    visit_row : row of the ``visits`` truth table (``Table`` row or mapping)
    camera : Camera
    ccd : int
    x, y : float
        Zero-based pixel position on the assembled CCD.
    """
    scale, g1, g2 = psf_variation(visit_row, camera, ccd, x, y)
    jac = sky_to_pixel_jacobian(visit_row, camera, ccd, x, y)[0]
    return pixel_psf(sky_psf(visit_row), jac, float(np.ravel(scale)[0]), float(np.ravel(g1)[0]),
                     float(np.ravel(g2)[0]))


# ------------------------------------------------------------------ objects on one CCD
def objects_on_ccd(visit_row, camera: Camera, ccd: int, objects: Table, margin: float = 30.0):
    """Indices into ``objects`` and zero-based true pixel ``(x, y)`` of those within ``margin`` pixels of the CCD."""
    ny, nx = camera.ccd_shape
    args = (visit_row["ra"], visit_row["dec"], visit_row["rotation"])
    cra, cdec = camera.pixel_to_sky(ccd, (nx - 1) / 2.0, (ny - 1) / 2.0, *args)
    half_diag = 0.5 * np.hypot(nx, ny) * camera.pixel_scale / 3600.0 * 1.05 + margin * camera.pixel_scale / 3600.0
    near = np.flatnonzero(angular_distance(cra[0], cdec[0], objects["ra"], objects["dec"]) < half_diag)
    if near.size == 0:
        return near, np.zeros(0), np.zeros(0)
    x, y = camera.sky_to_pixel(ccd, np.asarray(objects["ra"])[near], np.asarray(objects["dec"])[near], *args)
    keep = (x > -margin) & (x < nx - 1 + margin) & (y > -margin) & (y < ny - 1 + margin)
    return near[keep], np.asarray(x)[keep], np.asarray(y)[keep]


def inside_ccd(camera: Camera, x, y):
    """True where a zero-based position lies on the CCD's pixels."""
    ny, nx = camera.ccd_shape
    return (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)


def cosmic_ray_count(params: SimParams, camera: Camera, visit: int, ccd: int, exptime: float) -> int:
    """Number of cosmic rays of an exposure (the first draw of its cosmic-ray random stream)."""
    rng = exposure_rngs(params.seed, visit, ccd)["cr"]
    npix = camera.ccd_shape[0] * camera.ccd_shape[1]
    return int(rng.poisson(params.cr_rate * npix / 1e6 * exptime))


def exposure_rngs(seed: int, visit: int, ccd: int) -> dict[str, np.random.Generator]:
    """Independent random streams of one exposure: ``cr``, ``noise``, ``readout``, ``conditions``."""
    children = np.random.SeedSequence([int(seed), STREAM_EXPOSURE, int(visit), int(ccd)]).spawn(4)
    return {name: np.random.default_rng(s) for name, s in zip(("cr", "noise", "readout", "conditions"), children)}


# ------------------------------------------------------------------ the field
def make_field(params: SimParams, camera: Camera) -> FieldResult:
    """Draw the sky and the observing conditions: objects, visits, the reference catalog and the
    per-(visit, ccd) truth (true calexp zeropoint, object and cosmic-ray counts).

    The calexp zeropoint follows the median-1 master-flat convention:
    ``zeropoint = zeropoint_raw + 2.5 log10(median flat response of the CCD)``.
    """
    visits = plan_visits(params, camera)
    radius = field_radius(params, camera, visits)
    objects = make_objects(params, camera, radius)
    refcat = make_refcat(params, objects)
    refcat.meta["radius"] = radius
    medians = {c: instrument.median_flat_response(instrument.flat_response(params.seed, camera, c), camera, c)
               for c in _ccds(params, camera)}
    rows = []
    for v in visits:
        for c in _ccds(params, camera):
            idx, x, y = objects_on_ccd(v, camera, c, objects, margin=0.0)
            inside = inside_ccd(camera, x, y)
            types = np.asarray(objects["type"]).astype(str)[idx[inside]]
            rows.append(dict(
                visit=int(v["visit"]), ccd=c, filter=str(v["filter"]),
                zeropoint=float(v["zeropoint"] + 2.5 * np.log10(medians[c])),
                zeropoint_raw=float(v["zeropoint"]), median_flat=medians[c],
                n_objects=int(inside.sum()), n_stars=int((types == "star").sum()),
                n_galaxies=int((types == "galaxy").sum()),
                n_cosmic_rays=cosmic_ray_count(params, camera, int(v["visit"]), c, float(v["exptime"])),
            ))
    exposures = Table(rows=rows)
    exposures["zeropoint"].unit = exposures["zeropoint_raw"].unit = "mag"
    exposures.meta["comments"] = ["zeropoint: AB mag of 1 e- in the calexp (median-1 flat convention)"]
    return FieldResult(objects=objects, visits=visits, refcat=refcat, exposures=exposures)

