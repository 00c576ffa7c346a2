# Workflow-wide Python: the resolved config, the registry, the selected data IDs, and the
# input functions (get_*) the rules call. No rule is defined here.
import sys
from functools import lru_cache
from pathlib import Path

from snakedrp import config as sdconfig
from snakedrp.repo import dataid
from snakedrp import simulate
from snakedrp.repo.butler import Butler, RerunError
from snakedrp.repo.camera import Camera
from snakedrp.pexconfig import ConfigError
from snakedrp.repo.registry import Registry
from snakedrp.yamlio import read_yaml


def _load_sources():
    """Config sources in precedence order, labelled for show-config."""
    sources = [("config/config.yaml", read_yaml(Path(workflow.basedir, "config/config.yaml")))]
    for path in workflow.config_settings.configfiles:
        sources.append((f"--configfile {path}", read_yaml(path)))
    cli = dict(workflow.config_settings.config)
    cli.pop("pattern", None)  # show_config's filter (SHOW_PATTERN), not an option
    sources.append(("command line", cli))
    return sources


def check_schema(values):
    """Check the resolved config against config/schema.yaml.

    snakemake.utils.validate would do the same, but parses the 100 kB schema with pure-Python YAML:
    0.4 s of every snakemake process. The values are complete (defaults filled in), so its
    set_default has nothing to add.
    """
    import jsonschema

    schema = read_yaml(Path(workflow.basedir, "config/schema.yaml"))
    try:
        jsonschema.Draft202012Validator(schema).validate(values)
    except jsonschema.ValidationError as err:
        where = ".".join(map(str, err.absolute_path)) or "config"
        raise ConfigError(f"{where}: {err.message} (config/schema.yaml)") from None


try:
    CFG, CFG_ORIGIN = sdconfig.resolve(_load_sources())
    RESOLVED = CFG.to_dict()
    check_schema(RESOLVED)
except ConfigError as err:
    sys.exit(f"snakedrp: config error: {err}")

SHOW_PATTERN = workflow.config_settings.config.get("pattern")
REPO = Path(CFG.repo)
try:
    BUTLER = Butler(REPO, rerun=CFG.rerun)
except RerunError as err:
    sys.exit(f"snakedrp: rerun error: {err}")
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

# ------------------------------------------------------------------ coadd data IDs (coadd block 1 of 2)
# An id naming tract or patch selects coadds (coaddDriver's --id); every other id selects
# exposures. select_id (--selectId) narrows the calexps that may enter the coadds.
COADD_ID_KEYS = ("tract", "patch", "filter")
try:
    _IDS = dataid.parse_ids(CFG.id)
    COADD_IDS = [d for d in _IDS if "tract" in d or "patch" in d]
    EXPOSURE_IDS = [d for d in _IDS if not ("tract" in d or "patch" in d)]
    SELECT_IDS = dataid.parse_ids(CFG.select_id)
except dataid.DataIdError as err:
    sys.exit(f"snakedrp: data ID error: {err}")
# ------------------------------------------------------------------ end of coadd block 1

try:
    SCIENCE = [] if len(REGISTRY) == 0 else dataid.select(REGISTRY.exposures(obstype="science"), EXPOSURE_IDS,
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


@lru_cache(maxsize=None)
def _exposure_template(dataset_type):
    """The absolute template of a dataset keyed by visit and ccd alone (calexp, src, ...), else None."""
    return BUTLER.template(dataset_type, absolute=True) if set(BUTLER.keys(dataset_type)) <= {"visit", "ccd"} else None


def expand_exposures(dataset_type, exposures):
    """Output paths of a dataset for registry exposures.

    A dataset keyed by visit and ccd is formatted from the butler's template, with the integers the
    registry holds: the string BUTLER.output_path gives, at a tenth of the cost (a survey's dry run
    made 5 x 10^4 of these paths).
    """
    template = _exposure_template(dataset_type)
    if template is None:
        return [BUTLER.output_path(dataset_type, visit=e["visit"], ccd=e["ccd"], filter=e["filter"])
                for e in exposures]
    return [template.format(visit=int(e["visit"]), ccd=int(e["ccd"])) for e in exposures]


# ------------------------------------------------------------------ input files and functions
# Plain patterns where the path follows from the wildcards: Snakemake calls an input function
# once per job, and inspects its signature each time.
RAW_TEMPLATE = butler_template("raw")
REFCAT_INDEX = str(REPO / "ref_cats" / CFG.refcat / "index.json")


def get_calib_raws(obstype):
    """Input function: the raw calibration exposures of one type for a CCD (and filter).

    None is not an error here: raising in an input function stops the whole DAG, while the
    master_calib job without inputs fails alone, saying "no input frames".
    """

    def inputs(wildcards):
        return list(_calib_raws(obstype, int(wildcards.ccd),
                                wildcards.filter if obstype in CALIB_FILTER_TYPES else None))

    return inputs


# Input functions run once per job (10^5 in a survey's DAG) and in every process that plans it:
# what they look up is cached per process (the registry does not change while the DAG is built).
@lru_cache(maxsize=None)
def _calib_raws(obstype, ccd, filter_name):
    where = {"obstype": obstype, "ccd": ccd, "filter": filter_name}
    return tuple(str(REPO / r["path"]) for r in REGISTRY.exposures(**where))


@lru_cache(maxsize=1)
def _exposure_filters():
    """(visit, ccd) -> filter of every registry row, from one query instead of one per job."""
    return {(v, c): f for v, c, f in REGISTRY.query_metadata(["visit", "ccd", "filter"])}


def exposure_filter(wildcards):
    key = (int(wildcards.visit), int(wildcards.ccd))
    f = _exposure_filters().get(key)
    return f if f is not None else REGISTRY.row(*key)["filter"]  # KeyError saying what exists


def fringes(filter_name):
    # a filter the camera lacks (a registry from before ingest refused them): no fringe input;
    # process_ccd then fails that exposure alone, naming the filter
    known = CAMERA.filters.get(filter_name)
    return bool(known and known.fringe and CFG.isr.do_fringe)


def get_process_ccd_calibs(wildcards):
    """Master calibrations a science exposure needs, honouring the ISR do_* switches."""
    return dict(_process_ccd_calibs(int(wildcards.ccd), exposure_filter(wildcards)))


@lru_cache(maxsize=None)
def _process_ccd_calibs(ccd, f):
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



# ------------------------------------------------------------------ coadds (coadd block 2 of 2)
# The sky map, the overlap checkpoint's tables, the coadd inputs and targets (rules/coadd.smk).
# The sky-map and overlap modules (astropy, spherical_geometry) are imported where they are used,
# not here: every snakemake process parses this file, and most never read a sky map.
try:
    COADD_INPUTS = dataid.select(SCIENCE, SELECT_IDS, keys=("visit", "ccd", "filter"), what="calexp") if SCIENCE else []
except dataid.DataIdError as err:
    sys.exit(f"snakedrp: select_id error: {err}")
COADD_FILTERS = sorted({e["filter"] for e in COADD_INPUTS})
RINGS = CFG.coadd.skymap.type == "rings"
# rings: the map follows from the config alone, so ids are checked before any job runs
def _planned_skymap():
    from snakedrp.coadd.skymap import make_skymap

    return make_skymap(CFG.coadd.skymap, camera_pixel_scale=CAMERA.pixel_scale)


PLANNED_SKYMAP = _planned_skymap() if RINGS else None


def check_coadd_ids():
    """Stop before any job on a coadd id with an unknown key, filter, tract or patch (one line)."""
    if not COADD_IDS:
        return
    from snakedrp.coadd.skymap import SkyMapError, parse_patch

    for d in COADD_IDS:
        unknown = [k for k in d if k not in COADD_ID_KEYS]
        if unknown:
            raise dataid.DataIdError(f"unknown key {unknown[0]!r} in coadd id {d.source!r}; a coadd id names "
                                     f"{', '.join(COADD_ID_KEYS)} (inputs: select_id)")
        if "filter" in d and SCIENCE_FILTERS and d["filter"] not in SCIENCE_FILTERS:
            raise dataid.DataIdError(f"filter={d['filter']} (id {d.source!r}) matches no calexp; filters are "
                                     f"{dataid.format_values(SCIENCE_FILTERS)}")
        try:
            if "patch" in d:
                patch = parse_patch(d["patch"])
            if "tract" in d and PLANNED_SKYMAP is not None:
                tract = PLANNED_SKYMAP.check_tract(d["tract"])
                if "patch" in d:
                    PLANNED_SKYMAP.tracts[tract].check_patch(patch)
            elif "tract" in d and d["tract"] != 0:
                raise SkyMapError(f"the discrete sky map has one tract, 0; got tract={d['tract']}")
        except SkyMapError as err:
            raise dataid.DataIdError(f"{err} (id {d.source!r})") from None


try:
    check_coadd_ids()
except dataid.DataIdError as err:
    sys.exit(f"snakedrp: data ID error: {err}")


def coadd_params(*parts):
    """{"coadd": {part: ...}} for the coadd parts the calling job reads; a change re-runs only such jobs."""
    return {"coadd": {part: RESOLVED["coadd"][part] for part in parts}}


def wildcard_int(name):
    """Params function: the wildcard ``name`` as an int."""

    def value(wildcards):
        return int(wildcards[name])

    return value


def wildcard_patch(wildcards):
    """Params function: the patch wildcard (path form ``x_y``) as a data ID spells it, ``x,y``."""
    return dataid.patch_id(wildcards.patch)


def warp_output():
    path = butler_template("deepCoadd_directWarp")
    return path if CFG.coadd.keep_warps else temp(path)


def coadd_output():
    path = butler_template("deepCoadd")
    return path if CFG.coadd.write_coadd else temp(path)


def coadd_inputs_of(filter_name):
    return [e for e in COADD_INPUTS if e["filter"] == filter_name]


def get_skymap_inputs(wildcards):
    """rings: the camera only (the map never changes with the data); discrete: every selected calexp too."""
    calexps = [] if RINGS else expand_exposures("calexp", SCIENCE)
    return {"camera": str(CAMERA_PATH), "calexps": calexps}


def get_overlap_calexps(wildcards):
    return expand_exposures("calexp", coadd_inputs_of(wildcards.filter))


def get_overlap_data_ids(wildcards):
    return [[e["visit"], e["ccd"]] for e in coadd_inputs_of(wildcards.filter)]


@lru_cache(maxsize=None)
def _read_overlaps(path, mtime_ns):
    from astropy.table import Table

    from snakedrp.coadd.overlaps import overlap_index

    return overlap_index(Table.read(path, format="fits"))


def patch_overlaps(filter_name):
    """(tract, patch) → {visit: [ccd, ...]} of one filter, from the make_overlaps checkpoint.

    Raises Snakemake's IncompleteCheckpointException until the checkpoint has run, which is how
    Snakemake learns which jobs depend on it.
    """
    path = checkpoints.make_overlaps.get(filter=filter_name).output.overlaps
    return _read_overlaps(path, Path(path).stat().st_mtime_ns)


def _patch_visits(wildcards):
    key = (int(wildcards.tract), dataid.patch_id(wildcards.patch))
    visits = patch_overlaps(wildcards.filter).get(key)
    if not visits:
        raise ValueError(f"no {wildcards.filter} calexp touches tract {wildcards.tract} patch {key[1]}")
    return visits


def get_warp_calexps(wildcards):
    """The calexps of one visit that touch the patch (only those; a new visit's calexps are not here)."""
    ccds = _patch_visits(wildcards).get(int(wildcards.visit))
    if not ccds:
        raise ValueError(f"visit {wildcards.visit} does not touch tract {wildcards.tract} "
                         f"patch {dataid.patch_id(wildcards.patch)}")
    return [BUTLER.output_path("calexp", visit=int(wildcards.visit), ccd=c, filter=wildcards.filter) for c in ccds]


def get_coadd_warps(wildcards):
    return [BUTLER.output_path("deepCoadd_directWarp", filter=wildcards.filter, tract=int(wildcards.tract),
                               patch=wildcards.patch, visit=v) for v in _patch_visits(wildcards)]


def coadd_filters_wanted():
    """The filters whose coadds may be built: those of the coadd inputs, narrowed by the coadd ids' filters."""
    wanted = set(COADD_FILTERS)
    if COADD_IDS and all("filter" in d for d in COADD_IDS):
        wanted &= {d["filter"] for d in COADD_IDS}  # do not wait for other filters' overlaps
    return sorted(wanted)


def coadd_patches():
    """Data IDs (filter, tract, patch) of the coadds to build: the patches the coadd inputs touch,
    narrowed by the coadd ids. Reads the overlap checkpoints (one per filter)."""
    rows = [dict(tract=tract, patch=patch, filter=f) for f in coadd_filters_wanted() for tract, patch in patch_overlaps(f)]
    if COADD_IDS:
        try:
            rows = dataid.select(rows, COADD_IDS, keys=COADD_ID_KEYS, what="patch with coadd inputs")
        except dataid.DataIdError as err:  # known only once the overlaps exist: one line, no job
            sys.exit(f"snakedrp: data ID error: {err}")
    return rows


def coadd_products(dataset_type, patches):
    return [BUTLER.output_path(dataset_type, **p) for p in patches]


def get_coadd_targets(wildcards):
    """Every coadd through detection: snakemake coadd (all patches and bands, or the coadd ids')."""
    patches = coadd_patches()
    return coadd_products("deepCoadd_calexp", patches) + coadd_products("deepCoadd_det", patches)


def coadd_validation_wanted():
    return CFG.validation.enabled and not COADD_IDS and (SIMULATING or TRUTH_DIR.exists())


def get_coadd_validation_inputs(wildcards):
    patches = coadd_patches()
    return {
        "calexps": coadd_products("deepCoadd_calexp", patches),
        "dets": coadd_products("deepCoadd_det", patches),
        "inputs": coadd_products("deepCoadd_inputs", patches),
        "n_images": coadd_products("deepCoadd_nImage", patches),
        "skymap": butler_template("deepCoadd_skyMap"),
        "objects": str(TRUTH_DIR / "objects.fits"),
        "visits": str(TRUTH_DIR / "visits.fits"),
        "exposures": str(TRUTH_DIR / "exposures.fits"),
        "camera": str(CAMERA_PATH),
    }


def get_default_targets():
    """The default target's non-coadd files; with coadd ids only the rerun config (coadds pull in the rest)."""
    return [str(RERUN_DIR / "config.yaml")] if COADD_IDS else get_all_targets()


def get_all_coadd_targets(wildcards):
    """The default target's coadds (all, or the coadd ids') and, with truth, their validation."""
    if not COADD_INPUTS or not (CFG.coadd.enabled or COADD_IDS):
        return []
    targets = get_coadd_targets(wildcards)
    if coadd_validation_wanted():
        targets.append(str(RERUN_DIR / "validation" / "coadd.json"))
    if multiband_wanted():
        targets += get_multiband_targets(wildcards)
        if multiband_validation_wanted():
            targets.append(str(RERUN_DIR / "validation" / "multiband.json"))
    return targets
# ------------------------------------------------------------------ end of coadd block 2


# ------------------------------------------------------------------ multi-band (rules/multiband.smk)
def multiband_filters(tract, patch):
    """The filters with a coadd of (tract, patch), sorted (the order of a multi-band job's inputs and bands).

    One look-up per filter in its overlap index, not a pass over every patch: each multi-band job
    asks, and a survey has many patches."""
    key = (int(tract), dataid.patch_id(patch))
    rows = [dict(tract=key[0], patch=key[1], filter=f) for f in coadd_filters_wanted() if key in patch_overlaps(f)]
    if COADD_IDS and rows:
        try:
            rows = dataid.select(rows, COADD_IDS, keys=COADD_ID_KEYS, what="patch with coadd inputs")
        except dataid.DataIdError:
            return []
    return [r["filter"] for r in rows]


def multiband_products(dataset_type, wildcards):
    """One dataset of every band of the wildcards' patch, in multiband_filters order."""
    return [BUTLER.output_path(dataset_type, filter=f, tract=int(wildcards.tract), patch=wildcards.patch)
            for f in multiband_filters(wildcards.tract, wildcards.patch)]


def multiband_bands(wildcards):
    """Params function: the bands (camera band letters) of multiband_products' files."""
    return [CAMERA.filters[f].band for f in multiband_filters(wildcards.tract, wildcards.patch)]


def multiband_params(*parts):
    """{"multiband": {"priority": ..., part: ...}} for the parts the calling job reads."""
    return {"multiband": {"priority": RESOLVED["multiband"]["priority"], **{p: RESOLVED["multiband"][p] for p in parts}}}


def multiband_patches():
    """(tract, patch) of every patch with a coadd, sorted."""
    return sorted({(int(p["tract"]), str(p["patch"])) for p in coadd_patches()})


def multiband_tract_patches(tract):
    return [p for t, p in multiband_patches() if t == tract]


def multiband_wanted():
    return bool(COADD_INPUTS) and CFG.multiband.enabled and (CFG.coadd.enabled or bool(COADD_IDS))


def get_multiband_targets(wildcards):
    """The object tables: each patch's and each tract's."""
    patches = multiband_patches()
    tracts = sorted({t for t, _ in patches})
    return ([BUTLER.output_path("objectTable", tract=t, patch=p) for t, p in patches]
            + [BUTLER.output_path("objectTable_tract", tract=t) for t in tracts])


def multiband_validation_wanted():
    return multiband_wanted() and coadd_validation_wanted()


def get_multiband_validation_inputs(wildcards):
    tracts = sorted({t for t, _ in multiband_patches()})
    return {
        "tables": [BUTLER.output_path("objectTable_tract", tract=t) for t in tracts],
        "skymap": butler_template("deepCoadd_skyMap"),
        "objects": str(TRUTH_DIR / "objects.fits"),
    }


# ------------------------------------------------------------------ resources
def calib_mem_mb(wildcards, input):
    # measured on the hsc preset: 220-410 MB stacking 5 full-size frames; the stack grows by one
    # 2048x4176 image (~35 MB) per frame, with room for temporaries
    return 300 + 60 * len(input.raws)


# ------------------------------------------------------------------ QA (rules/qa.smk)
QA_DIR = RERUN_DIR / "qa"
METRICS_JSON = str(RERUN_DIR / "validation" / "metrics.json")
QA_VISITS = sorted({e["visit"] for e in SCIENCE})
QA_HAS_TRUTH = SIMULATING or TRUTH_DIR.exists()




def qa_data_ids(exposures):
    return [dict(visit=int(e["visit"]), ccd=int(e["ccd"]), filter=str(e["filter"])) for e in exposures]


def get_qa_plot_inputs(wildcards):
    inputs = {
        "calexps": expand_exposures("calexp", SCIENCE),
        "srcs": expand_exposures("src", SCIENCE),
        "matches": expand_exposures("srcMatch", SCIENCE),
        "camera": str(CAMERA_PATH),
    }
    if QA_HAS_TRUTH:
        inputs["exposures"] = str(TRUTH_DIR / "exposures.fits")
        inputs["objects"] = str(TRUTH_DIR / "objects.fits")
        inputs["truth"] = [str(TRUTH_DIR / "sources" / f"truth-{e['visit']}-{e['ccd']}.fits") for e in SCIENCE]
    return inputs


def qa_coadd_wanted():
    return bool(COADD_INPUTS) and (CFG.coadd.enabled or bool(COADD_IDS))


def get_qa_coadd_inputs(wildcards):
    return {"calexps": coadd_products("deepCoadd_calexp", coadd_patches()), "camera": str(CAMERA_PATH)}


def qa_coadd_data_ids(wildcards):
    return [dict(patch=str(p["patch"]), tract=int(p["tract"]), filter=str(p["filter"])) for p in coadd_patches()]


def get_validate_targets(wildcards):
    """What `validate` needs: the metrics, the plots, and the truth validations where truth exists."""
    targets = [*([METRICS_JSON] if CFG.metrics.enabled else []), *rules.qa_plots.output]
    targets += expand(rules.qa_psf_map.output.psf_map, visit=QA_VISITS)
    if CFG.validation.enabled and QA_HAS_TRUTH:
        targets.append(str(RERUN_DIR / "validation" / "single_frame.json"))
    if qa_coadd_wanted():
        targets += list(rules.qa_coadd_plots.output)
        if coadd_validation_wanted():
            targets.append(str(RERUN_DIR / "validation" / "coadd.json"))
        if multiband_validation_wanted():
            targets.append(str(RERUN_DIR / "validation" / "multiband.json"))
    return targets
