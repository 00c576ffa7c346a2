"""snakedrp.repo.compare: products compared by data, headers ignored."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Table

from snakedrp.repo.compare import compare_trees


def _write_tree(root, pixel=1.0, row=2.0, date="2026-01-01"):
    (root / "calexp").mkdir(parents=True)
    hdu = fits.PrimaryHDU(np.full((4, 5), pixel, np.float32))
    hdu.header["DATE"] = date
    fits.HDUList([hdu, fits.BinTableHDU(Table({"a": [1.0, row]}))]).writeto(root / "calexp" / "c.fits")
    pq.write_table(pa.table({"flux": [1.0, row]}), root / "src.parquet")
    (root / "logs").mkdir()
    fits.PrimaryHDU(np.array([[float(date[-1])]])).writeto(root / "logs" / "ignored.fits")


def test_same_data_other_headers_compare_equal(tmp_path):
    _write_tree(tmp_path / "a")
    _write_tree(tmp_path / "b", date="2026-12-02")
    result = compare_trees(tmp_path / "a", tmp_path / "b")
    assert result.ok and result.compared == 2


def test_a_changed_pixel_value_or_missing_file_is_reported(tmp_path):
    _write_tree(tmp_path / "a")
    _write_tree(tmp_path / "b", pixel=1.0 + 1e-6)
    _write_tree(tmp_path / "c", row=3.0)
    assert compare_trees(tmp_path / "a", tmp_path / "b").different == ["calexp/c.fits"]
    assert compare_trees(tmp_path / "a", tmp_path / "c").different == ["calexp/c.fits", "src.parquet"]
    (tmp_path / "c" / "src.parquet").unlink()
    assert compare_trees(tmp_path / "a", tmp_path / "c").only_in_a == ["src.parquet"]


def test_variable_length_array_columns_are_compared_row_by_row(tmp_path):
    for name, last in (("a", 3.0), ("b", 3.0), ("c", 4.0)):
        col = fits.Column(name="k", format="PD()", array=np.array([np.array([1.0, 2.0]), np.array([last])], dtype=object))
        (tmp_path / name).mkdir()
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([col])]).writeto(tmp_path / name / "psf.fits")
    assert compare_trees(tmp_path / "a", tmp_path / "b").ok
    assert compare_trees(tmp_path / "a", tmp_path / "c").different == ["psf.fits"]
