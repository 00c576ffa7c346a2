"""Draw the simulated sky once: truth catalogs, visit plan, sharded reference catalog (rule simulate_field)."""
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from snakedrp import log as sdlog
from snakedrp import simulate
from snakedrp.repo.camera import Camera

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, log_path):
    logger = sdlog.configure(log_path)
    sim = simulate.resolve_config(simulate.SimulateConfig.from_dict(params.simulate["simulate"]))
    camera = Camera.from_yaml(inputs.camera)
    field = simulate.make_field(sim, camera)
    simulate.write_field(field, Path(outputs.objects).parent, Path(outputs.refcat).parent, nside=sim.refcat_nside)
    shutil.copyfile(inputs.camera, outputs.camera)
    logger.info("field: %d objects, %d visits, %d reference stars (preset %s, seed %d)",
                len(field.objects), len(field.visits), len(field.refcat), sim.preset, sim.seed)


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
