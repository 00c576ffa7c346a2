"""Build one master calibration (rules master_bias, master_dark, master_flat, master_fringe)."""
from typing import TYPE_CHECKING

from snakedrp.isr import calibs
from snakedrp import log as sdlog
from snakedrp.repo.camera import Camera
from snakedrp.config import provenance_cards
from snakedrp.repo.raw import RawError, RawFrame

if TYPE_CHECKING:
    from snakemake.script import snakemake

BUILDERS = {
    "bias": (calibs.construct_bias, ()),
    "dark": (calibs.construct_dark, ("bias",)),
    "flat": (calibs.construct_flat, ("bias", "dark")),
    "fringe": (calibs.construct_fringe, ("bias", "dark", "flat")),
}


def main(inputs, outputs, params, wildcards, log_path):
    logger = sdlog.configure(log_path)
    kind = next(iter(outputs.keys()))
    build, needs = BUILDERS[kind]
    config = calibs.CalibsConfig.from_dict(params.calibs["calibs"])
    camera = Camera.from_yaml(inputs.camera)
    try:
        raws = [RawFrame.read(path) for path in inputs.raws]
        masters = {name: calibs.read_master(inputs[name], name, ccd=int(wildcards.ccd)) for name in needs}
        master = build(raws, camera, config=config, **masters)
    except (RawError, calibs.CalibError) as err:
        line = f"master_{kind} {' '.join(f'{k}={v}' for k, v in wildcards.items())}: {err}"
        logger.error("%s", line)
        raise SystemExit(line) from None
    for card in provenance_cards("calibs", config):
        master.metadata[card[0]] = card[1:]
    master.write(getattr(outputs, kind))
    logger.info("master %s %s from %d raw frames", kind, dict(wildcards), len(raws))


main(snakemake.input, snakemake.output, snakemake.params, snakemake.wildcards, snakemake.log[0])
