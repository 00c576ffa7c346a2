"""Dry-run cost of survey-size DAGs: snakedrp's workflow against a bare Snakefile with the same jobs.

For each survey size (visits x CCDs) a registry-only repository is written once
(:mod:`survey_registry`: registry, camera, empty raw files; no pixels), then ``snakemake -n`` is
timed on it twice in the same run: the real workflow, and ``benchmarks/bare_dag/Snakefile``, which
has the same single-frame jobs and files with trivial rules and dict-lookup input functions. Each
dry run is a process of its own; its wall and CPU seconds and peak resident memory (getrusage of that one
child) are printed with the job counts, and the ratio ours / bare (goal: <= 1.3). On a shared
machine compare the CPU seconds: the wall seconds follow the load.

    python benchmarks/bench_dag.py --visits 100 1000 --ccds 100 --work /tmp/dagbench
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from survey_registry import write_survey  # noqa: E402  (a sibling script, not a package module)

ROOT = Path(__file__).resolve().parents[1]
BARE = ROOT / "benchmarks" / "bare_dag" / "Snakefile"


def measure(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd`` in a fresh child; wall and CPU seconds, peak RSS [MB], job counts from its job table."""
    code = ("import resource, subprocess, sys, time, json; t = time.monotonic(); "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "wall = time.monotonic() - t; "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(json.dumps(dict(rc=p.returncode, wall=wall, cpu=u.ru_utime + u.ru_stime, rss=u.ru_maxrss / 1024, "
            "out=p.stdout + p.stderr)))")
    proc = subprocess.run([sys.executable, "-c", code, *cmd], cwd=cwd, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result['out'][-3000:]}")
    result["jobs"] = job_counts(result.pop("out"))
    return result


def job_counts(text: str) -> dict[str, int]:
    """Rule -> jobs from the first "Job stats" table of a dry run."""
    m = re.search(r"^Job stats:\n(.*?)^total\s+(\d+)\s*$", text, re.M | re.S)
    if m is None:
        raise RuntimeError(f"no job table in:\n{text[-2000:]}")
    counts = {}
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--ccds", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "snakedrp-dagbench")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    snakemake = [sys.executable, "-m", "snakemake", "-n", "-q", "rules"]
    rows = []
    for n_visits in args.visits:
        repo = args.work / f"survey-{n_visits}x{args.ccds}"
        if not (repo / "registry.sqlite3").exists():
            t0 = time.monotonic()
            write_survey(repo, n_visits, args.ccds)
            print(f"wrote {repo} in {time.monotonic() - t0:.1f} s", flush=True)
        ours = measure([*snakemake, "--config", f"repo={repo}", "rerun=dagbench"], cwd=ROOT)
        bare_dir = args.work / f"bare-{n_visits}x{args.ccds}"
        bare_dir.mkdir(parents=True, exist_ok=True)
        bare = measure([*snakemake, "-s", str(BARE), "--config", f"repo={repo}", f"out={bare_dir / 'out'}"],
                       cwd=bare_dir)
        row = dict(visits=n_visits, ccds=args.ccds, ours=ours, bare=bare)
        rows.append(row)
        print(f"{n_visits} visits x {args.ccds} CCDs: process_ccd jobs ours {ours['jobs'].get('process_ccd')}, "
              f"bare {bare['jobs'].get('process_ccd')}; total ours {sum(ours['jobs'].values())}, "
              f"bare {sum(bare['jobs'].values())}", flush=True)
    print("\n| process_ccd jobs | jobs ours / bare | wall s ours / bare | ratio | CPU s ours / bare | ratio "
          "| peak MB ours / bare | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, b = r["ours"], r["bare"]
        print(f"| {o['jobs'].get('process_ccd')} | {sum(o['jobs'].values())} / {sum(b['jobs'].values())} "
              f"| {o['wall']:.0f} / {b['wall']:.0f} | {o['wall'] / b['wall']:.2f} "
              f"| {o['cpu']:.0f} / {b['cpu']:.0f} | {o['cpu'] / b['cpu']:.2f} "
              f"| {o['rss']:.0f} / {b['rss']:.0f} | {o['rss'] / b['rss']:.2f} |")
    print(f"(load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; goal ours <= 1.3 x bare)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
