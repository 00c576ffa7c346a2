"""Camera geometry: the "obs package" of snakedrp, read from ``config/cameras/<name>.yaml``.

Coordinate conventions
----------------------
- Pixel positions are zero-based ``(x, y)`` with ``x`` the column and ``y`` the row of an
  array indexed ``[y, x]``; pixel centres sit on integers. FITS (one-based) conventions appear
  only in FITS headers written through astropy.
- Focal-plane positions ``(x_mm, y_mm)`` are millimetres from the boresight.
- Field angles ``(rho_x, rho_y)`` are degrees on the sky before projection; the optical
  distortion maps undistorted field angle ``rho`` to the true angle ``theta`` radially:
  ``theta = rho * (1 + d3 * rho**2 + d5 * rho**4)`` (``rho`` in degrees).
- Tangent-plane coordinates ``(xi, eta)`` (degrees, ``xi`` towards East) are the field angles
  mirrored in x (sky parity) and rotated by the sky rotation angle; they are projected
  gnomonically about the pointing.
- Raw frames put each amplifier's pixels in readout order: its data section then its serial
  overscan; ``flip_x`` amplifiers are read from the right, so their data appear mirrored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import yaml

from snakedrp.yamlio import read_yaml

if TYPE_CHECKING:  # astropy.wcs is imported where a WCS is made: the Snakefile reads cameras, every job parses it
    from astropy.wcs import WCS


@dataclass(frozen=True)
class Box:
    """A pixel rectangle ``[y0:y1, x0:x1]`` (zero-based, half-open, numpy slicing)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @classmethod
    def from_list(cls, values) -> "Box":
        y0, y1, x0, x1 = (int(v) for v in values)
        return cls(y0, y1, x0, x1)


@dataclass(frozen=True)
class Amplifier:
    """One amplifier of a CCD.

    Sections are ``Box`` objects: ``raw_data`` and ``raw_overscan`` in the raw frame,
    ``assembled`` in the trimmed, assembled CCD image. Gain in e-/ADU, read noise in e-,
    saturation and bias level in ADU.
    """

    name: str
    raw_data: Box
    raw_overscan: Box
    assembled: Box
    flip_x: bool
    gain: float
    read_noise: float
    saturation: float
    bias_level: float


@dataclass(frozen=True)
class Ccd:
    """A detector of the focal plane: centre ``(x_mm, y_mm)`` and rotation (degrees, CCW)."""

    id: int
    x_mm: float
    y_mm: float
    rotation: float
    amplifiers: tuple[Amplifier, ...]
    defects: tuple[Box, ...] = ()


@dataclass(frozen=True)
class Filter:
    """Photometric filter: name, band (refcat column suffix), zeropoint (AB mag giving 1 e-/s),
    sky brightness (AB mag/arcsec^2), whether it fringes."""

    name: str
    band: str
    zeropoint: float
    sky_brightness: float
    fringe: bool = False


@dataclass(frozen=True)
class Camera:
    """A mosaic camera described by a YAML file; see ``config/cameras/``."""

    name: str
    pixel_scale: float  # arcsec per pixel at the boresight
    pixel_size: float  # mm
    ccd_shape: tuple[int, int]  # assembled (ny, nx)
    raw_shape: tuple[int, int]  # raw (ny, nx)
    ccds: dict[int, Ccd]
    filters: dict[str, Filter]
    distortion: tuple[float, float] = (0.0, 0.0)
    dark_current: float = 0.0  # e-/s/pixel
    source: dict = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | Path) -> "Camera":
        """Read a camera definition file."""
        return cls.from_dict(read_yaml(path))

    @classmethod
    def from_dict(cls, spec: dict) -> "Camera":
        amp_template = spec["amplifiers"]
        ccds = {}
        for c in spec["ccds"]:
            per_amp = c.get("amplifiers", [{}] * len(amp_template))
            amps = []
            for template, override in zip(amp_template, per_amp):
                a = {**template, **override}
                amps.append(
                    Amplifier(
                        name=str(a["name"]),
                        raw_data=Box.from_list(a["raw_data"]),
                        raw_overscan=Box.from_list(a["raw_overscan"]),
                        assembled=Box.from_list(a["assembled"]),
                        flip_x=bool(a.get("flip_x", False)),
                        gain=float(a["gain"]),
                        read_noise=float(a["read_noise"]),
                        saturation=float(a["saturation"]),
                        bias_level=float(a["bias_level"]),
                    )
                )
            defects = tuple(Box.from_list(d) for d in c.get("defects", []))
            ccds[int(c["id"])] = Ccd(
                id=int(c["id"]),
                x_mm=float(c["x_mm"]),
                y_mm=float(c["y_mm"]),
                rotation=float(c.get("rotation", 0.0)),
                amplifiers=tuple(amps),
                defects=defects,
            )
        filters = {
            name: Filter(name=name, band=str(f["band"]), zeropoint=float(f["zeropoint"]),
                         sky_brightness=float(f["sky_brightness"]), fringe=bool(f.get("fringe", False)))
            for name, f in spec["filters"].items()
        }
        dist = spec.get("distortion", {})
        return cls(
            name=spec["name"],
            pixel_scale=float(spec["pixel_scale"]),
            pixel_size=float(spec["pixel_size"]),
            ccd_shape=tuple(spec["ccd_shape"]),
            raw_shape=tuple(spec["raw_shape"]),
            ccds=ccds,
            filters=filters,
            distortion=(float(dist.get("d3", 0.0)), float(dist.get("d5", 0.0))),
            dark_current=float(spec.get("dark_current", 0.0)),
            source=spec,
        )

    def to_yaml(self) -> str:
        """The YAML text this camera was read from (written into data repositories)."""
        return yaml.safe_dump(self.source, sort_keys=False)

    @property
    def ccd_ids(self) -> list[int]:
        return sorted(self.ccds)

    # ------------------------------------------------------------ transforms
    @property
    def _deg_per_mm(self) -> float:
        return self.pixel_scale / 3600.0 / self.pixel_size

    def pixel_to_focal_plane(self, ccd: int, x, y):
        """Pixel ``(x, y)`` on CCD ``ccd`` → focal plane ``(x_mm, y_mm)``."""
        c = self.ccds[ccd]
        ny, nx = self.ccd_shape
        dx = (np.asarray(x, float) - (nx - 1) / 2.0) * self.pixel_size
        dy = (np.asarray(y, float) - (ny - 1) / 2.0) * self.pixel_size
        t = np.deg2rad(c.rotation)
        return (c.x_mm + np.cos(t) * dx - np.sin(t) * dy,
                c.y_mm + np.sin(t) * dx + np.cos(t) * dy)

    def focal_plane_to_pixel(self, ccd: int, x_mm, y_mm):
        """Inverse of :meth:`pixel_to_focal_plane`."""
        c = self.ccds[ccd]
        ny, nx = self.ccd_shape
        dx = np.asarray(x_mm, float) - c.x_mm
        dy = np.asarray(y_mm, float) - c.y_mm
        t = np.deg2rad(c.rotation)
        u = (np.cos(t) * dx + np.sin(t) * dy) / self.pixel_size
        v = (-np.sin(t) * dx + np.cos(t) * dy) / self.pixel_size
        return u + (nx - 1) / 2.0, v + (ny - 1) / 2.0

    def _distort(self, rho):
        d3, d5 = self.distortion
        return rho * (1.0 + d3 * rho**2 + d5 * rho**4)

    def focal_plane_to_field_angle(self, x_mm, y_mm):
        """Focal plane (mm) → true field angle ``(theta_x, theta_y)`` in degrees (distorted)."""
        rx = np.asarray(x_mm, float) * self._deg_per_mm
        ry = np.asarray(y_mm, float) * self._deg_per_mm
        rho = np.hypot(rx, ry)
        ratio = np.where(rho > 0, self._distort(rho) / np.where(rho > 0, rho, 1.0), 1.0)
        return rx * ratio, ry * ratio

    def field_angle_to_focal_plane(self, theta_x, theta_y):
        """Inverse of :meth:`focal_plane_to_field_angle` (Newton iterations on the radius)."""
        tx = np.asarray(theta_x, float)
        ty = np.asarray(theta_y, float)
        theta = np.hypot(tx, ty)
        rho = theta.copy()
        d3, d5 = self.distortion
        for _ in range(8):
            f = self._distort(rho) - theta
            fp = 1.0 + 3 * d3 * rho**2 + 5 * d5 * rho**4
            rho = rho - f / fp
        ratio = np.where(theta > 0, rho / np.where(theta > 0, theta, 1.0), 1.0)
        return tx * ratio / self._deg_per_mm, ty * ratio / self._deg_per_mm

    @staticmethod
    def _tangent_wcs(ra0: float, dec0: float) -> WCS:
        # A TAN projection whose "pixels" are tangent-plane degrees, centred on the pointing.
        from astropy.wcs import WCS

        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra0, dec0]
        w.wcs.crpix = [1.0, 1.0]  # zero-based (0, 0) is the tangent point
        w.wcs.cd = np.eye(2)
        return w

    @staticmethod
    def _sky_rotate(theta_x, theta_y, rotation: float):
        # Sky parity: East is left at rotation 0 (xi = -theta_x), then rotate by `rotation`.
        t = np.deg2rad(rotation)
        a, b = -np.asarray(theta_x), np.asarray(theta_y)
        return np.cos(t) * a - np.sin(t) * b, np.sin(t) * a + np.cos(t) * b

    @staticmethod
    def _sky_unrotate(xi, eta, rotation: float):
        t = np.deg2rad(rotation)
        a = np.cos(t) * xi + np.sin(t) * eta
        b = -np.sin(t) * xi + np.cos(t) * eta
        return -a, b

    def pixel_to_sky(self, ccd: int, x, y, ra0: float, dec0: float, rotation: float):
        """True mapping pixel → ``(ra, dec)`` degrees for a pointing and sky rotation (deg)."""
        fx, fy = self.pixel_to_focal_plane(ccd, x, y)
        tx, ty = self.focal_plane_to_field_angle(fx, fy)
        xi, eta = self._sky_rotate(tx, ty, rotation)
        ra, dec = self._tangent_wcs(ra0, dec0).wcs_pix2world(np.atleast_1d(xi), np.atleast_1d(eta), 0)
        return np.mod(ra, 360.0), dec

    def sky_to_pixel(self, ccd: int, ra, dec, ra0: float, dec0: float, rotation: float):
        """Inverse of :meth:`pixel_to_sky`."""
        xi, eta = self._tangent_wcs(ra0, dec0).wcs_world2pix(np.atleast_1d(ra), np.atleast_1d(dec), 0)
        tx, ty = self._sky_unrotate(xi, eta, rotation)
        fx, fy = self.field_angle_to_focal_plane(tx, ty)
        return self.focal_plane_to_pixel(ccd, fx, fy)

    def nominal_wcs(self, ccd: int, ra0: float, dec0: float, rotation: float) -> WCS:
        """TAN WCS from the pointing and camera geometry, without the optical distortion."""
        c = self.ccds[ccd]
        # boresight position in CCD pixel coordinates
        bx, by = self.focal_plane_to_pixel(ccd, 0.0, 0.0)
        t = np.deg2rad(c.rotation)
        pix_to_fp = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) * self.pixel_size
        s = np.deg2rad(rotation)
        sky = np.array([[np.cos(s), -np.sin(s)], [np.sin(s), np.cos(s)]]) @ np.diag([-1.0, 1.0])
        cd = sky @ pix_to_fp * self._deg_per_mm
        from astropy.wcs import WCS

        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra0, dec0]
        w.wcs.crpix = [float(bx) + 1.0, float(by) + 1.0]  # FITS CRPIX is one-based
        w.wcs.cd = cd
        w.pixel_shape = (self.ccd_shape[1], self.ccd_shape[0])
        return w

    def distortion_sip(self) -> tuple[np.ndarray, np.ndarray]:
        """The optical distortion as the forward SIP polynomials ``A``, ``B`` about the boresight.

        With ``(u, v)`` the pixel offset from the boresight and ``s`` the pixel scale [deg/pixel],
        the undistorted field angle is ``rho = s |(u, v)|`` and the distortion moves the pixel
        radially to ``(u, v) (1 + d3 rho^2 + d5 rho^4)``: a polynomial of order 3 (5 with
        ``d5``) in ``(u, v)``, so the SIP represents the camera's model exactly.

        Returns
        -------
        a, b : ndarray, shape (order + 1, order + 1)
            ``a[p, q]`` multiplies ``u**p v**q`` [pixel^(1 - p - q)]; order 3, or 5 with ``d5``.
        """
        d3, d5 = self.distortion
        s2 = (self.pixel_scale / 3600.0) ** 2
        order = 5 if d5 else 3
        a = np.zeros((order + 1, order + 1))
        b = np.zeros((order + 1, order + 1))
        # u (u^2 + v^2) and u (u^2 + v^2)^2 expanded; B is A with u and v swapped
        for (p, q), c in {(3, 0): d3 * s2, (1, 2): d3 * s2,
                          (5, 0): d5 * s2**2, (3, 2): 2 * d5 * s2**2, (1, 4): d5 * s2**2}.items():
            if c:
                a[p, q] = c
                b[q, p] = c
        return a, b

    def initial_wcs(self, ccd: int, ra0: float, dec0: float, rotation: float) -> WCS:
        """TAN-SIP WCS from the pointing and camera geometry, with the optical distortion.

        :meth:`nominal_wcs` (what a raw header holds) plus :meth:`distortion_sip` about the
        boresight: at the true pointing and rotation it equals :meth:`pixel_to_sky`. This is the
        starting WCS of the astrometric fit (as LSST builds its initial SkyWcs from the boresight
        and the camera model), which then only corrects pointing, rotation and scale. The inverse
        polynomials (AP, BP) are left out: world → pixel is ``all_world2pix``. Without
        distortion (``d3 = d5 = 0``), the nominal TAN.
        """
        w = self.nominal_wcs(ccd, ra0, dec0, rotation)
        if not any(self.distortion):
            return w
        from astropy.wcs import Sip

        a, b = self.distortion_sip()
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
        w.wcs.set()
        return w

    def ccd_corners_sky(self, ccd: int, ra0: float, dec0: float, rotation: float, margin: float = 0.0):
        """``(ra, dec)`` of the four CCD corners (degrees), optionally grown by ``margin`` pixels."""
        ny, nx = self.ccd_shape
        x = np.array([-margin, nx - 1 + margin, nx - 1 + margin, -margin])
        y = np.array([-margin, -margin, ny - 1 + margin, ny - 1 + margin])
        return self.pixel_to_sky(ccd, x, y, ra0, dec0, rotation)
