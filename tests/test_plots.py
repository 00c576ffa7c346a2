"""QA plots (snakedrp.validate.plots) on small synthetic inputs: each writes a PNG with content."""
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from matplotlib.image import imread

from snakedrp.repo.camera import Camera
from snakedrp.validate import plots

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def camera():
    return Camera.from_yaml(ROOT / "config/cameras/ci.yaml")


def written(fig, path) -> np.ndarray:
    plots.save(fig, path)
    image = imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.01  # not a blank canvas
    return image


def summaries(camera, visits=(1, 2)):
    rng = np.random.default_rng(0)
    out = []
    for v in visits:
        for ccd in camera.ccd_ids:
            x, y = np.meshgrid([100.0, 900.0], [200.0, 1800.0])
            out.append(dict(visit=v, ccd=ccd, filter="HSC-R", zeropoint=32.0 + rng.normal(0, 0.01),
                            zeropoint_err=0.002, x=x.ravel(), y=y.ravel(), fwhm=rng.uniform(4, 5, 4),
                            e1=rng.normal(0, 0.03, 4), e2=rng.normal(0, 0.03, 4)))
    return out


def matches(n=600, seed=1):
    rng = np.random.default_rng(seed)
    mag = rng.uniform(16, 21, n)
    return Table(dict(visit=rng.choice([1, 2], n), ccd=rng.choice([0, 1, 2, 3], n), filter=np.full(n, "HSC-R"),
                      x=rng.uniform(0, 1024, n), y=rng.uniform(0, 2048, n), dra=rng.normal(0, 10, n),
                      ddec=rng.normal(0, 10, n), psf_mag=mag + rng.normal(0, 0.01, n), psf_mag_err=np.full(n, 0.01),
                      ref_mag=mag, used=np.ones(n, bool)))


def test_psf_focal_plane(tmp_path, camera):
    written(plots.psf_focal_plane(summaries(camera), camera, 1), tmp_path / "psf.png")


def test_zeropoints_with_truth(tmp_path, camera):
    s = summaries(camera)
    truth = {(r["visit"], r["ccd"]): r["zeropoint"] + 0.001 for r in s}
    written(plots.zeropoints(s, truth), tmp_path / "zp.png")


def test_astrometric_quiver_and_residuals(tmp_path, camera):
    m = matches()
    written(plots.astrometric_quiver(m, camera, bin_mm=8.0), tmp_path / "quiver.png")
    written(plots.residuals_vs_magnitude(m), tmp_path / "resid.png")


def test_colour_diagrams_two_bands_against_reference(tmp_path):
    rng = np.random.default_rng(2)
    n = 300
    ra, dec = 150 + (np.arange(n) % 20) * 0.003, 2 + (np.arange(n) // 20) * 0.003  # 10" apart: never merged
    r = rng.uniform(17, 22, n)
    colour = rng.uniform(0.1, 0.7, n)
    rows = []
    for f, mag in (("HSC-R", r), ("HSC-I", r - colour)):
        rows.append(Table(dict(coord_ra=ra, coord_dec=dec, psf_mag=mag, psf_snr=np.full(n, 100.0), kron_mag=mag,
                               extendedness=np.zeros(n), x_centroid=np.zeros(n), y_centroid=np.zeros(n),
                               visit=np.full(n, 1 if f == "HSC-R" else 2), ccd=np.zeros(n, int), filter=np.full(n, f))))
    from astropy.table import vstack

    objects = plots.match_bands(vstack(rows))
    assert len(objects) == n and (objects["n_HSC-R"] == 1).all() and (objects["n_HSC-I"] == 1).all()
    assert np.sort(objects["psf_mag_HSC-R"] - objects["psf_mag_HSC-I"]) == pytest.approx(np.sort(colour))
    reference = Table(dict(ra=ra, dec=dec, mag_r=r, mag_i=r - colour))
    written(plots.colour_diagrams(objects, ["HSC-R", "HSC-I"], reference, {"HSC-R": "r", "HSC-I": "i"}),
            tmp_path / "colours.png")


def test_completeness_curves(tmp_path):
    rng = np.random.default_rng(3)
    mag = rng.uniform(16, 25, 3000)
    detected = rng.random(3000) < 1 / (1 + np.exp((mag - 23.5) / 0.3))
    t = Table(dict(mag=mag, detected=detected, is_star=rng.random(3000) < 0.5))
    written(plots.completeness_curves({"HSC-R": t}), tmp_path / "compl.png")
    centres = np.arange(16.25, 25, 0.5)
    frac = 1 / (1 + np.exp((centres - 23.5) / 0.3))
    assert plots._fraction_mag(centres, frac, 0.5) == pytest.approx(23.5, abs=0.1)


def test_coadd_thumbnails_and_colour_composite(tmp_path):
    rng = np.random.default_rng(4)
    images = {(p, f): rng.normal(0, 1, (120, 100)) for p in ("0,0", "1,0") for f in ("HSC-R", "HSC-I")}
    images[("0,0", "HSC-R")][50:55, 40:45] += 200
    written(plots.coadd_thumbnails(images, max_side=50), tmp_path / "thumbs.png")
    rgb = plots.colour_composite({"HSC-R": images[("0,0", "HSC-R")], "HSC-I": images[("0,0", "HSC-I")]},
                                 ["HSC-R", "HSC-I"])
    assert rgb.shape == (120, 100, 3) and rgb.dtype == np.uint8 and rgb[52, 42].max() > rgb[5, 5].max()
    per_patch = {p: {f: images[(p, f)] for f in ("HSC-R", "HSC-I")} for p in ("0,0", "1,0")}
    written(plots.colour_composites(per_patch, ["HSC-R", "HSC-I"]), tmp_path / "rgb.png")


def test_block_mean_shape():
    assert plots.block_mean(np.ones((10, 7)), 3).shape == (3, 2)


def test_no_gui_backend_is_chosen():
    import re

    # Figures are made with matplotlib.figure.Figure and rendered by Agg on savefig: no pyplot, no GUI
    assert not re.search(r"^\s*(import|from)\s+matplotlib\.pyplot|pyplot\s+import", Path(plots.__file__).read_text(), re.M)
