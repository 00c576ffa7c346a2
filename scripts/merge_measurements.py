"""Choose each object's reference band (rule merge_measurements; mergeCoaddMeasurements)."""
from typing import TYPE_CHECKING

from collections import Counter

from astropy.table import Table

from snakedrp import log as sdlog
from snakedrp.config import provenance_cards
from snakedrp.multiband.config import MergeMeasurementsConfig
from snakedrp.multiband.merge_measurements import merge_measurements
from snakedrp.repo.io import write_table

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, log_path):
    logger = sdlog.configure(log_path)
    config = MergeMeasurementsConfig.from_dict(params.config["multiband"]["merge_measurements"])
    objects = Table.read(inputs.merged)
    measurements = {band: Table.read(path) for band, path in zip(params.bands, inputs.meas)}
    reference = merge_measurements(objects, measurements, params.config["multiband"]["priority"], config)
    for key, value, _ in provenance_cards("multiband.merge_measurements", config):
        reference.meta[key] = value
    reference.meta["TRACT"], reference.meta["PATCH"] = int(params.tract), params.patch
    write_table(reference, outputs.reference)
    counts = Counter(str(b) for b in reference["ref_band"])
    logger.info("tract=%s patch=%s: reference bands %s", params.tract, params.patch,
                ", ".join(f"{b} {counts[b]}" for b in measurements))


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
