"""Which calexps of one filter touch which patches (checkpoint make_overlaps).

Reads only the calexps' image headers (fitted WCS and size) and the sky map; writes the overlap
table deepCoadd_overlaps (visit, ccd, filter, tract, patch).
"""
from typing import TYPE_CHECKING

from astropy.io import fits

from snakedrp import log as sdlog
from snakedrp.coadd.overlaps import Footprint, calexp_polygon, coadd_exclusion, find_overlaps
from snakedrp.coadd.skymap import SkyMap, parse_patch
from snakedrp.repo.io import write_table

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, wildcards, log_path):
    logger = sdlog.configure(log_path)
    skymap = SkyMap.read(inputs.skymap)
    footprints = []
    for (v, c), path in zip(params.data_ids, inputs.calexps):
        excluded = coadd_exclusion(fits.getheader(path, 0))
        if excluded:
            logger.warning("make_overlaps %s: %s (visit=%d ccd=%d): %s: left out of the coadds",
                           wildcards.filter, path, int(v), int(c), excluded)
            continue
        footprints.append(Footprint(visit=int(v), ccd=int(c), filter=wildcards.filter,
                                    polygon=calexp_polygon(fits.getheader(path, "IMAGE"))))
    table = find_overlaps(skymap, footprints)
    patches = sorted({(int(t), str(p)) for t, p in zip(table["tract"], table["patch"])},
                     key=lambda tp: (tp[0], parse_patch(tp[1])))
    logger.info("%s: %d calexps touch %d patches (%d calexp-patch pairs): %s", wildcards.filter, len(footprints),
                len(patches), len(table), " ".join(f"{t}/{p}" for t, p in patches))
    write_table(table, outputs.overlaps)


main(snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards, snakemake.log[0])
