"""Measure the merged objects on one band's coadd (rules measure_coadd and forced_phot; measureCoaddSources, forcedPhotCoadd).

Free measurement (deepCoadd_meas) without a reference table among the inputs, forced photometry
at the reference positions (deepCoadd_forced_src) with one.
"""
from typing import TYPE_CHECKING

from astropy.io import fits
from astropy.table import Table

from snakedrp import log as sdlog
from snakedrp.config import provenance_cards
from snakedrp.multiband.config import MeasureCoaddConfig
from snakedrp.multiband.measure_coadd import measure_coadd
from snakedrp.repo.exposure import Exposure
from snakedrp.repo.io import FitsReadError, check_fits_file, write_table
from snakedrp.runtime import tune_memory

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, wildcards, log_path):
    tune_memory()
    logger = sdlog.configure(log_path)
    config = MeasureCoaddConfig.from_dict(params.config["multiband"]["measure"])
    where = f"filter={wildcards.filter} tract={wildcards.tract} patch={params.patch}"
    rule = "forced_phot" if "reference" in inputs.keys() else "measure_coadd"
    try:
        for path in inputs:
            check_fits_file(path)
        calexp = Exposure.read(inputs.calexp)
        objects = Table.read(inputs.merged)
        segmentation = fits.getdata(inputs.footprints, 1)
        reference = Table.read(inputs.reference) if rule == "forced_phot" else None
        table = measure_coadd(calexp, objects, segmentation, config=config, reference=reference)
    except (FitsReadError, ValueError) as err:
        logger.error("%s %s: %s", rule, where, err)
        raise SystemExit(f"{rule} {where}: {err}") from None
    for key, value, _ in provenance_cards("multiband.measure", config):
        table.meta[key] = value
    table.meta["FILTER"], table.meta["TRACT"], table.meta["PATCH"] = wildcards.filter, int(wildcards.tract), params.patch
    write_table(table, outputs.table, parquet=reference is not None)
    logger.info("%s: %d objects %s, aperture correction from %d point sources (scatter %.4f)", where, len(table),
                "forced at the reference positions" if reference is not None else "measured",
                table.meta["APCORRN"], table.meta["APCORRSC"])


main(snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards, snakemake.log[0])
