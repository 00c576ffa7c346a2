"""Every stage's benchmark in one run, and one markdown table of seconds, peak memory and ratios.

    python benchmarks/run_all.py                 # full: --repeat 3, DAGs of 100 and 1000 visits
    python benchmarks/run_all.py --quick         # one repeat, the 100-visit DAG only (a few minutes)

Runs, one after another, each in a process of its own (so that one's memory never counts in
another's): ``bench_process_ccd.py`` (single frame vs SExtractor + PSFEx + SCAMP),
``bench_coadd.py`` (coadd vs SWarp), ``bench_dag.py`` (dry run of large DAGs vs a bare
Snakefile, and the start-up one job pays), when present (a missing one is listed as skipped).
Each benchmark writes its JSON into ``benchmarks/out/``; this script reads them, prints the table, and writes it with the
date and machine to ``benchmarks/out/run_all.md``. Machines here vary by up to ±40 % between
runs: compare numbers from one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def run_child(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall seconds, peak RSS [MB] (of that child alone, wait4) and exit code."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=HERE.parent)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    return dict(wall=wall, rss_mb=usage.ru_maxrss / 1024.0, rc=os.waitstatus_to_exitcode(status))


def row(stage, case, ours_s=None, peer_s=None, ours_mb=None, peer_mb=None, peer="", note=""):
    ratio = ours_s / peer_s if ours_s and peer_s else None
    mem_ratio = ours_mb / peer_mb if ours_mb and peer_mb else None
    return dict(stage=stage, case=case, ours_s=ours_s, peer=peer, peer_s=peer_s, ratio=ratio, ours_mb=ours_mb,
                peer_mb=peer_mb, mem_ratio=mem_ratio, note=note)


def run_benchmark(stage: str, script: str, out: Path, argv: list[str], missing: str | None = None):
    """Run ``benchmarks/<script> argv`` in a child of its own and read the JSON it writes to ``out``.

    Returns ``(result, [])``, or ``(None, [row])`` with the row saying why there is no result (the
    script is missing, or it wrote no JSON). A JSON of an earlier run is removed first, so that it
    is never shown as this run's.
    """
    path = HERE / script
    if not path.exists():
        return None, [row(stage, "—", note=missing or f"skipped: benchmarks/{script} not present")]
    out.unlink(missing_ok=True)
    child = run_child([sys.executable, str(path), *argv])
    if not out.exists():
        return None, [row(stage, "—", note=f"failed (exit {child['rc']}), no {out.name}")]
    return json.loads(out.read_text()), []


def process_ccd(args) -> list[dict]:
    out = OUT / "process_ccd.json"
    r, failed = run_benchmark("single frame", "bench_process_ccd.py", out,
                              ["--repeat", str(args.repeat), "--output", str(out)])
    if r is None:
        return failed
    ours, peer = r["ours"], r["peer"]
    return [row("single frame", "raw → calexp + src, 1 HSC CCD 2048x4176", ours.get("median_seconds"),
                peer.get("median_seconds_total"), ours.get("peak_memory_mb"), peer.get("peak_memory_mb"),
                "SExtractor + PSFEx + SCAMP", f"median of {r['repeat']}; peers start from the ISR'd image")]


def coadd(args) -> list[dict]:
    out_dir = OUT / "coadd"
    visits = ["5"] if args.quick else ["5", "10"]
    result, failed = run_benchmark("coadd", "bench_coadd.py", out_dir / "coadd.json",
                                   ["--visits", *visits, "--out", str(out_dir)])
    if result is None:
        return failed
    rows = []
    for n, r in result.items():
        ours, swarp = r["ours"], r["swarp"]
        rows.append(row("coadd", f"warp + assemble, one 4200x4200 patch from {n} visits x 2 HSC CCDs",
                        ours.get("seconds"), swarp.get("seconds"), ours.get("peak_mb"), swarp.get("peak_mb"),
                        "SWarp (LANCZOS3, WEIGHTED)", "one run, one core"))
    return rows


def multiband(args) -> list[dict]:
    out = OUT / "multiband.json"
    r, failed = run_benchmark("multi-band", "bench_multiband.py", out, ["--json", str(out)],
                              missing="skipped: the multi-band stage is not built yet")
    if r is None:
        return failed
    return [row("multi-band", r.get("case", "per patch"), r.get("ours_s"), r.get("peer_s"), r.get("ours_mb"),
                r.get("peer_mb"), r.get("peer", ""), r.get("note", ""))]


def dag(args) -> list[dict]:
    out = OUT / "dag.json"
    visits = ["100"] if args.quick else ["100", "1000"]
    result, failed = run_benchmark("DAG dry run", "bench_dag.py", out,
                                   ["--visits", *visits, "--ccds", "100", "--startup", "--repeat", "3",
                                    "--json", str(out)])
    if result is None:
        return failed
    rows = []
    for r in result["dag"]:
        o, b = r["ours"], r["bare"]
        jobs = sum(o["jobs"].values())
        rows.append(row("DAG dry run", f"{r['visits']} visits x {r['ccds']} CCDs ({jobs} jobs)", o["cpu"], b["cpu"],
                        o["rss"], b["rss"], "bare Snakefile, same jobs", f"CPU s; wall {o['wall']:.0f} / {b['wall']:.0f} s"))
    figures = result["startup"]
    # bench_dag's names: the job script's start, and one Snakefile parse (what a cluster job pays first)
    script = next(v for k, v in figures.items() if k.startswith("job script start"))
    parse = {side: next(v for k, v in figures.items() if k.startswith(f"Snakefile parse, {side}"))
             for side in ("ours", "bare")}
    rows.append(row("per-job start-up", "a job script before its work (interpreter + Snakemake's preamble)",
                    script["wall"], figures["python -c pass"]["wall"], script["rss"], figures["python -c pass"]["rss"],
                    "bare `python -c pass`", "median of 3; the script's numerics imports come with its work"))
    rows.append(row("per-job start-up", "Snakefile parse a cluster job pays (snakemake -n of one calexp)",
                    parse["ours"]["wall"], parse["bare"]["wall"], parse["ours"]["rss"], parse["bare"]["rss"],
                    "bare Snakefile", "median of 3"))
    return rows


def _fmt(value, spec=".2f"):
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict]) -> str:
    lines = ["| stage | case | ours [s] | peer | peer [s] | ratio | ours peak [MB] | peer peak [MB] | ratio | note |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['case']} | {_fmt(r['ours_s'])} | {r['peer']} | {_fmt(r['peer_s'])} | "
                     f"{_fmt(r['ratio'])} | {_fmt(r['ours_mb'], '.0f')} | {_fmt(r['peer_mb'], '.0f')} | "
                     f"{_fmt(r['mem_ratio'])} | {r['note']} |")
    return "\n".join(lines)


BENCHMARKS = {"process_ccd": process_ccd, "coadd": coadd, "multiband": multiband, "dag": dag}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="repeats for the benchmarks that take it")
    parser.add_argument("--quick", action="store_true", help="one repeat, the small DAG only")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, bench in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        print(f"=== {name}", flush=True)
        rows += bench(args)
    stamp = (f"{datetime.date.today().isoformat()}, {platform.node()}: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}, load {os.getloadavg()[0]:.1f} at the end")
    text = f"Benchmarks, one run ({stamp}); ratio = ours / peer (lower is better).\n\n{markdown(rows)}\n"
    print("\n" + text)
    (OUT / "run_all.md").write_text(text)
    (OUT / "run_all.json").write_text(json.dumps(dict(stamp=stamp, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
