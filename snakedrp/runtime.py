"""Process-level tuning for a processing job: how the C allocator and numpy get memory.

A CCD job makes many full-image temporaries (2048×4176 float32 is 34 MB). glibc serves every
block above its mmap threshold with a fresh ``mmap`` and unmaps it on ``free``, and numpy asks
for transparent huge pages on large arrays, so each new temporary is faulted in and zeroed by
the kernel again: about a quarter of a CCD's CPU time went to that. :func:`tune_memory` keeps
freed blocks in the process's heap instead, so they are reused without faulting.

Call it once at the start of a job script (it changes process-wide allocator state, so the
package itself never calls it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

#: glibc ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks below this many bytes come from the heap rather than their own ``mmap``; above every
#: array a CCD job makes, below ``INT_MAX`` (``mallopt`` takes an ``int``).
MMAP_THRESHOLD = 1 << 30
#: Free memory at the top of the heap is given back to the system only above this many bytes.
TRIM_THRESHOLD = 1 << 30


@dataclass(frozen=True)
class MemoryTuning:
    """What :func:`tune_memory` changed.

    Attributes
    ----------
    malloc : bool
        True if glibc accepted both the mmap and the trim threshold.
    numpy_hugepage : bool or None
        numpy's huge-page ``madvise`` setting before the call; None if this numpy has no switch.
    """

    malloc: bool
    numpy_hugepage: bool | None


def tune_memory(*, hugepage: bool = False) -> MemoryTuning:
    """Make freed large arrays reusable without page faults, for the rest of the process.

    Sets glibc's mmap threshold to :data:`MMAP_THRESHOLD` and its trim threshold to
    :data:`TRIM_THRESHOLD` (both in bytes) through ``mallopt``, and switches numpy's huge-page
    ``madvise`` for large arrays to ``hugepage`` (the switch behind ``NUMPY_MADVISE_HUGEPAGE``).
    Where the C library is not glibc the allocator part is a silent no-op.

    The cost is memory: the heap keeps its high-water mark until the process ends, which suits
    a job that processes one CCD and exits.

    Parameters
    ----------
    hugepage : bool, optional
        Whether numpy should still ask for transparent huge pages.

    Returns
    -------
    MemoryTuning
    """
    return MemoryTuning(malloc=_tune_malloc(), numpy_hugepage=_set_numpy_hugepage(hugepage))


def _tune_malloc() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok


def _set_numpy_hugepage(enabled: bool) -> bool | None:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    setter = getattr(core.multiarray, "_set_madvise_hugepage", None)
    if setter is None:
        return None
    return bool(setter(enabled))
