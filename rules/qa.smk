# Survey metrics (LSST SRD: PA1, PF1/PA2, AM1, AF1/AD1) from the src catalogs, QA plots, and the
# target `validate` that gathers them with the validations against truth. Every plot and the
# metrics table are annotated for `snakemake --report report.html`.
#
#   snakemake --cores 2 validate                  # metrics JSON, plots, truth validations
#   snakemake --report report.html validate        # one self-contained HTML of all of it

report: "../report/workflow.rst"


rule validate_metrics:
    input:
        srcs=expand_exposures("src", SCIENCE),
    output:
        metrics=METRICS_JSON,
        table=report(str(RERUN_DIR / "validation" / "metrics.html"), caption="../report/metrics.rst",
                     category="1. Survey metrics", labels={"product": "SRD metrics table"}),
    params:
        data_ids=qa_data_ids(SCIENCE),
        config=section_params("metrics", "validation"),
    log:
        str(RERUN_DIR / "logs" / "validate_metrics.log"),
    benchmark:
        str(RERUN_DIR / "benchmarks" / "validate_metrics.tsv")
    resources:
        mem_mb=1500,
        runtime=15,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/validate_metrics.py"


rule qa_plots:
    input:
        unpack(get_qa_plot_inputs),
    output:
        zeropoints=report(str(QA_DIR / "zeropoints.png"), caption="../report/zeropoints.rst",
                          category="2. Single frame", subcategory="Photometry", labels={"plot": "zeropoints"}),
        astrometry_quiver=report(str(QA_DIR / "astrometry_quiver.png"), caption="../report/astrometry_quiver.rst",
                                 category="2. Single frame", subcategory="Astrometry",
                                 labels={"plot": "residual quiver"}),
        residuals=report(str(QA_DIR / "residuals_vs_mag.png"), caption="../report/residuals.rst",
                         category="2. Single frame", subcategory="Astrometry",
                         labels={"plot": "residuals vs magnitude"}),
        colours=report(str(QA_DIR / "colour_diagrams.png"), caption="../report/colours.rst",
                       category="3. Multi-band", labels={"plot": "colour diagrams"}),
        completeness=report(str(QA_DIR / "completeness.png"), caption="../report/completeness.rst",
                            category="2. Single frame", subcategory="Completeness", labels={"plot": "completeness"}),
    params:
        kind="single_frame",
        data_ids=qa_data_ids(SCIENCE),
    log:
        str(RERUN_DIR / "logs" / "qa_plots.log"),
    benchmark:
        str(RERUN_DIR / "benchmarks" / "qa_plots.tsv")
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/qa_plots.py"


rule qa_psf_map:
    input:
        calexps=lambda wildcards: expand_exposures("calexp", [e for e in SCIENCE if e["visit"] == int(wildcards.visit)]),
        camera=str(CAMERA_PATH),
    output:
        psf_map=report(str(QA_DIR / "psf_focal_plane-{visit}.png"), caption="../report/psf_focal_plane.rst",
                       category="2. Single frame", subcategory="PSF per visit", labels={"visit": "{visit}"}),
    params:
        kind="psf_map",
        visit=wildcard_int("visit"),
    log:
        str(RERUN_DIR / "logs" / "qa_psf_map" / "{visit}.log"),
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/qa_plots.py"


rule qa_coadd_plots:
    input:
        unpack(get_qa_coadd_inputs),
    output:
        thumbnails=report(str(QA_DIR / "coadd_thumbnails.png"), caption="../report/coadd_thumbnails.rst",
                          category="4. Coadds", labels={"plot": "thumbnails"}),
        composite=report(str(QA_DIR / "coadd_colour.png"), caption="../report/coadd_colour.rst",
                         category="4. Coadds", labels={"plot": "colour composite"}),
    params:
        kind="coadd",
        data_ids=qa_coadd_data_ids,
    log:
        str(RERUN_DIR / "logs" / "qa_coadd_plots.log"),
    benchmark:
        str(RERUN_DIR / "benchmarks" / "qa_coadd_plots.tsv")
    resources:
        mem_mb=3000,
        runtime=20,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/qa_plots.py"


rule validate:
    # Target: the SRD metrics, the QA plots and (with truth) the single-frame and coadd validations.
    input:
        get_validate_targets,
    localrule: True
