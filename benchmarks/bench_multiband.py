"""Multi-band benchmark: our merge, measurement and forced photometry of one demo patch in two bands against SExtractor + PSFEx.

Run ``python benchmarks/bench_multiband.py`` after ``snakemake --cores 2`` (it reads the demo's
``deepCoadd_calexp`` and ``deepCoadd_det`` of HSC-R and HSC-I for one patch; ``--repo``,
``--patch``, ``--repeat``). It

(a) times ours in a fresh child process on one core: read both bands' coadds and detections,
    ``merge_detections``, ``measure_coadd`` in each band, ``merge_measurements``, forced
    ``measure_coadd`` in each band, ``patch_object_table``, and write the tables (what the
    rules merge_detections, measure_coadd, merge_measurements, forced_phot and object_table do,
    in one process instead of seven jobs);
(b) times the peer a survey astronomer runs on coadds today, one thread, one core: per band
    SExtractor (LDAC with vignets) and PSFEx for a PSF model, then SExtractor in dual-image mode
    (detection on the HSC-I coadd, measurement on each band) with PSF fitting (``FLUX_PSF``),
    AUTO and aperture fluxes; the images are written untimed (:func:`peers.prepare_image`);
(c) prints the median seconds of ``--repeat`` runs, CPU seconds, peak memory, the ratio, and for
    both catalogs the bright isolated stars' median magnitude - truth per band and colour -
    true colour [mmag] (the truth of the simulator); writes the JSON ``--json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402  (benchmarks/peers.py: the peer tools' options and runners)

DEFAULT_REPO = HERE.parent / "data" / "ci_repo"
OUT_DIR = HERE / "out" / "multiband"
BANDS = {"HSC-I": "i", "HSC-R": "r"}      # detection (priority) band first
ZEROPOINT = 27.0
PEER_PARAMS = ["NUMBER", "XWIN_IMAGE", "YWIN_IMAGE", "ALPHAWIN_J2000", "DELTAWIN_J2000", "FLUX_PSF", "FLUXERR_PSF",
               "FLUX_AUTO", "FLUXERR_AUTO", "FLUX_APER(3)", "FLUXERR_APER(3)", "FLAGS"]


def patch_paths(repo: Path, patch: str) -> dict:
    p = patch.replace(",", "_")
    root = repo / "rerun" / "ci" / "deepCoadd-results"
    return {f: {"calexp": root / f / "0" / p / f"calexp-{f}-0-{p}.fits", "det": root / f / "0" / p / f"det-{f}-0-{p}.fits"}
            for f in BANDS}


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_ours(paths: dict, outdir: Path, patch: str) -> str:
    """The multi-band stage on one patch; returns the object table's path."""
    from astropy.table import Table

    from snakedrp.multiband.measure_coadd import measure_coadd
    from snakedrp.multiband.merge_detections import merge_detections
    from snakedrp.multiband.merge_measurements import merge_measurements
    from snakedrp.multiband.object_table import patch_object_table
    from snakedrp.repo.exposure import Exposure
    from snakedrp.repo.io import write_table

    calexps = {BANDS[f]: Exposure.read(p["calexp"]) for f, p in paths.items()}
    dets = {BANDS[f]: Table.read(p["det"]) for f, p in paths.items()}
    snr = {b: np.where(c.variance > 0, c.image / np.sqrt(np.where(c.variance > 0, c.variance, 1.0)), 0.0)
           for b, c in calexps.items()}
    wcs = next(iter(calexps.values())).wcs
    merged = merge_detections(dets, {b: c.mask for b, c in calexps.items()}, snr, priority=["i", "r"],
                              pixel_scale=0.168, wcs=wcs)
    meas = {b: measure_coadd(c, merged.objects, merged.segmentation) for b, c in calexps.items()}
    reference = merge_measurements(merged.objects, meas, ["i", "r"])
    forced = {b: measure_coadd(c, merged.objects, merged.segmentation, reference=reference) for b, c in calexps.items()}
    ny, nx = merged.segmentation.shape
    table = patch_object_table(reference, forced, tract=0, patch=patch, inner_bbox=(0, 0, nx, ny))
    for name, t in [("mergeDet", merged.objects), ("ref", reference)] + [(f"meas-{b}", t) for b, t in meas.items()] \
            + [(f"forced-{b}", t) for b, t in forced.items()]:
        write_table(t, outdir / f"{name}.fits")
    path = outdir / "objectTable.fits"
    write_table(table, path, parquet=True)
    return str(path)


def _ours_child(conn, paths, outdir, patch, cpu):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    import importlib

    for name in ("astropy.table", "snakedrp.multiband.measure_coadd"):  # before the clock, as a job's imports
        importlib.import_module(name)

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    try:
        path, error = run_ours(paths, Path(outdir), patch), None
    except Exception as exc:  # report, do not hang the parent
        path, error = None, f"{type(exc).__name__}: {exc}"
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    conn.send({"seconds": time.perf_counter() - t0, "max_rss_mb": _peak_rss_mb(), "table": path, "error": error,
               "cpu_seconds": usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime})
    conn.close()


def measure_ours(paths: dict, outdir: Path, patch: str, cpu: int | None) -> dict:
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    os.environ.update(peers._ONE_THREAD_ENV)
    proc = ctx.Process(target=_ours_child, args=(send, paths, str(outdir), patch, cpu))
    proc.start()
    send.close()
    result = receive.recv()
    proc.join()
    return result


def run_peer(paths: dict, workdir: Path, cpu: int | None) -> dict:
    """SExtractor + PSFEx per band, then dual-image SExtractor with PSF fitting; seconds and catalogs."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    images, steps = {}, []
    for f, p in paths.items():
        sub = workdir / BANDS[f]
        image, variance, header = peers.prepare_image(p["calexp"], sub, recenter=False, saturation_from_mask=False)
        images[f] = (sub, image, variance)
        conf = peers._dump_defaults(peers.SEXTRACTOR, sub / "default.sex")
        peers._dump_defaults(peers.PSFEX, sub / "default.psfex")
        shutil.copyfile(peers.SEXTRACTOR_PARAMS, sub / peers.SEXTRACTOR_PARAMS.name)
        shutil.copyfile(peers.SEXTRACTOR_CONV, sub / peers.SEXTRACTOR_CONV.name)
        (sub / "phot.param").write_text("\n".join(PEER_PARAMS) + "\n")
        options = dict(peers.SEXTRACTOR_OPTIONS, CATALOG_NAME="image.ldac", PARAMETERS_NAME=peers.SEXTRACTOR_PARAMS.name,
                       FILTER_NAME=peers.SEXTRACTOR_CONV.name, WEIGHT_TYPE="MAP_VAR", WEIGHT_IMAGE=variance.name,
                       WEIGHT_GAIN="N", WEIGHT_THRESH="1e29", GAIN="0.0")
        steps.append(peers.run_timed([peers.SEXTRACTOR, image.name, "-c", conf.name, *peers._options(options)], sub,
                                     sub / "sextractor.log", cpu=cpu))
        steps.append(peers.run_timed([peers.PSFEX, "image.ldac", "-c", "default.psfex",
                                      *peers._options(dict(peers.PSFEX_OPTIONS, XML_NAME="psfex.xml", PSF_DIR="."))],
                                     sub, sub / "psfex.log", cpu=cpu))
    det_dir, det_image, det_variance = images[next(iter(paths))]
    catalogs = {}
    for f in paths:
        sub, image, variance = images[f]
        options = dict(peers.SEXTRACTOR_OPTIONS, CATALOG_TYPE="FITS_1.0", CATALOG_NAME="phot.fits",
                       PARAMETERS_NAME="phot.param", FILTER_NAME=peers.SEXTRACTOR_CONV.name, PSF_NAME="image.psf",
                       WEIGHT_TYPE="MAP_VAR,MAP_VAR", WEIGHT_IMAGE=f"{det_variance},{variance.name}",
                       WEIGHT_GAIN="N,N", WEIGHT_THRESH="1e29,1e29", GAIN="0.0")
        steps.append(peers.run_timed([peers.SEXTRACTOR, f"{det_image},{image.name}", "-c", "default.sex",
                                      *peers._options(options)], sub, sub / "dual.log", cpu=cpu))
        catalogs[BANDS[f]] = str(sub / "phot.fits")
    failed = [s.log for s in steps if s.returncode != 0]
    return {"seconds": sum(s.seconds for s in steps), "cpu_seconds": sum(s.cpu_seconds for s in steps),
            "max_rss_mb": max(s.max_rss_mb for s in steps), "catalogs": catalogs, "error": failed or None}


def accuracy(fluxes: dict, ra, dec, objects, zeropoint: float = ZEROPOINT) -> dict:
    """Median magnitude - truth per band and colour - true colour [mmag] of bright isolated stars."""
    from snakedrp.validate.config import MultibandValidateConfig
    from snakedrp.validate.multiband import _chord, _unit_vectors, isolated_bright_stars
    from scipy.spatial import cKDTree

    rows = isolated_bright_stars(objects, list(fluxes), MultibandValidateConfig())
    dist, index = cKDTree(_unit_vectors(ra, dec)).query(_unit_vectors(objects["ra"][rows], objects["dec"][rows]))
    ok = dist < _chord(0.5)
    out, dmag = {"n": int(ok.sum())}, {}
    for band, flux in fluxes.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            dmag[band] = zeropoint - 2.5 * np.log10(np.asarray(flux, float)[index[ok]]) - np.asarray(objects[f"mag_{band}"])[rows[ok]]
        out[f"{band}_mmag"] = float(np.nanmedian(dmag[band])) * 1e3
    out["r-i_mmag"] = float(np.nanmedian(dmag["r"] - dmag["i"])) * 1e3
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO)
    parser.add_argument("--patch", default="1,1")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=0, help="core to pin both sides to (-1: none)")
    parser.add_argument("--json", type=Path, default=OUT_DIR / "multiband.json")
    args = parser.parse_args(argv)
    from astropy.table import Table

    paths = patch_paths(args.repo.resolve(), args.patch)
    missing = [str(p) for d in paths.values() for p in d.values() if not p.exists()]
    if missing:
        print(f"bench_multiband: missing {missing[0]} (run `snakemake --cores 2` first)", file=sys.stderr)
        return 2
    cpu = None if args.cpu < 0 else args.cpu
    ours, peer = [], []
    for _ in range(args.repeat):
        ours.append(measure_ours(paths, OUT_DIR / "ours", args.patch, cpu))
        peer.append(run_peer(paths, OUT_DIR / "peer", cpu))
    errors = [r["error"] for r in ours + peer if r["error"]]
    if errors:
        print("bench_multiband: failed:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    objects = Table.read(args.repo / "truth" / "objects.fits")
    table = Table.read(ours[-1]["table"])
    njy = 10 ** (0.4 * (31.4 - ZEROPOINT))
    ours_acc = accuracy({b: np.asarray(table[f"{b}_psfFlux"]) / njy for b in ("r", "i")}, table["coord_ra"],
                        table["coord_dec"], objects)
    phot = {b: Table.read(p) for b, p in peer[-1]["catalogs"].items()}
    peer_acc = accuracy({b: np.asarray(t["FLUX_PSF"]) for b, t in phot.items()}, phot["i"]["ALPHAWIN_J2000"],
                        phot["i"]["DELTAWIN_J2000"], objects)
    med = {side: {key: statistics.median(r[key] for r in runs) for key in ("seconds", "cpu_seconds", "max_rss_mb")}
           for side, runs in (("ours", ours), ("peer", peer))}
    record = {"case": f"one demo patch ({args.patch}, 2200x2200), HSC-R + HSC-I: merge, measure, reference, forced",
              "peer": "SExtractor + PSFEx, dual-image PSF fits", "repeat": args.repeat,
              "ours_s": med["ours"]["seconds"], "peer_s": med["peer"]["seconds"],
              "ours_cpu_s": med["ours"]["cpu_seconds"], "peer_cpu_s": med["peer"]["cpu_seconds"],
              "ours_mb": med["ours"]["max_rss_mb"], "peer_mb": med["peer"]["max_rss_mb"],
              "ratio": med["ours"]["seconds"] / med["peer"]["seconds"], "ours_accuracy": ours_acc,
              "peer_accuracy": peer_acc, "n_objects": len(table), "n_peer": len(phot["i"]),
              "note": f"median of {args.repeat}, one core; ours also deblends and chooses reference bands"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"ours {record['ours_s']:.2f} s ({record['ours_cpu_s']:.2f} CPU s, {record['ours_mb']:.0f} MB, "
          f"{record['n_objects']} objects); SExtractor + PSFEx {record['peer_s']:.2f} s ({record['peer_cpu_s']:.2f} CPU s, "
          f"{record['peer_mb']:.0f} MB, {record['n_peer']} objects); ratio {record['ratio']:.2f}")
    for side, acc in (("ours", ours_acc), ("peer", peer_acc)):
        print(f"  {side}: bright isolated stars (n={acc['n']}): r {acc['r_mmag']:+.1f}, i {acc['i_mmag']:+.1f}, "
              f"r-i {acc['r-i_mmag']:+.1f} mmag (median - truth)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
