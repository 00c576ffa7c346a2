# Master calibrations per CCD (and filter): constructBias, constructDark, constructFlat,
# constructFringe. They live under <repo>/CALIB and depend only on the calibs and ISR options.


rule master_bias:
    input:
        raws=get_calib_raws("bias"),
        camera=str(CAMERA_PATH),
    output:
        bias=butler_template("bias"),
    params:
        calibs=section_params("calibs"),
    log:
        str(REPO / "logs" / "master_bias" / "{ccd}.log"),
    benchmark:
        str(REPO / "benchmarks" / "master_bias" / "{ccd}.tsv")
    threads: 1
    resources:
        mem_mb=calib_mem_mb,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/master_calib.py"


rule master_dark:
    input:
        raws=get_calib_raws("dark"),
        camera=str(CAMERA_PATH),
        bias=rules.master_bias.output.bias,
    output:
        dark=butler_template("dark"),
    params:
        calibs=section_params("calibs"),
    log:
        str(REPO / "logs" / "master_dark" / "{ccd}.log"),
    benchmark:
        str(REPO / "benchmarks" / "master_dark" / "{ccd}.tsv")
    threads: 1
    resources:
        mem_mb=calib_mem_mb,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/master_calib.py"


rule master_flat:
    input:
        raws=get_calib_raws("flat"),
        camera=str(CAMERA_PATH),
        bias=rules.master_bias.output.bias,
        dark=rules.master_dark.output.dark,
    output:
        flat=butler_template("flat"),
    params:
        calibs=section_params("calibs"),
    log:
        str(REPO / "logs" / "master_flat" / "{filter}-{ccd}.log"),
    benchmark:
        str(REPO / "benchmarks" / "master_flat" / "{filter}-{ccd}.tsv")
    threads: 1
    resources:
        mem_mb=calib_mem_mb,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/master_calib.py"


rule master_fringe:
    input:
        raws=get_calib_raws("fringe"),
        camera=str(CAMERA_PATH),
        bias=rules.master_bias.output.bias,
        dark=rules.master_dark.output.dark,
        flat=rules.master_flat.output.flat,
    output:
        fringe=butler_template("fringe"),
    params:
        calibs=section_params("calibs"),
    log:
        str(REPO / "logs" / "master_fringe" / "{filter}-{ccd}.log"),
    benchmark:
        str(REPO / "benchmarks" / "master_fringe" / "{filter}-{ccd}.tsv")
    threads: 1
    resources:
        mem_mb=calib_mem_mb,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/master_calib.py"
