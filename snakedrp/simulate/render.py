"""Rendering one raw exposure (science or calibration) and writing it with its truth.

One call renders one (visit, ccd) and needs nothing from the other exposures, so the workflow
can run one job per exposure.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import galsim
import numpy as np
from astropy.io import fits
from astropy.table import Table

from snakedrp.repo.camera import Camera
from snakedrp.repo.io import atomic_path, write_table
from . import instrument
from .field import (GALAXY_TRUNCATION, GSPARAMS, SATELLITE_SIGMA, exposure_rngs, objects_on_ccd, pixel_psf,
                    psf_variation, sky_psf, sky_to_pixel_jacobian)
from .presets import SimParams

CR_CHARGE = (500.0, 5000.0)  # e- per pixel along a cosmic-ray track (log-uniform per hit)
CR_LENGTH = (1.0, 15.0)  # track length [pixel]
FIXED_CHECKSUM_COMMENT = "snakedrp.simulate"  # astropy stamps the time otherwise
MAX_STAMP_HALF = 200  # largest stamp half-width [pixel]: a 401 x 401 stamp, ~15-20 ms a star
PSF_MIN_STAMP_FWHM = 4.0  # smallest stamp half-width [FWHM] (~1 % of the light beyond); the FFT is about as large
SOURCE_MARGIN = 30.0  # objects within this many pixels of the CCD are in the truth table [pixel]


@dataclass(frozen=True)
class Scene:
    """Object light of one science exposure, before flat response and noise.

    Attributes
    ----------
    image : ndarray, float32, shape (ny, nx)
        Electrons from the objects at unit flat response.
    sources : Table
        The rendered objects: id, x, y (zero-based true pixel position), flux (true e- in calexp
        units, i.e. times the CCD's median flat response), mag, type.
    """

    image: np.ndarray
    sources: Table


@dataclass(frozen=True)
class RenderResult:
    """One rendered raw exposure.

    Attributes
    ----------
    raw : ndarray, uint16, shape ``camera.raw_shape``
        The raw frame in ADU.
    header : astropy.io.fits.Header
        ``snakedrp.repo.raw.REQUIRED_KEYS`` and, for on-sky exposures, the nominal TAN WCS.
    sources : Table
        Truth of the rendered objects (empty for calibration exposures); see :class:`Scene`
        plus ``saturated`` (a pixel within 2 pixels of the object reaches the amplifier's
        saturation level in the raw frame).
    cr_mask : ndarray, uint8, shape ``camera.ccd_shape``
        1 where a cosmic ray deposited charge (assembled pixel grid).
    """

    raw: np.ndarray
    header: fits.Header
    sources: Table
    cr_mask: np.ndarray


# ------------------------------------------------------------------ objects
def _draw(profile: galsim.GSObject, image: galsim.Image, x: float, y: float, half: int, method: str) -> None:
    ix, iy = int(np.floor(x + 0.5)) + 1, int(np.floor(y + 0.5)) + 1
    bounds = galsim.BoundsI(ix - half, ix + half, iy - half, iy + half) & image.bounds
    if not bounds.isDefined():
        return
    # GalSim is one-based: zero-based x is GalSim x + 1. center= keeps odd and even stamps exact.
    profile.drawImage(image=image[bounds], center=galsim.PositionD(x + 1.0, y + 1.0), add_to_image=True,
                      method=method)


def light_outside(sky: galsim.GSObject, pixel_scale: float, n: int = MAX_STAMP_HALF) -> np.ndarray:
    """Fraction of a sky PSF's light (pixel included) outside radius ``r`` = 0, 1, ..., ``n`` pixels.

    Measured on one drawing of ``sky`` (arcsec) at the nominal ``pixel_scale`` [arcsec/pixel],
    on a grid of 4 n + 1 pixels so that the light folded back by the FFT lies beyond ``n``.
    """
    m = 2 * n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", galsim.GalSimWarning)  # the grid is large on purpose
        img = sky.drawImage(nx=2 * m + 1, ny=2 * m + 1, scale=pixel_scale, method="auto").array
    yy, xx = np.indices(img.shape)
    r = np.ceil(np.hypot(xx - m, yy - m)).astype(int).ravel()
    inside = np.cumsum(np.bincount(r, weights=img.ravel().astype(float), minlength=n + 1))[: n + 1]
    return np.clip(1.0 - inside / float(sky.flux), 0.0, 1.0)


def stamp_half_width(flux, outside: np.ndarray, fwhm_pix: float, stretch, sky_variance: float) -> np.ndarray:
    """Stamp half-widths [pixel] of objects of total ``flux`` [e-] drawn with a PSF whose light
    outside radius r is ``outside[r]`` (:func:`light_outside`), stretched by ``stretch`` (>= 1).

    The stamp reaches the smallest radius r at which the light left out, ``flux * outside[r]``,
    is below the noise of the object's flux summed within r, ``sqrt(flux + pi r^2 sky_variance)``
    (``sky_variance`` in e-^2 per pixel), so no measurement out to the stamp's edge can see the
    missing light; at least ``PSF_MIN_STAMP_FWHM`` FWHM, at most ``MAX_STAMP_HALF``.
    """
    flux = np.maximum(np.asarray(flux, float), 1.0)[:, None]
    r = np.arange(outside.size, dtype=float)[None, :]
    below = flux * outside[None, :] <= np.sqrt(flux * (1 - outside[None, :]) + np.pi * r**2 * sky_variance)
    # outside[] decreases with r: the first r that qualifies, the largest if none does
    first = np.where(below.any(axis=1), below.argmax(axis=1), outside.size - 1)
    half = np.maximum(first, PSF_MIN_STAMP_FWHM * fwhm_pix) * np.asarray(stretch, float)
    return np.minimum(np.ceil(half).astype(int) + 2, MAX_STAMP_HALF)


def render_scene(params: SimParams, camera: Camera, visit_row, ccd: int, objects: Table,
                 *, median_flat: float | None = None) -> Scene:
    """Draw every object of ``objects`` that falls on ``ccd`` in a visit (no sky, noise or flat).

    Stars are the true PSF (:func:`snakedrp.simulate.true_psf`: Kolmogorov (x) obscured Airy,
    not truncated) convolved with the pixel; galaxies are truncated Sersic profiles on the sky
    mapped to pixels by the local Jacobian and convolved with the same PSF. Each object is drawn
    with FFTs into a stamp of the full-CCD GalSim image (bounds 1..nx, 1..ny) sized by
    :func:`stamp_half_width` (the light left out is below the noise of the flux within the
    stamp), so bright stars carry their wings far out (up to ``MAX_STAMP_HALF`` pixels) and stars
    up to that far off the CCD add their wings to it. The truth
    (``sources``: objects within ``SOURCE_MARGIN`` pixels of the CCD) holds total fluxes.
    """
    ny, nx = camera.ccd_shape
    if median_flat is None:
        median_flat = instrument.median_flat_response(instrument.flat_response(params.seed, camera, ccd), camera, ccd)
    image = galsim.ImageF(nx, ny, scale=1.0)  # bounds (1, nx, 1, ny); profiles are in pixel units
    idx, x, y = objects_on_ccd(visit_row, camera, ccd, objects, margin=float(MAX_STAMP_HALF))
    band = camera.filters[str(visit_row["filter"])].band
    mags = np.asarray(objects[f"mag_{band}"])[idx]
    flux_e = 10 ** (-0.4 * (mags - float(visit_row["zeropoint"])))
    types = np.asarray(objects["type"]).astype(str)[idx]
    sky = sky_psf(visit_row)
    fwhm_pix = float(visit_row["seeing"]) / camera.pixel_scale
    sersic_n = np.asarray(objects["sersic_n"])[idx]
    hlr = np.asarray(objects["half_light_radius"])[idx]
    e1, e2 = np.asarray(objects["e1"])[idx], np.asarray(objects["e2"])[idx]
    if idx.size:
        jac = sky_to_pixel_jacobian(visit_row, camera, ccd, x, y)
        scale, g1, g2 = psf_variation(visit_row, camera, ccd, x, y)
        # largest stretch of the nominal-scale PSF: local pixel scale, dilation, major axis of the shear
        stretch = (np.linalg.svd(jac, compute_uv=False)[:, 0] * camera.pixel_scale * np.maximum(scale, 1.0)
                   * (1.0 + 1.1 * np.hypot(g1, g2)))
        psf_half = stamp_half_width(flux_e, light_outside(sky, camera.pixel_scale), fwhm_pix, stretch,
                                    float(visit_row["sky"]))
        # how far each object lies off the CCD [pixel]; it is drawn when its stamp reaches the CCD
        off = np.maximum(np.maximum(-x, x - (nx - 1)), np.maximum(-y, y - (ny - 1)))
    with warnings.catch_warnings():
        # truncated Sersic: GalSim suggests real-space convolution, FFT is ~10x faster
        warnings.simplefilter("ignore", galsim.GalSimWarning)
        for k in range(idx.size):
            if types[k] == "star":
                half = int(psf_half[k])
                if off[k] >= half:
                    continue
                psf = pixel_psf(sky, jac[k], float(scale[k]), float(g1[k]), float(g2[k]))
                _draw(psf.withFlux(float(flux_e[k])), image, x[k], y[k], half, "fft")
            else:
                e = min(np.hypot(e1[k], e2[k]), 0.7)
                gal_half = GALAXY_TRUNCATION * hlr[k] / camera.pixel_scale * 1.02 * np.sqrt((1 + e) / (1 - e))
                half = min(int(np.ceil(gal_half)) + int(psf_half[k]), MAX_STAMP_HALF)
                if off[k] >= half:
                    continue
                j = jac[k]
                psf = pixel_psf(sky, j, float(scale[k]), float(g1[k]), float(g2[k]))
                gal = galsim.Sersic(n=float(sersic_n[k]), half_light_radius=float(hlr[k]),
                                    trunc=GALAXY_TRUNCATION * float(hlr[k]), flux_untruncated=False,
                                    gsparams=GSPARAMS)
                gal = gal.shear(e1=float(e1[k]), e2=float(e2[k])).transform(j[0, 0], j[0, 1], j[1, 0], j[1, 1])
                prof = galsim.Convolve(gal, psf).withFlux(float(flux_e[k]))
                _draw(prof, image, x[k], y[k], half, "fft")
    keep = np.flatnonzero((off < SOURCE_MARGIN) if idx.size else np.zeros(0, bool))
    idx, x, y, mags, flux_e, types = idx[keep], x[keep], y[keep], mags[keep], flux_e[keep], types[keep]
    sources = Table()
    sources["id"] = np.asarray(objects["id"])[idx]
    sources["x"], sources["y"] = x, y
    sources["flux"] = flux_e * median_flat
    sources["mag"] = mags
    sources["type"] = types.astype("U6")
    sources["x"].unit = sources["y"].unit = "pixel"
    sources["flux"].unit = "electron"
    sources["mag"].unit = "mag"
    sources.meta["comments"] = ["x, y: zero-based true pixel position; flux: true e- in the calexp "
                                "(median-1 flat convention)"]
    return Scene(image=image.array, sources=sources)


# ------------------------------------------------------------------ detector effects
def _focal_plane_distance_to_line(camera: Camera, ccd: int, angle: float, offset_mm: float) -> np.ndarray:
    ny, nx = camera.ccd_shape
    fx, fy = camera.pixel_to_focal_plane(ccd, np.arange(nx)[None, :], np.arange(ny)[:, None])
    t = np.deg2rad(angle)
    return np.abs(-np.sin(t) * fx + np.cos(t) * fy - offset_mm) / camera.pixel_size


def satellite_trail(visit_row, camera: Camera, ccd: int) -> np.ndarray | None:
    """Satellite-trail light [e-/pixel] on ``ccd`` in a visit (a Gaussian line across the focal plane), or None."""
    if not bool(visit_row["satellite"]):
        return None
    d = _focal_plane_distance_to_line(camera, ccd, float(visit_row["sat_angle"]), float(visit_row["sat_offset_mm"]))
    if d.min() > 10 * SATELLITE_SIGMA:
        return None
    return (float(visit_row["sat_peak"]) * np.exp(-0.5 * (d / SATELLITE_SIGMA) ** 2)).astype(np.float32)


def add_cosmic_rays(image: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Add ``n`` cosmic rays (short tracks and blobs, 500-5000 e- per pixel) to ``image`` in place.

    Returns the uint8 mask of the pixels that received charge.
    """
    ny, nx = image.shape
    mask = np.zeros(image.shape, np.uint8)
    if n == 0:
        return mask
    xs, ys, qs = [], [], []
    for _ in range(n):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        q = np.exp(rng.uniform(*np.log(CR_CHARGE)))
        if rng.uniform() < 0.3:  # blob: a few adjacent pixels
            px = int(x0) + np.array([0, 1, 0, 1])[: rng.integers(1, 5)]
            py = int(y0) + np.array([0, 0, 1, 1])[: px.size]
        else:
            length = rng.uniform(*CR_LENGTH)
            theta = rng.uniform(0, np.pi)
            t = np.linspace(-0.5, 0.5, int(np.ceil(length * 3)) + 1) * length
            px, py = np.floor(x0 + t * np.cos(theta)).astype(int), np.floor(y0 + t * np.sin(theta)).astype(int)
            keep = np.unique(np.stack([px, py]), axis=1)
            px, py = keep
        xs.append(px)
        ys.append(py)
        qs.append(q * rng.uniform(0.7, 1.3, px.size))
    x, y, q = np.concatenate(xs), np.concatenate(ys), np.concatenate(qs)
    ok = (x >= 0) & (x < nx) & (y >= 0) & (y < ny)
    np.add.at(image, (y[ok], x[ok]), q[ok])
    mask[y[ok], x[ok]] = 1
    return mask


def _bleed_column(col: np.ndarray, full_well: float) -> None:
    """Spill charge above ``full_well`` up and down a column (in place), conserving charge
    except what runs off the ends."""
    n = col.size
    for _ in range(n):
        over = np.flatnonzero(col > full_well * (1 + 1e-6))
        if over.size == 0:
            return
        a = b = over[0]
        b += 1
        q = col[a:b].sum()
        while q > full_well * (b - a) and (a > 0 or b < n):
            if a > 0 and ((b - a) % 2 == 0 or b >= n):
                a -= 1
                q += col[a]
            else:
                b += 1
                q += col[b - 1]
        if q >= full_well * (b - a):
            col[a:b] = full_well
        else:
            deficit = full_well * (b - a) - q
            col[a:b] = full_well
            col[a] -= deficit / 2
            col[b - 1] -= deficit / 2


def bleed(image: np.ndarray, camera: Camera, ccd: int) -> None:
    """Bleed trails (in place): charge above each amplifier's full well (saturation x gain e-)
    spills along its column."""
    for amp in camera.ccds[ccd].amplifiers:
        full_well = amp.saturation * amp.gain
        sec = image[amp.assembled.slices]
        for c in np.flatnonzero((sec > full_well).any(axis=0)):
            col = sec[:, c].astype(np.float64)
            _bleed_column(col, full_well)
            sec[:, c] = col


def saturation_mask(image: np.ndarray, camera: Camera, ccd: int) -> np.ndarray:
    """True where a pixel of the electron image reads at or above the amplifier's raw saturation level."""
    sat = np.zeros(image.shape, bool)
    for amp in camera.ccds[ccd].amplifiers:
        level = min(amp.saturation * amp.gain, (amp.saturation - amp.bias_level) * amp.gain)
        sat[amp.assembled.slices] = image[amp.assembled.slices] >= level
    return sat


def read_out(electrons: np.ndarray, camera: Camera, ccd: int, bias_structure: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Electrons on the assembled grid -> uint16 raw frame in the camera's raw layout.

    Per amplifier: gain, bias level + the fixed bias structure + a row-dependent drift (the same
    in the data and the serial overscan; zero mean over the rows) + read noise, rounded and
    clipped to [0, 65535].
    """
    raw = np.zeros(camera.raw_shape, np.float32)
    for amp in camera.ccds[ccd].amplifiers:
        data = electrons[amp.assembled.slices] / amp.gain
        if amp.flip_x:
            data = data[:, ::-1]
        rows = np.arange(camera.raw_shape[0], dtype=float)
        n = rows.size
        a, b = rng.uniform(-3.0, 3.0, 2)
        # integer number of cycles and a centred slope: the drift averages to zero over the rows
        drift = a * (rows - (n - 1) / 2) / ((n - 1) / 2) + b * np.cos(2 * np.pi * rng.integers(1, 3) * rows / n
                                                                     + rng.uniform(0, 2 * np.pi))
        sigma = amp.read_noise / amp.gain
        ds, os_ = amp.raw_data, amp.raw_overscan
        raw[ds.slices] = (data + amp.bias_level + drift[ds.y0:ds.y1, None]
                          + sigma * rng.standard_normal(ds.shape, dtype=np.float32))
        raw[os_.slices] = (amp.bias_level + drift[os_.y0:os_.y1, None]
                           + sigma * rng.standard_normal(os_.shape, dtype=np.float32))
    raw += bias_structure
    return np.clip(np.rint(raw), 0, 65535).astype(np.uint16)


# ------------------------------------------------------------------ headers
def make_header(camera: Camera, exposure_row) -> fits.Header:
    """Raw header: REQUIRED_KEYS, and the nominal TAN WCS for on-sky exposures."""
    h = fits.Header()
    exptime = float(exposure_row["exptime"])
    cards = [
        ("VISIT", int(exposure_row["visit"]), "exposure (visit) number"),
        ("CCD", int(exposure_row["ccd"]), "detector id"),
        ("FILTER", str(exposure_row["filter"]), "filter name"),
        ("OBSTYPE", str(exposure_row["obstype"]), "science, bias, dark, flat or fringe"),
        ("DATE-OBS", str(exposure_row["date_obs"]), "UTC start of the exposure"),
        ("MJD-OBS", float(exposure_row["mjd"]), "MJD (UTC) of the exposure start"),
        ("EXPTIME", exptime, "exposure time [s]"),
        ("DARKTIME", exptime, "dark time [s]"),
        ("AIRMASS", float(exposure_row["airmass"]), "airmass at the exposure start"),
        ("TELRA", float(exposure_row["telra"]), "telescope pointing RA [deg]"),
        ("TELDEC", float(exposure_row["teldec"]), "telescope pointing Dec [deg]"),
        ("ROTANG", float(exposure_row["rotang"]), "sky rotation angle [deg]"),
        ("CAMERA", camera.name, "camera name"),
        ("ORIGIN", "snakedrp.simulate", "simulated data"),
    ]
    for key, value, comment in cards:
        h[key] = (value, comment)
    if str(exposure_row["obstype"]) in ("science", "fringe"):
        wcs = camera.nominal_wcs(int(exposure_row["ccd"]), float(exposure_row["telra"]),
                                 float(exposure_row["teldec"]), float(exposure_row["rotang"]))
        h.extend(wcs.to_header(), update=True)
    return h


# ------------------------------------------------------------------ the exposure
def _empty_sources() -> Table:
    t = Table(names=("id", "x", "y", "flux", "mag", "type", "saturated"),
              dtype=(np.int64, float, float, float, float, "U6", bool))
    return t


def render_exposure(params: SimParams, camera: Camera, exposure_row, objects: Table | None = None,
                    visits: Table | None = None) -> RenderResult:
    """Render one raw exposure.

    Parameters
    ----------
    params : SimParams
    camera : Camera
    exposure_row : row of :func:`plan_exposures` (visit, ccd, filter, obstype, exptime, ...)
    objects, visits : Table
        The field truth from :func:`make_field`; needed for science exposures only.

    Returns
    -------
    RenderResult
    """
    visit, ccd = int(exposure_row["visit"]), int(exposure_row["ccd"])
    obstype = str(exposure_row["obstype"])
    exptime = float(exposure_row["exptime"])
    rngs = exposure_rngs(params.seed, visit, ccd)
    n_cr = int(rngs["cr"].poisson(params.cr_rate * camera.ccd_shape[0] * camera.ccd_shape[1] / 1e6 * exptime))
    response = instrument.flat_response(params.seed, camera, ccd)
    median_flat = instrument.median_flat_response(response, camera, ccd)
    expected = instrument.dark_current(camera, ccd) * exptime
    visit_row = None
    sources = _empty_sources()
    if obstype == "science":
        if objects is None or visits is None:
            raise ValueError("render_exposure: science exposures need the objects and visits tables")
        match = np.flatnonzero(np.asarray(visits["visit"]) == visit)
        if match.size != 1:
            raise ValueError(f"render_exposure: visit {visit} not in the visits table")
        visit_row = visits[int(match[0])]
        scene = render_scene(params, camera, visit_row, ccd, objects, median_flat=median_flat)
        light = scene.image + float(visit_row["sky"])
        if camera.filters[str(visit_row["filter"])].fringe:
            light += float(visit_row["sky"]) * instrument.FRINGE_AMPLITUDE * float(visit_row["fringe_scale"]) \
                * instrument.fringe_pattern(params.seed, camera, ccd)
        trail = satellite_trail(visit_row, camera, ccd)
        if trail is not None:
            light += trail
        expected += light * response
        sources = scene.sources
    elif obstype == "flat":
        expected += params.flat_level * response
    elif obstype == "fringe":
        cond = rngs["conditions"]
        filt = camera.filters[str(exposure_row["filter"])]
        sky_mag_pixel = filt.sky_brightness - 5.0 * np.log10(camera.pixel_scale)
        sky = 10 ** (-0.4 * (sky_mag_pixel - filt.zeropoint - 2.5 * np.log10(exptime))) * cond.uniform(0.8, 1.2)
        fringe = instrument.FRINGE_AMPLITUDE * cond.uniform(0.7, 1.3) * instrument.fringe_pattern(params.seed, camera, ccd)
        expected += sky * (1.0 + fringe) * response
    electrons = rngs["noise"].poisson(np.maximum(expected, 0)).astype(np.float32)
    cr_mask = add_cosmic_rays(electrons, n_cr, rngs["cr"])
    bleed(electrons, camera, ccd)
    if len(sources):
        sat = saturation_mask(electrons, camera, ccd)
        ny, nx = sat.shape
        flags = np.zeros(len(sources), bool)
        for k, (x, y) in enumerate(zip(sources["x"], sources["y"])):
            ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
            box = sat[max(iy - 2, 0):max(iy + 3, 0), max(ix - 2, 0):max(ix + 3, 0)]
            flags[k] = bool(box.any())
        sources["saturated"] = flags
    raw = read_out(electrons, camera, ccd, instrument.bias_structure(params.seed, camera, ccd), rngs["readout"])
    header = make_header(camera, exposure_row)
    return RenderResult(raw=raw, header=header, sources=sources, cr_mask=cr_mask)


# ------------------------------------------------------------------ writers
def write_raw(result: RenderResult, path: str | Path) -> None:
    """Write the raw frame (uint16, one HDU) atomically; byte-identical for identical inputs."""
    hdu = fits.PrimaryHDU(data=result.raw, header=result.header)
    hdu.add_checksum(when=FIXED_CHECKSUM_COMMENT)
    with atomic_path(path) as tmp:
        hdu.writeto(tmp, overwrite=True)


def write_sources(result: RenderResult, path: str | Path) -> None:
    """Write the truth table of the rendered objects (``sources/truth-<visit>-<ccd>.fits``)."""
    write_table(result.sources, path)


def write_cr_mask(result: RenderResult, path: str | Path) -> None:
    """Write the cosmic-ray truth mask (uint8, 1 = cosmic-ray charge) (``cr/cr-<visit>-<ccd>.fits``)."""
    hdu = fits.PrimaryHDU(data=result.cr_mask)
    hdu.header["VISIT"] = int(result.header["VISIT"])
    hdu.header["CCD"] = int(result.header["CCD"])
    hdu.header["COMMENT"] = "1 where a simulated cosmic ray deposited charge (assembled pixel grid)"
    with atomic_path(path) as tmp:
        fits.HDUList([hdu]).writeto(tmp, overwrite=True)
