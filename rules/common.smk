# Workflow-wide Python: the resolved config, the registry, the selected data IDs, and the
# input functions (get_*) the rules call. No rule is defined here.
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

from snakedrp import config as sdconfig
from snakedrp.repo import dataid
from snakedrp import simulate
from snakedrp.repo.butler import Butler
from snakedrp.repo.camera import Camera
from snakedrp.pexconfig import ConfigError
from snakedrp.repo.registry import Registry


def _load_sources():
    """Config sources in precedence order, labelled for show-config."""
    sources = [("config/config.yaml", yaml.safe_load(Path(workflow.basedir, "config/config.yaml").read_text()))]
    for path in workflow.config_settings.configfiles:
        sources.append((f"--configfile {path}", yaml.safe_load(Path(path).read_text())))
    cli = dict(workflow.config_settings.config)
    cli.pop("pattern", None)  # show_config's filter (SHOW_PATTERN), not an option
    sources.append(("command line", cli))
    return sources


try:
    CFG, CFG_ORIGIN = sdconfig.resolve(_load_sources())
    RESOLVED = CFG.to_dict()
    validate(RESOLVED, Path(workflow.basedir, "config/schema.yaml"))
except ConfigError as err:
    sys.exit(f"snakedrp: config error: {err}")

SHOW_PATTERN = workflow.config_settings.config.get("pattern")
REPO = Path(CFG.repo)
BUTLER = Butler(REPO, rerun=CFG.rerun)
RERUN_DIR = REPO / "rerun" / CFG.rerun.split(":")[-1]
REGISTRY_PATH = REPO / "registry.sqlite3"
CALIB_FILTER_TYPES = ("flat", "fringe")


def _config_camera_path():
    name = CFG.camera
    return Path(name) if name.endswith(".yaml") else Path(workflow.basedir, "config/cameras", f"{name}.yaml")


# The repository's own copy of the camera YAML (its "mapper"), written by simulate_field for the
# demo; a repository of real data brings it along.
CAMERA_PATH = REPO / "_camera.yaml"
CAMERA = Camera.from_yaml(CAMERA_PATH if CAMERA_PATH.exists() else _config_camera_path())
SIM_PARAMS = simulate.resolve_config(CFG.simulate)
TRUTH_DIR = REPO / "truth"
# A repository is simulated when it is new or its simulation has begun (Snakemake makes truth/
# for simulate_field's outputs before the job starts); real data never has truth/. Deciding from
# raw/ instead made a half-simulated repository (killed, or seen by a Slurm job between
# simulate_raw and ingest) look like un-ingested real data, and each process plan another DAG.
SIMULATED_REPO = TRUTH_DIR.exists() or not (REPO / "raw").exists()
INGESTED = REGISTRY_PATH.exists()
# Until ingest has run, the simulator's plan (cheap, no rendering) stands in for the registry,
# so a dry run of a fresh demo already lists every job, and every process sees the same DAG.
SIMULATING = SIMULATED_REPO and not INGESTED


def plan_registry_rows():
    """Registry rows of the exposures the simulator will write (its plan, no rendering)."""
    plan = simulate.plan_exposures(SIM_PARAMS, CAMERA)
    return [
        dict(visit=int(r["visit"]), ccd=int(r["ccd"]), filter=str(r["filter"]), obstype=str(r["obstype"]),
             date_obs=str(r["date_obs"]), mjd=float(r["mjd"]), exptime=float(r["exptime"]),
             ra=float(r["telra"]), dec=float(r["teldec"]), rotation=float(r["rotang"]),
             airmass=float(r["airmass"]),
             path=str(Path(BUTLER.output_path("raw", visit=int(r["visit"]), ccd=int(r["ccd"]))).relative_to(REPO)))
        for r in plan
    ]


if INGESTED:
    REGISTRY = Registry(REGISTRY_PATH)
elif SIMULATING:
    REGISTRY = Registry.from_rows(plan_registry_rows())
else:
    # Real raw data not yet ingested: only the ingest job can be known before the registry exists.
    REGISTRY = Registry.from_rows([])

try:
    SCIENCE = [] if len(REGISTRY) == 0 else dataid.select(REGISTRY.exposures(obstype="science"), dataid.parse_ids(CFG.id),
                            keys=("visit", "ccd", "filter"))
except dataid.DataIdError as err:
    sys.exit(f"snakedrp: data ID error: {err}")

try:
    sdconfig.check_rerun_config(RERUN_DIR / "config.yaml", CFG, clobber=CFG.clobber_config)
except ConfigError as err:
    sys.exit(f"snakedrp: {err}")

SCIENCE_CCDS = sorted({e["ccd"] for e in SCIENCE})
SCIENCE_FILTERS = sorted({e["filter"] for e in SCIENCE})


# ------------------------------------------------------------------ paths
def butler_template(dataset_type):
    """Absolute path pattern of a dataset, wildcards left in (the butler's template)."""
    return BUTLER.template(dataset_type, absolute=True)


def log_path(rule_name, *keys):
    parts = "-".join("{%s}" % k for k in keys) or "all"
    return str(RERUN_DIR / "logs" / rule_name / f"{parts}.log")


def benchmark_path(rule_name, *keys):
    parts = "-".join("{%s}" % k for k in keys) or "all"
    return str(RERUN_DIR / "benchmarks" / rule_name / f"{parts}.tsv")


def expand_exposures(dataset_type, exposures):
    return [BUTLER.output_path(dataset_type, visit=e["visit"], ccd=e["ccd"], filter=e["filter"])
            for e in exposures]


# ------------------------------------------------------------------ input functions
def get_raw(wildcards):
    return BUTLER.output_path("raw", visit=int(wildcards.visit), ccd=int(wildcards.ccd))


def get_calib_raws(obstype):
    """Input function: the raw calibration exposures of one type for a CCD (and filter)."""

    def inputs(wildcards):
        where = {"obstype": obstype, "ccd": int(wildcards.ccd)}
        if obstype in CALIB_FILTER_TYPES:
            where["filter"] = wildcards.filter
        rows = REGISTRY.exposures(**where)
        if not rows:
            raise ValueError(f"no raw {obstype} exposures for {where} in {REGISTRY_PATH}")
        return [str(REPO / r["path"]) for r in rows]

    return inputs


def exposure_filter(wildcards):
    return REGISTRY.row(int(wildcards.visit), int(wildcards.ccd))["filter"]


def fringes(filter_name):
    return CAMERA.filters[filter_name].fringe and CFG.isr.do_fringe


def get_process_ccd_calibs(wildcards):
    """Master calibrations a science exposure needs, honouring the ISR do_* switches."""
    f = exposure_filter(wildcards)
    ccd = int(wildcards.ccd)
    calibs = {}
    if CFG.isr.do_bias:
        calibs["bias"] = BUTLER.output_path("bias", ccd=ccd)
    if CFG.isr.do_dark:
        calibs["dark"] = BUTLER.output_path("dark", ccd=ccd)
    if CFG.isr.do_flat:
        calibs["flat"] = BUTLER.output_path("flat", ccd=ccd, filter=f)
    if fringes(f):
        calibs["fringe"] = BUTLER.output_path("fringe", ccd=ccd, filter=f)
    return calibs


def get_refcat_index(wildcards):
    return str(REPO / "ref_cats" / CFG.refcat / "index.json")


def section_params(*names):
    """The config sections the calling rule depends on; a change re-runs it (params trigger)."""
    return {name: RESOLVED[name] for name in names}


def get_ingest_raws(wildcards):
    """The raw files to ingest: every exposure the registry (or the simulator's plan) lists."""
    return [str(REPO / row["path"]) for row in REGISTRY.exposures()]


def get_validation_inputs(wildcards):
    return {
        "calexps": expand_exposures("calexp", SCIENCE),
        "srcs": expand_exposures("src", SCIENCE),
        "icsrcs": expand_exposures("icSrc", SCIENCE),
        "visits": str(TRUTH_DIR / "visits.fits"),
        "objects": str(TRUTH_DIR / "objects.fits"),
        "exposures": str(TRUTH_DIR / "exposures.fits"),
        "truth": [str(TRUTH_DIR / "sources" / f"truth-{e['visit']}-{e['ccd']}.fits") for e in SCIENCE],
        "cr": [str(TRUTH_DIR / "cr" / f"cr-{e['visit']}-{e['ccd']}.fits") for e in SCIENCE],
        "camera": str(CAMERA_PATH),
    }


def get_all_targets():
    targets = [str(REGISTRY_PATH), str(RERUN_DIR / "config.yaml")]
    targets += expand_exposures("calexp", SCIENCE)
    targets += expand_exposures("src", SCIENCE)
    if CFG.validation.enabled and (SIMULATING or TRUTH_DIR.exists()):
        targets.append(str(RERUN_DIR / "validation" / "single_frame.json"))
    return targets

