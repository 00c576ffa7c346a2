"""Render one raw exposure (science or calibration) with its truth (rule simulate_raw)."""
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table

from snakedrp import log as sdlog
from snakedrp import simulate
from snakedrp.repo.camera import Camera

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, wildcards, log_path):
    logger = sdlog.configure(log_path)
    sim = simulate.resolve_config(simulate.SimulateConfig.from_dict(params.simulate["simulate"]))
    camera = Camera.from_yaml(inputs.camera)
    plan = simulate.plan_exposures(sim, camera)
    visit, ccd = int(wildcards.visit), int(wildcards.ccd)
    row = plan[(np.asarray(plan["visit"]) == visit) & (np.asarray(plan["ccd"]) == ccd)]
    if len(row) != 1:
        raise SystemExit(f"simulate_raw: visit={visit} ccd={ccd} is not in the simulator's plan")
    objects, visits = Table.read(inputs.objects), Table.read(inputs.visits)
    result = simulate.render_exposure(sim, camera, row[0], objects, visits)
    simulate.write_raw(result, outputs.raw)
    simulate.write_sources(result, outputs.sources)
    simulate.write_cr_mask(result, outputs.cr)
    logger.info("visit=%d ccd=%d (%s): %d objects, %d cosmic-ray pixels", visit, ccd, row[0]["obstype"],
                len(result.sources), int(result.cr_mask.sum()))


main(snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards, snakemake.log[0])
