# snakedrp: raw CCD frames → calibrated exposures and catalogs, the Snakemake way.
#
#   snakemake --cores 2                         # the ci demo: simulate, ingest, calibs, processCcd, validate
#   snakemake --cores 2 --config id="visit=903334..903338:2 ccd=0^1"
#   snakemake --cores 2 --config set="isr.do_flat=false" rerun=noflat
#   snakemake show_config                        # every option, its description and origin
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


include: "rules/common.smk"


wildcard_constraints:
    visit=r"\d+",
    ccd=r"\d+",
    filter=r"[A-Za-z0-9_\-]+",


include: "rules/simulate.smk"
include: "rules/ingest.smk"
include: "rules/calibs.smk"
include: "rules/single_frame.smk"
include: "rules/validate.smk"


rule all:
    input:
        get_all_targets(),
    default_target: True
