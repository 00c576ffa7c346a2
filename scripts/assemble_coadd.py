"""Coadd the warps of one patch and filter (rule assemble_coadd; assembleCoadd with CompareWarp)."""
from typing import TYPE_CHECKING

from astropy.io import fits

from snakedrp import log as sdlog
from snakedrp.coadd.assemble import assemble_coadd, open_warp
from snakedrp.coadd.config import AssembleConfig
from snakedrp.config import provenance_cards
from snakedrp.repo.io import FitsReadError, check_fits_file, write_hdulist, write_table
from snakedrp.runtime import tune_memory

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, wildcards, log_path):
    tune_memory()
    logger = sdlog.configure(log_path)
    config = AssembleConfig.from_dict(params.config["coadd"]["assemble"])
    where = f"filter={wildcards.filter} tract={params.tract} patch={params.patch}"
    # read a block of rows of every warp at a time: memory does not grow with the number of visits
    try:
        for path in inputs.warps:
            check_fits_file(path)        # a damaged warp is named here, not by astropy mid-assembly
        warps = [open_warp(path) for path in inputs.warps]
        result = assemble_coadd(warps, config=config)
    except (FitsReadError, ValueError) as err:
        logger.error("assemble_coadd %s: %s", where, err)
        raise SystemExit(f"assemble_coadd {where}: {err}") from None
    for k in result.dropped:
        logger.warning("assemble_coadd %s: %s: no usable pixel (all masked or no data): left out of the coadd",
                       where, inputs.warps[k])
    cards = provenance_cards("coadd.assemble", config)
    coadd = result.coadd
    coadd.metadata["TRACT"] = (int(params.tract), "tract of the patch")
    coadd.metadata["PATCH"] = (params.patch, "patch x,y in the tract")
    for key, *value in cards:
        coadd.metadata[key] = tuple(value)
    coadd.write(outputs.coadd)
    n_image = fits.PrimaryHDU(result.n_image, header=coadd.wcs.to_header(relax=True) if coadd.wcs else None)
    n_image.header["BUNIT"] = ("", "number of warps contributing to the pixel")
    write_hdulist(fits.HDUList([n_image]), outputs.n_image)
    for key, value, _ in cards:
        result.inputs.meta[key] = value
    write_table(result.inputs, outputs.inputs)
    logger.info("%s: %d warps (%s), %d pixels clipped, median n_image %d", where, len(warps) - len(result.dropped),
                ", ".join(f"{r['visit']}: w={r['weight']:.3g}" for r in result.inputs),
                coadd.metadata["NCLIPPED"], int(sorted(result.n_image.ravel())[result.n_image.size // 2]))


main(snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards, snakemake.log[0])
