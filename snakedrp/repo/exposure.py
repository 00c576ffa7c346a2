"""The ``Exposure``: image, mask and variance planes with WCS, PSF and zeropoint.

On disk an exposure is a multi-extension FITS file readable by astropy and ds9:

========  ==========================================================================
HDU       content
========  ==========================================================================
PRIMARY   metadata (VISIT, CCD, FILTER, ...), ``ZEROPT``/``ZEROPTER`` (AB mag of 1
          unit of image flux), provenance
IMAGE     float32 ``(ny, nx)``; the fitted WCS in its header
MASK      int32 bit mask; each plane declared as ``MP_<NAME> = bit``
VARIANCE  float32, in image units squared
PSF       the PSF model (see :mod:`snakedrp.meas.psf`), when there is one
========  ==========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from snakedrp.repo.io import write_hdulist
from snakedrp.repo.mask_planes import MASK_PLANES
from snakedrp.repo.psf_model import PsfModel, psf_from_hdu


def mask_bit(name: str) -> int:
    """Integer value of mask plane ``name`` (``1 << bit``)."""
    return 1 << MASK_PLANES[name]


def mask_bits(*names: str) -> int:
    """OR of several mask planes' values."""
    value = 0
    for name in names:
        value |= mask_bit(name)
    return value


@dataclass
class Exposure:
    """An image with its mask, variance, WCS, PSF and photometric zeropoint.

    Attributes
    ----------
    image : ndarray, float32, shape (ny, nx)
        Pixel values (electrons for calexps).
    mask : ndarray, int32, shape (ny, nx)
        Bit mask; see :data:`MASK_PLANES`.
    variance : ndarray, float32, shape (ny, nx)
        Per-pixel variance in image units squared.
    wcs : astropy.wcs.WCS or None
        Pixel → sky mapping (zero-based pixel convention when used with ``origin=0``).
    psf : PsfModel or None
    zeropoint, zeropoint_err : float or None
        AB magnitude of a source of total flux 1 (image units), and its 1-sigma error.
    metadata : astropy.io.fits.Header
        VISIT, CCD, FILTER, DATE-OBS, EXPTIME, ... and provenance keys.
    """

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    wcs: WCS | None = None
    psf: PsfModel | None = None
    zeropoint: float | None = None
    zeropoint_err: float | None = None
    metadata: fits.Header = field(default_factory=fits.Header)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def to_hdulist(self) -> fits.HDUList:
        primary = fits.PrimaryHDU(header=self.metadata.copy())
        if self.zeropoint is not None:
            primary.header["ZEROPT"] = (float(self.zeropoint), "AB mag of a source of total flux 1")
            primary.header["ZEROPTER"] = (float(self.zeropoint_err or 0.0), "zeropoint 1-sigma error [mag]")
        image_header = self.wcs.to_header(relax=True) if self.wcs is not None else fits.Header()
        hdus = [
            primary,
            # asarray: no copy when the planes already have the file's types (the writer never modifies them)
            fits.ImageHDU(np.asarray(self.image, np.float32), header=image_header, name="IMAGE"),
            fits.ImageHDU(np.asarray(self.mask, np.int32), name="MASK"),
            fits.ImageHDU(np.asarray(self.variance, np.float32), header=image_header, name="VARIANCE"),
        ]
        for name, bit in MASK_PLANES.items():
            key = f"MP_{name}" if len(name) <= 5 else f"HIERARCH MP_{name}"  # LSST's long keys
            hdus[2].header[key] = (bit, f"mask plane {name} is bit {bit}")
        if self.psf is not None:
            hdus.append(self.psf.to_hdu())
        return fits.HDUList(hdus)

    def write(self, path: str | Path) -> None:
        """Write atomically as a multi-extension FITS file (layout in the module docstring)."""
        write_hdulist(self.to_hdulist(), path)

    @classmethod
    def read(cls, path: str | Path, *, memmap: bool = False) -> "Exposure":
        """Read a file written by :meth:`write`.

        Parameters
        ----------
        path : str or Path
        memmap : bool
            Give the planes as astropy reads them, memory maps of the file in its (big-endian)
            byte order, instead of native copies: for inputs that are only read, such as master
            calibrations in ISR, this saves their copies (about 100 MB an HSC CCD) and the page
            faults of making them. The maps are copy-on-write: writing to a plane changes this
            process's pages, never the file.
        """
        with fits.open(path) as hdul:   # astropy memory-maps by default
            primary = hdul[0].header.copy()
            planes = [hdul[name].data for name in ("IMAGE", "MASK", "VARIANCE")]
            if memmap:
                image, mask, variance = planes
            else:
                image, mask, variance = (p.astype(t) for p, t in zip(planes, (np.float32, np.int32, np.float32)))
            wcs = WCS(hdul["IMAGE"].header) if "CTYPE1" in hdul["IMAGE"].header else None
            psf = psf_from_hdu(hdul["PSF"]) if "PSF" in hdul else None
        return cls(
            image=image,
            mask=mask,
            variance=variance,
            wcs=wcs,
            psf=psf,
            zeropoint=primary.get("ZEROPT"),
            zeropoint_err=primary.get("ZEROPTER"),
            metadata=primary,
        )
