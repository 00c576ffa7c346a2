"""snakedrp: an astronomical data-reduction pipeline written as a Snakemake workflow.

The package holds the numerics (arrays, WCS objects and tables in, results out); the
workflow in ``Snakefile`` and ``rules/`` decides which files each step reads and writes.

The names a user types most are importable from the top (``from snakedrp import
ProcessCcdTask, Butler``); they load on first use, so that ``import snakedrp`` stays cheap for
the many short jobs of a workflow.
"""
from importlib import import_module

__version__ = "0.1.0"

#: Public name -> module that defines it.
_EXPORTS = {
    "Butler": "snakedrp.repo.butler",
    "Camera": "snakedrp.repo.camera",
    "Exposure": "snakedrp.repo.exposure",
    "Registry": "snakedrp.repo.registry",
    "IsrConfig": "snakedrp.isr.isr",
    "IsrTask": "snakedrp.isr.isr",
    "CharacterizeConfig": "snakedrp.single_frame.characterize",
    "CharacterizeTask": "snakedrp.single_frame.characterize",
    "CalibrateConfig": "snakedrp.single_frame.calibrate",
    "CalibrateTask": "snakedrp.single_frame.calibrate",
    "ProcessCcdConfig": "snakedrp.single_frame.process_ccd",
    "ProcessCcdTask": "snakedrp.single_frame.process_ccd",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'snakedrp' has no attribute {name!r}") from None
    return getattr(import_module(module), name)


def __dir__():
    return sorted(list(globals()) + __all__)
