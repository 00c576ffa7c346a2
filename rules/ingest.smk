# Ingest: read every raw file's header into the SQLite registry (one file in the repository).


def get_ingest_raws(wildcards):
    """The raw files to ingest: every exposure the registry (or the simulator's plan) lists."""
    return [str(REPO / row["path"]) for row in REGISTRY.exposures()]


rule ingest:
    input:
        raws=get_ingest_raws,
    output:
        registry=str(REGISTRY_PATH),
    params:
        ingest=section_params("ingest"),
        repo=str(REPO),
    log:
        str(REPO / "logs" / "ingest.log"),
    benchmark:
        str(REPO / "benchmarks" / "ingest.tsv")
    resources:
        mem_mb=500,
        runtime=10,
    script:
        "../scripts/ingest.py"
