"""Record the full config a rerun was run with (rule rerun_config)."""
from typing import TYPE_CHECKING

import yaml

from snakedrp.repo.io import write_text

if TYPE_CHECKING:
    from snakemake.script import snakemake

write_text(yaml.safe_dump(snakemake.params.config, sort_keys=False), snakemake.output[0])
