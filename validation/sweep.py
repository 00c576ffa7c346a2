"""Single-frame and coadd validation on fields, seeds and conditions that neither the demo nor CI holds.

Each single-frame case is one ``ci`` CCD, two visits (0.5" and 1.3" seeing unless the case says
otherwise), run through the workflow (simulate, calibrations, process_ccd, validation against
truth; no coadd). Each ``--coadd`` case is two CCDs and three visits of one filter (0.5", 0.9",
1.3" unless the case says otherwise) run through the whole workflow, coadds included, and reports
the single-frame and the coadd figures. Each ``--multiband`` case is two CCDs and two visits in each
of two or three bands, through the object tables, and reports the multi-band figures too. Every case runs into ``<out>/<case>/repo``; the validation
is not strict, so every figure is reported and the sweep goes on. Prints each case's missed goals,
then a summary line; exits 1 if any case missed a goal or failed.

    python validation/sweep.py [--out DIR] [--cores N] [CASE ...]            # default: every case
    python validation/sweep.py --coadd [--out DIR] [--cores N] [CASE ...]    # the coadd cases
    python validation/sweep.py --multiband [--out DIR] [--cores N] [CASE ...]  # the multi-band cases

About 40 s a single-frame case on 2 cores (~20 minutes for all of them), 3-4 minutes a coadd case,
4-6 minutes a multi-band case.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPARSE = dict(star_density=12000.0, bright_star_density=50.0)
MID = dict(star_density=30000.0, bright_star_density=120.0)
DENSE = dict(star_density=400000.0, bright_star_density=3000.0)
#: name -> simulate options on top of one CCD, two HSC-R visits
CASES: dict[str, dict] = {
    "seed3": dict(seed=3, ra=10.0, dec=5.0, rotation=12.0),
    "seed7": dict(seed=7, ra=200.0, dec=30.0, rotation=-50.0),
    "seed21": dict(seed=21, ra=300.0, dec=-45.0, rotation=80.0),
    "sparse5": dict(SPARSE, seed=5),
    "sparse8": dict(SPARSE, seed=8, ra=60.0, dec=-30.0),
    "sparse11": dict(seed=11, star_density=8000.0, bright_star_density=30.0, ra=120.0, dec=60.0),
    "sparse14": dict(SPARSE, seed=14, ra=150.0, dec=45.0),
    "sparse20": dict(SPARSE, seed=20, ra=20.0, dec=-60.0),
    "sparse26": dict(SPARSE, seed=26, ra=230.0, dec=10.0, rotation=30.0),
    "sparse32": dict(SPARSE, seed=32, ra=320.0, dec=-15.0),
    "sparse38": dict(SPARSE, seed=38, ra=100.0, dec=70.0),
    "sparse44": dict(SPARSE, seed=44, ra=180.0, dec=-40.0),
    "sparse50": dict(SPARSE, seed=50, ra=290.0, dec=25.0),
    "sparse56": dict(SPARSE, seed=56, ra=45.0, dec=15.0, rotation=-20.0),
    "mid60": dict(MID, seed=60, ra=80.0, dec=-10.0),
    "mid62": dict(MID, seed=62, ra=250.0, dec=40.0),
    "dense9": dict(DENSE, seed=9, ra=270.0, dec=-20.0),
    "seeing_1.8_2.0": dict(seed=17, seeing_min=1.8, seeing_max=2.0),
    "seeing_0.40_0.45": dict(seed=19, seeing_min=0.4, seeing_max=0.45),
    "bright_sky23": dict(seed=23, sky_offset_min=-2.0, sky_offset_max=-1.5),
    "hsc_g29": dict(seed=29, filters=["HSC-G"]),
    "hsc_i31": dict(seed=31, filters=["HSC-I"]),
    "exptime30_37": dict(seed=37, exptime=30.0),
}


#: name -> simulate options on top of two CCDs, three visits of one filter (HSC-R unless given)
COADD_CASES: dict[str, dict] = {
    "seed3": dict(seed=3, ra=10.0, dec=5.0, rotation=12.0),
    "seed21": dict(seed=21, ra=300.0, dec=-45.0, rotation=80.0),
    "bad_seeing41": dict(seed=41, seeing_min=1.4, seeing_max=1.6),
    "good_seeing43": dict(seed=43, seeing_min=0.4, seeing_max=0.5),
    "sparse44": dict(SPARSE, seed=44, ra=180.0, dec=-40.0),
    "mid60": dict(MID, seed=60, ra=80.0, dec=-10.0),
    "dense45": dict(DENSE, seed=45, ra=270.0, dec=-20.0),
    "bright_sky46": dict(seed=46, sky_offset_min=-2.0, sky_offset_max=-1.5),
    "hsc_i47": dict(seed=47, filters=["HSC-I"]),
    "hsc_g48": dict(seed=48, filters=["HSC-G"]),
    "five_visits49": dict(seed=49, n_visits=5),
}


#: name -> simulate options on top of two CCDs, two visits in each of HSC-R and HSC-I unless given
MULTIBAND_CASES: dict[str, dict] = {
    "gri50": dict(seed=50, ra=40.0, dec=20.0, rotation=-30.0, filters=["HSC-G", "HSC-R", "HSC-I"]),
    "bad_seeing51": dict(seed=51, seeing_min=1.2, seeing_max=1.6),
    "good_seeing52": dict(seed=52, seeing_min=0.4, seeing_max=0.6),
    "sparse53": dict(SPARSE, seed=53, ra=160.0, dec=-50.0),
    "dense54": dict(DENSE, seed=54, ra=265.0, dec=-25.0),
    "gi_mid55": dict(MID, seed=55, ra=330.0, dec=5.0, filters=["HSC-G", "HSC-I"]),
    # the two fields that miss in the CI field tests' first runs (README "Multi-band")
    "gi13": dict(seed=13, ra=200.0, dec=10.0, rotation=-15.0, filters=["HSC-G", "HSC-I"]),
    "mixed_seeing_r": dict(filters=["HSC-R"]),
}


def flow(values: dict) -> str:
    """Flow-style YAML of ``values`` for ``--config``."""
    def one(v):
        return "[" + ", ".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else str(v)
    return "{" + ", ".join(f"{k}: {one(v)}" for k, v in values.items()) + "}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", metavar="CASE",
                        help=f"cases to run (default: all): {', '.join(CASES)}; with --coadd: {', '.join(COADD_CASES)}; "
                             f"with --multiband: {', '.join(MULTIBAND_CASES)}")
    parser.add_argument("--coadd", action="store_true", help="run the coadd cases (two CCDs, three visits, coadds)")
    parser.add_argument("--multiband", action="store_true",
                        help="run the multi-band cases (two CCDs, two visits a band, through the object tables)")
    parser.add_argument("--out", type=Path, default=Path("sweep"), help="directory of the case repositories")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    if args.coadd and args.multiband:
        parser.error("--coadd and --multiband are two sets of cases; give one")
    cases = MULTIBAND_CASES if args.multiband else COADD_CASES if args.coadd else CASES
    unknown = sorted(set(args.cases) - set(cases))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(cases)}")
    base = ({"ccds": [0, 1], "n_visits": 2, "filters": ["HSC-R", "HSC-I"]} if args.multiband
            else {"ccds": [0, 1], "n_visits": 3, "filters": ["HSC-R"]} if args.coadd
            else {"ccds": [0], "n_visits": 2, "filters": ["HSC-R"]})
    reports = (("single_frame.json", "coadd.json", "multiband.json") if args.multiband
               else ("single_frame.json", "coadd.json") if args.coadd else ("single_frame.json",))
    missed_cases = []
    for name in args.cases or list(cases):
        repo = (args.out / name / "repo").resolve()
        options = [f"repo={repo}", f"simulate={flow({**base, **cases[name]})}"]
        if not (args.coadd or args.multiband):
            options.append("coadd={enabled: false}")
        elif args.coadd:
            options.append("multiband={enabled: false}")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(args.cores), "-q", "--config",
                               *options], cwd=ROOT, capture_output=True, text=True)
        paths = [repo / "rerun/ci/validation" / r for r in reports]
        if proc.returncode != 0 or not all(p.exists() for p in paths):
            errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line][:3]
            print(f"{name}: FAILED (exit {proc.returncode})", *errors, sep="\n  ", flush=True)
            missed_cases.append(name)
            continue
        missed = [line for p in paths for line in json.loads(p.read_text())["missed"]]
        print(f"{name} ({time.monotonic() - t0:.0f} s): {'all goals met' if not missed else ''}",
              *missed, sep="\n  " if missed else "", flush=True)
        if missed:
            missed_cases.append(name)
    n = len(args.cases or cases)
    print(f"{n - len(missed_cases)} of {n} cases met every goal" + (f"; not: {', '.join(missed_cases)}" if missed_cases else ""))
    return 1 if missed_cases else 0


if __name__ == "__main__":
    sys.exit(main())
