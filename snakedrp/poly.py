"""Two-dimensional polynomial bases for quantities that vary smoothly over a CCD (PSF pixels,
aperture corrections). Positions are normalised, ``u = (x - x_center) / x_scale``.
"""
from __future__ import annotations

import numpy as np


# ---------------------------------------------------------------- polynomial basis in (x, y)
def poly_terms(degree: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of ``u**i * v**j`` for total degree <= ``degree``, ordered by degree then j.

    Degree 2 gives ``1, u, v, u^2, uv, v^2``; this order is the first axis of :class:`PixelPsf`'s
    coefficient cube.
    """
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def poly_basis(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """Basis values at normalised positions: shape ``(len(u), n_terms)``."""
    u = np.atleast_1d(np.asarray(u, float))
    v = np.atleast_1d(np.asarray(v, float))
    return np.stack([u**i * v**j for i, j in poly_terms(degree)], axis=-1)
