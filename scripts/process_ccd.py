"""Process one CCD: raw → calexp, src, icSrc, calexpBackground, srcMatch (rule process_ccd)."""
from pathlib import Path
from typing import TYPE_CHECKING

from snakedrp import log as sdlog
from snakedrp.single_frame.calibrate import CalibrateError
from snakedrp.repo.camera import Camera
from snakedrp.single_frame.characterize import CharacterizeError
from snakedrp.config import provenance_cards
from snakedrp.isr.calibs import CalibError, read_master
from snakedrp.meas.cosmicray import CosmicRayError
from snakedrp.repo.io import write_hdulist, write_table
from snakedrp.isr.isr import IsrError
from snakedrp.single_frame.process_ccd import ProcessCcdConfig, ProcessCcdTask
from snakedrp.repo.raw import RawError, RawFrame, check_raw
from snakedrp.repo.refcat import RefcatError
from snakedrp.runtime import tune_memory

if TYPE_CHECKING:
    from snakemake.script import snakemake

#: Errors whose message starts with the file at fault (the raw, a master calibration, a refcat shard).
FILE_FAILURES = (RawError, CalibError, RefcatError)
#: Errors about the data of the raw frame (no stars, failed fits ...).
DATA_FAILURES = (IsrError, CharacterizeError, CosmicRayError, CalibrateError)
CALIBS = ("bias", "dark", "flat", "fringe")


def main(inputs, outputs, params, wildcards, log_path):
    tune_memory()
    logger = sdlog.configure(log_path)
    visit, ccd = int(wildcards.visit), int(wildcards.ccd)
    where = f"visit={visit} ccd={ccd}"
    config = ProcessCcdConfig.from_dict(params.config)
    camera = Camera.from_yaml(inputs.camera)
    try:
        raw = RawFrame.read(inputs.raw)
        check_raw(raw, camera, visit=visit, ccd=ccd)
        # memory-mapped: ISR only reads them, and parallel jobs share the file pages
        calibs = {name: read_master(inputs[name], name, ccd=ccd, memmap=True,
                                    filter=raw.filter if name in ("flat", "fringe") else None)
                  for name in CALIBS if name in inputs.keys()}
        result = ProcessCcdTask(config).run(raw, camera=camera, calibs=calibs,
                                            refcat_dir=Path(inputs.refcat).parent, release_calibs=True)
    except (*FILE_FAILURES, *DATA_FAILURES) as err:
        # one line: the data ID, the file at fault, the reason
        if isinstance(err, FILE_FAILURES):
            line = f"process_ccd {where}: {err}"
        else:  # the tasks' messages start with "visit V ccd C: "
            line = f"process_ccd {where}: {inputs.raw}: {str(err).removeprefix(f'visit {visit} ccd {ccd}: ')}"
        logger.error("%s", line)
        raise SystemExit(line) from None
    for amp, reason in result.unusable_amplifiers.items():
        logger.warning("process_ccd %s: %s: amplifier %s masked NO_DATA: %s", where, inputs.raw, amp, reason)
    if "WCSFAIL" in result.calexp.metadata:
        logger.warning("process_ccd %s: %s: astrometric fit failed (%s): calexp written with the camera's WCS "
                       "and no zeropoint, flagged WCSFAIL (left out of the coadds)", where, inputs.raw,
                       result.calexp.metadata["WCSFAIL"])
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
    zp = result.calexp.zeropoint if result.calexp.zeropoint is not None else float("nan")
    logger.info("%s: %d sources, %d PSF stars, %d cosmic rays, zeropoint %.4f +- %.4f, astrometric rms %.1f mas",
                where, len(result.sources), len(result.psf_sources), result.n_cosmic_rays, zp,
                result.calexp.zeropoint_err if result.calexp.zeropoint_err is not None else float("nan"),
                result.calexp.metadata.get("ASTRMS", float("nan")))


main(snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards, snakemake.log[0])
