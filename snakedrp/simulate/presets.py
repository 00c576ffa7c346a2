"""Simulator configuration: the ``simulate`` config section, its presets and the resolved parameters.

``SimulateConfig`` is what users set (``--config simulate.seed=3``); every field left at ``None``
(or an empty list) takes the value of the chosen preset. :func:`resolve_config` merges the two
into a frozen :class:`SimParams`, the only thing the rest of the simulator reads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

from snakedrp.pexconfig import Config, ConfigError, option

#: Preset values. ``ci``: the small 4-CCD camera, a dense field for fast end-to-end tests, seeing
#: spread over 0.5"-1.3" in each filter; ``hsc``: the 8-CCD 2048x4176 camera for benchmarks.
PRESETS: dict[str, dict] = {
    "ci": dict(
        seed=1, ra=150.0, dec=2.0, rotation=0.0, filters=("HSC-R", "HSC-I"), n_visits=3, ccds=(),
        exptime=45.0,
        star_density=150000.0, star_mag_min=16.5, star_mag_max=24.0, star_slope=0.12,
        bright_star_density=1000.0, bright_star_mag_min=13.0,
        galaxy_density=50000.0, galaxy_mag_min=18.0, galaxy_mag_max=24.5, galaxy_slope=0.3,
        seeing_min=0.5, seeing_max=1.3, sky_offset_min=0.0, sky_offset_max=0.0,
        refcat_mag_limit=21.0, refcat_band="r", refcat_nside=64, refcat_pos_err=10.0, refcat_mag_err=0.01,
        n_bias=5, n_dark=5, dark_exptime=300.0, n_flat=5, flat_exptime=5.0, flat_level=20000.0, n_fringe=4,
        cr_rate=1.0, satellite=True,
    ),
    "hsc": dict(
        seed=2, ra=150.0, dec=2.0, rotation=0.0, filters=("HSC-R", "HSC-I"), n_visits=5, ccds=(),
        exptime=60.0,
        star_density=60000.0, star_mag_min=16.5, star_mag_max=24.0, star_slope=0.12,
        bright_star_density=300.0, bright_star_mag_min=13.0,
        galaxy_density=60000.0, galaxy_mag_min=18.0, galaxy_mag_max=24.5, galaxy_slope=0.3,
        seeing_min=0.5, seeing_max=1.0, sky_offset_min=0.0, sky_offset_max=0.0,
        refcat_mag_limit=21.0, refcat_band="r", refcat_nside=64, refcat_pos_err=10.0, refcat_mag_err=0.01,
        n_bias=5, n_dark=5, dark_exptime=300.0, n_flat=5, flat_exptime=5.0, flat_level=20000.0, n_fringe=4,
        cr_rate=1.0, satellite=True,
    ),
}

#: Named observing conditions for a conditions matrix: ``simulate`` overrides to merge over a
#: preset (``--config simulate='{seeing_min: 0.45, seeing_max: 0.55}'`` is ``good_seeing``).
#: Reference stars (r < 21) per ``ci`` CCD (0.0046 deg^2): ~255 by default, ~20 in ``sparse`` (what
#: a full HSC CCD gets at high Galactic latitude), ~660 in ``dense``.
CONDITIONS: dict[str, dict] = {
    "good_seeing": dict(seeing_min=0.45, seeing_max=0.55),
    "bad_seeing": dict(seeing_min=1.4, seeing_max=1.6),
    # high Galactic latitude: ~1e4 stars per deg^2 to r = 24
    "sparse": dict(star_density=12000.0, bright_star_density=50.0),
    # low latitude: a few 1e5 per deg^2
    "dense": dict(star_density=400000.0, bright_star_density=3000.0),
    "bright_sky": dict(sky_offset_min=-2.0, sky_offset_max=-1.5),
}


@dataclass
class SimulateConfig(Config):
    """Simulated demo/test data: the preset and overrides (None or [] = the preset's value)."""

    preset: str = option("ci", "Preset of every other option: ci (4 small CCDs) or hsc (8 HSC-size CCDs)",
                         choices=("ci", "hsc"))
    seed: Optional[int] = option(None, "Random seed; the same seed gives byte-identical files", min=0)
    ra: Optional[float] = option(None, "Field centre right ascension [deg]", min=0.0, max=360.0)
    dec: Optional[float] = option(None, "Field centre declination [deg]", min=-90.0, max=90.0)
    rotation: Optional[float] = option(None, "Sky rotation angle of the focal plane [deg]", min=-360.0, max=360.0)
    filters: list[str] = option([], "Filters observed (camera filter names); [] = the preset's")
    n_visits: Optional[int] = option(None, "Science visits per filter", min=1, max=40)
    ccds: list[int] = option([], "CCD ids to simulate; [] = every CCD of the camera")
    exptime: Optional[float] = option(None, "Science exposure time [s]; survey visits take 15-300 s", min=0.1, max=3600.0)
    star_density: Optional[float] = option(
        None, "Stars per deg^2 between star_mag_min and star_mag_max (r band): ~1e4 at high Galactic latitude, "
        "~1e5-5e5 at low latitude (the cap: ~1.5 ms a star to render, ~2300 per ci CCD)", min=0.0, max=5.0e5)
    star_mag_max: Optional[float] = option(None, "Faint limit of the simulated stars [AB mag, r]", min=10.0, max=30.0)
    bright_star_density: Optional[float] = option(
        None, "Extra bright (mostly saturated) stars per deg^2, r in [13, star_mag_min): tens at high latitude, "
        "thousands at low latitude", min=0.0, max=2.0e4)
    galaxy_density: Optional[float] = option(
        None, "Galaxies per deg^2 down to galaxy_mag_max (r band); ~1e5 to r = 24.5", min=0.0, max=1.0e6)
    galaxy_mag_max: Optional[float] = option(None, "Faint limit of the simulated galaxies [AB mag, r]", min=10.0, max=30.0)
    seeing_min: Optional[float] = option(
        None, "Smallest per-visit seeing (Kolmogorov FWHM) [arcsec]; 0.4 (excellent site) to 2.0 (poor night); the "
        "visits of each filter are spread evenly between seeing_min and seeing_max", min=0.4, max=2.0)
    seeing_max: Optional[float] = option(None, "Largest per-visit seeing (Kolmogorov FWHM) [arcsec], 0.4-2.0",
                                         min=0.4, max=2.0)
    sky_offset_min: Optional[float] = option(
        None, "Sky brightness of a visit relative to the filter's dark sky [mag/arcsec^2]: 0 dark, ~-1 grey, -2 to -3 "
        "bright (moon); each visit draws uniformly in [sky_offset_min, sky_offset_max]", min=-4.0, max=1.0)
    sky_offset_max: Optional[float] = option(None, "Upper end of the per-visit sky offset [mag/arcsec^2], -4 to 1",
                                             min=-4.0, max=1.0)
    refcat_mag_limit: Optional[float] = option(None, "Reference catalog faint limit [AB mag in refcat_band]", min=5.0, max=30.0)
    refcat_nside: Optional[int] = option(None, "HEALPix nside of the reference-catalog shards (power of 2)", min=1, max=8192)
    n_bias: Optional[int] = option(None, "Raw bias exposures per CCD", min=0, max=99)
    n_dark: Optional[int] = option(None, "Raw dark exposures per CCD", min=0, max=99)
    n_flat: Optional[int] = option(None, "Raw dome flats per CCD and filter", min=0, max=99)
    n_fringe: Optional[int] = option(None, "Raw night-sky fringe exposures per CCD and fringing filter", min=0, max=99)
    cr_rate: Optional[float] = option(None, "Cosmic-ray rate [hits per megapixel per second]", min=0.0)
    satellite: Optional[bool] = option(None, "Draw a satellite trail across the second science visit?")

    def validate(self) -> None:
        super().validate()
        if self.seeing_min is not None and self.seeing_max is not None and self.seeing_min > self.seeing_max:
            raise ConfigError(f"simulate.seeing_min ({self.seeing_min}) exceeds seeing_max ({self.seeing_max})")
        if (self.sky_offset_min is not None and self.sky_offset_max is not None
                and self.sky_offset_min > self.sky_offset_max):
            raise ConfigError(f"simulate.sky_offset_min ({self.sky_offset_min}) exceeds sky_offset_max "
                              f"({self.sky_offset_max})")
        if self.refcat_nside is not None and self.refcat_nside & (self.refcat_nside - 1):
            raise ConfigError(f"simulate.refcat_nside = {self.refcat_nside} is not a power of 2")


@dataclass(frozen=True)
class SimParams:
    """Effective simulator parameters (preset + overrides); hashable and picklable.

    Units: angles in degrees (seeing in arcsec), sky offsets in mag/arcsec^2, ``refcat_pos_err``
    in mas, densities per deg^2, magnitudes AB in the r band, times in seconds, ``flat_level`` in
    electrons per pixel, ``cr_rate`` in hits per megapixel per second.
    """

    preset: str
    seed: int
    ra: float
    dec: float
    rotation: float
    filters: tuple[str, ...]
    n_visits: int
    ccds: tuple[int, ...]
    exptime: float
    star_density: float
    star_mag_min: float
    star_mag_max: float
    star_slope: float
    bright_star_density: float
    bright_star_mag_min: float
    galaxy_density: float
    galaxy_mag_min: float
    galaxy_mag_max: float
    galaxy_slope: float
    seeing_min: float
    seeing_max: float
    sky_offset_min: float
    sky_offset_max: float
    refcat_mag_limit: float
    refcat_band: str
    refcat_nside: int
    refcat_pos_err: float
    refcat_mag_err: float
    n_bias: int
    n_dark: int
    dark_exptime: float
    n_flat: int
    flat_exptime: float
    flat_level: float
    n_fringe: int
    cr_rate: float
    satellite: bool

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_config(config: SimulateConfig | None = None) -> SimParams:
    """Merge a :class:`SimulateConfig` with its preset into the effective :class:`SimParams`."""
    config = config if config is not None else SimulateConfig()
    values = dict(PRESETS[config.preset])
    for f in fields(config):
        if f.name == "preset":
            continue
        v = getattr(config, f.name)
        if v is None or (isinstance(v, list) and not v):
            continue
        values[f.name] = tuple(v) if isinstance(v, list) else v
    values["ra"] = float(values["ra"]) % 360.0
    if values["seeing_min"] > values["seeing_max"]:
        raise ConfigError(f"simulate: seeing_min {values['seeing_min']} exceeds seeing_max {values['seeing_max']}")
    if values["sky_offset_min"] > values["sky_offset_max"]:
        raise ConfigError(f"simulate: sky_offset_min {values['sky_offset_min']} exceeds sky_offset_max "
                          f"{values['sky_offset_max']}")
    return SimParams(preset=config.preset, **values)
