# Validation against the simulator's truth: figures printed and written as JSON; the job fails
# when a figure falls past its goal (validate.fail_on_goal).


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


rule validate_single_frame:
    input:
        unpack(get_validation_inputs),
    output:
        metrics=str(RERUN_DIR / "validation" / "single_frame.json"),
    params:
        validation=section_params("validation"),
    log:
        str(RERUN_DIR / "logs" / "validate_single_frame.log"),
    benchmark:
        str(RERUN_DIR / "benchmarks" / "validate_single_frame.tsv")
    resources:
        mem_mb=2000,
        runtime=15,
    script:
        "../scripts/validate_single_frame.py"


rule show_config:
    # Print every option with its description, type, default and where its value came from.
    localrule: True
    params:
        pattern=workflow.config_settings.config.get("pattern"),
    run:
        print(sdconfig.format_config(CFG, CFG_ORIGIN, params.pattern))
