# Single-frame processing (processCcd): ISR → characterize → calibrate in one process per CCD,
# writing calexp, src (FITS + Parquet), icSrc, calexpBackground and srcMatch.


rule process_ccd:
    input:
        unpack(get_process_ccd_calibs),
        raw=RAW_TEMPLATE,
        refcat=REFCAT_INDEX,
        camera=str(CAMERA_PATH),
    output:
        calexp=butler_template("calexp"),
        src=butler_template("src"),
        icsrc=butler_template("icSrc"),
        background=butler_template("calexpBackground"),
        matches=butler_template("srcMatch"),
    params:
        config=section_params("isr", "characterize", "calibrate"),
    log:
        log_path("process_ccd", "visit", "ccd"),
    benchmark:
        benchmark_path("process_ccd", "visit", "ccd")
    threads: 1
    resources:
        mem_mb=1500,
        runtime=5,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/process_ccd.py"


rule rerun_config:
    # Each rerun keeps the full config it was run with; the next run is compared with it.
    output:
        str(RERUN_DIR / "config.yaml"),
    params:
        config=RESOLVED,
    log:
        str(RERUN_DIR / "logs" / "rerun_config.log"),
    localrule: True
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/rerun_config.py"
