# Ingest: read every raw file's header into the SQLite registry (one file in the repository).


rule ingest:
    input:
        raws=get_ingest_raws,
    output:
        registry=str(REGISTRY_PATH),
    params:
        ingest=section_params("ingest"),
    log:
        str(REPO / "logs" / "ingest.log"),
    benchmark:
        str(REPO / "benchmarks" / "ingest.tsv")
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        "../envs/snakedrp.yaml"
    script:
        "../scripts/ingest.py"
