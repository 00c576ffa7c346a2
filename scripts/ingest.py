"""Ingest raw files into the repository's SQLite registry (rule ingest)."""
from pathlib import Path
from typing import TYPE_CHECKING

from snakedrp import log as sdlog
from snakedrp.repo.ingest import IngestConfig, IngestError, ingest

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, log_path):
    logger = sdlog.configure(log_path)
    repo = Path(outputs.registry).parent
    # the registry's (or the simulator's) list; for a new repository of real data, every raw file
    raws = list(inputs.raws) or sorted(str(p) for p in (repo / "raw").rglob("*.fits"))
    config = IngestConfig.from_dict(params.ingest["ingest"])
    try:
        report = ingest(repo, raws, config)
    except IngestError as err:
        raise SystemExit(f"ingest: {err}") from None
    logger.info("registry %s: %d file(s) ingested, %d skipped", outputs.registry, len(report.ingested),
                len(report.skipped))


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
