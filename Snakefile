# snakedrp: raw CCD frames → calibrated exposures and catalogs, the Snakemake way.
#
#   snakemake --cores 2                         # the ci demo: simulate, ingest, calibs, processCcd, coadds, object tables, validate
#   snakemake --cores 2 --config id="visit=903334..903338:2 ccd=0^1"
#   snakemake --cores 2 --config set="isr.do_flat=false" rerun=noflat
#   snakemake show_config                        # every option, its description and origin
#   snakemake coadd --cores 2                    # deep coadds of every band and patch, through detection
#   snakemake multiband --cores 2                # the multi-band object tables of every patch and tract
#   snakemake --cores 2 --config id="tract=0 patch=0..2,0..2 filter=HSC-R" select_id="visit=903334..903338"
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


include: "rules/common.smk"


wildcard_constraints:
    visit=r"\d+",
    ccd=r"\d+",
    filter=r"[A-Za-z0-9_\-]+",
    tract=r"\d+",
    patch=r"\d+_\d+",  # x_y: see snakedrp.repo.dataid.patch_in_path


# A repository of real data has no simulation rules: without them Snakemake does not plan a
# (never-run) simulate_raw job behind every raw file, which made survey-size dry runs 4x slower.
if SIMULATED_REPO:

    include: "rules/simulate.smk"


include: "rules/ingest.smk"
include: "rules/calibs.smk"
include: "rules/single_frame.smk"
include: "rules/validate.smk"
include: "rules/coadd.smk"
include: "rules/multiband.smk"
include: "rules/qa.smk"


rule all:
    input:
        get_default_targets(),
        get_all_coadd_targets,
    default_target: True
