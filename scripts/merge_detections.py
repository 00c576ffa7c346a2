"""Merge the bands' coadd detections of one patch (rule merge_detections; mergeCoaddDetections)."""
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits
from astropy.table import Table

from snakedrp import log as sdlog
from snakedrp.config import provenance_cards
from snakedrp.multiband.config import MergeDetectionsConfig
from snakedrp.multiband.merge_detections import merge_detections
from snakedrp.repo.exposure import Exposure
from snakedrp.repo.io import FitsReadError, check_fits_file, write_hdulist, write_table
from snakedrp.runtime import tune_memory

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, log_path):
    tune_memory()
    logger = sdlog.configure(log_path)
    config = MergeDetectionsConfig.from_dict(params.config["multiband"]["merge"])
    where = f"tract={params.tract} patch={params.patch}"
    detections, masks, snr = {}, {}, {}
    wcs = scale = None
    try:
        for band, calexp_path, det_path in zip(params.bands, inputs.calexps, inputs.dets):
            check_fits_file(calexp_path)
            check_fits_file(det_path)
            calexp = Exposure.read(calexp_path)
            detections[band] = Table.read(det_path)
            masks[band] = calexp.mask
            with np.errstate(invalid="ignore", divide="ignore"):
                snr[band] = np.where(calexp.variance > 0, calexp.image / np.sqrt(calexp.variance), 0.0)
            wcs = calexp.wcs
            scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)
        result = merge_detections(detections, masks, snr, priority=params.config["multiband"]["priority"],
                                  pixel_scale=scale, config=config, wcs=wcs)
    except (FitsReadError, ValueError) as err:
        logger.error("merge_detections %s: %s", where, err)
        raise SystemExit(f"merge_detections {where}: {err}") from None
    objects = result.objects
    for key, value, _ in provenance_cards("multiband.merge", config):
        objects.meta[key] = value
    objects.meta["TRACT"], objects.meta["PATCH"] = int(params.tract), params.patch
    write_table(objects, outputs.merged)
    header = wcs.to_header(relax=True) if wcs is not None else fits.Header()
    header["BUNIT"] = ("", "object id (deepCoadd_mergeDet id); 0: no footprint")
    footprints = fits.CompImageHDU(result.segmentation, header=header, compression_type="RICE_1", name="FOOTPRINTS")
    write_hdulist(fits.HDUList([fits.PrimaryHDU(), footprints]), outputs.footprints)
    peaks = ", ".join(f"{band} {len(table)} peaks" for band, table in detections.items())
    logger.info("%s: %d objects from %s (%s), %d in footprints with several", where, len(objects), peaks,
                objects.meta["BANDS"], int(np.sum(objects["is_blended"])))


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
