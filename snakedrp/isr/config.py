"""Configs of instrument signature removal and of the master calibrations.

The algorithm modules (isr, calibs) import their configs from here, under the same names. This
module imports only :mod:`snakedrp.pexconfig`, the standard library and other light modules, so that
:mod:`snakedrp.config`, which every Snakefile parse and job script imports, stays light.
"""
from __future__ import annotations

from dataclasses import dataclass

from snakedrp.pexconfig import Config, ConfigError, option, subconfig


@dataclass
class IsrConfig(Config):
    """Instrument signature removal: overscan, assembly, bias, dark, flat, fringe, defects, masks."""

    do_overscan: bool = option(True, "Subtract each amplifier's serial overscan?")
    overscan_fit: str = option("poly", "Overscan model along rows: median = one level per amp; poly/spline = fit to the per-row clipped mean",
                               choices=("median", "poly", "spline"))
    overscan_order: int = option(3, "Polynomial order of the overscan fit (overscan_fit=poly)", min=0, max=12)
    overscan_spline_knots: int = option(8, "Interior knots, evenly spaced in rows, of the cubic overscan spline (overscan_fit=spline)", min=1, max=200)
    overscan_clip_sigma: float = option(3.0, "Clip overscan pixels (within a row) and rows (about the fit) beyond this many sigma", min=1.0)
    overscan_clip_iterations: int = option(3, "Clipping iterations for the overscan rows and the fit", min=0, max=20)
    overscan_skip_columns: int = option(0, "Leading overscan columns (next to the data, readout order) left out of the fit, e.g. charge-transfer trails [pixel]", min=0)
    do_assemble: bool = option(True, "Trim the overscan and assemble the amplifiers into the CCD image (honouring flip_x)?")
    do_saturation: bool = option(True, "Mask pixels at or above the amplifier saturation level (raw ADU) as SAT?")
    saturated_grow: int = option(1, "Grow the SAT mask by this many pixels in every direction [pixel]", min=0, max=50)
    saturated_bleed_grow: int = option(4, "Grow the SAT mask by this many more pixels along columns (y), to cover the faint ends of bleed trails [pixel]", min=0, max=200)
    do_bias: bool = option(True, "Subtract the master bias (ADU)?")
    do_gain: bool = option(True, "Convert ADU to electrons with each amplifier's gain?")
    do_variance: bool = option(True, "Build the variance plane (Poisson + read noise, calibration variances propagated)? Zero otherwise")
    use_calib_variance: bool = option(True, "Add the master calibrations' own variance planes to the variance?")
    do_dark: bool = option(True, "Subtract the master dark (e-/s) scaled by the header DARKTIME?")
    do_flat: bool = option(True, "Divide by the master flat (median 1)?")
    do_fringe: bool = option(True, "Fit and subtract the fringe template (only filters with fringe: true in the camera)?")
    fringe_num_points: int = option(30000, "Random positions at which image and template are compared in the fringe fit", min=10)
    fringe_box_half: int = option(2, "Half-size of the box whose median is taken at each fringe position [pixel]", min=0, max=50)
    fringe_clip_sigma: float = option(3.0, "Reject fringe-fit positions whose residual exceeds this many (MAD) sigma", min=1.0)
    fringe_iterations: int = option(10, "Maximum clipping iterations of the fringe fit", min=1, max=100)
    fringe_background: str = option("plane", "Background fitted with the fringe amplitude: a constant or a plane in x, y",
                                    choices=("constant", "plane"))
    fringe_seed: int = option(0, "Seed (with visit and ccd) of the fringe-fit positions", min=0)
    do_defect: bool = option(True, "Mask the camera's defect boxes as BAD?")
    do_interpolate: bool = option(True, "Interpolate across columns over BAD pixels (and SAT, see do_saturation_interpolation); sets INTRP")
    do_saturation_interpolation: bool = option(True, "Also interpolate over SAT pixels (saturated cores, bleed trails)?")
    # also masks the amplifiers without signal (find_unusable_amplifiers)
    do_nan_masking: bool = option(True, "Mask NaN/inf pixels as NO_DATA|BAD (value 0, variance inf)?")
    edge_width: int = option(2, "Mask this many pixels along the CCD border as EDGE (0: none) [pixel]", min=0, max=500)

    def validate(self) -> None:
        super().validate()
        if not self.do_assemble:
            needs = [n for n in ("do_bias", "do_dark", "do_flat", "do_fringe", "do_defect") if getattr(self, n)]
            if needs:
                raise ConfigError(f"isr: {', '.join(needs)} need(s) do_assemble (calibrations and defects are in assembled pixels)")
        if self.do_dark and not self.do_gain:
            raise ConfigError("isr: do_dark needs do_gain (the master dark is in electrons per second)")

    def overscan_options(self) -> dict:
        """The ``overscan_*`` options as keywords of :func:`snakedrp.isr.overscan.overscan_models`."""
        return dict(fit=self.overscan_fit, order=self.overscan_order, knots=self.overscan_spline_knots,
                    clip_sigma=self.overscan_clip_sigma, clip_iterations=self.overscan_clip_iterations,
                    skip_columns=self.overscan_skip_columns)


@dataclass
class CombineConfig(Config):
    """Pixel-by-pixel sigma-clipped mean of the processed input frames."""

    clip_sigma: float = option(3.0, "Leave out input pixels farther than this many sigma from the stack centre", min=1.0)
    clip_iterations: int = option(3, "Clipping iterations about the mean of the surviving inputs (after one about the median)", min=0, max=20)
    clip_noise: str = option("variance", "Sigma of the clipping: each input's ISR variance (works for few inputs) or the std of the surviving inputs",
                             choices=("variance", "std"))
    min_inputs: int = option(3, "Fewest input frames (after dropping unusable ones) to build the master", min=1)


@dataclass
class FringeCombineConfig(CombineConfig):
    """Combination of night-sky frames into the fringe template, with per-frame source masking."""

    source_threshold: float = option(5.0, "Per frame, leave out pixels this many robust sigma above the sky (stars, galaxies); 0: off", min=0.0)
    source_grow: int = option(2, "Grow the per-frame source mask by this many pixels [pixel]", min=0, max=50)


@dataclass
class CalibsConfig(Config):
    """Master calibrations: per-frame ISR options and the combination of each calibration type."""

    bias: CombineConfig = subconfig(CombineConfig, "Master bias (ADU)")
    dark: CombineConfig = subconfig(CombineConfig, "Master dark (e-/s)")
    flat: CombineConfig = subconfig(CombineConfig, "Master flat (median 1)")
    fringe: FringeCombineConfig = subconfig(FringeCombineConfig, "Fringe template (per unit sky, zero mean)")
    isr: IsrConfig = subconfig(IsrConfig, "Per-frame ISR of calibration inputs (overscan, saturation, NaN masking); each construct_* sets the bias/gain/dark/flat/fringe switches itself")
