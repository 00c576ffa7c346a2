"""The whole config tree: every stage's section, overrides, ``show-config`` and provenance.

``PipelineConfig`` gathers the sections each stage defines in its own module. Values come,
in order of precedence, from the dataclass defaults, ``config/config.yaml``, any partial config
files (``--configfile``) and the command line (``--config``); the last one wins. Keys may be
nested dicts or dotted names (``isr.do_flat: false``).
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
import platform
from dataclasses import dataclass
from pathlib import Path

import yaml

# the light config modules only: every Snakefile parse and job imports this one
from snakedrp.coadd.config import AssembleConfig, DetectCoaddConfig, SkyMapConfig, WarpConfig
from snakedrp.isr.config import CalibsConfig, IsrConfig
from snakedrp.multiband.config import MultibandConfig
from snakedrp.pexconfig import Config, ConfigError, merge_into, option, subconfig
from snakedrp.repo.config import IngestConfig
from snakedrp.simulate.presets import SimulateConfig
from snakedrp.single_frame.config import CalibrateConfig, CharacterizeConfig
from snakedrp.validate.config import MetricsConfig, ValidateConfig

#: Packages whose versions every product records.
KEY_PACKAGES = ("snakedrp", "numpy", "scipy", "astropy", "galsim", "sep", "astroscrappy")


@dataclass
class CoaddConfig(Config):
    """Deep coadds: sky map, warps, assembly, detection, and which products stay on disk."""

    enabled: bool = option(True, "Build the deep coadds, through detection, in the default target (rule all)?")
    keep_warps: bool = option(True, "Keep the warps (deepCoadd_directWarp)? false: temporary, deleted once "
                              "their coadds are built (adding a visit then re-warps the patches it touches)")
    write_coadd: bool = option(True, "Keep the pre-detection coadd (deepCoadd; assembleCoadd.doWrite)? false: "
                               "temporary, deleted once detect_coadd has read it")
    skymap: SkyMapConfig = subconfig(SkyMapConfig, "Sky map: tracts and patches (makeSkyMap, makeDiscreteSkyMap)")
    warp: WarpConfig = subconfig(WarpConfig, "Warping of calexps onto patches (makeCoaddTempExp)")
    assemble: AssembleConfig = subconfig(AssembleConfig, "Assembly of the warps with artifact rejection (assembleCoadd)")
    detect: DetectCoaddConfig = subconfig(DetectCoaddConfig, "Detection on the coadds (detectCoaddSources)")


#: Coadd options that change which files stay on disk or are built, not what any product holds.
COADD_SWITCHES = ("coadd.enabled", "coadd.keep_warps", "coadd.write_coadd")


@dataclass
class PipelineConfig(Config):
    """snakedrp configuration: the data repository, the rerun, and every stage's options."""

    repo: str = option("data/ci_repo", "Data repository root (raw, CALIB, ref_cats, registry, rerun/)")
    rerun: str = option("ci", "Output rerun name, or 'parent:child' to chain a new rerun onto a parent")
    id: list[str] = option([], "Data IDs to process, LSST --id syntax (e.g. 'visit=903334..903338:2 ccd=0^1'); empty = all")
    select_id: list[str] = option([], "Coadd inputs, LSST --selectId syntax (e.g. 'visit=903334..903338'): the "
                                  "calexps selected by id that may enter the coadds; empty = all")
    camera: str = option("ci", "Camera YAML (name in config/cameras/ or a path) used when the workflow simulates the repo")
    refcat: str = option("sim_gaia", "Reference catalog name under <repo>/ref_cats/")
    clobber_config: bool = option(False, "Allow running a rerun with a config different from the one it was made with (affected products are rebuilt)")
    simulate: SimulateConfig = subconfig(SimulateConfig, "Simulated demo/test data (used when the repo has no registry yet)")
    ingest: IngestConfig = subconfig(IngestConfig, "Ingest of raw files into the registry")
    calibs: CalibsConfig = subconfig(CalibsConfig, "Master calibrations (constructBias/Dark/Flat/Fringe)")
    isr: IsrConfig = subconfig(IsrConfig, "Instrument signature removal")
    characterize: CharacterizeConfig = subconfig(CharacterizeConfig, "Characterize: background, PSF, cosmic rays, aperture correction")
    calibrate: CalibrateConfig = subconfig(CalibrateConfig, "Calibrate: detection, measurement, astrometry, photometry")
    coadd: CoaddConfig = subconfig(CoaddConfig, "Deep coadds: sky map, warps, assembly, coadd detection")
    multiband: MultibandConfig = subconfig(MultibandConfig, "Multi-band processing of the coadds: merged detections, measurement, reference band, forced photometry, object tables")
    validation: ValidateConfig = subconfig(ValidateConfig, "Validation against simulator truth: accuracy goals")
    metrics: MetricsConfig = subconfig(MetricsConfig, "Survey metrics (LSST SRD: PA1, PF1/PA2, AM1, AF1/AD1) from the src catalogs")


# ------------------------------------------------------------------ merging
def expand_dotted(values: dict) -> dict:
    """Turn ``{"isr.do_flat": False}`` into ``{"isr": {"do_flat": False}}`` (recursively merged)."""
    out: dict = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = expand_dotted(value)
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"option {key}: {p} is not a section")
        merge_into(node, {parts[-1]: value})
    return out


def _leaves(values: dict, prefix: str = ""):
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, name + ".")
        else:
            yield name, value


def resolve(sources: list[tuple[str, dict]]) -> tuple[PipelineConfig, dict[str, str]]:
    """Merge config sources in order and validate them.

    Parameters
    ----------
    sources : list of (label, dict)
        E.g. ``[("config/config.yaml", {...}), ("command line", {...})]``; later wins.

    Returns
    -------
    config : PipelineConfig
    origin : dict
        Dotted option name → label of the source that set it (``"default"`` if none did).
    """
    merged: dict = {}
    origin: dict[str, str] = {}
    for label, values in sources:
        values = expand_dotted(parse_set(normalize_ids(values or {})))
        for name, _ in _leaves(values):
            origin[name] = label
        merge_into(merged, values)
    config = PipelineConfig.from_dict(merged)
    for row in PipelineConfig.describe():
        origin.setdefault(row["name"], "default")
    return config, origin


def parse_set(values: dict) -> dict:
    """Expand ``set: "isr.do_flat=false calibrate.astrometry.sip_order=2"`` into dotted options.

    Snakemake's ``--config`` accepts only identifiers as keys, so dotted names travel inside
    ``--config set="..."`` (whitespace-separated ``name=value``, values parsed as YAML).
    """
    if "set" not in values:
        return values
    values = dict(values)
    text = values.pop("set")
    for item in str(text).split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"set: expected name=value, got {item!r}")
        values[key] = yaml.safe_load(value) if value else None
    return values


def normalize_ids(values: dict) -> dict:
    """Accept ``id`` and ``select_id`` as one string (``--config id="visit=1"``) as well as a list of strings."""
    for key in ("id", "select_id"):
        if isinstance(values.get(key), str):
            values = {**values, key: [values[key]]}
    return values


# ------------------------------------------------------------------ show-config
def format_config(config: PipelineConfig, origin: dict[str, str] | None = None, pattern: str | None = None) -> str:
    """The resolved config as commented YAML-like lines, one option each (``--show=config``).

    Each option is preceded by its description, type, default, allowed values and the source
    of its value. ``pattern`` is a glob on dotted names (e.g. ``"isr.*"``, ``"*fringe*"``).
    """
    lines = []
    for row in PipelineConfig.describe():
        name = row["name"]
        if pattern and not fnmatch.fnmatch(name, pattern) and pattern not in name:
            continue
        allowed = ""
        if row["choices"]:
            allowed = f"; one of {', '.join(map(str, row['choices']))}"
        elif row["min"] is not None or row["max"] is not None:
            allowed = f"; range [{row['min']}, {row['max']}]"
        source = (origin or {}).get(name, "default")
        value = _get(config, name)
        if source.endswith("config/config.yaml") and value == row["default"]:
            source = "default"  # the workflow's config file restates every default
        lines.append(f"# {row['doc']} ({row['type']}, default {row['default']!r}{allowed}) [from {source}]")
        lines.append(f"{name}: {yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix('...').strip()}")
    return "\n".join(lines) + "\n"


def _get(config: Config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


def default_config_yaml() -> str:
    """Text of ``config/config.yaml``: every option at its default, grouped by section."""
    header = (
        "# snakedrp configuration: every science option of every stage, at its default.\n"
        "# Generated from the config dataclasses (python -m snakedrp write-config); each option's\n"
        "# description, type and range: python -m snakedrp show-config, or config/schema.yaml.\n"
        "# Override on the command line: snakemake --config isr.do_flat=false, or\n"
        "# --config isr='{do_flat: false}', or a partial file: --configfile my.yaml\n"
    )
    return header + yaml.safe_dump(PipelineConfig().to_dict(), sort_keys=False)


def schema_yaml() -> str:
    """Text of ``config/schema.yaml`` (JSON schema used by ``snakemake.utils.validate``)."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **PipelineConfig.json_schema()}
    # the workflow accepts a single id string as well as a list
    for key in ("id", "select_id"):
        schema["properties"][key] = {"type": ["string", "array"], "items": {"type": "string"},
                                     "description": schema["properties"][key]["description"], "default": []}
    return yaml.safe_dump(schema, sort_keys=False)


# ------------------------------------------------------------------ provenance
def package_versions() -> dict[str, str]:
    """Versions of Python and of the key packages, for provenance."""
    versions = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance_cards(section_name: str, section: Config) -> list[tuple[str, str, str]]:
    """FITS header cards recording the config section (hash) and software versions."""
    cards = [("CFGSECT", section_name, "config section that made this product"),
             ("CFGHASH", section.hash(), "hash of that config section's values")]
    for i, (name, version) in enumerate(package_versions().items()):
        cards.append((f"SWNAM{i}", name, "software package"))
        cards.append((f"SWVER{i}", version, f"version of {name}"))
    return cards


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted names whose values differ between two config dicts."""
    a, b = dict(_leaves(old)), dict(_leaves(new))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_rerun_config(path: Path, config: PipelineConfig, *, clobber: bool) -> list[str]:
    """Compare ``config`` with the one a rerun was made with (the equivalent of --clobber-config).

    Returns the differing option names. Raises ConfigError if they differ and ``clobber`` is
    false: products made with different configs must not be mixed silently in one rerun.
    """
    path = Path(path)
    if not path.exists():
        return []
    old = yaml.safe_load(path.read_text()) or {}
    # repo: the file lives inside the repo (a moved repo is the same rerun); validation, metrics make no products
    ignore = {"id", "select_id", "clobber_config", "rerun", "repo", "validation", "metrics"}
    diffs = [d for d in config_differences(old, config.to_dict())
             if d.split(".")[0] not in ignore and d not in COADD_SWITCHES]
    if diffs and not clobber:
        raise ConfigError(
            f"rerun config {path} differs from the current config in {', '.join(diffs[:8])}"
            f"{' ...' if len(diffs) > 8 else ''}; use a new rerun name, or --config clobber_config=true "
            "to rebuild the affected products in this rerun"
        )
    return diffs
