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
from snakedrp.validate.single_frame import ValidateConfig, check_goals, summarize, validate_exposure

if TYPE_CHECKING:
    from snakemake.script import snakemake


def main(inputs, outputs, params, log_path):
    logger = sdlog.configure(log_path)
    config = ValidateConfig.from_dict(params.validation["validation"])
    camera = Camera.from_yaml(inputs.camera)
    objects, visits, exposures = Table.read(inputs.objects), Table.read(inputs.visits), Table.read(inputs.exposures)
    true_zp = {(int(r["visit"]), int(r["ccd"])): float(r["zeropoint"]) for r in exposures}
    figures = []
    for calexp_path, src_path, icsrc_path, truth_path, cr_path in zip(
            inputs.calexps, inputs.srcs, inputs.icsrcs, inputs.truth, inputs.cr):
        calexp = Exposure.read(calexp_path)
        visit, ccd = int(calexp.metadata["VISIT"]), int(calexp.metadata["CCD"])
        visit_row = visits[np.flatnonzero(np.asarray(visits["visit"]) == visit)[0]]

        def true_psf_image(x, y, shape, visit_row=visit_row, ccd=ccd):
            profile = simulate.true_psf(visit_row, camera, ccd, x, y)
            return profile.drawImage(nx=shape[1], ny=shape[0], scale=1.0, method="auto").array

        figures.append(validate_exposure(calexp, Table.read(src_path), Table.read(icsrc_path), Table.read(truth_path),
                                         objects, fits.getdata(cr_path), true_zp[(visit, ccd)], true_psf_image,
                                         config))
        logger.info("visit=%d ccd=%d: zeropoint error %.2f mmag", visit, ccd, figures[-1].zeropoint_error_mmag)
    metrics = summarize(figures, config)
    for m in metrics:
        logger.info(m.line())
    all_stars = np.concatenate([f.astrometry_all_mas for f in figures])
    report = {"metrics": [dict(name=m.name, value=float(m.value), goal=float(m.goal), unit=m.unit, n=int(m.n),
                               passed=bool(m.passed)) for m in metrics],
              "astrometric_rms_all_bright_stars_mas": float(np.sqrt(np.mean(all_stars**2))),
              "zeropoint_errors_mmag": {f"{f.visit}-{f.ccd}": float(f.zeropoint_error_mmag) for f in figures}}
    logger.info("for information: astrometric RMS of all matched bright stars, blends included: %.1f mas (n=%d)",
                report["astrometric_rms_all_bright_stars_mas"], all_stars.size)
    failed = check_goals(metrics)
    if failed and config.fail_on_goal:
        raise SystemExit("validation: goal(s) missed: " + "; ".join(m.line() for m in failed))
    write_text(json.dumps(report, indent=2), outputs.metrics)


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
