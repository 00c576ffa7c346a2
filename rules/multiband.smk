# Multi-band processing of the coadds: merge_detections → measure_coadd (each band) →
# merge_measurements → forced_phot (each band) → object_table (patch) → object_table_tract,
# then validate_multiband. A patch's bands are those whose coadds exist there (coadd_patches).


rule merge_detections:
    input:
        calexps=lambda w: multiband_products("deepCoadd_calexp", w),
        dets=lambda w: multiband_products("deepCoadd_det", w),
    output:
        merged=butler_template("deepCoadd_mergeDet"),
        footprints=butler_template("deepCoadd_mergeDet_footprints"),
    params:
        tract=wildcard_int("tract"),
        patch=wildcard_patch,
        bands=multiband_bands,
        config=multiband_params("merge"),
    log:
        log_path("merge_detections", "tract", "patch"),
    benchmark:
        benchmark_path("merge_detections", "tract", "patch")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/merge_detections.py"


rule measure_coadd:
    input:
        calexp=butler_template("deepCoadd_calexp"),
        merged=rules.merge_detections.output.merged,
        footprints=rules.merge_detections.output.footprints,
    output:
        table=butler_template("deepCoadd_meas"),
    params:
        patch=wildcard_patch,
        config=multiband_params("measure"),
    log:
        log_path("measure_coadd", "filter", "tract", "patch"),
    benchmark:
        benchmark_path("measure_coadd", "filter", "tract", "patch")
    threads: 1
    resources:
        mem_mb=1500,
        runtime=20,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/measure_coadd.py"


rule merge_measurements:
    input:
        merged=rules.merge_detections.output.merged,
        meas=lambda w: multiband_products("deepCoadd_meas", w),
    output:
        reference=butler_template("deepCoadd_ref"),
    params:
        tract=wildcard_int("tract"),
        patch=wildcard_patch,
        bands=multiband_bands,
        config=multiband_params("merge_measurements"),
    log:
        log_path("merge_measurements", "tract", "patch"),
    benchmark:
        benchmark_path("merge_measurements", "tract", "patch")
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/merge_measurements.py"


rule forced_phot:
    input:
        calexp=butler_template("deepCoadd_calexp"),
        merged=rules.merge_detections.output.merged,
        footprints=rules.merge_detections.output.footprints,
        reference=rules.merge_measurements.output.reference,
    output:
        table=butler_template("deepCoadd_forced_src"),
    params:
        patch=wildcard_patch,
        config=multiband_params("measure"),
    log:
        log_path("forced_phot", "filter", "tract", "patch"),
    benchmark:
        benchmark_path("forced_phot", "filter", "tract", "patch")
    threads: 1
    resources:
        mem_mb=1500,
        runtime=20,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/measure_coadd.py"


rule object_table:
    input:
        reference=rules.merge_measurements.output.reference,
        forced=lambda w: multiband_products("deepCoadd_forced_src", w),
        skymap=rules.make_skymap.output.skymap,
    output:
        table=butler_template("objectTable"),
    params:
        tract=wildcard_int("tract"),
        patch=wildcard_patch,
        bands=multiband_bands,
    log:
        log_path("object_table", "tract", "patch"),
    benchmark:
        benchmark_path("object_table", "tract", "patch")
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/object_table.py"


rule object_table_tract:
    input:
        patches=lambda w: [BUTLER.output_path("objectTable", tract=int(w.tract), patch=p)
                           for p in multiband_tract_patches(int(w.tract))],
    output:
        table=butler_template("objectTable_tract"),
    params:
        tract=wildcard_int("tract"),
    log:
        log_path("object_table_tract", "tract"),
    benchmark:
        benchmark_path("object_table_tract", "tract")
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/object_table.py"


rule validate_multiband:
    # Multi-band figures against the simulator's truth; fails when one misses its goal (strict).
    input:
        unpack(get_multiband_validation_inputs),
    output:
        metrics=str(RERUN_DIR / "validation" / "multiband.json"),
    params:
        bands=lambda w: [CAMERA.filters[f].band for f in COADD_FILTERS],
        config=section_params("validation", "multiband"),
    log:
        log_path("validate_multiband"),
    benchmark:
        benchmark_path("validate_multiband")
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/validate_multiband.py"


rule multiband:
    # Target: the object tables of every tract (and patch) the coadds cover, or of the coadd ids.
    input:
        get_multiband_targets,
    localrule: True
