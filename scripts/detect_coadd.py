"""Detect sources on one coadd (rule detect_coadd; detectCoaddSources)."""
from typing import TYPE_CHECKING

from snakedrp import log as sdlog
from snakedrp.coadd.config import DetectCoaddConfig
from snakedrp.coadd.detect_coadd import detect_coadd
from snakedrp.config import provenance_cards
from snakedrp.repo.exposure import Exposure
from snakedrp.repo.io import write_table
from snakedrp.runtime import tune_memory

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, log_path):
    tune_memory()
    logger = sdlog.configure(log_path)
    config = DetectCoaddConfig.from_dict(params.config["coadd"]["detect"])
    coadd = Exposure.read(inputs.coadd)
    result = detect_coadd(coadd, config=config)
    cards = provenance_cards("coadd.detect", config)
    for key, *value in cards:
        result.calexp.metadata[key] = tuple(value)
    result.calexp.write(outputs.calexp)
    for key, value, _ in cards:
        result.detections.meta[key] = value
    write_table(result.detections, outputs.det)
    logger.info("%s: %d peaks at %.1f sigma, variance scaled by %.3f", inputs.coadd, len(result.detections),
                config.detection.threshold, result.variance_scale)


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
