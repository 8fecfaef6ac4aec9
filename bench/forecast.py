"""Forecasts on the shapes production traffic has (issue 31): per shape, over several seeds, the
decision an SRE would take against what the backtest and plans in `forecast.mode: act` did, the
forecast's error (48-hour WAPE), the lead time of the first split ahead, false and missed splits,
and the time over the hot threshold against the reactive policy replayed in the same run.

    python bench/forecast.py --seeds 1 2 3 [--jobs 2] [--write docs/BENCHMARKS.md]

The shapes are tests/traces.py's `shape` (one value a minute, noise and levels drawn from the
seed); the judging is tests/forecast_shapes.py's, the same the tests assert. With --write, the
section between the markers in the file is replaced by the table this run printed, with the
command, the seeds and the load average (nothing in it is typed by hand).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from forecast_shapes import Judged, backtest, plan_replay  # noqa: E402
from traces import SHAPES, shape  # noqa: E402

BEGIN, END = "<!-- bench/forecast.py: begin -->", "<!-- bench/forecast.py: end -->"


def run_one(job: tuple[str, int]) -> tuple[str, int, Judged, Judged, float]:
    name, seed = job
    started = time.perf_counter()
    judged, _ = backtest(name, seed)
    with tempfile.TemporaryDirectory() as directory:
        planned = plan_replay(name, Path(directory), seed)
    return name, seed, judged, planned, time.perf_counter() - started


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(results: list[tuple[str, int, Judged, Judged, float]], seeds: list[int], names: list[str]) -> list[str]:
    lines = ["| shape | SRE decision | backtest agrees | plan agrees | forecast error (48 h WAPE, median) |"
             " lead time of the split ahead (median) | false splits | missed splits |"
             " hot time reactive -> predictive |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        rows = [(j, p) for n, _, j, p, _ in results if n == name]
        reactive = sum(j.reactive_hot for j, _ in rows)
        predictive = sum(j.predictive_hot for j, _ in rows)
        hot = "-" if not reactive else (f"{reactive / 60:.0f} min -> {predictive / 60:.0f} min"
                                        f" ({100 * (reactive - predictive) / reactive:.0f}% less)")
        lines.append(
            f"| {name} | {shape(name).decision} | {sum(j.agrees for j, _ in rows)}/{len(rows)}"
            f" | {sum(p.agrees for _, p in rows)}/{len(rows)}"
            f" | {_fmt(_median([j.wape for j, _ in rows if j.wape is not None]), '.1f', '%')}"
            f" | {_fmt(_median([j.lead_hours for j, _ in rows if j.lead_hours is not None]), '.1f', ' h')}"
            f" | {sum(j.false_splits + p.false_splits for j, p in rows)}"
            f" | {sum(j.missed + p.missed for j, p in rows)} | {hot} |")
    lines.append("")
    for seed in seeds:
        mine = [(j, p) for _, s, j, p, _ in results if s == seed]
        lines.append(f"- seed {seed}: the backtest agrees with the SRE in {sum(j.agrees for j, _ in mine)} of"
                     f" {len(mine)} shapes, the plan replay in {sum(p.agrees for _, p in mine)} of {len(mine)}")
    splits = [(j, p) for n, _, j, p, _ in results if shape(n).decision == "split"]
    reactive = sum(j.reactive_hot for j, _ in splits)
    predictive = sum(j.predictive_hot for j, _ in splits)
    lines.append(f"- where a split ahead is right, time over the hot threshold: reactive {reactive / 3600:.1f} h,"
                 f" predictive {predictive / 3600:.1f} h ({100 * (reactive - predictive) / reactive:.0f}% less)")
    lines.append("")
    wrong = []
    for n, s, j, p, _ in sorted(results, key=lambda r: (SHAPES.index(r[0]), r[1])):
        if not j.agrees:
            wrong.append(f"- {n} seed {s}, backtest: {j.why}")
        if not p.agrees:
            wrong.append(f"- {n} seed {s}, plan: {p.why}")
    return [*lines, "Disagreements:" if wrong else "Disagreements: none.", *wrong]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None, help="replace the section between the markers here")
    args = parser.parse_args()
    started = time.perf_counter()
    jobs = [(name, seed) for name in args.shapes for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    load = os.getloadavg()
    command = "python bench/forecast.py " + " ".join(
        ["--seeds", *map(str, args.seeds), "--jobs", str(args.jobs)]
        + (["--shapes", *args.shapes] if args.shapes != list(SHAPES) else []))
    lines = [f"Command: `{command}` ({len(jobs)} replays of a backtest and a plan replay each, seeds"
             f" {', '.join(map(str, args.seeds))}; {time.perf_counter() - started:.0f} s; load average"
             f" {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}).", "", *table(results, args.seeds, args.shapes)]
    print("\n".join(lines))
    if args.write:
        text = args.write.read_text()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        args.write.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)


if __name__ == "__main__":
    main()
