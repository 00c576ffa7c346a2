"""The data simulator: raw frames, calibration exposures, reference catalog and truth.

The simulated data are the truth every pipeline stage is validated against.

Sky and telescope
-----------------
- Stars (power-law number counts, a bright component that saturates) and galaxies (GalSim
  Sersic profiles, ``n`` quantized in steps of 0.5, truncated at 4.5 half-light radii), with
  stellar-locus-like colours; uniform on the sphere about the field centre (RA 0/360 and the
  poles are fine).
- **PSF** (:func:`true_psf`): the atmosphere, a Kolmogorov profile of FWHM = the visit's seeing,
  convolved with the optics, the Airy pattern of an 8.2 m pupil with a 0.28 central
  obstruction at the filter's effective wavelength; **not truncated** (about 4 % of the light
  lies beyond 2 FWHM, 1 % beyond 4 FWHM, 0.2 % beyond 10 FWHM). In pixel units it is mapped by
  the local Jacobian of the true sky-to-pixel mapping and, standing for optical aberrations
  that vary smoothly over the focal plane, dilated by a per-visit quadratic pattern in
  focal-plane position (+-5-8 %) and sheared by another (|g| <= ~0.04). :func:`true_psf`
  returns this profile *without* the pixel; the images hold it convolved with the pixel,
  each object on a stamp that reaches the radius where the light left out falls below the
  noise of the object's flux within it (up to 401 x 401 pixels for the brightest stars; see
  :func:`snakedrp.simulate.render.stamp_half_width`). Truth fluxes are total fluxes.
- Seeing: the visits of each filter are spread evenly over ``[seeing_min, seeing_max]``
  (``ci``: 0.5"-1.3"); :data:`CONDITIONS` holds named overrides (good/bad seeing, sparse/dense
  field, bright sky) for a conditions matrix.
- Per visit: transparency (zeropoint offset up to +-0.1 mag), sky (the filter's dark sky plus
  ``[sky_offset_min, sky_offset_max]`` mag/arcsec^2, times +-20 %), dither of a third of
  a CCD, rotation offset of 0.2-1 deg, airmass. The header pointing is off from the true one
  by 1-2 arcsec and the header rotation by <= 0.02 deg; the header WCS is
  ``Camera.nominal_wcs`` at the header pointing (no distortion). The true mapping is
  ``Camera.sky_to_pixel`` at the true pointing (``visits.fits`` ra, dec, rotation).

Detector
--------
Per amplifier: gain, bias level + a fixed 2-D bias structure (a few ADU) + a row-dependent
drift of a few ADU shared by data and serial overscan (zero mean over the rows) + read noise;
dark current, hot pixels (1x1/2x2 defect boxes, 30 e-/s), bad columns (taller defect boxes,
response 0.2); flat response = vignetting (4 % at the focal-plane edge) x 1 % pixel-to-pixel;
fringes (filters with ``fringe: true``, ~1.5 % of the sky, fixed on the focal plane, scaled per
visit); cosmic rays (tracks and blobs of 500-5000 e- per pixel, ``cr_rate`` hits per megapixel
per second); a satellite trail across the second science visit. Charge above the full well
(``saturation x gain`` e-) bleeds up and down the column, so full-well pixels read about
``bias_level + saturation`` ADU: a raw-ADU threshold at ``saturation`` flags them. Raw values
are rounded and clipped to [0, 65535].

Conventions
-----------
Zero-based pixels; GalSim drawing uses ``center=PositionD(x + 1, y + 1)`` on the full-CCD image
with bounds 1..nx, 1..ny. Fluxes: an object of AB magnitude ``m`` gives ``10**(-0.4 (m - zp))``
e- in the raw exposure (``zp`` = visit zeropoint) before the flat response; truth fluxes are
in calexp electrons (times the CCD's median flat response), and the true calexp zeropoint is
``zp + 2.5 log10(median flat response)`` (``exposures.fits``). Random streams are seeded by
``numpy.random.SeedSequence([seed, stream, visit, ccd])``: one exposure renders without the
others and the same seed gives byte-identical files.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from .presets import CONDITIONS, PRESETS, SimParams, SimulateConfig, resolve_config

if TYPE_CHECKING:
    from .field import (FieldResult, make_field, make_objects, make_refcat, plan_exposures, plan_visits,
                        sky_to_pixel_jacobian, true_psf, visit_seeings)
    from .render import (RenderResult, Scene, render_exposure, render_scene, write_cr_mask, write_raw,
                         write_sources)

# field and render import galsim and astropy (about 1 s): they are imported on first use, so that
# snakedrp.config (SimulateConfig) and a parse that only resolves the config do not pay for them
_LAZY = {
    **dict.fromkeys(("FieldResult", "make_field", "make_objects", "make_refcat", "plan_exposures", "plan_visits",
                     "sky_to_pixel_jacobian", "true_psf", "visit_seeings"), "field"),
    **dict.fromkeys(("RenderResult", "Scene", "render_exposure", "render_scene", "write_cr_mask", "write_raw",
                     "write_sources"), "render"),
}

__all__ = [
    "CONDITIONS", "PRESETS", "FieldResult", "RenderResult", "Scene", "SimParams", "SimulateConfig", "make_field",
    "make_objects", "make_refcat", "plan_exposures", "plan_visits", "render_exposure", "render_scene",
    "resolve_config", "sky_to_pixel_jacobian", "true_psf", "visit_seeings", "write_cr_mask", "write_field",
    "write_raw", "write_sources",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def write_field(field: FieldResult, truth_dir: str | Path, refcat_dir: str | Path, *, nside: int) -> None:
    """Write ``objects.fits``, ``visits.fits``, ``exposures.fits`` under ``truth_dir`` and the sharded
    reference catalog (``index.json`` last) under ``refcat_dir``."""
    from snakedrp.repo.io import write_table
    from snakedrp.repo.refcat import write_refcat

    truth_dir = Path(truth_dir)
    write_table(field.objects, truth_dir / "objects.fits")
    write_table(field.visits, truth_dir / "visits.fits")
    write_table(field.exposures, truth_dir / "exposures.fits")
    write_refcat(field.refcat, refcat_dir, nside=nside)

