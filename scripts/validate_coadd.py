"""Validate the coadds against the simulator's truth (rule validate_coadd; the issue's must-show figures).

Per filter, the figures pool every patch: stars count in each patch's inner box (so stars of
patch borders count once; the patch's border stars still enter its depth
scale), each measured with the coadd PSF mix covering it; the trail, CLIPPED-star, noise and depth figures are per patch
and the worst patch counts. Writes rerun/<name>/validation/coadd.json with each figure, its
goal and pass/fail; a missed goal fails the job only when ``validation.strict`` is true.
"""
import json
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits
from astropy.table import Table

from snakedrp import log as sdlog
from snakedrp.coadd.skymap import SkyMap
from snakedrp.repo.camera import Camera
from snakedrp.repo.exposure import Exposure
from snakedrp.repo.io import write_text
from snakedrp.validate.coadd import (CoaddValidateConfig, PsfMixes, clipped_stars_figure, depth_figure, measured,
                                     noise_figure, objects_mask, star_measurements, star_metrics, trail_figure,
                                     trail_pixels)

if TYPE_CHECKING:
    from snakemake.script import snakemake


def _worst(metrics, name, goal, unit):
    """The worst per-patch figure (NaN figures, e.g. a patch without trail pixels, are left out)."""
    from snakedrp.validate.figures import Metric

    finite = [m for m in metrics if np.isfinite(m.value)]
    if not finite:
        return None
    worst = max(finite, key=lambda m: m.value)
    return Metric(name, worst.value, goal, unit, sum(m.n for m in finite))


def validate_patch(path, n_image_path, inputs_path, skymap, camera, objects, visits, config, logger):
    calexp = Exposure.read(path)
    n_image = fits.getdata(n_image_path)
    inputs = Table.read(inputs_path)
    tract, patch, filt = int(calexp.metadata["TRACT"]), str(calexp.metadata["PATCH"]), str(calexp.metadata["FILTER"])
    band = camera.filters[filt].band
    ny, nx = calexp.shape
    fwhm = float(calexp.psf.fwhm((nx - 1) / 2, (ny - 1) / 2))
    inner = np.zeros(calexp.shape, bool)
    inner[skymap.patch_info(tract, patch).inner_slices] = True
    # one cache of the coadd PSF's mixes (covering visits, local FWHM) for all the patch's figures
    mixes = PsfMixes(calexp.psf)
    stars = star_measurements(calexp, objects, band, config, region=inner, mixes=mixes)
    out = dict(filter=filt, tract=tract, patch=patch, stars=stars, fwhm=fwhm)
    visit_depth = {int(r["visit"]): float(r["depth"]) for r in inputs}
    trail_visits = [r for r in visits if bool(r["satellite"]) and int(r["visit"]) in visit_depth]
    trails = [trail_pixels(row, camera, calexp.wcs, calexp.shape) for row in trail_visits]
    on_trail = np.logical_or.reduce(trails) if trails else None
    out["clipped"] = clipped_stars_figure(calexp, objects, band, config, trail=on_trail, mixes=mixes)
    out["noise"] = noise_figure(calexp, config)
    # depth where every visit covers the patch, against the visits' depths (one per visit)
    full = n_image >= len(visit_depth)
    out["depth"] = None
    if full.mean() > 0.05:
        out["depth"], out["depth_measured"], out["depth_predicted"] = depth_figure(
            calexp, visit_depth, stars, config, where=full, mixes=mixes)
        if out["depth"] is None:
            logger.info("%s tract=%d patch=%s: no depth figure (no star of the depth position's PSF mix with a "
                        "total flux to scale the PSF fluxes, or fewer than %d empty positions)", filt, tract, patch,
                        config.depth_min_positions)
    out["trail"] = []
    if trail_visits:
        near_objects = objects_mask(objects, band, calexp.wcs, calexp.shape, fwhm)
        for trail in trails:
            figure = trail_figure(calexp, trail, near_objects, n_image, config) if trail.any() else None
            if figure is not None:
                out["trail"].append(figure)
    used = measured(stars)
    logger.info("%s tract=%d patch=%s: %d stars (left out: %d with an INEXACT_PSF pixel within 2 FWHM, %d with "
                "the covering visits changing within the aperture), FWHM %.2f px at the centre, %s; %s%s",
                filt, tract, patch, int(used.sum()), int((stars["inexact_psf"] & stars["in_region"]).sum()),
                int((stars["mix_boundary"] & stars["in_region"]).sum()),
                fwhm, out["clipped"].line(), out["noise"].line(),
                "".join("; " + m.line() for m in out["trail"] + ([out["depth"]] if out["depth"] else [])))
    return out


def main(inputs, outputs, params, log_path):
    logger = sdlog.configure(log_path)
    validation = params.config["validation"]
    config = CoaddValidateConfig.from_dict(validation.get("coadd", {}))
    strict = bool(validation.get("strict", False))
    camera = Camera.from_yaml(inputs.camera)
    skymap = SkyMap.read(inputs.skymap)
    objects, visits = Table.read(inputs.objects), Table.read(inputs.visits)
    patches = [validate_patch(c, n, i, skymap, camera, objects, visits, config, logger)
               for c, n, i in zip(inputs.calexps, inputs.n_images, inputs.inputs)]
    metrics, per_patch = [], []
    for filt in sorted({p["filter"] for p in patches}):
        mine = [p for p in patches if p["filter"] == filt]
        label = f"{filt}: "
        stars = {key: np.concatenate([p["stars"][key] for p in mine]) for key in mine[0]["stars"]}
        metrics += star_metrics(stars, config, label)
        pooled = [
            _worst([p["clipped"] for p in mine], label + f"stars < {config.clipped_mag_max:g} mag with CLIPPED pixels", 0, ""),
            _worst([p["noise"] for p in mine], label + "coadd noise / variance prediction - 1 (worst patch)", config.noise_goal, "%"),
            _worst([m for p in mine for m in p["trail"]], label + "satellite trail residual (worst patch)", config.trail_nsigma_goal, "sigma"),
            _worst([p["depth"] for p in mine if p["depth"]], label + "coadd 5-sigma depth - prediction (worst patch)", config.depth_goal, "mag"),
        ]
        metrics += [m for m in pooled if m is not None]
        for p in mine:
            per_patch.append(dict(filter=filt, tract=p["tract"], patch=p["patch"], fwhm_pixel=p["fwhm"],
                                  n_stars=int(measured(p["stars"]).sum()),
                                  figures=[dict(name=m.name, value=float(m.value), goal=float(m.goal), unit=m.unit,
                                                n=int(m.n), passed=bool(m.passed))
                                           for m in [p["clipped"], p["noise"]] + p["trail"] + ([p["depth"]] if p["depth"] else [])],
                                  depth_measured=p.get("depth_measured"), depth_predicted=p.get("depth_predicted")))
    for m in metrics:
        logger.info(m.line())
    failed = [m for m in metrics if not m.passed]
    report = {"strict": strict, "passed": not failed, "missed": [m.line() for m in failed],
              "metrics": [dict(name=m.name, value=float(m.value), goal=float(m.goal), unit=m.unit, n=int(m.n),
                               passed=bool(m.passed)) for m in metrics],
              "patches": per_patch}
    write_text(json.dumps(report, indent=2), outputs.metrics)
    if failed:
        message = "coadd validation: goal(s) missed: " + "; ".join(m.line() for m in failed)
        if strict:
            raise SystemExit(message)
        logger.warning("%s (validation.strict is false: not failing)", message)


main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
