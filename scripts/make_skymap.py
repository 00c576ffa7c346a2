"""Make the deep-coadd sky map (rule make_skymap; makeSkyMap / makeDiscreteSkyMap).

discrete: one tract about the calexps' footprints, read from their headers' fitted WCSs (no
pixels); rings: the fixed all-sky map, from the config alone (no calexp inputs).
"""
from typing import TYPE_CHECKING

from astropy.io import fits

from snakedrp import log as sdlog
from snakedrp.coadd.overlaps import calexp_polygon
from snakedrp.coadd.skymap import SkyMapConfig, SkyMapError, make_skymap
from snakedrp.repo.camera import Camera

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, log_path):
    logger = sdlog.configure(log_path)
    config = SkyMapConfig.from_dict(params.config["coadd"]["skymap"])
    camera = Camera.from_yaml(inputs.camera)
    footprints = [calexp_polygon(fits.getheader(path, "IMAGE")) for path in inputs.calexps]
    try:
        skymap = make_skymap(config, camera_pixel_scale=camera.pixel_scale, footprints=footprints)
    except SkyMapError as err:
        raise SystemExit(f"make_skymap: {err}") from None
    if config.type == "discrete":
        logger.info("discrete sky map from %d calexps:", len(footprints))
        logger.info("%s", skymap.tracts[0].describe())
    else:
        logger.info("rings sky map: %d rings, %d tracts, %s, %g arcsec/pixel, patches of %d + %d border pixels",
                    skymap.n_rings, skymap.n_tracts, skymap.projection, skymap.pixel_scale,
                    skymap.patch_inner, skymap.patch_border)
    skymap.write(outputs.skymap)


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
