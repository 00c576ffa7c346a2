"""RawFrame.read: ADU as float32, the values astropy's scaled reading gives."""
import numpy as np
import pytest
from astropy.io import fits

from snakedrp.repo.raw import REQUIRED_KEYS, RawFrame


def _raw_header():
    header = fits.Header()
    for key in REQUIRED_KEYS:
        header[key] = {"OBSTYPE": "science", "FILTER": "HSC-R", "DATE-OBS": "2026-01-01T00:00:00",
                       "CAMERA": "hsc"}.get(key, 1)
    return header


@pytest.mark.parametrize("stored, scale", [(np.uint16, None), (np.int16, 0.5), (np.float32, None)])
def test_raw_adu_match_astropys_scaled_data(tmp_path, stored, scale):
    adu = np.random.default_rng(0).integers(0, 65535, size=(6, 5)).astype(stored)
    hdu = fits.PrimaryHDU(adu, header=_raw_header())
    if scale is not None:
        hdu.scale("int16", bscale=scale, bzero=100.0)
    hdu.writeto(tmp_path / "raw.fits")
    raw = RawFrame.read(tmp_path / "raw.fits")
    assert raw.data.dtype == np.float32
    assert np.array_equal(raw.data, fits.getdata(tmp_path / "raw.fits").astype(np.float32))
