"""The result record every bench writes: what was run, under what load, every run's figures.

docs/BENCHMARKS.md is rendered from these records by bench/report.py, so a figure in it is one
a bench measured and wrote down here, never one typed by hand. A record holds the exact
command (the bench's own argv), the load average before and after the run, and per measure
every run's value with its median, min and max; a measure compared with a baseline names it,
and its ratio is taken run by run against the baseline of the same run where the bench
alternates them (`paired=True`, one value each per run), else median against median.

    rec = Record("branch")                     # docs/bench/branch.json
    rec.measure("baseline", "pg_dump + pg_restore", [28.8], "s")
    rec.measure("full", "full branch", [22.6], "s", baseline="baseline")
    rec.fact("size_mb", 994)
    rec.write()
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
from pathlib import Path

RECORDS = Path(__file__).resolve().parent.parent / "docs" / "bench"
# a trial run (small sizes while changing a bench) writes elsewhere, never over the published record
OUT = Path(os.environ.get("SHARDCTL_BENCH_RECORDS", RECORDS))


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentiles(values: list[float]) -> dict:
    """p50 / p99 / max over cycles (p99 is the nearest rank: with few cycles it is the max)."""
    ordered = sorted(values)
    rank = max(0, -(-99 * len(ordered) // 100) - 1)
    return {"p50": statistics.median(ordered), "p99": ordered[rank], "max": ordered[-1], "n": len(ordered)}


class Record:
    """One bench run's record; NAME is the file's stem (a variant of a bench gets its own name)."""

    def __init__(self, name: str, argv: list[str] | None = None, load_before: tuple[float, ...] | None = None
                 ) -> None:
        """LOAD_BEFORE: the load average the bench took at its start, when the record is made later."""
        self.name = name
        args = sys.argv if argv is None else argv
        self.command = "python " + shlex.join([_relative(args[0]), *args[1:]])
        self.load_before = list(os.getloadavg() if load_before is None else load_before)
        self.measures: list[dict] = []
        self.facts: dict = {}

    def measure(self, key: str, label: str, runs: list[float], unit: str, *,
                baseline: str | None = None, paired: bool = False) -> dict:
        """Every run's value of one measure; BASELINE names the measure doing the same work,
        PAIRED says the bench ran them alternately (run i of each is one pair)."""
        if not runs:
            raise ValueError(f"measure {key}: no runs")
        entry: dict = {"key": key, "label": label, "unit": unit, "runs": [float(v) for v in runs],
                       **spread(runs), "baseline": baseline}
        if baseline is not None:
            base = self.get(baseline)
            if paired and len(base["runs"]) == len(runs):
                each = [v / b for v, b in zip(runs, base["runs"], strict=True)]
                entry["ratio"] = {**spread(each), "paired": True}
            else:
                entry["ratio"] = {**spread([entry["median"] / base["median"]]), "paired": False}
        self.measures.append(entry)
        return entry

    def cycles(self, key: str, label: str, values: list[float], unit: str) -> dict:
        """A latency over cycles (moves): p50 / p99 / max beside the plain spread."""
        entry = self.measure(key, label, values, unit)
        entry["percentiles"] = percentiles(values)
        return entry

    def get(self, key: str) -> dict:
        for entry in self.measures:
            if entry["key"] == key:
                return entry
        raise KeyError(f"no measure {key} in record {self.name}")

    def fact(self, key: str, value) -> None:
        """A figure that is not a timing (sizes, counts, settings) the prose may need."""
        self.facts[key] = value

    def write(self, directory: Path | None = None) -> Path:
        directory = directory or OUT
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        data = {"name": self.name, "command": self.command, "load_before": self.load_before,
                "load_after": list(os.getloadavg()), "measures": self.measures, "facts": self.facts}
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"record written: {path}", flush=True)
        return path


def _relative(script: str) -> str:
    path = Path(script).resolve()
    try:
        return str(path.relative_to(RECORDS.parent.parent))
    except ValueError:
        return script
