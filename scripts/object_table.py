"""The multi-band object table of one patch (rule object_table) or one tract (rule object_table_tract)."""
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table

from snakedrp import log as sdlog
from snakedrp.coadd.skymap import SkyMap
from snakedrp.multiband.object_table import patch_object_table, tract_object_table
from snakedrp.repo.io import write_table

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, log_path):
    logger = sdlog.configure(log_path)
    if "patches" in inputs.keys():
        table = tract_object_table([Table.read(path) for path in inputs.patches])
        write_table(table, outputs.table, parquet=True)
        logger.info("tract=%s: %d primary objects from %d patches", params.tract, len(table), len(inputs.patches))
        return
    skymap = SkyMap.read(inputs.skymap)
    tract = int(params.tract)
    info = skymap.patch_info(tract, params.patch)
    owner = getattr(skymap, "find_tract", None)
    tract_inner = (None if owner is None else
                   (lambda ra, dec: np.array([owner(float(r), float(d)) == tract for r, d in zip(ra, dec)], bool)))
    reference = Table.read(inputs.reference)
    forced = {band: Table.read(path) for band, path in zip(params.bands, inputs.forced)}
    table = patch_object_table(reference, forced, tract=tract, patch=params.patch, inner_bbox=info.inner_bbox,
                               tract_inner=tract_inner)
    write_table(table, outputs.table, parquet=True)
    logger.info("tract=%d patch=%s: %d objects, %d primary", tract, params.patch, len(table),
                int(np.sum(table["detect_isPrimary"])))


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
