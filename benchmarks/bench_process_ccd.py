"""Single-frame benchmark: our raw → calexp+src on one full-size HSC CCD against the peers.

Run ``python benchmarks/bench_process_ccd.py --repeat 3``. It

(a) makes (or reuses) one HSC CCD (2048×4176, 0.168"/px): :func:`prepare_hsc_ccd`;
(b) times our processing, raw → calexp + src, in a fresh child process on one core and reads the
    child's peak RSS: :func:`run_ours`;
(c) times the peer chain SExtractor → PSFEx → SCAMP (:mod:`peers`) on the same ISR-corrected
    image, with each tool's peak RSS;
(d) prints medians over the repeats (machines here vary by ±40 %, hence the repeats) and the
    ratio ours/peer, and writes ``benchmarks/out/process_ccd.json``.

The comparison favours the peers: our time includes ISR (raw → electrons), theirs starts from
the ISR-corrected image. Goals: ≤ 3 s per CCD, ratio ≤ 1.0, peak memory ≤ 1.5 GB.

The CCD comes from the project's simulator (``hsc`` preset, one visit of CCD 0 in HSC-R, masters
from three raw frames each) under ``benchmarks/out/hsc_repo/``, made once and reused;
:func:`make_standin_ccd` (a GalSim-only ISR-corrected image, no raw) remains for peer-only
experiments. Our side also reports per-stage wall and CPU seconds (read, ISR, characterize,
refcat, calibrate, write). See ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402  (benchmarks/ is not a package)

OUT_DIR = HERE / "out"
DEFAULT_REPO = OUT_DIR / "hsc_repo"


@dataclass(frozen=True)
class HscCcd:
    """One CCD to benchmark, as files on disk plus the reference catalog.

    Attributes
    ----------
    raw_path : Path or None
        The raw frame (ADU) our pipeline starts from; None for the stand-in.
    calib_paths : dict of str → Path
        Master calibrations by kind (``bias``, ``dark``, ``flat``, ``fringe``); empty for the stand-in.
    refcat : Table
        Reference stars around the CCD: id, ra, dec [deg], ra_err, dec_err [mas],
        ``mag_<band>``, ``mag_<band>_err``.
    isr_path : Path
        The ISR-corrected image (electrons, nominal TAN WCS) the peers start from: an
        Exposure file (IMAGE/MASK/VARIANCE) or a single-image FITS.
    band : str
        Band name of the refcat magnitude column, e.g. ``"i"``.
    truth_path : Path or None
        Table of the rendered objects (x, y zero-based; ra, dec true) to check fitted WCSs.
    """

    raw_path: Path | None
    calib_paths: dict[str, Path]
    refcat: Table
    isr_path: Path
    band: str
    truth_path: Path | None = None


# ---------------------------------------------------------------------------- the hsc CCD
#: The simulated CCD: one science visit of one CCD of the ``hsc`` preset, HSC-R (no fringe frames),
#: three raw frames per master calibration (the masters' minimum).
HSC = dict(preset="hsc", ccd=0, filter="HSC-R", n_bias=3, n_dark=3, n_flat=3, refcat="sim_gaia")


def prepare_hsc_ccd(repo: Path = DEFAULT_REPO) -> HscCcd:
    """Make or reuse the benchmark CCD with the project's simulator and return where its files are.

    Simulates (untimed, once; reused while ``bench-params.json`` matches :data:`HSC`) one visit
    of one CCD of the ``hsc`` preset: the field truth and sharded refcat, the bias/dark/flat raws
    and their masters (``snakedrp.isr.calibs.construct_*``), the science raw, and the ISR-corrected
    image (``IsrTask`` with the masters, written as an Exposure) that the peers start from. The
    refcat returned is what our pipeline loads around the CCD (``refcat_for_exposure`` on the
    header WCS with the calibrate margin). Layout follows the data repository's
    (``raw/``, ``CALIB/``, ``ref_cats/``, ``truth/``).
    """
    from astropy.io import fits

    from snakedrp.isr import calibs
    from snakedrp import simulate
    from snakedrp.single_frame.calibrate import CalibrateConfig
    from snakedrp.repo.camera import Camera
    from snakedrp.isr.isr import IsrTask
    from snakedrp.single_frame.process_ccd import refcat_for_exposure
    from snakedrp.repo.raw import RawFrame

    repo = Path(repo)
    camera_yaml = ROOT / "config" / "cameras" / "hsc.yaml"
    camera = Camera.from_yaml(camera_yaml)
    ccd, filt = HSC["ccd"], HSC["filter"]
    params = simulate.resolve_config(simulate.SimulateConfig(
        preset=HSC["preset"], ccds=[ccd], filters=[filt], n_visits=1, n_bias=HSC["n_bias"],
        n_dark=HSC["n_dark"], n_flat=HSC["n_flat"], n_fringe=0))
    refcat_dir = repo / "ref_cats" / HSC["refcat"]
    truth_dir = repo / "truth"
    calib_paths = {"bias": repo / "CALIB" / "bias" / f"bias-{ccd}.fits",
                   "dark": repo / "CALIB" / "dark" / f"dark-{ccd}.fits",
                   "flat": repo / "CALIB" / "flat" / filt / f"flat-{filt}-{ccd}.fits"}
    isr_path = repo / "isr.fits"
    stamp = repo / "bench-params.json"
    plan = simulate.plan_exposures(params, camera)
    science = plan[np.asarray(plan["obstype"]) == "science"][0]
    visit = int(science["visit"])
    raw_path = repo / "raw" / str(visit) / f"raw-{visit}-{ccd}.fits"
    truth_path = truth_dir / "sources" / f"truth-{visit}-{ccd}.fits"
    wanted = dict(HSC, params=params.to_dict())
    done = [raw_path, isr_path, truth_path, refcat_dir / "index.json", *calib_paths.values()]
    if not (stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(wanted))
            and all(p.exists() for p in done)):
        print(f"simulating the benchmark CCD into {repo} (once) ...", flush=True)
        field = simulate.make_field(params, camera)
        simulate.write_field(field, truth_dir, refcat_dir, nside=params.refcat_nside)
        shutil_copy(camera_yaml, repo / "_camera.yaml")
        raws: dict[str, list[RawFrame]] = {"bias": [], "dark": [], "flat": []}
        for row in plan:
            v, obstype = int(row["visit"]), str(row["obstype"])
            path = repo / "raw" / str(v) / f"raw-{v}-{int(row['ccd'])}.fits"
            path.parent.mkdir(parents=True, exist_ok=True)
            result = simulate.render_exposure(params, camera, row, field.objects, field.visits)
            simulate.write_raw(result, path)
            if obstype == "science":
                truth_path.parent.mkdir(parents=True, exist_ok=True)
                simulate.write_sources(result, truth_path)
            elif obstype in raws:
                raws[obstype].append(RawFrame.read(path))
        bias = calibs.construct_bias(raws["bias"], camera)
        dark = calibs.construct_dark(raws["dark"], camera, bias=bias)
        flat = calibs.construct_flat(raws["flat"], camera, bias=bias, dark=dark)
        masters = {"bias": bias, "dark": dark, "flat": flat}
        for name, master in masters.items():
            calib_paths[name].parent.mkdir(parents=True, exist_ok=True)
            master.write(calib_paths[name])
        raw = RawFrame.read(raw_path)
        isr = IsrTask().run(raw, camera=camera, **masters).exposure
        isr.metadata["BUNIT"] = "electron"
        isr.write(isr_path)
        stamp.write_text(json.dumps(wanted, indent=1))
    # the refcat our pipeline loads (header WCS, calibrate margin); the peers get the same stars
    header = fits.getheader(isr_path, "IMAGE")
    from astropy.wcs import WCS

    refcat = refcat_for_exposure(refcat_dir, WCS(header), camera.ccd_shape, CalibrateConfig().refcat_margin)
    band = camera.filters[filt].band
    # rendered objects with their true sky positions (for the peers' WCS check)
    bench_truth = repo / "truth-radec.fits"
    if not bench_truth.exists() or bench_truth.stat().st_mtime < truth_path.stat().st_mtime:
        truth = Table.read(truth_path)
        objects = Table.read(truth_dir / "objects.fits")
        row = {int(i): k for k, i in enumerate(objects["id"])}
        k = np.array([row[int(i)] for i in truth["id"]], int)
        truth["ra"] = np.asarray(objects["ra"], float)[k]
        truth["dec"] = np.asarray(objects["dec"], float)[k]
        truth.write(bench_truth, overwrite=True)
    return HscCcd(raw_path, calib_paths, refcat, isr_path, band, bench_truth)


def shutil_copy(src, dst) -> None:
    import shutil

    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def run_ours(ccd: HscCcd, outdir: str) -> dict:
    """Our raw → calexp + src for ``ccd``, writing into ``outdir``; runs in a child process.

    What ``scripts/process_ccd.py`` does: tune the allocator (:func:`snakedrp.runtime.tune_memory`),
    read the camera, the raw and the master calibrations, run ``ProcessCcdTask`` with the default
    config (the refcat shards loaded from the refcat directory around the CCD), and write calexp
    (FITS), src (FITS + Parquet), icSrc, srcMatch and calexpBackground. The whole call is timed; modules in :data:`OURS_PRELOAD` are imported
    before the clock starts. Per-stage seconds are measured by wrapping the sub-tasks' ``run``.
    """
    from snakedrp.repo.camera import Camera
    from snakedrp.isr.calibs import read_master
    from snakedrp.repo.io import write_hdulist, write_table
    from snakedrp.single_frame.process_ccd import ProcessCcdConfig, ProcessCcdTask, refcat_for_exposure
    from snakedrp.single_frame import process_ccd as pc
    from snakedrp.repo.raw import RawFrame
    from snakedrp.runtime import tune_memory

    tune_memory()  # as scripts/process_ccd.py does first
    stages: dict[str, float] = {}      # wall seconds
    stages_cpu: dict[str, float] = {}  # CPU seconds (user + system) of this process

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
                stages_cpu[name] = stages_cpu.get(name, 0.0) + time.process_time() - c
        return wrapper

    def read_inputs():
        camera = Camera.from_yaml(repo / "_camera.yaml")
        raw = RawFrame.read(ccd.raw_path)
        calibs = {name: read_master(path, name, memmap=True) for name, path in ccd.calib_paths.items()}
        return camera, raw, calibs

    out = Path(outdir)
    repo = Path(ccd.raw_path).parents[2]
    camera, raw, calibs = timed("read", read_inputs)()

    task = ProcessCcdTask(ProcessCcdConfig())
    task.isr.run = timed("isr", task.isr.run)
    task.characterize.run = timed("characterize", task.characterize.run)
    task.calibrate.run = timed("calibrate", task.calibrate.run)
    saved = pc.refcat_for_exposure
    pc.refcat_for_exposure = timed("refcat", refcat_for_exposure)
    try:
        result = task.run(raw, camera=camera, calibs=calibs, refcat_dir=repo / "ref_cats" / HSC["refcat"],
                          release_calibs=True)  # as scripts/process_ccd.py
    finally:
        pc.refcat_for_exposure = saved

    def write_outputs():
        visit, ccd_id = raw.visit, raw.ccd
        result.calexp.write(out / f"calexp-{visit}-{ccd_id}.fits")
        write_table(result.sources, out / f"src-{visit}-{ccd_id}.fits", parquet=True)
        write_table(result.psf_sources, out / f"icSrc-{visit}-{ccd_id}.fits")
        if result.matches is not None:
            write_table(result.matches, out / f"srcMatch-{visit}-{ccd_id}.fits")
        write_hdulist(result.background.to_hdulist(), out / f"calexpBackground-{visit}-{ccd_id}.fits")

    timed("write", write_outputs)()
    md = result.calexp.metadata
    return {"n_sources": len(result.sources), "n_psf_stars": len(result.psf_sources),
            "n_matches": 0 if result.matches is None else len(result.matches),
            "n_cosmic_rays": result.n_cosmic_rays,
            "astrometry_rms_mas": float(md.get("ASTRMS", float("nan"))),
            "zeropoint": float(result.calexp.zeropoint), "stage_seconds": stages, "stage_cpu_seconds": stages_cpu}


# ---------------------------------------------------------------------------- stand-in CCD
STANDIN = dict(
    ccd=0,                          # a corner CCD of the hsc camera: the strongest distortion
    filter="HSC-I",
    band="i",
    exptime=200.0,                  # s
    ra=150.1, dec=2.2, rotation=12.0,  # true pointing [deg]
    pointing_error=1.5,             # header pointing minus truth [arcsec]
    n_stars=1500,
    n_galaxies=3000,
    sky=2000.0,                     # e-/pixel
    read_noise=4.5,                 # e-
    saturation=150000.0,            # e-
    fwhm=4.0,                       # pixel, Moffat, varies ±5 % over the CCD
    moffat_beta=3.5,
    refcat_mag_max=23.0,            # refcat depth
    refcat_margin=300,              # refcat stars this far outside the CCD too [pixel]
    seed=1,
)


def make_standin_ccd(repo: Path | str = DEFAULT_REPO, **overrides) -> HscCcd:
    """Render a full-size ISR-corrected HSC CCD with GalSim; reuse it if already made.

    The true pixel → sky mapping is the hsc camera's (with its optical distortion) at the
    true pointing; the header carries the camera's nominal TAN WCS at a pointing
    ``pointing_error`` arcsec away, as the simulator's raw headers do. Writes
    ``standin-isr.fits`` (an Exposure: IMAGE/MASK/VARIANCE, electrons), ``standin-truth.fits``
    and ``standin-refcat.fits`` into ``repo``.
    """
    p = dict(STANDIN, **overrides)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    isr_path, truth_path, refcat_path = (repo / f"standin-{n}.fits" for n in ("isr", "truth", "refcat"))
    stamp = repo / "standin-params.json"
    if stamp.exists() and json.loads(stamp.read_text()) == p and isr_path.exists() and refcat_path.exists():
        return HscCcd(None, {}, Table.read(refcat_path), isr_path, p["band"], truth_path)

    import galsim
    from astropy.io import fits

    from snakedrp.repo.camera import Camera
    from snakedrp.repo.exposure import Exposure, mask_bit

    camera = Camera.from_yaml(ROOT / "config" / "cameras" / "hsc.yaml")
    ccd = p["ccd"]
    ny, nx = camera.ccd_shape
    rng = np.random.default_rng(p["seed"])
    zeropoint = camera.filters[p["filter"]].zeropoint + 2.5 * np.log10(p["exptime"])

    # stars over the CCD plus a margin (refcat stars outside the CCD), galaxies over the CCD
    m = p["refcat_margin"]
    area_ratio = (nx + 2 * m) * (ny + 2 * m) / (nx * ny)
    n_star_all = int(round(p["n_stars"] * area_ratio))
    sx = rng.uniform(-m, nx - 1 + m, n_star_all)
    sy = rng.uniform(-m, ny - 1 + m, n_star_all)
    # dN/dm ∝ 10^(0.2 m) between 16.5 (a few saturate) and 25: inverse-CDF sampling
    u = rng.uniform(size=n_star_all)
    lo, hi = 10 ** (0.2 * 16.5), 10 ** (0.2 * 25.0)
    smag = 5.0 * np.log10(lo + u * (hi - lo))
    gx = rng.uniform(0, nx - 1, p["n_galaxies"])
    gy = rng.uniform(0, ny - 1, p["n_galaxies"])
    u = rng.uniform(size=p["n_galaxies"])
    lo, hi = 10 ** (0.3 * 19.0), 10 ** (0.3 * 25.5)
    gmag = np.log10(lo + u * (hi - lo)) / 0.3

    def psf_at(x, y):
        # FWHM +/-5 % along y, a small x-dependent shear: enough for PSFVAR_DEGREES 2 to matter
        fwhm = p["fwhm"] * (1.0 + 0.05 * (2 * y / (ny - 1) - 1))
        g1 = 0.02 * (2 * x / (nx - 1) - 1)
        return galsim.Moffat(beta=p["moffat_beta"], fwhm=fwhm).shear(g1=g1, g2=0.01)

    image = galsim.ImageF(nx, ny, scale=1.0)  # one-based bounds: zero-based x is GalSim x + 1

    def add(obj, x, y, size):
        st = obj.drawImage(nx=size, ny=size, scale=1.0, center=galsim.PositionD(x + 1.0, y + 1.0))
        b = st.bounds & image.bounds
        if b.isDefined():
            image[b] += st[b]

    star_flux = 10 ** (-0.4 * (smag - zeropoint))
    inside = (sx > -20) & (sx < nx + 19) & (sy > -20) & (sy < ny + 19)
    for x, y, f, mg in zip(sx[inside], sy[inside], star_flux[inside], smag[inside]):
        add(psf_at(x, y).withFlux(f), x, y, 96 if mg < 19 else 48 if mg < 22 else 32)

    n_choices = np.array([1.0, 1.5, 2.5, 4.0])  # few Sersic indices: each new n builds a table
    gal_n = n_choices[rng.integers(0, n_choices.size, gx.size)]
    gal_hlr = rng.uniform(0.2, 0.8, gx.size)  # arcsec
    gal_e = rng.uniform(0, 0.5, gx.size) * np.exp(2j * rng.uniform(0, np.pi, gx.size))
    gal_flux = 10 ** (-0.4 * (gmag - zeropoint))
    for x, y, f, n, r, e in zip(gx, gy, gal_flux, gal_n, gal_hlr, gal_e):
        gal = galsim.Sersic(n=n, half_light_radius=r / camera.pixel_scale, flux=f, trunc=0)
        gal = gal.shear(g1=e.real, g2=e.imag)
        size = int(np.clip(8 * r / camera.pixel_scale + 24, 32, 96))
        add(galsim.Convolve(gal, psf_at(x, y)), x, y, size)

    model = image.array.astype(np.float64) + p["sky"]
    data = rng.poisson(model).astype(np.float32) + rng.normal(0, p["read_noise"], model.shape).astype(np.float32)
    variance = (model + p["read_noise"] ** 2).astype(np.float32)
    mask = np.zeros(model.shape, np.int32)
    sat = data >= p["saturation"]
    data[sat] = p["saturation"]
    mask[sat] |= mask_bit("SAT")

    # truth and refcat
    ra0, dec0, rot = p["ra"], p["dec"], p["rotation"]
    sra, sdec = camera.pixel_to_sky(ccd, sx, sy, ra0, dec0, rot)
    gra, gdec = camera.pixel_to_sky(ccd, gx, gy, ra0, dec0, rot)
    truth = Table()
    truth["x"] = np.concatenate([sx, gx])
    truth["y"] = np.concatenate([sy, gy])
    truth["ra"] = np.concatenate([sra, gra])
    truth["dec"] = np.concatenate([sdec, gdec])
    truth["type"] = np.array(["star"] * sx.size + ["galaxy"] * gx.size)
    truth[f"mag_{p['band']}"] = np.concatenate([smag, gmag])
    truth.write(truth_path, overwrite=True)

    bright = smag < p["refcat_mag_max"]
    ref_err_mas = 5.0
    refcat = Table()
    refcat["id"] = np.arange(bright.sum(), dtype=np.int64)
    cosd = np.cos(np.deg2rad(sdec[bright]))
    refcat["ra"] = sra[bright] + rng.normal(0, ref_err_mas, bright.sum()) / 3.6e6 / cosd
    refcat["dec"] = sdec[bright] + rng.normal(0, ref_err_mas, bright.sum()) / 3.6e6
    refcat["ra_err"] = np.full(bright.sum(), ref_err_mas)
    refcat["dec_err"] = np.full(bright.sum(), ref_err_mas)
    refcat[f"mag_{p['band']}"] = smag[bright] + rng.normal(0, 0.01, bright.sum())
    refcat[f"mag_{p['band']}_err"] = np.full(bright.sum(), 0.01)
    refcat.write(refcat_path, overwrite=True)

    # header: nominal TAN WCS at a pointing off by pointing_error (random direction)
    phi = rng.uniform(0, 2 * np.pi)
    off = p["pointing_error"] / 3600.0
    ra_h = ra0 + off * np.cos(phi) / np.cos(np.deg2rad(dec0))
    dec_h = dec0 + off * np.sin(phi)
    wcs = camera.nominal_wcs(ccd, ra_h, dec_h, rot)
    meta = fits.Header()
    for key, value in dict(VISIT=1, CCD=ccd, FILTER=p["filter"], EXPTIME=p["exptime"],
                           **{"DATE-OBS": "2026-01-15T06:00:00", "MJD-OBS": 61055.25},
                           SATURATE=p["saturation"], GAIN=1.0, BUNIT="electron",
                           CAMERA="hsc", OBSTYPE="science").items():
        meta[key] = value
    Exposure(image=data, mask=mask, variance=variance, wcs=wcs, metadata=meta).write(isr_path)
    stamp.write_text(json.dumps(p))
    return HscCcd(None, {}, refcat, isr_path, p["band"], truth_path)


# ---------------------------------------------------------------------------- measuring ours
#: Modules imported in the child before the clock starts (import time is not per-CCD work).
OURS_PRELOAD = ("numpy", "scipy.ndimage", "scipy.spatial", "scipy.sparse.csgraph", "astropy.io.fits",
                "astropy.wcs", "astropy.io.misc.parquet", "astropy.io.misc.yaml", "pyarrow.parquet",
                "pyarrow.compute", "pyarrow.pandas_compat", "pandas", "yaml", "sep", "galsim",
                "snakedrp.single_frame.process_ccd", "snakedrp.repo.io")
_ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _peak_rss_mb() -> float:
    """This process's peak RSS [MB] since its last exec.

    ``VmHWM`` belongs to the current address space; ``ru_maxrss`` would also carry the
    spawning parent's high-water mark across ``exec`` (Linux), i.e. the benchmark's own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ours_child(conn, ccd: HscCcd, outdir: str, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    import importlib

    for name in OURS_PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    rss_before = _peak_rss_mb()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    try:
        info, error = run_ours(ccd, outdir) or {}, None
    except NotImplementedError as exc:
        info, error = {}, f"not wired: {exc}"
    except Exception as exc:  # report, do not hang the parent
        info, error = {}, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    conn.send({"seconds": seconds, "cpu_seconds": cpu_seconds, "max_rss_mb": _peak_rss_mb(),
               "rss_after_imports_mb": rss_before,
               "info": info, "error": error})
    conn.close()


def measure_ours(ccd: HscCcd, outdir: Path, *, cpu: int | None) -> dict:
    """Run :func:`run_ours` in a fresh (spawned) process pinned to ``cpu``.

    Returns ``seconds`` (the ``run_ours`` call alone, measured in the child), ``seconds_wall``
    (process start to exit, with interpreter start-up and imports), ``max_rss_mb`` (the
    child's peak RSS, imports included), ``info`` and ``error``. ``outdir`` is emptied first, as
    Snakemake removes a job's old outputs before it runs.
    """
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    saved = {k: os.environ.get(k) for k in _ONE_THREAD_ENV}
    os.environ.update(_ONE_THREAD_ENV)  # the spawned interpreter reads them at start-up
    try:
        t0 = time.perf_counter()
        proc = ctx.Process(target=_ours_child, args=(send, ccd, str(outdir), cpu))
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"seconds": None, "max_rss_mb": None, "info": {}, "error": "child died"}
    proc.join()
    result["seconds_wall"] = time.perf_counter() - t0
    if proc.exitcode:
        result["error"] = result.get("error") or f"child exit code {proc.exitcode}"
    return result


# ---------------------------------------------------------------------------- the benchmark
#: Our stages as :func:`run_ours` times them, with their table labels.
STAGES = {"read": "read raw + calibs", "isr": "ISR", "characterize": "characterize", "refcat": "load refcat",
          "calibrate": "calibrate", "write": "write outputs"}
GOALS = {"seconds_per_ccd": 3.0, "ratio_ours_over_peer": 1.0, "peak_memory_mb": 1536.0}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, spec=".2f"):
    return "—" if value is None else format(value, spec)


def benchmark(repeat: int, *, repo: Path, cpu: int | None, scamp_refine: int, skip_ours: bool) -> dict:
    """Prepare the CCD, then alternate ours / peers ``repeat`` times; return the record."""
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ccd = prepare_hsc_ccd(repo)
    seconds_prepare = time.perf_counter() - t0
    work = OUT_DIR / "work"
    truth = Table.read(ccd.truth_path) if ccd.truth_path and Path(ccd.truth_path).exists() else None

    ours_runs, peer_runs = [], []
    for i in range(repeat):
        if not skip_ours:
            ours_runs.append(measure_ours(ccd, work / "ours", cpu=cpu))
        peer_runs.append(peers.run_peer_chain(ccd.isr_path, ccd.refcat, work / "peer", band=ccd.band,
                                              scamp_refine=scamp_refine, cpu=cpu))
        o = ours_runs[-1] if ours_runs else {}
        p = peer_runs[-1]
        print(f"  run {i + 1}/{repeat}: ours {_fmt(o.get('seconds'))} s"
              f"{' (' + o['error'] + ')' if o.get('error') else ''}, peer {p['seconds_total']:.2f} s"
              f" (sex {p['seconds_sextractor']:.2f}, psfex {p['seconds_psfex']:.2f}, scamp {p['seconds_scamp']:.2f})"
              f"{'' if p['ok'] else ' FAILED: ' + '; '.join(p['errors'])}", flush=True)

    last = peer_runs[-1]
    peer = {
        "seconds_total": [r["seconds_total"] for r in peer_runs],
        "median_seconds_total": _median([r["seconds_total"] for r in peer_runs]),
        "min_seconds_total": min(r["seconds_total"] for r in peer_runs),
        "cpu_seconds_total": [r["cpu_seconds_total"] for r in peer_runs],
        "median_cpu_seconds_total": _median([r["cpu_seconds_total"] for r in peer_runs]),
        "median_seconds": {step: _median([r[f"seconds_{step}"] for r in peer_runs])
                           for step in ("sextractor", "psfex", "scamp")},
        "peak_memory_mb": max(r["max_rss_mb"]["peak"] for r in peer_runs),
        "max_rss_mb": last["max_rss_mb"],
        "rss_source": last["steps"]["sextractor"]["rss_source"],
        "n_sources": last["n_sources"],
        "psfex": last["psfex"],
        "scamp": last["scamp"],
        "scamp_rms_mas": last["scamp_rms_mas"],
        "ok": all(r["ok"] for r in peer_runs),
        "errors": sorted({e for r in peer_runs for e in r["errors"]}),
        "options": {"sextractor": peers.SEXTRACTOR_OPTIONS, "psfex": peers.PSFEX_OPTIONS,
                    "scamp": peers.SCAMP_OPTIONS, "scamp_refine": peers.SCAMP_REFINE_OPTIONS,
                    "scamp_refine_passes": scamp_refine},
    }
    if truth is not None and last.get("head"):
        peer["wcs_vs_truth"] = peers.wcs_error_vs_truth(last, truth)

    ours_ok = bool(ours_runs) and all(r.get("error") is None for r in ours_runs)
    ours = {
        "wired": ours_ok,
        "seconds": [r.get("seconds") for r in ours_runs],
        "seconds_wall": [r.get("seconds_wall") for r in ours_runs],
        "median_seconds": _median([r.get("seconds") for r in ours_runs]) if ours_ok else None,
        "median_seconds_wall": _median([r.get("seconds_wall") for r in ours_runs]) if ours_ok else None,
        "min_seconds": min(r["seconds"] for r in ours_runs) if ours_ok else None,
        "cpu_seconds": [r.get("cpu_seconds") for r in ours_runs],
        "median_cpu_seconds": _median([r.get("cpu_seconds") for r in ours_runs]) if ours_ok else None,
        "peak_memory_mb": max((r.get("max_rss_mb") or 0.0) for r in ours_runs) if ours_ok else None,
        "info": ours_runs[-1].get("info") if ours_runs else None,
        "errors": sorted({r["error"] for r in ours_runs if r.get("error")}),
    }
    for key in ("stage_seconds", "stage_cpu_seconds"):
        per_run = [(r.get("info") or {}).get(key) or {} for r in ours_runs]
        names = [n for n in STAGES if any(n in d for d in per_run)]
        ours[f"median_{key}"] = {n: _median([d.get(n) for d in per_run]) for n in names} if ours_ok else {}
    ratio = (ours["median_seconds"] / peer["median_seconds_total"]
             if ours["median_seconds"] is not None and peer["median_seconds_total"] else None)
    ratio_cpu = (ours["median_cpu_seconds"] / peer["median_cpu_seconds_total"]
                 if ours["median_cpu_seconds"] is not None and peer["median_cpu_seconds_total"] else None)
    goals = {
        "seconds_per_ccd": (ours["median_seconds"] <= GOALS["seconds_per_ccd"]) if ours_ok else None,
        "ratio_ours_over_peer": (ratio <= GOALS["ratio_ours_over_peer"]) if ratio is not None else None,
        "peak_memory_mb": (ours["peak_memory_mb"] <= GOALS["peak_memory_mb"]) if ours_ok else None,
    }
    return {
        "benchmark": "process_ccd",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "pinned_cpu": cpu,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "tools": peers.tool_versions(),
        "repeat": repeat,
        "ccd": {"raw": str(ccd.raw_path) if ccd.raw_path else None, "isr": str(ccd.isr_path),
                "shape": _image_shape(ccd.isr_path), "band": ccd.band, "n_refcat": len(ccd.refcat),
                "stand_in": ccd.raw_path is None, "seconds_prepare": seconds_prepare},
        "ours": ours,
        "peer": peer,
        "ratio_ours_over_peer": ratio,
        "ratio_ours_over_peer_cpu": ratio_cpu,
        "goals": GOALS,
        "goals_met": goals,
        "notes": [
            "ours: raw → calexp + src including ISR, timed inside a spawned child around run_ours()",
            "peer: SExtractor → PSFEx → SCAMP on the ISR-corrected image (ISR not included); "
            "preparing the tool inputs (image/variance split, LDAC refcat) is not timed",
            "one core: both sides pinned to the same CPU, library thread pools set to one thread",
            "memory: peak RSS of our child process (imports included); for the peers the largest "
            "of the three tools' peak RSS (they run one after another)",
        ],
    }


def _image_shape(path) -> list[int]:
    """``[ny, nx]`` of the image in an ISR file (Exposure or single image)."""
    from astropy.io import fits

    with fits.open(path) as hdul:
        hdu = hdul["IMAGE"] if "IMAGE" in hdul else next(h for h in hdul if h.data is not None)
        return list(hdu.shape)


def print_table(record: dict) -> None:
    ours, peer = record["ours"], record["peer"]
    ms = peer["median_seconds"]
    stage_wall = ours.get("median_stage_seconds") or {}
    stage_cpu = ours.get("median_stage_cpu_seconds") or {}
    rows = [
        ("median seconds per CCD", _fmt(ours["median_seconds"]), _fmt(peer["median_seconds_total"])),
        *[(f"  {STAGES[n]} (ours: wall / CPU)", f"{_fmt(stage_wall.get(n))} / {_fmt(stage_cpu.get(n))}", "")
          for n in STAGES if n in stage_wall],
        ("  SExtractor", "", _fmt(ms["sextractor"])),
        ("  PSFEx", "", _fmt(ms["psfex"])),
        (f"  SCAMP ({1 + peer['options']['scamp_refine_passes']} passes)", "", _fmt(ms["scamp"])),
        ("  CPU seconds (user + system)", _fmt(ours["median_cpu_seconds"]), _fmt(peer["median_cpu_seconds_total"])),
        ("  wall incl. start-up (ours)", _fmt(ours["median_seconds_wall"]), ""),
        ("peak memory [MB]", _fmt(ours["peak_memory_mb"], ".0f"), _fmt(peer["peak_memory_mb"], ".0f")),
        ("sources detected", str((ours.get("info") or {}).get("n_sources", "—")), str(peer["n_sources"])),
        ("astrometric RMS vs refcat [mas]", _fmt((ours.get("info") or {}).get("astrometry_rms_mas"), ".1f"),
         _fmt(peer["scamp_rms_mas"], ".1f")),
    ]
    if "wcs_vs_truth" in peer:
        t = peer["wcs_vs_truth"]
        rows.append(("WCS error vs truth, RMS RA/Dec [mas]", "",
                     f"{t['rms_mas'][0]:.1f} / {t['rms_mas'][1]:.1f}" if "rms_mas" in t else "—"))
    width = max(len(r[0]) for r in rows) + 2
    print(f"\nprocess_ccd benchmark: {record['ccd']['shape'][1]}x{record['ccd']['shape'][0]} CCD, "
          f"median of {record['repeat']}{' (GalSim stand-in CCD)' if record['ccd']['stand_in'] else ''}")
    print(f"{'':{width}}{'ours':>12}{'peer':>12}")
    for name, a, b in rows:
        print(f"{name:{width}}{a:>12}{b:>12}")
    ratio = record["ratio_ours_over_peer"]
    print(f"{'ratio ours/peer (wall; CPU)':{width}}{_fmt(ratio):>12}{_fmt(record['ratio_ours_over_peer_cpu']):>12}")
    goals = record["goals_met"]
    print("goals: " + ", ".join(f"{k} ≤ {record['goals'][k]:g}: "
                                f"{'—' if v is None else ('met' if v else 'NOT met')}" for k, v in goals.items()))
    if ours["errors"]:
        print("ours: " + "; ".join(ours["errors"]))
    if peer["errors"]:
        print("peer: " + "; ".join(peer["errors"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; medians are reported")
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="where the benchmark CCD is made/reused")
    parser.add_argument("--cpu", type=int, default=None,
                        help="core to pin both sides to (default: the last core this process may use)")
    parser.add_argument("--scamp-refine", type=int, default=2, help="SCAMP refinement passes after the first")
    parser.add_argument("--skip-ours", action="store_true", help="time the peers only")
    parser.add_argument("--output", type=Path, default=OUT_DIR / "process_ccd.json")
    args = parser.parse_args(argv)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    record = benchmark(args.repeat, repo=args.repo, cpu=cpu, scamp_refine=args.scamp_refine,
                       skip_ours=args.skip_ours)
    print_table(record)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {args.output}")
    return 0 if record["peer"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
