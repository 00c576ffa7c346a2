"""Process one CCD: raw → calexp, src, icSrc, calexpBackground, srcMatch (rule process_ccd)."""
from pathlib import Path
from typing import TYPE_CHECKING

from snakedrp import log as sdlog
from snakedrp.single_frame.calibrate import CalibrateError
from snakedrp.repo.camera import Camera
from snakedrp.single_frame.characterize import CharacterizeError
from snakedrp.config import provenance_cards
from snakedrp.meas.cosmicray import CosmicRayError
from snakedrp.repo.exposure import Exposure
from snakedrp.repo.io import write_hdulist, write_table
from snakedrp.isr.isr import IsrError
from snakedrp.single_frame.process_ccd import ProcessCcdConfig, ProcessCcdTask
from snakedrp.repo.raw import RawError, RawFrame
from snakedrp.runtime import tune_memory

if TYPE_CHECKING:
    from snakemake.script import snakemake

FAILURES = (RawError, IsrError, CharacterizeError, CosmicRayError, CalibrateError)
CALIBS = ("bias", "dark", "flat", "fringe")


def main(inputs, outputs, params, wildcards, log_path):
    tune_memory()
    logger = sdlog.configure(log_path)
    where = f"visit={wildcards.visit} ccd={wildcards.ccd}"
    config = ProcessCcdConfig.from_dict(params.config)
    camera = Camera.from_yaml(inputs.camera)
    try:
        raw = RawFrame.read(inputs.raw)
        calibs = {name: Exposure.read(inputs[name]) for name in CALIBS if name in inputs.keys()}
        result = ProcessCcdTask(config).run(raw, camera=camera, calibs=calibs,
                                            refcat_dir=Path(inputs.refcat).parent)
    except FAILURES as err:
        logger.error("process_ccd %s: %s", where, err)
        raise SystemExit(f"process_ccd {where}: {err}") from None
    cards = provenance_cards("process_ccd", config)
    for key, *value in cards:
        result.calexp.metadata[key] = tuple(value)
    result.calexp.write(outputs.calexp)
    for table, path, parquet in ((result.sources, outputs.src, True), (result.psf_sources, outputs.icsrc, False),
                                 (result.matches, outputs.matches, False)):
        for key, value, _ in cards:
            table.meta[key] = value
        write_table(table, path, parquet=parquet)
    background = result.background.to_hdulist()
    for key, *value in cards:
        background[0].header[key] = tuple(value)
    write_hdulist(background, outputs.background)
    zp = result.calexp.zeropoint
    logger.info("%s: %d sources, %d PSF stars, %d cosmic rays, zeropoint %.4f +- %.4f, astrometric rms %.1f mas",
                where, len(result.sources), len(result.psf_sources), result.n_cosmic_rays, zp,
                result.calexp.zeropoint_err, result.calexp.metadata.get("ASTRMS", float("nan")))


main(snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards, snakemake.log[0])
