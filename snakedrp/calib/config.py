"""Configs of astrometric and photometric calibration (reference matching, TAN-SIP fit, zeropoint).

The algorithm modules (astrometry, photometry) import their configs from here, under the same names.
This module imports only :mod:`snakedrp.pexconfig`, the standard library and other light modules, so
that :mod:`snakedrp.config`, which every Snakefile parse and job script imports, stays light.
"""
from __future__ import annotations

from dataclasses import dataclass

from snakedrp.pexconfig import Config, ConfigError, option


@dataclass
class AstrometryConfig(Config):
    """Reference matching (offset vote, then nearest neighbours) and the TAN-SIP fit."""

    max_offset: float = option(10.0, "Largest offset of the guess WCS searched by the matcher [arcsec]",
                               min=0.5, max=3600.0)
    max_rotation: float = option(0.05, "Largest rotation error of the guess WCS searched by the matcher [deg]",
                                 min=0.0, max=180.0)
    max_radial_distortion: float = option(
        1.0, "Largest |d3| of a radial distortion theta = rho (1 + d3 rho^2) about the guess's tangent point "
             "searched by the matcher (0: none) [deg^-2]", min=0.0)
    n_pattern_sources: int = option(150, "Brightest usable sources used by the pattern matcher", min=5)
    n_pattern_refs: int = option(100, "Brightest reference stars on the CCD used by the pattern matcher", min=5)
    vote_bin: float = option(0.5, "Offset-vote bin of the fine stage; the coarse stage uses 4x [arcsec]",
                             min=0.02, max=60.0)
    min_pattern_matches: int = option(6, "Fewest pairs in the winning offset-vote bin", min=3)
    pattern_false_alarm: float = option(1e-3, "Largest chance probability of the winning coarse offset-vote bin "
                                              "(Poisson, times the number of bins and trials)", min=0.0, max=1.0)
    match_radius: float = option(0.5, "Final nearest-neighbour match radius [arcsec]", min=0.01, max=60.0)
    source_snr_min: float = option(5.0, "Sources below this S/N are not matched", min=0.0)
    ignore_flags: list[str] = option([], "flag_* columns that do not exclude a source from matching")
    sip_order: int = option(3, "Highest polynomial order fitted to the matches: of the whole distortion for a TAN "
                                 "guess, of the correction on top of the guess's SIP distortion otherwise",
                            min=1, max=7)
    keep_guess_distortion: bool = option(
        True, "With a TAN-SIP guess (the camera's optical distortion, Camera.initial_wcs), keep its SIP and fit only "
              "a correction on top of it?")
    order_significance: float = option(
        0.001, "A richer model (shift+rotation+scale, then polynomial orders 1, 2, ...) replaces a simpler one only "
              "when its chi^2 drop has a chance probability (F-test) below this", min=0.0, max=1.0)
    max_predicted_error: float = option(
        3.0, "With keep_guess_distortion, a richer correction replaces a simpler one only when, besides the F-test, "
             "the position error its parameter covariance predicts (from the matches' errors and layout, scaled up by "
             "chi^2/dof above 1) has an RMS over an 11x11 grid of the CCD at most this [mas]", min=0.0)
    inverse_sip_order_max: int = option(7, "Highest order tried for the inverse SIP (AP/BP), and for the forward SIP "
                                             "holding the guess's distortion with the correction", min=1, max=9)
    inverse_tolerance: float = option(0.002, "SIP goal: max pixel error on the CCD of world->pixel, and of the "
                                             "forward SIP holding the guess's distortion with the correction [pixel]",
                                      min=0.0)
    rejection_iterations: int = option(3, "Fit / sigma-clip / re-match iterations", min=0, max=20)
    clip_sigma: float = option(3.0, "Matches beyond this many (robustly rescaled) sigma are rejected", min=1.0)
    systematic_error: float = option(2.0, "Added in quadrature to each match's error in the weights [mas]",
                                     min=0.0)
    min_matches: int = option(10, "Fewest matches (after rejection) for a solution", min=3)
    min_matches_per_term: float = option(2.0, "A model is tried only with matches >= this x its terms per axis "
                                              "(2 for shift+rotation+scale)", min=1.0)
    max_rms: float = option(200.0, "Fail when the RMS of the used matches exceeds this [mas]", min=0.0)

    def validate(self) -> None:
        super().validate()
        if self.match_radius > self.max_offset:
            raise ConfigError(f"match_radius ({self.match_radius}) must not exceed max_offset ({self.max_offset})")


@dataclass
class PhotometryConfig(Config):
    """Zeropoint from matched unresolved reference stars (iterative clipped weighted mean)."""

    flux_column: str = option("psf_flux", "Instrumental flux column [e-]; its error is <flux_column>_err")
    snr_min: float = option(20.0, "Stars below this S/N (flux / flux_err) are not used", min=0.0)
    mag_min: float = option(10.0, "Reference stars brighter than this are not used (saturation) [mag]")
    mag_max: float = option(23.0, "Reference stars fainter than this are not used [mag]")
    ref_mag_err_max: float = option(0.1, "Reference stars with larger magnitude errors are not used [mag]", min=0.0)
    extendedness_column: str = option("extendedness", "Column of the source's extendedness (0 star, 1 galaxy); "
                                      "ignored when absent")
    extendedness_max: float = option(0.5, "Sources with extendedness at or above this are not used", min=0.0)
    ignore_flags: list[str] = option([], "flag_* columns that do not exclude a star")
    clip_sigma: float = option(3.0, "Stars beyond this many (robustly rescaled) sigma are rejected", min=1.0)
    iterations: int = option(5, "Most clipping iterations (stops earlier when the used set is stable)",
                             min=1, max=50)
    min_stars: int = option(5, "Fewest stars for a zeropoint", min=1)
    exclude_blended: bool = option(True, "Leave deblended children (is_blended) out of the fit when at least min_blend_free other stars remain?")
    min_blend_free: int = option(20, "... that many unblended stars", min=1)
    star_error_floor: float = option(0.0, "Added in quadrature to each star's magnitude error [mag]", min=0.0)
    zeropoint_err_floor: float = option(0.001, "Systematic floor added in quadrature to the zeropoint error [mag]",
                                        min=0.0)
    colour_terms: dict = option({}, "Per filter name: [c, band1, band2] adds c * (mag_band1 - mag_band2) to the "
                                    "reference magnitude (default: no colour terms)")

    def validate(self) -> None:
        super().validate()
        if self.mag_min >= self.mag_max:
            raise ConfigError(f"mag_min ({self.mag_min}) must be below mag_max ({self.mag_max})")
        for name, term in self.colour_terms.items():
            ok = (isinstance(term, (list, tuple)) and len(term) == 3 and isinstance(term[0], (int, float))
                  and isinstance(term[1], str) and isinstance(term[2], str))
            if not ok:
                raise ConfigError(f"option colour_terms.{name} must be [coefficient, band1, band2], got {term!r}")
