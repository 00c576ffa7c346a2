"""Mask plane bits, as the LSST stack numbers them.

A module of its own (no imports) so that the config classes can check plane names without
importing :mod:`snakedrp.repo.exposure` and astropy; :mod:`snakedrp.repo.exposure` re-exports it.
"""
from __future__ import annotations

#: Mask plane bits, as the LSST stack numbers them.
MASK_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
    "CLIPPED": 9,   # coadd artifact rejection: a warp pixel excluded as an outlier
    "INEXACT_PSF": 10,  # coadd pixel where a warp with data was left out: the coadd PSF is not exact there
}
