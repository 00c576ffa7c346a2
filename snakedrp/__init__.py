"""snakedrp: an astronomical data-reduction pipeline written as a Snakemake workflow.

The package holds the numerics (arrays, WCS objects and tables in, results out); the
workflow in ``Snakefile`` and ``rules/`` decides which files each step reads and writes.
"""
__version__ = "0.1.0"
