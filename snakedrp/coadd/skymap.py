"""The sky map of the deep coadds: tracts and patches (makeSkyMap, makeDiscreteSkyMap).

A *tract* is a region of sky with one projection (TAN or STG) and one pixel grid, cut into
square *patches* of ``patch_inner`` x ``patch_inner`` pixels. Each patch grows by
``patch_border`` pixels on every side into its *outer* box, the grid on which warps and coadds
are made, so neighbouring patches overlap by twice the border. Patch ``(x, y)`` (written
``"x,y"`` in paths and data IDs) is column ``x``, row ``y`` of the tract's grid; its outer box
starts at tract pixel ``(x * patch_inner, y * patch_inner)`` and its inner box
``patch_border`` pixels further in. The tract grid has a border all round, so every outer box
has the same shape and lies inside the tract. Pixels are zero-based, pixel centres at integers.

Two kinds of sky map, chosen by :attr:`SkyMapConfig.type`:

``discrete``
    One tract (id 0) centred on the selected calexps. Its inner area is the square about the
    smallest circle (about the footprints' mean direction) that holds every footprint vertex, so
    it does not depend on the field's orientation, and the field sits in the middle patch.
``rings``
    A fixed all-sky map: ``n_rings`` declination rings of height ``180 / (n_rings + 1)`` deg
    between two polar caps, each ring cut in RA into as many tracts as keep a tract's width at the
    ring's equator-side edge within the ring height; tract 0 is the south cap, ids run ring by
    ring eastwards from RA 0, the last id is the north cap. Every tract's grid covers its cell
    plus ``tract_overlap`` on every side, so neighbouring tracts overlap.

The file (``deepCoadd_skyMap``, YAML) holds only the definition; tracts, patches and their WCSs
are derived from it, so a (tract, patch) id means the same sky for as long as the definition is
unchanged (for ``rings``: forever, whichever data arrive).

Sky polygons are :class:`spherical_geometry.polygon.SphericalPolygon`; projections are astropy
WCSs.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml
from astropy.coordinates import angular_separation
from astropy.wcs import WCS
from spherical_geometry import vector
from spherical_geometry.polygon import SphericalPolygon

from snakedrp.coadd.config import PROJECTIONS, SkyMapConfig
from snakedrp.repo.dataid import DataIdError, patch_id
from snakedrp.repo.io import write_text

#: Version tag written into sky-map files.
FORMAT = "snakedrp-skymap-1"


class SkyMapError(ValueError):
    """A tract or patch id that the sky map does not have, or a malformed sky-map file."""


# ------------------------------------------------------------------ geometry helpers
def box_polygon(wcs: WCS, x0: float, y0: float, nx: int, ny: int, *, steps: int = 1) -> SphericalPolygon:
    """The sky polygon of a pixel box (outer pixel edges), vertices in counter-clockwise pixel order.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Pixel → sky (zero-based pixels).
    x0, y0 : float
        Zero-based pixel index of the box's first column and row.
    nx, ny : int
        Box size [pixels].
    steps : int
        Vertices per side. In a TAN projection a straight pixel line is a great circle, so 1
        (the corners) is exact; distorted (SIP) or STG grids need a few.
    """
    t = np.arange(steps) / steps
    left, right = x0 - 0.5, x0 + nx - 0.5
    bottom, top = y0 - 0.5, y0 + ny - 0.5
    xs = np.concatenate([left + (right - left) * t, np.full(steps, right), right - (right - left) * t,
                         np.full(steps, left)])
    ys = np.concatenate([np.full(steps, bottom), bottom + (top - bottom) * t, np.full(steps, top),
                         top - (top - bottom) * t])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    centre = wcs.all_pix2world([x0 + (nx - 1) / 2], [y0 + (ny - 1) / 2], 0)
    return SphericalPolygon.from_lonlat(ra, dec, center=(float(centre[0][0]), float(centre[1][0])))


def polygon_lonlat(polygon: SphericalPolygon) -> tuple[np.ndarray, np.ndarray]:
    """Every vertex of a (possibly multi-part) polygon, once, as ``(ra, dec)`` arrays [deg].

    spherical_geometry closes each part by repeating its first vertex; the copy is dropped, so
    that means over the vertices are not pulled towards it.
    """
    parts = [(np.asarray(lon)[:-1], np.asarray(lat)[:-1]) for lon, lat in polygon.to_lonlat()]
    return np.concatenate([lon for lon, _ in parts]), np.concatenate([lat for _, lat in parts])


def _mean_direction(ra: np.ndarray, dec: np.ndarray) -> tuple[float, float]:
    xyz = np.asarray(vector.lonlat_to_vector(ra, dec, degrees=True))
    mean = vector.normalize_vector(xyz.mean(axis=1))
    lon, lat = vector.vector_to_lonlat(*mean, degrees=True)
    return float(lon) % 360.0, float(lat)


def _separation(ra0: float, dec0: float, ra, dec) -> np.ndarray:
    """Angular separation [deg] of (ra, dec) from (ra0, dec0), all in degrees."""
    return np.degrees(angular_separation(np.radians(ra0), np.radians(dec0), np.radians(ra), np.radians(dec)))


def tangent_wcs(ra: float, dec: float, *, projection: str, pixel_scale: float, crpix=(1.0, 1.0)) -> WCS:
    """A north-up, east-left celestial WCS about ``(ra, dec)`` [deg] (pixel_scale in arcsec/pixel).

    ``crpix`` is FITS one-based, as in the header.
    """
    if projection not in PROJECTIONS:
        raise SkyMapError(f"projection {projection!r} is not one of {', '.join(PROJECTIONS)}")
    w = WCS(naxis=2)
    w.wcs.ctype = [f"RA---{projection}", f"DEC--{projection}"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = list(crpix)
    scale = pixel_scale / 3600.0
    w.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    w.wcs.set()
    return w


# ------------------------------------------------------------------ tracts and patches
@dataclass(frozen=True)
class PatchInfo:
    """One patch of a tract.

    Attributes
    ----------
    tract : int
    index : (int, int)
        ``(x, y)``: column and row in the tract's patch grid.
    wcs : astropy.wcs.WCS
        WCS of the patch's outer box: zero-based pixel (0, 0) is the outer box's first pixel.
    outer_shape : (int, int)
        ``(ny, nx)`` of the outer box [pixels].
    outer_origin : (int, int)
        ``(x0, y0)`` of the outer box in tract pixels.
    inner_bbox : (int, int, int, int)
        ``(x0, y0, nx, ny)`` of the inner box relative to the outer box.
    polygon : SphericalPolygon
        The inner box on the sky (the area this patch owns).
    outer_polygon : SphericalPolygon
        The outer box on the sky (what a warp of this patch covers).
    """

    tract: int
    index: tuple[int, int]
    wcs: WCS
    outer_shape: tuple[int, int]
    outer_origin: tuple[int, int]
    inner_bbox: tuple[int, int, int, int]
    polygon: SphericalPolygon
    outer_polygon: SphericalPolygon

    @property
    def name(self) -> str:
        """The patch id as written in paths and data IDs, ``"x,y"``."""
        return format_patch(self.index)

    @property
    def inner_slices(self) -> tuple[slice, slice]:
        """``(rows, columns)`` slices of the inner box in an outer-box array."""
        x0, y0, nx, ny = self.inner_bbox
        return slice(y0, y0 + ny), slice(x0, x0 + nx)


@dataclass(frozen=True)
class TractInfo:
    """One tract: centre, projection and patch grid.

    Attributes
    ----------
    id : int
    ra, dec : float
        Projection centre [deg], at the middle of the tract's pixel grid.
    n_patches : (int, int)
        ``(n_x, n_y)``: patches along x (columns) and y (rows).
    patch_inner, patch_border : int
        [pixels]
    pixel_scale : float
        [arcsec/pixel]
    projection : str
        ``TAN`` or ``STG``.
    """

    id: int
    ra: float
    dec: float
    n_patches: tuple[int, int]
    patch_inner: int
    patch_border: int
    pixel_scale: float
    projection: str

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the whole tract grid [pixels], borders included."""
        n_x, n_y = self.n_patches
        return n_y * self.patch_inner + 2 * self.patch_border, n_x * self.patch_inner + 2 * self.patch_border

    @cached_property
    def wcs(self) -> WCS:
        """WCS of the tract grid (zero-based pixel (0, 0) at the first pixel of patch 0,0's outer box)."""
        ny, nx = self.shape
        w = tangent_wcs(self.ra, self.dec, projection=self.projection, pixel_scale=self.pixel_scale,
                        crpix=((nx + 1) / 2, (ny + 1) / 2))
        w.pixel_shape = (nx, ny)
        return w

    @property
    def patches(self) -> list[tuple[int, int]]:
        """Every patch index ``(x, y)``, row by row."""
        n_x, n_y = self.n_patches
        return [(x, y) for y in range(n_y) for x in range(n_x)]

    def _steps(self) -> int:
        return 1 if self.projection == "TAN" else 8

    @cached_property
    def polygon(self) -> SphericalPolygon:
        """The whole tract grid on the sky."""
        ny, nx = self.shape
        return box_polygon(self.wcs, 0, 0, nx, ny, steps=self._steps())

    @cached_property
    def radius(self) -> float:
        """Largest angular distance [deg] from the centre to the tract's boundary (a coarse pre-filter)."""
        ny, nx = self.shape
        corners_x, corners_y = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5]), np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        ra, dec = self.wcs.all_pix2world(corners_x, corners_y, 0)
        return float(_separation(self.ra, self.dec, ra, dec).max())

    def check_patch(self, index: tuple[int, int]) -> tuple[int, int]:
        """``index`` as a tuple of ints, or :class:`SkyMapError` naming the grid."""
        x, y = (int(v) for v in index)
        n_x, n_y = self.n_patches
        if not (0 <= x < n_x and 0 <= y < n_y):
            raise SkyMapError(f"tract {self.id} has no patch {x},{y}; its patches are 0..{n_x - 1},0..{n_y - 1}")
        return x, y

    def patch_info(self, index: tuple[int, int] | str) -> PatchInfo:
        """The patch ``index`` = ``(x, y)`` or ``"x,y"``."""
        x, y = self.check_patch(parse_patch(index) if isinstance(index, str) else index)
        size = self.patch_inner + 2 * self.patch_border
        x0, y0 = x * self.patch_inner, y * self.patch_inner
        w = self.wcs.deepcopy()
        w.wcs.crpix = [w.wcs.crpix[0] - x0, w.wcs.crpix[1] - y0]
        w.pixel_shape = (size, size)
        w.wcs.set()
        b, n, steps = self.patch_border, self.patch_inner, self._steps()
        return PatchInfo(
            tract=self.id, index=(x, y), wcs=w, outer_shape=(size, size), outer_origin=(x0, y0),
            inner_bbox=(b, b, n, n),
            polygon=box_polygon(self.wcs, x0 + b, y0 + b, n, n, steps=steps),
            outer_polygon=box_polygon(self.wcs, x0, y0, size, size, steps=steps),
        )

    def find_patches(self, polygon: SphericalPolygon) -> list[tuple[int, int]]:
        """Patches whose outer boxes intersect ``polygon`` (e.g. a calexp's footprint), row by row."""
        ra, dec = polygon_lonlat(polygon)
        if not np.all(_separation(self.ra, self.dec, ra, dec) < 80.0):
            return []  # the tract's projection cannot hold the polygon (and the tract cannot reach it)
        x, y = self.wcs.all_world2pix(ra, dec, 0)
        n_x, n_y = self.n_patches
        size = self.patch_inner + 2 * self.patch_border
        # candidate range from the vertices' pixel box; the exact test below decides
        lo_x = max(0, int(math.floor((x.min() - size) / self.patch_inner)))
        hi_x = min(n_x - 1, int(math.floor((x.max() + 0.5) / self.patch_inner)))
        lo_y = max(0, int(math.floor((y.min() - size) / self.patch_inner)))
        hi_y = min(n_y - 1, int(math.floor((y.max() + 0.5) / self.patch_inner)))
        found = []
        for py in range(lo_y, hi_y + 1):
            for px in range(lo_x, hi_x + 1):
                if self.patch_info((px, py)).outer_polygon.intersects_poly(polygon):
                    found.append((px, py))
        return found

    def describe(self) -> str:
        """One line for the log: centre, size and patch grid (as makeDiscreteSkyMap reports it)."""
        ny, nx = self.shape
        deg = self.pixel_scale / 3600.0
        return (f"tract {self.id}: centre RA {self.ra:.5f} Dec {self.dec:+.5f} deg, "
                f"{nx * deg:.3f} x {ny * deg:.3f} deg ({nx} x {ny} pixels of {self.pixel_scale:g} arcsec, "
                f"{self.projection}), {self.n_patches[0]} x {self.n_patches[1]} patches of {self.patch_inner} "
                f"pixels + {self.patch_border} border")


def format_patch(index: tuple[int, int]) -> str:
    """``(1, 2)`` → ``"1,2"``."""
    return f"{int(index[0])},{int(index[1])}"


def parse_patch(text: str) -> tuple[int, int]:
    """``"1,2"`` (or the path form ``"1_2"``) → ``(1, 2)``; :class:`SkyMapError` if malformed."""
    try:
        x, y = patch_id(text).split(",")
    except DataIdError as err:
        raise SkyMapError(str(err)) from None
    return int(x), int(y)


def _grid_size(half_x: float, half_y: float, patch_inner: int) -> tuple[int, int]:
    """Patches needed for a grid centred on the projection centre reaching ``half_*`` pixels each way."""
    return (max(1, math.ceil(2 * half_x / patch_inner - 1e-9)), max(1, math.ceil(2 * half_y / patch_inner - 1e-9)))


# ------------------------------------------------------------------ sky maps
class _Tracts(Mapping):
    """Tract id → :class:`TractInfo`, made on first use (a rings map has thousands)."""

    def __init__(self, skymap: "SkyMap"):
        self._skymap = skymap

    def __getitem__(self, tract_id: int) -> TractInfo:
        return self._skymap.tract_info(tract_id)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._skymap.n_tracts))

    def __len__(self) -> int:
        return self._skymap.n_tracts


class SkyMap:
    """Tracts and patches; base of :class:`DiscreteSkyMap` and :class:`RingsSkyMap`.

    Attributes
    ----------
    kind : str
        ``discrete`` or ``rings``.
    projection : str
    pixel_scale : float
        [arcsec/pixel]
    patch_inner, patch_border : int
        [pixels]
    tracts : Mapping[int, TractInfo]
        Every tract by id (ids 0 .. n_tracts - 1).
    """

    kind = ""

    def __init__(self, *, projection: str, pixel_scale: float, patch_inner: int, patch_border: int):
        if projection not in PROJECTIONS:
            raise SkyMapError(f"projection {projection!r} is not one of {', '.join(PROJECTIONS)}")
        if pixel_scale <= 0:
            raise SkyMapError(f"pixel_scale must be positive, got {pixel_scale}")
        self.projection = projection
        self.pixel_scale = float(pixel_scale)
        self.patch_inner = int(patch_inner)
        self.patch_border = int(patch_border)
        self.tracts: Mapping[int, TractInfo] = _Tracts(self)
        self._cache: dict[int, TractInfo] = {}

    # subclasses set n_tracts and give _make_tract and _definition (and candidate_tracts, to be fast)
    n_tracts = 0

    def tract_info(self, tract_id: int) -> TractInfo:
        """The tract ``tract_id`` (made once, then cached)."""
        tract_id = self.check_tract(tract_id)
        if tract_id not in self._cache:
            self._cache[tract_id] = self._make_tract(tract_id)
        return self._cache[tract_id]

    def _make_tract(self, tract_id: int) -> TractInfo:
        raise NotImplementedError

    def candidate_tracts(self, ra: np.ndarray, dec: np.ndarray) -> list[int]:
        """Tracts that may reach a polygon with these vertices (a superset; every tract by default)."""
        return list(range(self.n_tracts))

    def _definition(self) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------ common API
    def check_tract(self, tract_id: int) -> int:
        if not isinstance(tract_id, (int, np.integer)) or not 0 <= int(tract_id) < self.n_tracts:
            last = f"0..{self.n_tracts - 1}" if self.n_tracts > 1 else "0"
            raise SkyMapError(f"the {self.kind} sky map has no tract {tract_id}; its tracts are {last}")
        return int(tract_id)

    def patch_info(self, tract: int, patch: tuple[int, int] | str) -> PatchInfo:
        """The patch ``patch`` (``(x, y)`` or ``"x,y"``) of tract ``tract``."""
        return self.tracts[self.check_tract(tract)].patch_info(patch)

    def find_tracts(self, polygon: SphericalPolygon) -> list[int]:
        """Tracts whose grids intersect ``polygon``, in id order."""
        ra, dec = polygon_lonlat(polygon)
        return [t for t in self.candidate_tracts(ra, dec) if self.tracts[t].polygon.intersects_poly(polygon)]

    def find_patches(self, polygon: SphericalPolygon) -> list[tuple[int, tuple[int, int]]]:
        """``(tract, (x, y))`` of every patch whose outer box intersects ``polygon``."""
        return [(t, p) for t in self.find_tracts(polygon) for p in self.tracts[t].find_patches(polygon)]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "projection": self.projection,
                "pixel_scale": self.pixel_scale, "patch_inner": self.patch_inner,
                "patch_border": self.patch_border, **self._definition()}

    def write(self, path: str | Path) -> None:
        """Write the definition as YAML (atomically)."""
        write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), path)

    @classmethod
    def from_dict(cls, values: dict) -> "SkyMap":
        values = dict(values)
        if values.pop("format", None) != FORMAT:
            raise SkyMapError(f"not a {FORMAT} sky map")
        kind = values.pop("kind", None)
        if kind not in SKYMAP_KINDS:
            raise SkyMapError(f"unknown sky-map kind {kind!r}; known: {', '.join(SKYMAP_KINDS)}")
        return SKYMAP_KINDS[kind]._from_values(values)

    @classmethod
    def read(cls, path: str | Path) -> "SkyMap":
        """Read a file written by :meth:`write`."""
        try:
            return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})
        except SkyMapError as err:
            raise SkyMapError(f"{path}: {err}") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, SkyMap) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n_tracts} tracts, {self.projection}, {self.pixel_scale:g} arcsec/pixel)"


class DiscreteSkyMap(SkyMap):
    """Explicit tracts (makeDiscreteSkyMap makes one, id 0, about the data).

    Parameters
    ----------
    tracts : sequence of dict
        Each ``{"ra": deg, "dec": deg, "n_patches": [n_x, n_y]}``; ids are the positions.
    """

    kind = "discrete"

    def __init__(self, tracts: Sequence[dict], **kwargs):
        super().__init__(**kwargs)
        self._tracts = [dict(ra=float(t["ra"]), dec=float(t["dec"]), n_patches=[int(v) for v in t["n_patches"]])
                        for t in tracts]
        self.n_tracts = len(self._tracts)

    @classmethod
    def from_footprints(cls, footprints: Sequence[SphericalPolygon], *, margin: float = 0.0, **kwargs) -> "DiscreteSkyMap":
        """One tract enclosing ``footprints`` (e.g. the calexps' WCS polygons).

        Parameters
        ----------
        footprints : sequence of SphericalPolygon
        margin : float
            Added to the enclosing radius [arcsec].
        **kwargs
            projection, pixel_scale [arcsec/pixel], patch_inner, patch_border [pixels].
        """
        if not footprints:
            raise SkyMapError("a discrete sky map needs at least one calexp footprint")
        ra, dec = (np.concatenate(v) for v in zip(*(polygon_lonlat(p) for p in footprints)))
        ra0, dec0 = _mean_direction(ra, dec)
        radius = float(_separation(ra0, dec0, ra, dec).max()) + margin / 3600.0
        if radius >= 80.0:
            raise SkyMapError(f"the calexps span {radius:.1f} deg from their centre; use the rings sky map")
        # the square about the enclosing circle, measured in the projection's own pixels (TAN and
        # STG are radially symmetric about the centre, so one point at that distance gives it)
        w = tangent_wcs(ra0, dec0, projection=kwargs["projection"], pixel_scale=kwargs["pixel_scale"],
                        crpix=(1.0, 1.0))
        probe_dec = dec0 + radius if dec0 + radius <= 90.0 else dec0 - radius
        x, y = w.all_world2pix([ra0], [probe_dec], 0)
        half = float(np.hypot(x[0], y[0]))
        n = _grid_size(half, half, kwargs["patch_inner"])
        return cls([{"ra": ra0, "dec": dec0, "n_patches": list(n)}], **kwargs)

    @classmethod
    def _from_values(cls, values: dict) -> "DiscreteSkyMap":
        try:
            return cls(values.pop("tracts"), **values)
        except (KeyError, TypeError) as err:
            raise SkyMapError(f"malformed discrete sky map ({err})") from None

    def _make_tract(self, tract_id: int) -> TractInfo:
        t = self._tracts[tract_id]
        return TractInfo(id=tract_id, ra=t["ra"], dec=t["dec"], n_patches=tuple(t["n_patches"]),
                         patch_inner=self.patch_inner, patch_border=self.patch_border,
                         pixel_scale=self.pixel_scale, projection=self.projection)

    def _definition(self) -> dict:
        return {"tracts": [dict(t) for t in self._tracts]}


class RingsSkyMap(SkyMap):
    """The fixed all-sky sky map: declination rings of tracts between two polar caps.

    Parameters
    ----------
    n_rings : int
        Rings between the caps; ring height ``180 / (n_rings + 1)`` deg, each cap half that.
    tract_overlap : float
        How far each tract's grid reaches beyond its cell [deg].
    """

    kind = "rings"

    def __init__(self, *, n_rings: int, tract_overlap: float, **kwargs):
        super().__init__(**kwargs)
        if n_rings < 1:
            raise SkyMapError(f"n_rings must be at least 1, got {n_rings}")
        self.n_rings = int(n_rings)
        self.tract_overlap = float(tract_overlap)
        self.ring_height = 180.0 / (self.n_rings + 1)
        counts = []
        for i in range(self.n_rings):
            lo, hi = self.ring_bounds(i)
            nearest_equator = 0.0 if lo <= 0.0 <= hi else min(abs(lo), abs(hi))
            counts.append(max(1, math.ceil(360.0 * math.cos(math.radians(nearest_equator)) / self.ring_height - 1e-9)))
        self.ring_counts = counts
        self.ring_first = np.concatenate([[1], 1 + np.cumsum(counts)]).astype(int)  # first id of each ring
        self.n_tracts = int(self.ring_first[-1]) + 1

    def ring_bounds(self, ring: int) -> tuple[float, float]:
        """Declination range [deg] of ring ``ring`` (0 = southernmost)."""
        centre = -90.0 + (ring + 1) * self.ring_height
        return centre - self.ring_height / 2, centre + self.ring_height / 2

    def cell(self, tract_id: int) -> tuple[int, tuple[float, float], tuple[float, float]]:
        """``(ring, (ra_min, ra_max), (dec_min, dec_max))`` of a tract's cell [deg]; ring -1 / n_rings for the caps."""
        tract_id = self.check_tract(tract_id)
        cap = self.ring_height / 2
        if tract_id == 0:
            return -1, (0.0, 360.0), (-90.0, -90.0 + cap)
        if tract_id == self.n_tracts - 1:
            return self.n_rings, (0.0, 360.0), (90.0 - cap, 90.0)
        ring = int(np.searchsorted(self.ring_first, tract_id, side="right") - 1)
        j = tract_id - int(self.ring_first[ring])
        width = 360.0 / self.ring_counts[ring]
        return ring, (j * width - width / 2, j * width + width / 2), self.ring_bounds(ring)

    def find_tract(self, ra: float, dec: float) -> int:
        """The tract whose cell holds ``(ra, dec)`` [deg] (where an object at that position belongs)."""
        cap = self.ring_height / 2
        if dec < -90.0 + cap:
            return 0
        if dec >= 90.0 - cap:
            return self.n_tracts - 1
        ring = min(self.n_rings - 1, int((dec + 90.0 - cap) // self.ring_height))
        n = self.ring_counts[ring]
        return int(self.ring_first[ring]) + int(math.floor(((ra % 360.0) / (360.0 / n)) + 0.5)) % n

    def _make_tract(self, tract_id: int) -> TractInfo:
        ring, (ra0, ra1), (dec0, dec1) = self.cell(tract_id)
        ov = self.tract_overlap
        if ring in (-1, self.n_rings):
            centre = (0.0, -90.0 if ring < 0 else 90.0)
            colat = self.ring_height / 2 + ov
            phi = np.linspace(0.0, 360.0, 72, endpoint=False)
            ra, dec = phi, np.full_like(phi, (-90.0 + colat) if ring < 0 else (90.0 - colat))
        else:
            centre = ((ra0 + ra1) / 2 % 360.0, -90.0 + (ring + 1) * self.ring_height)
            d_lo, d_hi = max(dec0 - ov, -89.999), min(dec1 + ov, 89.999)
            # the overlap in RA grows towards the pole: take it at the cell's most polar edge
            widen = ov / max(math.cos(math.radians(max(abs(d_lo), abs(d_hi)))), 1e-6)
            r_lo, r_hi = ra0 - widen, ra1 + widen
            if r_hi - r_lo >= 180.0:  # a ring of one or two tracts: the projection cannot span it
                raise SkyMapError(f"ring {ring} has too few tracts for a tangent projection; use more rings")
            s = np.linspace(0.0, 1.0, 33)
            ra = np.concatenate([r_lo + (r_hi - r_lo) * s, np.full_like(s, r_hi), r_lo + (r_hi - r_lo) * s, np.full_like(s, r_lo)])
            dec = np.concatenate([np.full_like(s, d_lo), d_lo + (d_hi - d_lo) * s, np.full_like(s, d_hi), d_lo + (d_hi - d_lo) * s])
        w = tangent_wcs(*centre, projection=self.projection, pixel_scale=self.pixel_scale)
        x, y = w.all_world2pix(ra % 360.0, dec, 0)
        n = _grid_size(float(np.abs(x).max()), float(np.abs(y).max()), self.patch_inner)
        return TractInfo(id=tract_id, ra=float(centre[0]), dec=float(centre[1]), n_patches=n,
                         patch_inner=self.patch_inner, patch_border=self.patch_border,
                         pixel_scale=self.pixel_scale, projection=self.projection)

    def candidate_tracts(self, ra: np.ndarray, dec: np.ndarray) -> list[int]:
        # Rings whose declination band (grown by the overlap and a patch) meets the polygon's,
        # then tracts whose centres are close enough; find_tracts does the exact test.
        pad = self.tract_overlap + (self.patch_inner + 2 * self.patch_border) * self.pixel_scale / 3600.0
        ra0, dec0 = _mean_direction(ra, dec)
        reach = float(_separation(ra0, dec0, ra, dec).max())
        lo, hi = float(np.min(dec)) - pad, float(np.max(dec)) + pad
        if dec0 + reach >= 90.0 - self.ring_height / 2 - pad:
            hi = 90.0
        if dec0 - reach <= -90.0 + self.ring_height / 2 + pad:
            lo = -90.0
        ids = []
        if lo <= -90.0 + self.ring_height / 2 + pad:
            ids.append(0)
        for ring in range(self.n_rings):
            r_lo, r_hi = self.ring_bounds(ring)
            if r_hi + pad >= lo and r_lo - pad <= hi:
                ids.extend(range(int(self.ring_first[ring]), int(self.ring_first[ring + 1])))
        if hi >= 90.0 - self.ring_height / 2 - pad:
            ids.append(self.n_tracts - 1)
        if not ids:
            return []
        ids = np.asarray(ids)
        centres = np.array([self._centre(int(t)) for t in ids])
        # a tract's grid reaches at most its half-cell plus the overlap and a patch from its centre,
        # along either axis (ring tracts are no wider than the ring is high)
        bound = math.sqrt(2.0) * (self.ring_height / 2 + pad) * 1.2
        near = _separation(ra0, dec0, centres[:, 0], centres[:, 1]) <= reach + bound
        return [int(t) for t in ids[near]]

    def _centre(self, tract_id: int) -> tuple[float, float]:
        ring, (ra0, ra1), _ = self.cell(tract_id)
        if ring == -1:
            return 0.0, -90.0
        if ring == self.n_rings:
            return 0.0, 90.0
        return (ra0 + ra1) / 2 % 360.0, -90.0 + (ring + 1) * self.ring_height

    @classmethod
    def _from_values(cls, values: dict) -> "RingsSkyMap":
        try:
            return cls(**values)
        except TypeError as err:
            raise SkyMapError(f"malformed rings sky map ({err})") from None

    def _definition(self) -> dict:
        return {"n_rings": self.n_rings, "tract_overlap": self.tract_overlap}


#: Sky-map kind (config ``coadd.skymap.type``) → class.
SKYMAP_KINDS: dict[str, type[SkyMap]] = {"discrete": DiscreteSkyMap, "rings": RingsSkyMap}


def make_skymap(config: SkyMapConfig, *, camera_pixel_scale: float,
                footprints: Sequence[SphericalPolygon] = ()) -> SkyMap:
    """The sky map a config describes.

    Parameters
    ----------
    config : SkyMapConfig
    camera_pixel_scale : float
        [arcsec/pixel], used when ``config.pixel_scale`` is 0.
    footprints : sequence of SphericalPolygon
        The calexps' footprints (``discrete`` only; ``rings`` ignores them).
    """
    common = dict(projection=config.projection, pixel_scale=config.pixel_scale or camera_pixel_scale,
                  patch_inner=config.patch_inner, patch_border=config.patch_border)
    if config.type == "discrete":
        return DiscreteSkyMap.from_footprints(footprints, margin=config.margin, **common)
    return RingsSkyMap(n_rings=config.n_rings, tract_overlap=config.tract_overlap / 3600.0, **common)
