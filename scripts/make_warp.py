"""Warp one visit's calexps onto one patch (rule make_warp; makeCoaddTempExp / makeDirectWarp)."""
from typing import TYPE_CHECKING

from snakedrp import log as sdlog
from snakedrp.coadd.config import WarpConfig
from snakedrp.coadd.skymap import SkyMap
from snakedrp.coadd.warp import warp_exposures
from snakedrp.config import provenance_cards
from snakedrp.repo.exposure import Exposure
from snakedrp.runtime import tune_memory

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, wildcards, log_path):
    tune_memory()
    logger = sdlog.configure(log_path)
    config = WarpConfig.from_dict(params.config["coadd"]["warp"])
    patch = SkyMap.read(inputs.skymap).patch_info(int(params.tract), params.patch)
    where = f"filter={wildcards.filter} tract={params.tract} patch={params.patch} visit={params.visit}"
    calexps = [Exposure.read(path) for path in inputs.calexps]
    ids = [{"visit": int(c.metadata["VISIT"]), "ccd": int(c.metadata["CCD"])} for c in calexps]
    try:
        result = warp_exposures(calexps, ids, patch.wcs, patch.outer_shape, config=config)
    except ValueError as err:
        logger.error("make_warp %s: %s", where, err)
        raise SystemExit(f"make_warp {where}: {err}") from None
    warp = result.exposure
    warp.metadata["TRACT"] = (int(params.tract), "tract of the patch")
    warp.metadata["PATCH"] = (params.patch, "patch x,y in the tract")
    for key, *value in provenance_cards("coadd.warp", config):
        warp.metadata[key] = tuple(value)
    warp.write(outputs.warp)
    if result.empty:
        logger.warning("make_warp %s: no pixel of the %d calexps lands on the patch (off it or without data): "
                       "the warp is NO_DATA everywhere and assemble_coadd leaves it out", where, len(calexps))
    for row in result.inputs:
        logger.info("%s: ccd %d -> %d pixels, flux scale %.4f, mean variance %.3g", where, row["ccd"],
                    row["n_pixels"], row["flux_scale"], row["variance_mean"])


main(snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards, snakemake.log[0])
