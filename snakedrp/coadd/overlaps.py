"""Which calexps touch which patches: footprints from the calexps' WCSs, and the overlap table.

A calexp's footprint is its pixel box mapped to the sky by the WCS fitted in astrometry (the
header's TAN-SIP), so the overlaps are known only after single-frame processing; the workflow's
``make_overlaps`` checkpoint writes them and decides which warps exist.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from spherical_geometry.polygon import SphericalPolygon

from snakedrp.coadd.skymap import SkyMap, box_polygon, format_patch

#: Columns of the overlap table (deepCoadd_overlaps): name → (dtype, description).
OVERLAP_COLUMNS = {
    "visit": ("i8", "exposure number of the calexp"),
    "ccd": ("i4", "detector id of the calexp"),
    "filter": ("U16", "filter of the calexp"),
    "tract": ("i8", "tract whose grid the calexp touches"),
    "patch": ("U16", "patch (x,y) whose outer box the calexp touches"),
}


@dataclass(frozen=True)
class Footprint:
    """One calexp's area on the sky.

    Attributes
    ----------
    visit, ccd : int
    filter : str
    polygon : SphericalPolygon
        The CCD's pixel box (outer pixel edges) on the sky.
    """

    visit: int
    ccd: int
    filter: str
    polygon: SphericalPolygon


def calexp_polygon(header: fits.Header, *, steps: int = 4) -> SphericalPolygon:
    """The sky polygon of a calexp from its image header (WCS and NAXIS1/NAXIS2 only, no pixels).

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header of the calexp's IMAGE extension.
    steps : int
        Vertices per side; the fitted SIP distortion bends the edges slightly.
    """
    nx, ny = int(header["NAXIS1"]), int(header["NAXIS2"])
    if "CTYPE1" not in header:
        raise ValueError("the calexp header has no WCS (CTYPE1 missing)")
    return box_polygon(WCS(header), 0, 0, nx, ny, steps=steps)


def empty_overlap_table() -> Table:
    table = Table(names=list(OVERLAP_COLUMNS), dtype=[d for d, _ in OVERLAP_COLUMNS.values()])
    for name, (_, doc) in OVERLAP_COLUMNS.items():
        table[name].description = doc
    return table


def find_overlaps(skymap: SkyMap, footprints: Iterable[Footprint]) -> Table:
    """Every (visit, ccd) × (tract, patch) pair whose footprint meets the patch's outer box.

    Returns
    -------
    astropy.table.Table
        Columns :data:`OVERLAP_COLUMNS`, one row per pair, sorted by visit, ccd, tract, patch.
    """
    rows = []
    for fp in footprints:
        for tract, index in skymap.find_patches(fp.polygon):
            rows.append((int(fp.visit), int(fp.ccd), str(fp.filter), int(tract), format_patch(index)))
    table = empty_overlap_table()
    for row in sorted(rows, key=lambda r: (r[0], r[1], r[3], tuple(int(v) for v in r[4].split(",")))):
        table.add_row(row)
    table.meta["comments"] = ["snakedrp: which calexps touch which patches (outer boxes)"]
    return table


def overlap_index(table: Table) -> dict[tuple[int, str], dict[int, list[int]]]:
    """``(tract, patch)`` → ``{visit: [ccd, ...]}`` from an overlap table (visits and ccds sorted)."""
    table = table.copy(copy_data=False)
    table.convert_bytestring_to_unicode()  # FITS gives the patch names as bytes
    out: dict[tuple[int, str], dict[int, list[int]]] = {}
    for visit, ccd, tract, patch in zip(np.asarray(table["visit"]), np.asarray(table["ccd"]),
                                        np.asarray(table["tract"]), np.asarray(table["patch"])):
        out.setdefault((int(tract), str(patch)), {}).setdefault(int(visit), []).append(int(ccd))
    return {key: {v: sorted(c) for v, c in sorted(visits.items())} for key, visits in sorted(out.items())}


def coadd_exclusion(metadata) -> str | None:
    """Why a calexp must stay out of the coadds, from its primary header, or None.

    A calexp whose astrometric fit failed (``WCSFAIL``, see ``calibrate.require_astrometry``)
    carries only the camera's WCS and no zeropoint: warped, it would smear its stars.
    """
    reason = metadata.get("WCSFAIL")
    return f"astrometric fit failed ({reason})" if reason else None
