"""Validate single-frame processing against the simulator's truth (rule validate_single_frame)."""
import json
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits
from astropy.table import Table

from snakedrp import log as sdlog
from snakedrp import simulate
from snakedrp.repo.camera import Camera
from snakedrp.repo.exposure import Exposure
from snakedrp.repo.io import write_text
from snakedrp.validate.figures import Metric
from snakedrp.validate.single_frame import (ValidateConfig, ValidationFailed, finish, information, summarize,
                                            validate_exposure)

if TYPE_CHECKING:
    from snakemake.script import snakemake


def truth_functions(visit_row, camera: Camera, ccd: int, objects: Table, shape):
    """The true PSF image, pixel-to-sky mapping, total magnitudes and PSF effective area of one exposure."""
    def true_psf_image(x, y, stamp_shape):
        profile = simulate.true_psf(visit_row, camera, ccd, x, y)
        return profile.drawImage(nx=stamp_shape[1], ny=stamp_shape[0], scale=1.0, method="auto").array

    def true_pixel_to_sky(x, y):
        return camera.pixel_to_sky(ccd, x, y, float(visit_row["ra"]), float(visit_row["dec"]),
                                   float(visit_row["rotation"]))

    mag_column = np.asarray(objects[f"mag_{str(visit_row['band']).strip()}"], float)
    row_of = {int(i): k for k, i in enumerate(objects["id"])}

    def true_mag(ids):
        return mag_column[[row_of[int(i)] for i in ids]]

    # the true PSF's effective area 1 / sum(p^2) on a coarse grid (it varies slowly), nearest node
    ny, nx = shape
    gx, gy = np.linspace(0, nx - 1, 3), np.linspace(0, ny - 1, 5)
    half = int(np.ceil(5 * float(visit_row["seeing"]) / camera.pixel_scale)) + 5
    neff = np.array([[1.0 / np.sum(true_psf_image(float(x), float(y), (2 * half + 1, 2 * half + 1)) ** 2)
                      for x in gx] for y in gy])

    def true_neff(x, y):
        i = np.abs(np.asarray(x, float)[:, None] - gx[None, :]).argmin(axis=1)
        j = np.abs(np.asarray(y, float)[:, None] - gy[None, :]).argmin(axis=1)
        return neff[j, i]

    return true_psf_image, true_pixel_to_sky, true_mag, true_neff


def main(inputs, outputs, params, log_path):
    logger = sdlog.configure(log_path)
    config = ValidateConfig.from_dict(params.validation["validation"])
    camera = Camera.from_yaml(inputs.camera)
    objects, visits, exposures = Table.read(inputs.objects), Table.read(inputs.visits), Table.read(inputs.exposures)
    true_zp = {(int(r["visit"]), int(r["ccd"])): float(r["zeropoint"]) for r in exposures}
    figures, failed = [], []
    for calexp_path, src_path, icsrc_path, truth_path, cr_path in zip(
            inputs.calexps, inputs.srcs, inputs.icsrcs, inputs.truth, inputs.cr):
        calexp = Exposure.read(calexp_path)
        visit, ccd = int(calexp.metadata["VISIT"]), int(calexp.metadata["CCD"])
        if "WCSFAIL" in calexp.metadata:
            failed.append(f"visit={visit} ccd={ccd}")
            logger.warning("%s (visit=%d ccd=%d): astrometric fit failed (%s): left out of the figures", calexp_path,
                           visit, ccd, calexp.metadata["WCSFAIL"])
            continue
        visit_row = visits[np.flatnonzero(np.asarray(visits["visit"]) == visit)[0]]
        psf_image, pixel_to_sky, true_mag, true_neff = truth_functions(visit_row, camera, ccd, objects, calexp.shape)
        figures.append(validate_exposure(calexp, Table.read(src_path), Table.read(icsrc_path), Table.read(truth_path),
                                         objects, fits.getdata(cr_path), true_zp[(visit, ccd)], psf_image, config,
                                         true_pixel_to_sky=pixel_to_sky, true_mag=true_mag, true_neff=true_neff,
                                         pixel_scale=camera.pixel_scale))
        f = figures[-1]
        logger.info("visit=%d ccd=%d (seeing %.2f\"): WCS error RMS %.1f mas, photometric calibration error %.2f mmag, "
                    "zeropoint error %.2f mmag", visit, ccd, float(visit_row["seeing"]),
                    float(np.sqrt(np.mean(f.wcs_mas**2))),
                    float(np.median(f.photometry_mmag)) if len(f.photometry_mmag) else float("nan"),
                    f.zeropoint_error_mmag)
    metrics = summarize(figures, config)
    # a calexp without a fitted WCS is a calibration failure, counted against the run
    metrics.append(Metric("calexps whose astrometric fit failed", len(failed), 0, "", len(figures) + len(failed)))
    for m in metrics:
        logger.info(m.line())
    info = information(figures)
    logger.info("for information: centroid scatter of S/N > %g isolated stars %.1f mas (expected from their S/N "
                "%.1f mas, n=%d); all matched bright stars, blends included: %.1f mas",
                config.astrometry_snr_min, info["centroid_scatter_rms_mas"],
                info["centroid_scatter_expected_rms_mas"], info["centroid_scatter_n"],
                info["astrometric_rms_all_bright_stars_mas"])
    logger.info("for information: binomial 1-sigma error of the completeness %.1f %%",
                info["completeness_binomial_error_percent"])
    try:
        report = finish(metrics, config, info)
    except ValidationFailed as err:  # validation.strict: the figures are in the log above
        raise SystemExit(str(err)) from None
    for line in report["missed"]:
        logger.warning("goal missed (validation.strict is off, the run goes on): %s", line)
    write_text(json.dumps(report, indent=2), outputs.metrics)


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
