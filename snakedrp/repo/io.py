"""File helpers: every product is written atomically (temporary file, then rename), and
:func:`check_fits_file` tells a damaged FITS input (unreadable, truncated) in one line.

FITS files are written here directly, block by block, rather than through astropy's writers:
astropy byte-swaps every image twice (in place and back) and builds binary tables column
object by column object, which cost a CCD job about half of its writing time. The bytes are
the same a plain ``HDUList.writeto`` gives for images; tables carry the same cards and
astropy's serialized-column block, so ``Table.read`` gives back units, descriptions and meta.
Anything outside the simple cases (scaled or compressed images, masked, mixin, string-array
or TDISP columns) still goes through astropy.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.utils.exceptions import AstropyUserWarning

#: FITS block size [bytes]; every header and data unit is padded to a multiple of it.
FITS_BLOCK = 2880

#: Elements converted to big-endian per write; small enough to stay in cache.
_CHUNK = 1 << 18

#: FITS BITPIX of each image dtype that needs no BZERO/BSCALE.
_BITPIX = {np.dtype(np.uint8): 8, np.dtype(np.int16): 16, np.dtype(np.int32): 32,
           np.dtype(np.int64): 64, np.dtype(np.float32): -32, np.dtype(np.float64): -64}

#: Binary-table TFORM letter of each column dtype FITS stores without TZERO.
_TFORM = {"u1": "B", "i2": "I", "i4": "J", "i8": "K", "f4": "E", "f8": "D"}

#: A standard (non-HIERARCH) header keyword.
_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}")

#: Header keys a table's meta must not set (astropy skips them too).
_RESERVED = ("XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT", "TFIELDS",
             "THEAP", "SIMPLE", "EXTEND", "END")
_COLUMN_KEYS = ("TTYPE", "TFORM", "TUNIT", "TNULL", "TSCAL", "TZERO", "TDISP", "TBCOL", "TDIM",
                "TCTYP", "TCUNI", "TCRPX", "TCRVL", "TCDLT", "TRPOS", "TCOMM")


class FitsReadError(OSError):
    """A FITS file cannot be used: missing, unreadable or truncated; the message starts with its path."""


def check_fits_file(path: str | Path) -> None:
    """Check that ``path`` is a FITS file whose every header and data unit is complete.

    Reads the headers only. Astropy opens a truncated file with a warning and fails later, on
    the first data access, with an unrelated message ("buffer is too small"); this says what is
    wrong, naming the file.

    Raises
    ------
    FitsReadError
        The file is missing, not FITS, or shorter than its headers declare.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)  # "may have been truncated": measured below
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                needed = max(hdu._data_offset + hdu._data_size for hdu in hdul)
    except FileNotFoundError:
        raise FitsReadError(f"{path}: no such file") from None
    except Exception as err:  # astropy raises several types for damaged files
        raise FitsReadError(f"{path}: not a readable FITS file ({type(err).__name__}: {err})") from None
    if size < needed:
        raise FitsReadError(f"{path}: truncated ({size} bytes, headers and data need {needed})")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A job killed half-way leaves no partial product behind, so Snakemake never mistakes
    a truncated file for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_hdulist(hdulist: fits.HDUList, path: str | Path) -> None:
    """Write a FITS HDU list atomically.

    Unscaled images are written by :func:`write_fits`, with the bytes ``hdulist.writeto``
    would give; other HDU types go through astropy. No CHECKSUM cards: astropy dates their
    comments, and the same inputs must give the same bytes.
    """
    hdulist.update_extend()
    hdulist.verify("exception")
    if all(_plain_image(hdu) for hdu in hdulist):
        write_fits([(hdu.header, hdu.data) for hdu in hdulist], path)
        return
    with atomic_path(path) as tmp:
        hdulist.writeto(tmp, overwrite=True)


def write_fits(units: list[tuple[fits.Header | str, np.ndarray | None]], path: str | Path) -> None:
    """Write header-data units atomically, each header followed by its data, block-padded.

    Parameters
    ----------
    units : list of (astropy.io.fits.Header or str, ndarray or None)
        Complete headers (the first a primary one; a str is taken as the padded header
        blocks, END card included) and the data they describe, in any byte
        order; converted to big-endian a chunk at a time, so the arrays are never copied
        whole nor modified.
    path : str or Path
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for header, data in units:
            f.write((header if isinstance(header, str) else header.tostring()).encode("ascii"))
            if data is not None and data.size:
                _write_big_endian(f, data)
                f.write(bytes(-data.nbytes % FITS_BLOCK))


def write_table(table: Table, path: str | Path, *, parquet: bool = False) -> None:
    """Write an astropy table as FITS (units and descriptions kept), and Parquet beside it.

    The FITS file has an empty primary HDU and one binary table: ``TTYPEn``/``TFORMn``/
    ``TUNITn`` per column, ``table.meta`` as header cards, and each column's description in
    astropy's serialized-column comment block, so ``Table.read`` gives them back. The Parquet
    copy, when asked for, goes to the same path with a ``.parq`` suffix; it holds the units and
    descriptions both as each field's metadata (``unit``, ``description``) and in astropy's
    ``table_meta_yaml``. Units FITS cannot hold are mapped to FITS ones in both files:
    ``electron`` (calexp counts) becomes ``ct``.
    """
    table = table.copy(copy_data=False)
    for col in table.itercols():
        if col.unit is not None:
            col.unit = _fits_unit(col.unit)
    hdu = _bintable(table)
    if hdu is None:
        with atomic_path(path) as tmp:
            table.write(tmp, format="fits", overwrite=True)
    else:
        primary = fits.PrimaryHDU().header
        write_fits([(primary, None), hdu], path)
    if parquet:
        with atomic_path(Path(path).with_suffix(".parq")) as tmp:
            if not _write_parquet(table, tmp):
                table.write(tmp, format="parquet", overwrite=True)


def _fits_unit(unit):
    import astropy.units as u

    if isinstance(unit, u.CompositeUnit) and u.electron in unit.bases:
        out = u.Unit(unit.scale)
        for base, power in zip(unit.bases, unit.powers):
            out = out * (u.ct if base == u.electron else base) ** power
        return out
    return u.ct if unit == u.electron else unit


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


# ---------------------------------------------------------------------------- images
def _plain_image(hdu) -> bool:
    """True if ``hdu`` is an image whose header and data :func:`write_fits` can write as they are."""
    if type(hdu) not in (fits.PrimaryHDU, fits.ImageHDU):
        return False
    header, data = hdu.header, hdu.data
    if "BSCALE" in header or "BZERO" in header:
        return False
    if data is None:
        return header.get("NAXIS", 0) == 0
    if not isinstance(data, np.ndarray) or _BITPIX.get(data.dtype.newbyteorder("=")) != header.get("BITPIX"):
        return False
    return header.get("NAXIS") == data.ndim and all(
        header.get(f"NAXIS{i + 1}") == n for i, n in enumerate(reversed(data.shape)))


def _write_big_endian(f, data: np.ndarray) -> None:
    flat = np.ascontiguousarray(data).reshape(-1)
    big = flat.dtype.newbyteorder(">")
    if flat.dtype == big or flat.dtype.itemsize == 1:
        f.write(memoryview(flat).cast("B"))
        return
    buffer = np.empty(min(flat.size, _CHUNK), big)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK]
        out = buffer[:part.size]
        out[...] = part
        f.write(memoryview(out).cast("B"))


# ---------------------------------------------------------------------------- tables
def _bintable(table: Table) -> tuple[str, np.ndarray] | None:
    """The binary-table header blocks and big-endian rows of ``table``; None if astropy must write it."""
    if table.has_mixin_columns or table.masked:
        return None
    fields, forms, units = [], [], []
    for col in table.itercols():
        dt = col.dtype
        if isinstance(col, np.ma.MaskedArray) or col.info.format is not None or col.info.meta:
            return None
        if dt.kind == "b" and col.ndim == 1:
            fields.append((col.name, "u1"))
            forms.append(("L", None))
        elif dt.kind in "SU" and col.ndim == 1 and dt.itemsize:
            width = dt.itemsize // (4 if dt.kind == "U" else 1)
            fields.append((col.name, f"S{width}"))
            forms.append((f"{width}A", None))
        elif dt.str[1:] in _TFORM and dt.kind != "b":
            shape = col.shape[1:]
            count = int(np.prod(shape)) if shape else 1
            fields.append((col.name, dt.newbyteorder(">"), shape))
            tdim = "(" + ",".join(str(n) for n in reversed(shape)) + ")" if shape else None
            forms.append((f"{count}{_TFORM[dt.str[1:]]}" if shape else _TFORM[dt.str[1:]], tdim))
        else:
            return None
        if col.unit is None:
            units.append(None)
        else:
            try:
                units.append(col.unit.to_string(format="fits"))
            except ValueError:  # astropy would drop the unit with a warning
                return None
    meta_cards = _meta_cards(table.meta)
    if meta_cards is None:
        return None
    rows = np.empty(len(table), np.dtype(fields))
    for col, (name, *_) in zip(table.itercols(), fields):
        if col.dtype.kind == "b":
            rows[name] = np.where(col, ord("T"), ord("F"))
        elif col.dtype.kind == "U":
            try:
                rows[name] = np.char.encode(np.asarray(col), "ascii")
            except UnicodeEncodeError:
                return None
        else:
            rows[name] = col
    cards = [("XTENSION", "BINTABLE", "binary table extension"), ("BITPIX", 8, "array data type"),
             ("NAXIS", 2, "number of array dimensions"), ("NAXIS1", rows.dtype.itemsize, "length of dimension 1"),
             ("NAXIS2", len(rows), "length of dimension 2"), ("PCOUNT", 0, "number of group parameters"),
             ("GCOUNT", 1, "number of groups"), ("TFIELDS", len(fields), "number of table fields")]
    for i, (col, (form, tdim), unit) in enumerate(zip(table.itercols(), forms, units), start=1):
        cards.append((f"TTYPE{i}", col.name, ""))
        cards.append((f"TFORM{i}", form, ""))
        if unit is not None:
            cards.append((f"TUNIT{i}", unit, ""))
        if tdim is not None:
            cards.append((f"TDIM{i}", tdim, ""))
    try:
        images = [_card_image(*card) for card in cards + [(k, v, "") for k, v in meta_cards]]
    except ValueError:  # not a valid card: astropy skips it with a warning
        return None
    comments = ["--BEGIN-ASTROPY-SERIALIZED-COLUMNS--"]
    for line in _yaml_columns(table, None):
        # astropy's convention: 70 characters per COMMENT card, a trailing "\" continues the line
        chunks = [line[i:i + 70] for i in range(0, len(line), 70)] or [""]
        comments += [chunk + "\\" for chunk in chunks[:-1]] + chunks[-1:]
    comments.append("--END-ASTROPY-SERIALIZED-COLUMNS--")
    images += [f"COMMENT {text:72}" for text in comments]
    images.append(f"{'END':80}")
    header = "".join(images)
    header += " " * (-len(header) % FITS_BLOCK)
    return header, rows


def _card_image(key: str, value, comment: str) -> str:
    """The 80-column image(s) of one header card, formatted as astropy formats it.

    Short ASCII strings and integers under 8-character keys (all of a table's own cards) are
    formatted here, astropy's ``Card`` being slow; anything else is left to it.
    """
    if _KEYWORD.fullmatch(key):
        if isinstance(value, str) and value.isascii() and value.isprintable():
            quoted = value.replace("'", "''")
            field = f"'{quoted:8}'" if quoted else "''"
        elif isinstance(value, int) and not isinstance(value, bool):
            field = f"{value:>20d}"
        else:
            field = None
        if field is not None:
            image = f"{key:8}= {field:20}" + (f" / {comment}" if comment else "")
            if len(image) <= 80:
                return f"{image:80}"
    return str(fits.Card(key, value, comment))


def _meta_cards(meta) -> list[tuple[str, object]] | None:
    """``table.meta`` as (key, value) header cards; None if astropy must handle it."""
    cards = []
    for key, value in meta.items():
        upper = str(key).upper()
        if (not isinstance(key, str) or upper in _RESERVED or upper in ("COMMENT", "HISTORY")
                or upper.rstrip("0123456789") in _COLUMN_KEYS
                or not isinstance(value, (str, bool, int, float, np.generic))):
            return None
        cards.append((key, value.item() if isinstance(value, np.generic) else value))
    return cards


def _yaml_columns(table: Table, meta: dict | None) -> list[str]:
    """Astropy's serialized-column YAML: each column's name, unit, datatype and description.

    ``meta`` (scalars only) goes in the ``meta`` map, as for Parquet; None for FITS, whose
    table meta are header cards.
    """
    lines = ["datatype:"]
    for col in table.itercols():
        shape = col.shape[1:]
        datatype = "string" if shape or col.dtype.kind in "SU" else col.dtype.name
        items = [("name", _yaml_str(col.name))]
        if col.unit is not None:
            items.append(("unit", _yaml_str(col.unit.to_string())))
        items.append(("datatype", datatype))
        if col.info.description is not None:
            items.append(("description", _yaml_str(col.info.description)))
        if shape:
            items.append(("subtype", _yaml_str(f"{col.dtype.name}{list(shape)}".replace(" ", ""))))
        lines.append("- {" + ", ".join(f"{k}: {v}" for k, v in items) + "}")
    if meta is None:
        lines += ["meta: !!omap", "- __serialized_columns__: {}"]  # what astropy's FITS reader expects
    elif meta:
        lines.append("meta: !!omap")
        lines += [f"- {_yaml_str(key)}: {_yaml_scalar(value)}" for key, value in meta.items()]
    return lines


def _yaml_str(text: str) -> str:
    text = str(text)
    if text.isprintable():
        return "'" + text.replace("'", "''") + "'"
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _yaml_scalar(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"!!float {float(value)!r}"  # PyYAML reads "1e-05" as a string without the tag
    return _yaml_str(value)


def _write_parquet(table: Table, path: Path) -> bool:
    """Write ``table`` as Parquet with pyarrow; False (nothing written) if astropy must do it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if table.has_mixin_columns or table.masked or _meta_cards(table.meta) is None:
        return False
    fields, arrays, metadata = [], [], {}
    for col in table.itercols():
        if col.ndim != 1 or col.dtype.kind not in "biufSU":
            return False
        if isinstance(col, np.ma.MaskedArray):
            # a FITS float column read back with NaNs comes masked: NaN is its masked value here too
            if col.dtype.kind == "f":
                values = col.filled(np.nan)
            elif not np.any(col.mask):
                values = np.asarray(col.data)
            else:
                return False
        else:
            values = np.asarray(col)
        values = values.astype(values.dtype.newbyteorder("="), copy=False)
        field_meta = {}
        if col.unit is not None:
            field_meta["unit"] = col.unit.to_string()
        if col.info.description is not None:
            field_meta["description"] = col.info.description
        if col.dtype.kind == "U":
            metadata[f"table::len::{col.name}"] = str(col.dtype.itemsize // 4)
        elif col.dtype.kind == "S":
            metadata[f"table::len::{col.name}"] = str(col.dtype.itemsize)
        array = pa.array(values)
        fields.append(pa.field(col.name, array.type, metadata=field_meta or None))
        arrays.append(array)
    metadata["table_meta_yaml"] = "\n".join(_yaml_columns(table, dict(table.meta)))
    schema = pa.schema(fields, metadata=metadata)
    with pq.ParquetWriter(path, schema, version="2.4") as writer:
        writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    return True
