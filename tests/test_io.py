"""snakedrp.repo.io: products read back as astropy writes them, byte for byte where astropy is the reference."""
import io
import shutil
import subprocess

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import MaskedColumn, Table

from snakedrp.repo.exposure import Exposure
from snakedrp.repo.io import _fits_unit, write_hdulist, write_table


@pytest.fixture
def catalog():
    """A small source table with the column kinds our catalogs have, plus provenance meta."""
    rng = np.random.default_rng(3)
    t = Table()
    t["id"] = np.arange(5, dtype=np.int64)
    t["parent"] = np.zeros(5, np.int32)
    t["x_centroid"] = rng.uniform(0, 2048, 5)
    t["psf_flux"] = rng.normal(1e4, 10, 5).astype(np.float32)
    t["psf_flux_flag"] = [True, False, False, True, False]
    t["band"] = ["r", "r", "i", "i", "z"]
    t["shape"] = rng.normal(size=(5, 2, 3))
    t["psf_flux"].unit = u.electron
    t["x_centroid"].unit = u.pix
    t["psf_flux_flag"].unit = u.dimensionless_unscaled
    t["shape"].unit = u.electron / u.s ** 2
    for name in t.colnames:
        t[name].description = f"{name}: a description with 'quotes', a # and a colon, long enough to need " \
                              "more than one seventy-character COMMENT card in the FITS header"
    t["id"].description = "unique id"
    t.meta.update({"CFGSECT": "process_ccd", "CFGHASH": "0123abcd", "SWNAM0": "numpy", "NSRC": 5, "SCALE": 1e-5,
                   "origin": "lower-case key", "NOTE": "a string too long for one card, " * 4, "DONE": True})
    return t


def _astropy_reference(table, path):
    """What astropy's own writers make of ``table`` once its units are mapped as write_table maps them."""
    ref = table.copy(copy_data=False)
    for col in ref.itercols():
        if col.unit is not None:
            col.unit = _fits_unit(col.unit)
    ref.write(path, format="fits")
    return path


def _assert_same_tables(ours, theirs):
    assert ours.colnames == theirs.colnames
    for name in ours.colnames:
        assert ours[name].unit == theirs[name].unit, name
        assert ours[name].description == theirs[name].description, name
        assert ours[name].dtype.newbyteorder("=") == theirs[name].dtype.newbyteorder("="), name
        assert np.array_equal(ours[name], theirs[name]), name
    assert dict(ours.meta) == dict(theirs.meta)


def test_table_reads_back_as_astropys_own_fits(catalog, tmp_path):
    write_table(catalog, tmp_path / "ours.fits")
    ref = _astropy_reference(catalog, tmp_path / "ref.fits")
    _assert_same_tables(Table.read(tmp_path / "ours.fits"), Table.read(ref))
    with fits.open(tmp_path / "ours.fits") as ours, fits.open(ref) as theirs:
        assert ours[0].header.tostring() == theirs[0].header.tostring()
        # every card but the YAML comments (another emitter, same content) is astropy's, as is every row byte
        cards = [[str(c) for c in h[1].header.cards if c.keyword != "COMMENT"] for h in (ours, theirs)]
        assert cards[0] == cards[1]
        assert ours[1].data.tobytes() == theirs[1].data.tobytes()
        assert ours[1].header["TUNIT4"] == "count"  # electron has no FITS name; ct is written "count"


def test_table_parquet_keeps_units_descriptions_and_meta(catalog, tmp_path):
    flat = catalog.copy()
    del flat["shape"]
    write_table(flat, tmp_path / "src.fits", parquet=True)
    parquet = Table.read(tmp_path / "src.parq")
    assert parquet["psf_flux"].unit == u.ct and parquet["psf_flux_flag"].unit == u.dimensionless_unscaled
    reference = flat.copy()
    for col in reference.itercols():
        if col.unit is not None:
            col.unit = _fits_unit(col.unit)
    reference.write(tmp_path / "ref.parq")
    _assert_same_tables(parquet, Table.read(tmp_path / "ref.parq"))
    import pyarrow.parquet as pq

    field = pq.read_schema(tmp_path / "src.parq").field("psf_flux")
    assert field.metadata[b"unit"] == b"ct" and field.metadata[b"description"].startswith(b"psf_flux:")


def test_a_float_column_read_back_masked_keeps_its_parquet_metadata(catalog, tmp_path):
    """FITS float columns with NaN read back masked; their Parquet copy holds NaN and the units."""
    flat = catalog.copy()
    del flat["shape"]
    flat["psf_flux"][1] = np.nan
    write_table(flat, tmp_path / "src.fits", parquet=True)
    read = Table.read(tmp_path / "src.fits")
    read["psf_flux"] = MaskedColumn(read["psf_flux"], mask=np.isnan(read["psf_flux"]))
    write_table(read, tmp_path / "again.fits", parquet=True)
    import pyarrow.parquet as pq

    parquet = pq.read_table(tmp_path / "again.parq")
    assert parquet.schema.field("psf_flux").metadata[b"unit"] == b"ct"
    values = parquet.column("psf_flux").to_numpy()
    assert np.isnan(values[1]) and np.array_equal(values, np.asarray(flat["psf_flux"]), equal_nan=True)


def test_tables_astropy_must_write_still_round_trip(catalog, tmp_path):
    masked = catalog.copy()
    masked["parent"] = MaskedColumn(masked["parent"], mask=[0, 1, 0, 0, 0])
    write_table(masked, tmp_path / "masked.fits", parquet=True)  # string-array/masked: astropy's writers
    back = Table.read(tmp_path / "masked.fits")
    assert back["parent"].mask[1] and back["x_centroid"].description == catalog["x_centroid"].description
    assert Table.read(tmp_path / "masked.parq")["shape"].unit == u.ct / u.s ** 2


def test_same_inputs_give_the_same_bytes(catalog, tmp_path):
    for name in ("a", "b"):
        write_table(catalog, tmp_path / f"{name}.fits")
    assert (tmp_path / "a.fits").read_bytes() == (tmp_path / "b.fits").read_bytes()


@pytest.fixture
def exposure():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(30, 40)).astype(np.float32)
    header = fits.Header([("VISIT", 12), ("CCD", 3), ("FILTER", "HSC-R")])
    return Exposure(image, (image > 1).astype(np.int32), np.ones_like(image), zeropoint=27.0,
                    zeropoint_err=0.01, metadata=header)


def test_images_are_written_as_astropy_writes_them(exposure, tmp_path):
    before = exposure.image.copy()
    exposure.write(tmp_path / "calexp.fits")
    buf = io.BytesIO()
    exposure.to_hdulist().writeto(buf)
    assert (tmp_path / "calexp.fits").read_bytes() == buf.getvalue()
    assert np.array_equal(exposure.image, before)  # converted to big-endian by copies, not in place
    back = Exposure.read(tmp_path / "calexp.fits")
    assert np.array_equal(back.image, exposure.image) and back.zeropoint == 27.0


def test_memory_mapped_planes_equal_the_copies_and_leave_the_file_alone(exposure, tmp_path):
    path = tmp_path / "calexp.fits"
    exposure.write(path)
    before = path.read_bytes()
    copied, mapped = Exposure.read(path), Exposure.read(path, memmap=True)
    for name in ("image", "mask", "variance"):
        plane = getattr(mapped, name)
        assert plane.dtype.byteorder == ">"                      # as stored, not converted
        assert np.array_equal(plane, getattr(copied, name))
    mapped.image[0, 0] += 1.0                                    # copy-on-write
    del mapped
    assert path.read_bytes() == before


def test_scaled_images_go_through_astropy(tmp_path):
    data = np.arange(12, dtype=np.uint16).reshape(3, 4) + 60000  # BZERO=32768
    write_hdulist(fits.HDUList([fits.PrimaryHDU(data)]), tmp_path / "raw.fits")
    assert np.array_equal(fits.getdata(tmp_path / "raw.fits"), data)


def test_a_failed_write_leaves_nothing(catalog, tmp_path):
    bad = catalog.copy()
    bad["obj"] = np.array([object()] * 5)
    with pytest.raises(Exception):
        write_table(bad, tmp_path / "bad.fits")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("fitsverify") is None, reason="fitsverify not installed")
def test_fitsverify_finds_no_error(catalog, exposure, tmp_path):
    write_table(catalog, tmp_path / "src.fits")
    exposure.write(tmp_path / "calexp.fits")
    for name in ("src.fits", "calexp.fits"):
        out = subprocess.run(["fitsverify", "-q", str(tmp_path / name)], capture_output=True, text=True)
        # a warning is allowed: the long NOTE card uses CONTINUE without LONGSTRN, as astropy writes it
        assert "verification OK" in out.stdout or " 0 errors" in out.stdout, out.stdout
