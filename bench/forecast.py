"""Forecasts on the shapes production traffic has (issue 31): per shape, over several seeds, the
decision an SRE would take against what the backtest and plans in `forecast.mode: act` did, the
forecast's error (48-hour WAPE), the lead time of the first split ahead, false and missed splits,
and the time over the hot threshold against the reactive policy replayed in the same run.

    python bench/forecast.py --seeds 1 2 3 [--jobs 2]

The shapes are tests/traces.py's `shape` (one value a minute, noise and levels drawn from the
seed); the judging is tests/forecast_shapes.py's, the same the tests assert. Writes its record
(bench/record.py) to docs/bench/forecast.json: the table this run printed, each replay's seconds,
forecast error and hot time (reactive, the baseline, against predictive); bench/report.py renders
it into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
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
from record import Record  # noqa: E402
from traces import SHAPES, shape  # noqa: E402


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
    args = parser.parse_args()
    record = Record("forecast")
    started = time.perf_counter()
    jobs = [(name, seed) for name in args.shapes for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    lines = table(results, args.seeds, args.shapes)
    print("\n".join(lines))
    record.fact("seeds", args.seeds)
    record.fact("replays", len(jobs))
    record.fact("whole_run_s", round(time.perf_counter() - started))
    record.fact("table", lines)
    record.measure("replay_s", "one shape and seed: a backtest and a plan replay", [r[4] for r in results], "s")
    record.measure("wape", "forecast error, 48 h WAPE, every replay that forecast",
                   [j.wape for _, _, j, _, _ in results if j.wape is not None], "%")
    splits = [j for n, _, j, _, _ in results if shape(n).decision == "split"]
    record.measure("reactive_hot", "baseline: time over the hot threshold, reactive policy, shapes where a split"
                   " ahead is right", [j.reactive_hot / 60 for j in splits], "min")
    record.measure("predictive_hot", "the same replays, predictive (forecast.mode: act)",
                   [j.predictive_hot / 60 for j in splits], "min", baseline="reactive_hot")
    record.write()


if __name__ == "__main__":
    main()
