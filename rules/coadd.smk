# Deep coadds: make_skymap → make_overlaps (checkpoint) → make_warp → assemble_coadd → detect_coadd,
# then validate_coadd. Coadds are per filter, tract and patch ("x,y"; "x_y" in paths); warps per visit too.
#
# Keeping a re-run small when visits are added (rings sky map): make_skymap has no calexp input
# for rings, so its file is never rewritten; a warp's inputs are only its visit's overlapping
# calexps and that file; the overlap tables are read through the checkpoint and are no job's input
# file, so rewriting them (their mtime) re-runs nothing. New visits thus add their own warps and
# re-run the coadds of the patches they touch (their list of warps changed), nothing else.


rule make_skymap:
    input:
        unpack(get_skymap_inputs),
    output:
        skymap=butler_template("deepCoadd_skyMap"),
    params:
        config=coadd_params("skymap"),
    log:
        log_path("make_skymap"),
    benchmark:
        benchmark_path("make_skymap")
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/make_skymap.py"


# A checkpoint: which calexps touch which patches follows from the WCSs fitted in astrometry, so
# the make_warp and assemble_coadd jobs that exist are known only once the calexps are made.
# One table per filter: coadd inputs are split by filter, and a filter's coadds need only its own.
checkpoint make_overlaps:
    input:
        calexps=get_overlap_calexps,
        skymap=rules.make_skymap.output.skymap,
    output:
        overlaps=butler_template("deepCoadd_overlaps"),
    params:
        data_ids=get_overlap_data_ids,
    log:
        log_path("make_overlaps", "filter"),
    benchmark:
        benchmark_path("make_overlaps", "filter")
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/make_overlaps.py"


rule make_warp:
    input:
        calexps=get_warp_calexps,
        skymap=rules.make_skymap.output.skymap,
    output:
        warp=warp_output(),
    params:
        tract=wildcard_int("tract"),
        patch=wildcard_patch,
        visit=wildcard_int("visit"),
        config=coadd_params("warp"),
    log:
        log_path("make_warp", "filter", "tract", "patch", "visit"),
    benchmark:
        benchmark_path("make_warp", "filter", "tract", "patch", "visit")
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/make_warp.py"


rule assemble_coadd:
    input:
        warps=get_coadd_warps,
        skymap=rules.make_skymap.output.skymap,
    output:
        coadd=coadd_output(),
        n_image=butler_template("deepCoadd_nImage"),
        inputs=butler_template("deepCoadd_inputs"),
    params:
        tract=wildcard_int("tract"),
        patch=wildcard_patch,
        config=coadd_params("assemble"),
    log:
        log_path("assemble_coadd", "filter", "tract", "patch"),
    benchmark:
        benchmark_path("assemble_coadd", "filter", "tract", "patch")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/assemble_coadd.py"


rule detect_coadd:
    input:
        coadd=rules.assemble_coadd.output.coadd,
    output:
        calexp=butler_template("deepCoadd_calexp"),
        det=butler_template("deepCoadd_det"),
    params:
        config=coadd_params("detect"),
    log:
        log_path("detect_coadd", "filter", "tract", "patch"),
    benchmark:
        benchmark_path("detect_coadd", "filter", "tract", "patch")
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/detect_coadd.py"


rule validate_coadd:
    # Coadd figures against the simulator's truth; fails when one misses its goal.
    input:
        unpack(get_coadd_validation_inputs),
    output:
        metrics=str(RERUN_DIR / "validation" / "coadd.json"),
    params:
        config=section_params("validation", "coadd"),
    log:
        log_path("validate_coadd"),
    benchmark:
        benchmark_path("validate_coadd")
    resources:
        mem_mb=3000,
        runtime=20,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/validate_coadd.py"


rule coadd:
    # Target: every coadd through detection, each band and patch (or those of the coadd ids).
    input:
        get_coadd_targets,
    localrule: True
