"""Dry-run cost of survey-size DAGs: snakedrp's workflow against a bare Snakefile with the same jobs.

For each survey size (visits x CCDs) a registry-only repository is written once
(:mod:`survey_registry`: registry, camera, empty raw files; no pixels), then ``snakemake -n`` is
timed on it twice in the same run: the real workflow, and ``benchmarks/bare_dag/Snakefile``, which
has the same single-frame jobs and files with trivial rules and dict-lookup input functions. Each
dry run is a process of its own; its wall and CPU seconds and peak resident memory (getrusage of that one
child) are printed with the job counts, and the ratio ours / bare (goal: <= 1.3). On a shared
machine compare the CPU seconds: the wall seconds follow the load.

``--startup`` also measures what one job pays before its work (median of ``--repeat`` fresh
processes each): a job script's start (interpreter, Snakemake's script preamble, then the
script's own imports, which for process_ccd are the numerics its work runs on: numpy, scipy,
astropy, sep, galsim), and the Snakefile parse of a nested snakemake (a cluster job runs one, or
two with a job group), as a dry run of one calexp target, ours and bare.

    python benchmarks/bench_dag.py --visits 100 1000 --ccds 100 --work /tmp/dagbench
    python benchmarks/bench_dag.py --visits 100 --startup
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from survey_registry import write_survey  # noqa: E402  (a sibling script, not a package module)

ROOT = Path(__file__).resolve().parents[1]
BARE = ROOT / "benchmarks" / "bare_dag" / "Snakefile"


def measure(cmd: list[str], cwd: Path, *, counts: bool = True) -> dict:
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
    out = result.pop("out")
    if counts:
        result["jobs"] = job_counts(out)
    return result


def script_imports(path: Path) -> str:
    """The module-level import statements of a job script (what runs before its ``main``)."""
    tree = ast.parse(path.read_text())
    return "\n".join(ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


def median_run(cmd: list[str], cwd: Path, repeat: int) -> dict:
    """Median wall and CPU seconds and the largest peak RSS [MB] of ``repeat`` fresh runs of ``cmd``."""
    runs = [measure(cmd, cwd, counts=False) for _ in range(repeat)]
    return dict(wall=statistics.median(r["wall"] for r in runs), cpu=statistics.median(r["cpu"] for r in runs),
                rss=max(r["rss"] for r in runs), repeat=repeat)


def startup(repo: Path, bare_out: Path, repeat: int) -> dict:
    """Per-job start-up: a job script before its work, and one Snakefile parse (ours and bare)."""
    py = sys.executable
    preamble = "import sys, pickle; import snakemake.script, snakemake.logging, snakemake.iocontainers"
    ccd_imports = script_imports(ROOT / "scripts" / "process_ccd.py")
    row = sqlite3.connect(f"file:{repo}/registry.sqlite3?mode=ro", uri=True).execute(
        "SELECT visit, ccd, filter FROM raw WHERE obstype = 'science' ORDER BY visit, ccd LIMIT 1").fetchone()
    visit, ccd, filter_name = row
    code = (f"from snakedrp.repo.butler import Butler; print(Butler({str(repo)!r}, rerun='dagbench')"
            f".output_path('calexp', visit={visit}, ccd={ccd}, filter={filter_name!r}))")
    calexp = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    smk = [py, "-m", "snakemake", "-n", "-q", "--cores", "1"]
    cases = {
        "python -c pass": ([py, "-c", "pass"], ROOT),
        "import snakedrp.config": ([py, "-c", "import snakedrp.config"], ROOT),
        "job script start: interpreter + Snakemake's script preamble (imports snakemake.script)":
            ([py, "-c", preamble], ROOT),
        "... + the imports of scripts/process_ccd.py (the numerics its work needs)":
            ([py, "-c", preamble + "\n" + ccd_imports], ROOT),
        "Snakefile parse, ours: snakemake -n of one calexp": (
            [*smk, calexp, "--config", f"repo={repo}", "rerun=dagbench"], ROOT),
        "Snakefile parse, bare: snakemake -n of one calexp": (
            [*smk, "-s", str(BARE), f"{bare_out}/calexp/{visit}/calexp-{visit}-{ccd}.fits",
             "--config", f"repo={repo}", f"out={bare_out}"], bare_out.parent),
    }
    return {name: median_run(cmd, cwd, repeat) for name, (cmd, cwd) in cases.items()}


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
    parser.add_argument("--startup", action="store_true",
                        help="also measure the per-job start-up (on the first --visits repository)")
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per start-up figure (median)")
    parser.add_argument("--no-dag", action="store_true", help="skip the dry runs (with --startup)")
    args = parser.parse_args(argv)
    snakemake = [sys.executable, "-m", "snakemake", "-n", "-q", "rules"]
    rows = []
    for n_visits in args.visits:
        repo = args.work / f"survey-{n_visits}x{args.ccds}"
        if not (repo / "registry.sqlite3").exists():
            t0 = time.monotonic()
            write_survey(repo, n_visits, args.ccds)
            print(f"wrote {repo} in {time.monotonic() - t0:.1f} s", flush=True)
        bare_dir = args.work / f"bare-{n_visits}x{args.ccds}"
        bare_dir.mkdir(parents=True, exist_ok=True)
        if args.no_dag:
            continue
        ours = measure([*snakemake, "--config", f"repo={repo}", "rerun=dagbench"], cwd=ROOT)
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
    result = rows
    if args.startup:
        n_visits = args.visits[0]
        figures = startup(args.work / f"survey-{n_visits}x{args.ccds}",
                          args.work / f"bare-{n_visits}x{args.ccds}" / "out", args.repeat)
        print(f"\nPer-job start-up, median of {args.repeat} fresh processes ({n_visits} visits x {args.ccds} CCDs "
              "repository for the parses):\n\n| what (one process) | wall s | CPU s | peak MB |\n|---|---|---|---|")
        for name, r in figures.items():
            print(f"| {name} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['rss']:.0f} |")
        print(f"(load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())})")
        result = dict(dag=rows, startup=figures)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
