"""QA plots (rules qa_plots and qa_coadd_plots): read the products, call snakedrp.validate.plots, write PNGs."""
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits
from astropy.table import Table

from snakedrp import log as sdlog
from snakedrp.repo.camera import Camera
from snakedrp.validate import plots

if TYPE_CHECKING:
    from snakemake.script import snakemake


def single_frame(inputs, outputs, params, logger):
    camera = Camera.from_yaml(inputs.camera)
    data_ids = params.data_ids
    band_of = {name: f.band for name, f in camera.filters.items()}
    summaries = [plots.read_calexp_summary(p, grid=(1, 1)) for p in inputs.calexps]  # zeropoints only
    true_zp = None
    if "exposures" in inputs.keys():
        true_zp = {(int(r["visit"]), int(r["ccd"])): float(r["zeropoint"]) for r in Table.read(inputs.exposures)}
    plots.save(plots.zeropoints(summaries, true_zp), outputs.zeropoints)
    matches = plots.read_matches(inputs.matches, inputs.srcs, data_ids, band_of)
    logger.info("read %d srcMatch rows (%d used by the fits)", len(matches), int(np.sum(matches["used"])) if len(matches) else 0)
    plots.save(plots.astrometric_quiver(matches, camera), outputs.astrometry_quiver)
    plots.save(plots.residuals_vs_magnitude(matches), outputs.residuals)
    sources = plots.read_sources(inputs.srcs, data_ids)
    objects = plots.match_bands(sources)
    filters = sorted(set(d["filter"] for d in data_ids), key=lambda f: "ugrizy".find(band_of[f]))
    reference = None
    if "objects" in inputs.keys():
        reference = Table.read(inputs.objects)
        reference.meta["label"] = "the simulator's truth"
    plots.save(plots.colour_diagrams(objects, filters, reference, band_of), outputs.colours)
    tables = {}
    if "truth" in inputs.keys():
        per_filter = {}
        for src_path, truth_path, data_id in zip(inputs.srcs, inputs.truth, data_ids):
            src = plots.read_table(src_path, ("x_centroid", "y_centroid"))
            per_filter.setdefault(data_id["filter"], []).append(plots.completeness_table(src, Table.read(truth_path)))
        from astropy.table import vstack

        tables = {f: vstack(t) for f, t in per_filter.items()}
    plots.save(plots.completeness_curves(tables), outputs.completeness)
    logger.info("wrote %d plots", len(outputs))


def psf_map(inputs, outputs, params, logger):
    camera = Camera.from_yaml(inputs.camera)
    summaries = [plots.read_calexp_summary(p) for p in inputs.calexps]
    logger.info("visit %d: PSF model shapes of %d calexps", params.visit, len(summaries))
    plots.save(plots.psf_focal_plane(summaries, camera, params.visit), outputs.psf_map)


def coadds(inputs, outputs, params, logger):
    camera = Camera.from_yaml(inputs.camera)
    band_of = {name: f.band for name, f in camera.filters.items()}
    images = {}
    for path, data_id in zip(inputs.calexps, params.data_ids):
        images[(data_id["patch"], data_id["filter"])] = fits.getdata(path, "IMAGE")
    logger.info("read %d coadd calexps", len(images))
    plots.save(plots.coadd_thumbnails(images), outputs.thumbnails)
    filters = sorted({f for _, f in images}, key=lambda f: "ugrizy".find(band_of.get(f, "z")))
    per_patch = {}
    for (patch, f), image in images.items():
        per_patch.setdefault(patch, {})[f] = image
    complete = {p: v for p, v in per_patch.items() if all(f in v for f in filters)}
    plots.save(plots.colour_composites(complete, filters), outputs.composite)


def main(snakemake):
    logger = sdlog.configure(snakemake.log[0])
    run = {"coadd": coadds, "psf_map": psf_map, "single_frame": single_frame}[snakemake.params.kind]
    run(snakemake.input, snakemake.output, snakemake.params, logger)


main(snakemake)
