"""Print the resolved config with each option's description and origin (rule show_config)."""
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

print(snakemake.params.text, end="")
Path(snakemake.log[0]).write_text(snakemake.params.text)
