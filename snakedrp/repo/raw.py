"""Raw frames as the camera writes them: one FITS file per (visit, ccd), one HDU.

The data are unsigned 16-bit ADU (``BITPIX=16``, ``BZERO=32768``) in the raw layout of the
camera YAML (amplifier data in readout order, each followed by its serial overscan). The
header carries the keys in :data:`REQUIRED_KEYS` and a nominal TAN WCS for the *assembled*
CCD pixel grid, built from the telescope pointing without the optical distortion.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

#: Header keys every raw frame must carry, with their meaning.
REQUIRED_KEYS: dict[str, str] = {
    "VISIT": "exposure (visit) number",
    "CCD": "detector id, as in the camera YAML",
    "FILTER": "filter name; NONE for bias and dark",
    "OBSTYPE": "science, bias, dark, flat or fringe",
    "DATE-OBS": "UTC start of the exposure, ISO 8601",
    "MJD-OBS": "MJD (UTC) of the exposure start",
    "EXPTIME": "exposure time [s]",
    "DARKTIME": "dark time [s]",
    "AIRMASS": "airmass at the exposure start",
    "TELRA": "telescope pointing RA [deg]",
    "TELDEC": "telescope pointing Dec [deg]",
    "ROTANG": "sky rotation angle of the focal plane [deg]",
    "CAMERA": "camera name (config/cameras/<name>.yaml)",
}

OBSTYPES = ("science", "bias", "dark", "flat", "fringe")


class RawError(ValueError):
    """A raw file cannot be used: unreadable, truncated, or missing a required header key."""


@dataclass
class RawFrame:
    """A raw CCD frame.

    Attributes
    ----------
    data : ndarray, float32, shape (ny_raw, nx_raw)
        ADU in the camera's raw layout.
    header : astropy.io.fits.Header
    path : str or None
        The file it was read from (None for a frame made in memory); error messages name it.
    """

    data: np.ndarray
    header: fits.Header
    path: str | None = None

    @property
    def visit(self) -> int:
        return int(self.header["VISIT"])

    @property
    def ccd(self) -> int:
        return int(self.header["CCD"])

    @property
    def filter(self) -> str:
        return str(self.header["FILTER"])

    @classmethod
    def read(cls, path: str | Path) -> "RawFrame":
        """Read and check a raw file; :class:`RawError` names the file and the problem."""
        header = read_raw_header(path)
        try:
            with fits.open(path, do_not_scale_image_data=True) as hdul:
                stored = hdul[0].data
                if stored is None or stored.shape != (header["NAXIS2"], header["NAXIS1"]):
                    raise RawError(f"{path}: data missing or of the wrong shape")
                data = _adu_float32(stored, hdul[0].header)
        except RawError:
            raise
        except Exception as err:  # astropy raises several types for damaged files
            raise RawError(f"{path}: cannot read pixel data ({type(err).__name__}: {err})") from None
        return cls(data=data, header=header, path=str(path))


def _adu_float32(stored: np.ndarray, header: fits.Header) -> np.ndarray:
    """Stored FITS integers as float32 ADU, ``BZERO + BSCALE * stored``, in one pass.

    Unsigned 16-bit ADU are exact in float32; astropy would first make the uint16 array
    (``stored + BZERO``) and then a float32 copy of it.
    """
    bscale, bzero = header.get("BSCALE", 1), header.get("BZERO", 0)
    if bscale != 1 or stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2:
        return (stored * np.float64(bscale) + bzero).astype(np.float32)
    out = np.empty(stored.shape, np.float32)
    np.add(stored, np.float32(bzero), out=out)
    return out


def read_raw_header(path: str | Path) -> fits.Header:
    """Read a raw file's header, checking it is complete and that the file is not truncated."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)  # "may have been truncated": measured below
            with fits.open(path, memmap=False) as hdul:
                header = hdul[0].header.copy()
                # truncation shows as a file shorter than header + data
                expected = hdul[0]._data_offset + hdul[0]._data_size
    except Exception as err:
        raise RawError(f"{path}: not a readable FITS file ({type(err).__name__}: {err})") from None
    if path.stat().st_size < expected:
        raise RawError(f"{path}: truncated ({path.stat().st_size} bytes, header and data need {expected})")
    missing = [k for k in REQUIRED_KEYS if k not in header]
    if missing:
        raise RawError(f"{path}: missing required header key(s) {', '.join(missing)}")
    if header["OBSTYPE"] not in OBSTYPES:
        raise RawError(f"{path}: OBSTYPE {header['OBSTYPE']!r} is not one of {', '.join(OBSTYPES)}")
    return header


def camera_problem(header, camera) -> str | None:
    """What makes a raw header foreign to ``camera`` (its CAMERA, CCD or FILTER), or None.

    The header must hold :data:`REQUIRED_KEYS`. Bias and dark frames carry ``FILTER = NONE``;
    every other exposure needs one of the camera's filters (the filter chooses the flat, the
    fringe template and the reference band).
    """
    if str(header["CAMERA"]) != camera.name:
        return f"CAMERA {header['CAMERA']!r} is not this repository's camera {camera.name!r}"
    try:
        ccd = int(header["CCD"])
    except (TypeError, ValueError):
        return f"header key CCD = {header['CCD']!r} is not a valid integer"
    if ccd not in camera.ccds:
        return f"CCD {ccd} is not a detector of camera {camera.name!r} (ids {', '.join(map(str, camera.ccd_ids))})"
    if str(header["OBSTYPE"]) not in ("bias", "dark") and str(header["FILTER"]) not in camera.filters:
        return (f"FILTER {header['FILTER']!r} is not a filter of camera {camera.name!r} "
                f"({', '.join(camera.filters)})")
    return None


def check_raw(raw: RawFrame, camera, *, visit: int | None = None, ccd: int | None = None) -> None:
    """Check that ``raw`` belongs to ``camera`` and, if given, is the exposure ``(visit, ccd)``.

    A file whose header names another exposure than its data ID is a duplicate of that
    exposure or a misfiled frame; processing it would write one exposure's pixels under the
    other's name.

    Raises
    ------
    RawError
        Naming the file (``raw.path``) and the problem.
    """
    name = raw.path or "raw frame"
    if visit is not None and ccd is not None and (raw.visit, raw.ccd) != (int(visit), int(ccd)):
        raise RawError(f"{name}: the header says visit={raw.visit} ccd={raw.ccd}, not visit={visit} ccd={ccd} "
                       "(a duplicate of that exposure, or a misfiled file)")
    problem = camera_problem(raw.header, camera)
    if problem is not None:
        raise RawError(f"{name}: {problem}")
