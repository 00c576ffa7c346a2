# Validation against the simulator's truth: figures printed and written as JSON, a missed goal
# marked there; with validation.strict (tests, CI) a missed goal fails the job.


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
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/validate_single_frame.py"


rule show_config:
    # Print every option with its description, type, default and where its value came from.
    localrule: True
    params:
        text=sdconfig.format_config(CFG, CFG_ORIGIN, SHOW_PATTERN),
    log:
        str(RERUN_DIR / "logs" / "show_config.log"),
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/show_config.py"
