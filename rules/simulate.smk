# Demo/test data: the workflow simulates the repository itself when it has no registry yet.
# simulate_field draws the sky (objects, visits, reference catalog) once; simulate_raw renders
# one raw exposure per job, science and calibration alike.


rule simulate_field:
    input:
        camera=str(_config_camera_path()),
    output:
        objects=str(TRUTH_DIR / "objects.fits"),
        visits=str(TRUTH_DIR / "visits.fits"),
        exposures=str(TRUTH_DIR / "exposures.fits"),
        refcat=str(REPO / "ref_cats" / CFG.refcat / "index.json"),
        camera=str(CAMERA_PATH),
    params:
        simulate=section_params("simulate"),
    log:
        str(REPO / "logs" / "simulate_field.log"),
    benchmark:
        str(REPO / "benchmarks" / "simulate_field.tsv")
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/simulate_field.py"


rule simulate_raw:
    input:
        objects=rules.simulate_field.output.objects,
        visits=rules.simulate_field.output.visits,
        camera=rules.simulate_field.output.camera,
    output:
        raw=butler_template("raw"),
        sources=str(TRUTH_DIR / "sources" / "truth-{visit}-{ccd}.fits"),
        cr=str(TRUTH_DIR / "cr" / "cr-{visit}-{ccd}.fits"),
    params:
        simulate=section_params("simulate"),
    log:
        str(REPO / "logs" / "simulate_raw" / "{visit}-{ccd}.log"),
    benchmark:
        str(REPO / "benchmarks" / "simulate_raw" / "{visit}-{ccd}.tsv")
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/simulate_raw.py"
