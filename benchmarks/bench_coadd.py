"""Coadd benchmark: our warp + assemble of one full ``hsc`` patch against SWarp, from 5 and 10 visits.

Run ``python benchmarks/bench_coadd.py`` (``--visits 5 10``, ``--repeat 1``). It

(a) makes calexps of one patch (4000 x 4000 inner + 100 px border, 0.168"/px, TAN): per visit two
    HSC CCDs (2048 x 4176) side by side, dithered, rotated, with a TAN-SIP WCS (a few-pixel
    distortion), Gaussian stars of 17-23 mag at seeing 0.5"-1.1", sky noise and a per-visit
    zeropoint; the stars' true positions and fluxes are the truth. (The single-frame pipeline
    is not run: this times the coadd stage only, on exact calexp WCSs and PSFs.)
(b) times ours in a fresh child process on one core (``tune_memory`` as the job scripts call it,
    ``warp_exposures`` per visit, written to disk, then ``assemble_coadd`` reading the warps a
    block of rows at a time) and reads the child's peak RSS;
(c) times SWarp (LANCZOS3, COMBINE_TYPE WEIGHTED, one constant weight map per input = 1 / its
    clipped-mean variance, one thread, TPV headers from ``sip_tpv`` since SWarp ignores SIP,
    ``FLXSCALE`` to zeropoint 27, the same output grid through ``<out>.head``) on the same calexps;
(d) prints wall and CPU seconds, the ratios ours/SWarp, peak memory, and both coadds' bright-star
    positions and aperture fluxes against truth, and what our time includes that SWarp's does not
    (:data:`OURS_ONLY`); writes ``coadd.json`` in ``--out``.

Goals (issue 10): ratio <= 1.0; our peak memory for 10 visits <= 1.2 x that for 5.

``--warp-only`` (with ``--repeat N``, default 3) times one warp job instead: ``warp_exposures`` of the
first visit's two CCDs onto the patch, each repeat in a fresh child process on one core, and prints
the median wall and CPU seconds and the median peak RSS (imports and the two calexps included).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out" / "coadd"
PIXEL_SCALE = 0.168 / 3600.0            # deg / pixel
CCD_SHAPE = (4176, 2048)                 # (ny, nx)
PATCH_INNER, PATCH_BORDER = 4000, 100
RA0, DEC0 = 150.0, 2.0
N_STARS = 3000
#: Work in our timing that SWarp does not do (its output is an image and a weight map only).
OURS_ONLY = ("writes each warp to disk and reads it back", "propagates the variance and mask planes",
             "rejects artifacts (CompareWarp: leave-one-out median, footprints)", "builds the CoaddPsf")


def patch_wcs():
    from astropy.wcs import WCS

    n = PATCH_INNER + 2 * PATCH_BORDER
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0, DEC0]
    w.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    w.wcs.cd = [[-PIXEL_SCALE, 0.0], [0.0, PIXEL_SCALE]]
    return w, (n, n)


def ccd_wcs(ra, dec, rotation_deg):
    from astropy.io import fits
    from astropy.wcs import WCS

    ny, nx = CCD_SHAPE
    t = np.deg2rad(rotation_deg)
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, nx, ny
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    h["CRPIX1"], h["CRPIX2"] = (nx + 1) / 2, (ny + 1) / 2
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CD1_1"], h["CD1_2"] = -PIXEL_SCALE * np.cos(t), PIXEL_SCALE * np.sin(t)
    h["CD2_1"], h["CD2_2"] = PIXEL_SCALE * np.sin(t), PIXEL_SCALE * np.cos(t)
    # ~3 pixels of distortion at the CCD corners
    h["A_ORDER"] = h["B_ORDER"] = 2
    h["A_2_0"], h["A_0_2"], h["B_1_1"] = 2e-7, -1e-7, 1.5e-7
    return WCS(h)


def truth(seed=0):
    rng = np.random.default_rng(seed)
    half = (PATCH_INNER / 2 + PATCH_BORDER) * PIXEL_SCALE
    dec = DEC0 + rng.uniform(-half, half, N_STARS)
    ra = RA0 + rng.uniform(-half, half, N_STARS) / np.cos(np.deg2rad(DEC0))
    mag = 17.0 + 6.0 * rng.power(2.5, N_STARS)
    return ra, dec, mag


def render(shape, x, y, flux, sigma):
    img = np.zeros(shape, np.float32)
    r = int(np.ceil(5 * sigma))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    for xc, yc, f in zip(x, y, flux):
        ix, iy = int(round(xc)), int(round(yc))
        if ix < -r or iy < -r or ix >= shape[1] + r or iy >= shape[0] + r:
            continue
        stamp = f / (2 * np.pi * sigma**2) * np.exp(-((xx + ix - xc) ** 2 + (yy + iy - yc) ** 2) / (2 * sigma**2))
        y0, y1, x0, x1 = iy - r, iy + r + 1, ix - r, ix + r + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        y0c, y1c, x0c, x1c = max(y0, 0), min(y1, shape[0]), max(x0, 0), min(x1, shape[1])
        if y1c > y0c and x1c > x0c:
            img[y0c:y1c, x0c:x1c] += stamp[sy0:sy0 + y1c - y0c, sx0:sx0 + x1c - x0c]
    return img


def make_calexps(n_visits, directory: Path):
    """Two dithered CCDs per visit; returns {visit: [paths]} and the truth."""
    from astropy.io import fits

    from snakedrp.repo.exposure import Exposure
    from snakedrp.repo.psf_model import GaussianPsf

    ra, dec, mag = truth()
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    visits = {}
    for v in range(n_visits):
        visit = 1000 + 2 * v
        seeing = 0.5 + 0.6 * v / max(1, n_visits - 1)              # arcsec FWHM
        sigma = seeing / 0.168 / 2.3548
        zp = rng.uniform(31.0, 32.0)                               # AB mag of 1 e-
        sky = rng.uniform(800.0, 1500.0)                           # e- / pixel
        rot = rng.uniform(-2.0, 2.0)
        d_ra, d_dec = rng.uniform(-250, 250, 2) * PIXEL_SCALE
        paths = []
        for c, side in enumerate((-1, 1)):
            path = directory / f"calexp-{visit}-{c}.fits"
            paths.append(path)
            if path.exists():
                continue
            off = side * (CCD_SHAPE[1] / 2 + 30) * PIXEL_SCALE
            wcs = ccd_wcs(RA0 + (off + d_ra) / np.cos(np.deg2rad(DEC0)), DEC0 + d_dec, rot)
            x, y = wcs.all_world2pix(ra, dec, 0)
            image = render(CCD_SHAPE, x, y, 10 ** (-0.4 * (mag - zp)), sigma)
            variance = (image + sky).astype(np.float32)
            image += rng.normal(0.0, 1.0, CCD_SHAPE).astype(np.float32) * np.sqrt(variance)
            meta = fits.Header({"VISIT": visit, "CCD": c, "FILTER": "HSC-R"})
            Exposure(image=image, mask=np.zeros(CCD_SHAPE, np.int32), variance=variance, wcs=wcs,
                     psf=GaussianPsf(sigma, 2 * int(np.ceil(4 * sigma)) + 1), zeropoint=zp, zeropoint_err=0.0,
                     metadata=meta).write(path)
        visits[visit] = paths
    return visits, (ra, dec, mag)


def run_ours(visits: dict, out: Path) -> dict:
    """Child process: warp each visit, then assemble from the warp files; prints a JSON line."""
    code = f"""
import json, time, resource
from pathlib import Path
from snakedrp.runtime import tune_memory
tune_memory()                     # as the make_warp and assemble_coadd scripts do
from snakedrp.coadd.assemble import assemble_coadd, open_warp
from snakedrp.coadd.warp import warp_exposures
from snakedrp.repo.exposure import Exposure
import sys; sys.path.insert(0, {str(HERE)!r})
from bench_coadd import patch_wcs
wcs, shape = patch_wcs()
visits = {json.dumps({k: [str(p) for p in v] for k, v in visits.items()})}
out = Path({str(out)!r}); out.mkdir(parents=True, exist_ok=True)
t0, c0 = time.perf_counter(), time.process_time(); paths = []
for visit, files in visits.items():
    calexps = [Exposure.read(f) for f in files]
    ids = [dict(visit=int(visit), ccd=k) for k in range(len(files))]
    warp = warp_exposures(calexps, ids, wcs, shape).exposure
    paths.append(out / f"warp-{{visit}}.fits"); warp.write(paths[-1]); del calexps, warp
t1 = time.perf_counter()
coadd = assemble_coadd([open_warp(p) for p in paths]).coadd
t2, c2 = time.perf_counter(), time.process_time()
coadd.write(out / "coadd.fits")
print(json.dumps(dict(warp=t1 - t0, assemble=t2 - t1, seconds=t2 - t0, cpu=c2 - c0,
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_warp(files: list, repeat: int) -> dict:
    """Children on one core: ``warp_exposures`` of one visit's calexps; median wall, CPU [s] and peak RSS [MB]."""
    code = f"""
import json, resource, sys, time
sys.path.insert(0, {str(HERE)!r})
from snakedrp.runtime import tune_memory
tune_memory()
from bench_coadd import patch_wcs
from snakedrp.coadd.warp import warp_exposures
from snakedrp.repo.exposure import Exposure
wcs, shape = patch_wcs()
files = {json.dumps([str(f) for f in files])}
calexps = [Exposure.read(f) for f in files]
t0, c0 = time.perf_counter(), time.process_time()
warp_exposures(calexps, [dict(visit=0, ccd=k) for k in range(len(files))], wcs, shape)
print(json.dumps(dict(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0,
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    core = max(os.sched_getaffinity(0))
    runs = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False,
                              preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]} | {"runs": runs}


def tpv_header(wcs):
    """The calexp's TAN-SIP WCS as TPV (SWarp ignores SIP): CD matrix first, then sip_tpv."""
    import sip_tpv

    h = wcs.to_header(relax=True)
    pc = wcs.wcs.get_pc()
    cdelt = wcs.wcs.get_cdelt()
    for i in (1, 2):
        for j in (1, 2):
            h.remove(f"PC{i}_{j}", ignore_missing=True)
            h[f"CD{i}_{j}"] = pc[i - 1, j - 1] * cdelt[i - 1]
    for i in (1, 2):
        h.remove(f"CDELT{i}", ignore_missing=True)
    sip_tpv.sip_to_pv(h)
    return h


def run_swarp(visits: dict, out: Path) -> dict:
    """SWarp on the same calexps and grid: time and the child's peak RSS (from wait4)."""
    from astropy.io import fits

    from snakedrp.coadd.assemble import clipped_mean
    from snakedrp.repo.exposure import Exposure

    out.mkdir(parents=True, exist_ok=True)
    inputs = []
    for visit, files in visits.items():
        for f in files:
            calexp = Exposure.read(f)
            h = tpv_header(calexp.wcs)
            h["FLXSCALE"] = 10 ** (0.4 * (27.0 - calexp.zeropoint))
            name = out / f"in-{Path(f).stem}.fits"
            fits.PrimaryHDU(np.asarray(calexp.image, np.float32), header=h).writeto(name, overwrite=True)
            # one weight per input: 1 / its clipped-mean variance at zeropoint 27
            weight = 1.0 / (clipped_mean(calexp.variance[::4, ::4].ravel(), 3.0, 3) * h["FLXSCALE"] ** 2)
            fits.PrimaryHDU(np.full(calexp.shape, weight, np.float32), header=h).writeto(
                name.with_suffix(".weight.fits"), overwrite=True)
            inputs.append(str(name))
    wcs, shape = patch_wcs()
    head = wcs.to_header()
    head["NAXIS"], head["NAXIS1"], head["NAXIS2"] = 2, shape[1], shape[0]
    (out / "coadd.head").write_text("\n".join(c.image for c in head.cards) + "\nEND\n")
    cmd = ["SWarp", *inputs, "-c", "/dev/null", "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_SUFFIX", ".weight.fits",
           "-RESAMPLING_TYPE", "LANCZOS3", "-COMBINE_TYPE", "WEIGHTED", "-SUBTRACT_BACK", "N",
           "-NTHREADS", "1", "-IMAGEOUT_NAME", str(out / "coadd.fits"),
           "-WEIGHTOUT_NAME", str(out / "coadd.weight.fits"), "-RESAMPLE_DIR", str(out),
           "-VERBOSE_TYPE", "QUIET", "-WRITE_XML", "N"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=out)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status:
        raise RuntimeError(f"SWarp failed ({status})")
    for f in out.glob("*.resamp*.fits"):
        f.unlink()
    return dict(seconds=seconds, cpu=usage.ru_utime + usage.ru_stime, peak_mb=usage.ru_maxrss / 1024)


def stars_vs_truth(image, wcs, sky, sigma_px=2.5):
    """Bright isolated stars: windowed-centroid offsets [mas] and 15-pixel aperture magnitudes - truth [mmag]."""
    import sep
    from scipy.spatial import cKDTree

    ra, dec, mag = sky
    x, y = wcs.all_world2pix(ra, dec, 0)
    ny, nx = image.shape
    tree = cKDTree(np.column_stack([x, y]))
    crowded = np.array([len(tree.query_ball_point([a, b], 30)) > 1 for a, b in zip(x, y)])
    pick = (mag < 20.5) & ~crowded & (x > 50) & (x < nx - 50) & (y > 50) & (y < ny - 50)
    data = np.ascontiguousarray(np.nan_to_num(image), np.float32)
    xs, ys = x[pick], y[pick]
    ok = np.array([np.isfinite(image[int(b) - 15:int(b) + 16, int(a) - 15:int(a) + 16]).all() for a, b in zip(xs, ys)])
    xs, ys, m = xs[ok], ys[ok], mag[pick][ok]
    xw, yw, _ = sep.winpos(data, xs, ys, sigma_px)
    rw, dw = wcs.all_pix2world(xw, yw, 0)
    rt, dt = ra[pick][ok], dec[pick][ok]
    off = np.hypot((rw - rt) * np.cos(np.deg2rad(dt)), dw - dt) * 3.6e6
    flux, _, _ = sep.sum_circle(data, xw, yw, 15.0, subpix=5)
    dmag = -2.5 * np.log10(flux / 10 ** (-0.4 * (m - 27.0)))
    return dict(n=int(len(off)), rms_mas=float(np.sqrt(np.mean(off**2))), median_dmag_mmag=float(1000 * np.median(dmag)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--warp-only", action="store_true", help="time one warp job (one visit, two CCDs) only")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of --warp-only (medians are printed)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # SWarp runs in another directory
    if args.warp_only:
        visits_all, _ = make_calexps(1, args.out / "calexps")
        warp = run_warp(next(iter(visits_all.values())), args.repeat)
        print(f"one warp (2 CCDs of {CCD_SHAPE[1]}x{CCD_SHAPE[0]} -> {PATCH_INNER + 2 * PATCH_BORDER}^2 patch), "
              f"median of {args.repeat}: {warp['seconds']:.2f} s wall, {warp['cpu']:.2f} s CPU, "
              f"peak {warp['peak_mb']:.0f} MB (runs: " + ", ".join(f"{r['seconds']:.2f}" for r in warp["runs"]) + " s)")
        return
    from astropy.io import fits
    from astropy.wcs import WCS

    from snakedrp.repo.exposure import Exposure

    visits_all, sky = make_calexps(max(args.visits), args.out / "calexps")
    results = {}
    for n in args.visits:
        visits = dict(list(visits_all.items())[:n])
        ours = run_ours(visits, args.out / f"ours-{n}")
        swarp = run_swarp(visits, args.out / f"swarp-{n}")
        wcs, _ = patch_wcs()
        coadd = Exposure.read(args.out / f"ours-{n}" / "coadd.fits")
        ours["stars"] = stars_vs_truth(coadd.image, coadd.wcs, sky)
        with fits.open(args.out / f"swarp-{n}" / "coadd.fits") as hdul:
            sw_image = hdul[0].data.astype(np.float32)
            sw_image[sw_image == 0] = np.nan                 # SWarp's no-data value
            swarp["stars"] = stars_vs_truth(sw_image, WCS(hdul[0].header), sky)
        results[n] = dict(ours=ours, swarp=swarp, ratio=ours["seconds"] / swarp["seconds"],
                          cpu_ratio=ours["cpu"] / swarp["cpu"])
        print(f"{n} visits: ours {ours['seconds']:.1f} s (warp {ours['warp']:.1f}, assemble {ours['assemble']:.1f}; "
              f"CPU {ours['cpu']:.1f} s), peak {ours['peak_mb']:.0f} MB; SWarp {swarp['seconds']:.1f} s "
              f"(CPU {swarp['cpu']:.1f} s), peak {swarp['peak_mb']:.0f} MB; ratio {results[n]['ratio']:.2f} "
              f"(CPU {results[n]['cpu_ratio']:.2f})")
        for name, r in (("ours", ours), ("SWarp", swarp)):
            s = r["stars"]
            print(f"    {name}: {s['n']} bright stars, positions vs truth RMS {s['rms_mas']:.1f} mas, "
                  f"15-px aperture mag - truth median {s['median_dmag_mmag']:+.1f} mmag")
        for d in (args.out / f"ours-{n}",):
            for f in d.glob("warp-*.fits"):
                f.unlink()
    print(f"not like for like: ours also {', '.join(OURS_ONLY)}; SWarp's time includes none of these")
    if len(args.visits) >= 2:
        a, b = min(args.visits), max(args.visits)
        growth = results[b]["ours"]["peak_mb"] / results[a]["ours"]["peak_mb"]
        print(f"our peak memory {b} / {a} visits: {growth:.2f} (goal <= 1.2); "
              f"time ratio goal <= 1.0: " + ", ".join(f"{n}: {r['ratio']:.2f}" for n, r in results.items()))
    (args.out / "coadd.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
