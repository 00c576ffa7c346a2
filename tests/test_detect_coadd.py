"""Coadd detection: variance rescaled to the measured noise, stars found at their positions."""
import numpy as np

from test_warp import make_calexp, make_sky, patch_grid

from snakedrp.coadd.assemble import assemble_coadd
from snakedrp.coadd.config import DetectCoaddConfig
from snakedrp.coadd.detect_coadd import detect_coadd
from snakedrp.coadd.warp import warp_exposures
from snakedrp.repo.exposure import mask_bit


def _coadd(sky, shape=(260, 260)):
    wcs, shape = patch_grid(shape=shape)
    warps = [warp_exposures([make_calexp(sky, sigma=s, seed=50 + k, visit=k + 1, rotation=1 + 2 * k, shape=(320, 320))],
                            [{"visit": k + 1, "ccd": 0}], wcs, shape).exposure
             for k, s in enumerate([1.5, 2.0, 1.8])]
    return assemble_coadd(warps).coadd, wcs


def test_detects_the_stars_and_sets_detected():
    sky = make_sky(16, seed=8, margin=0.006)
    coadd, wcs = _coadd(sky)
    # the variance plane is off by a known factor: the rescaling must find it
    coadd.variance *= 0.5
    result = detect_coadd(coadd, config=DetectCoaddConfig())
    assert abs(result.variance_scale / 2.0 - 1) < 0.08
    ra, dec, _ = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    inside = (x > 10) & (x < 250) & (y > 10) & (y < 250)
    det = result.detections
    dist = np.array([np.min(np.hypot(det["x"] - xi, det["y"] - yi)) for xi, yi in zip(x[inside], y[inside])])
    assert (dist < 0.2).all()                     # every star found, at its position
    assert len(det) < inside.sum() + 5            # and few spurious peaks at 5 sigma
    detected = (result.calexp.mask & mask_bit("DETECTED")) != 0
    ix, iy = np.round(x[inside]).astype(int), np.round(y[inside]).astype(int)
    assert detected[iy, ix].all()
    assert {"id", "footprint_id", "x", "y", "peak_value", "coord_ra", "coord_dec"} <= set(det.colnames)


def test_noise_matches_rescaled_variance_on_pure_noise():
    coadd, _ = _coadd(make_sky(0))
    result = detect_coadd(coadd)
    good = result.calexp.mask == 0
    ratio = np.var(result.calexp.image[good]) / np.mean(result.calexp.variance[good])
    assert abs(ratio - 1) < 0.05
