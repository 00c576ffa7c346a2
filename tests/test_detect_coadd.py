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



def _add_moffat(image, xc, yc, flux, fwhm, beta, half):
    """Add a Moffat star [flux units] centred at zero-based ``(xc, yc)``, drawn within ``half`` pixels."""
    ny, nx = image.shape
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    x0, x1 = max(int(xc) - half, 0), min(int(xc) + half + 1, nx)
    y0, y1 = max(int(yc) - half, 0), min(int(yc) + half + 1, ny)
    y, x = np.mgrid[y0:y1, x0:x1]
    r2 = ((x - xc) ** 2 + (y - yc) ** 2) / alpha**2
    image[y0:y1, x0:x1] += (flux * (beta - 1) / (np.pi * alpha**2) * (1 + r2) ** -beta).astype(np.float32)


def test_background_does_not_eat_a_bright_stars_wings():
    # a crowded coadd on zero sky (unit noise): a bright Moffat (beta 2.5) star among 300 fainter ones
    from snakedrp.repo.exposure import Exposure
    from snakedrp.repo.psf_model import GaussianPsf

    n, fwhm, beta = 768, 5.0, 2.5
    rng = np.random.default_rng(2)
    star = np.zeros((n, n), np.float32)
    _add_moffat(star, n / 2 + 0.3, n / 2 - 0.2, 1e6, fwhm, beta, half=n)
    image = star.copy()
    for _ in range(300):
        _add_moffat(image, rng.uniform(0, n), rng.uniform(0, n), np.exp(rng.uniform(np.log(3e2), np.log(3e4))), fwhm, beta, 120)
    image += rng.normal(0.0, 1.0, (n, n)).astype(np.float32)
    coadd = Exposure(image=image, mask=np.zeros((n, n), np.int32), variance=np.ones((n, n), np.float32),
                     psf=GaussianPsf(fwhm / 2.3548, size=25))
    y, x = np.mgrid[0:n, 0:n]
    r = np.hypot(x - n / 2 - 0.3, y - n / 2 + 0.2)
    ring = (r > 5 * fwhm) & (r < 10 * fwhm)
    wing = float(star[ring].mean())

    def subtracted_fraction(config):
        calexp = detect_coadd(coadd, config=config).calexp
        return float((coadd.image - calexp.image)[ring].mean()) / wing

    # a background of every pixel takes in the wings (a quarter of this one's, 5-10 FWHM out) ...
    assert subtracted_fraction(DetectCoaddConfig(refine_background=False)) > 0.2
    # ... the refined one, with the sources masked well into their wings, a small part
    assert abs(subtracted_fraction(DetectCoaddConfig())) < 0.12
