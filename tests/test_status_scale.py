"""`status` at the size it exists for: 256 shards with two hours of samples each fit a 120-column
terminal (the q/s history is a bounded sparkline, and past COMPACT_AFTER shards the table lists
only the shards worth a look). The rows are made by status itself (_shard_row) from sample
windows in columns and the detector's verdicts on them."""

from __future__ import annotations

import io
import math
from contextlib import redirect_stdout
from datetime import timedelta
from types import SimpleNamespace

from conftest import assert_golden
from engine.detect.detector import assess
from engine.keyspace import even_ranges, physical_name
from engine.observe.metrics import METRICS
from engine.observe.series import Series, micros
from engine.status import BUSIEST, SPARK_WIDTH, _shard_row, render_status, sparkline
from test_one_truth import POLICY, _database
from traces import START

SHARDS = 256
SAMPLES = 720  # two hours at 10 s
HOT = {7, 100, 201}  # over the hot q/s threshold for the last 10 minutes
IDLE = {50, 51}  # under every cold threshold throughout


AT = [micros(START + timedelta(seconds=10 * k)) for k in range(SAMPLES)]


def _window(address: str, server: str, i: int) -> Series:
    values: dict[str, list[float | None]] = {}
    for m in METRICS:
        values[m] = [0.5 if i in IDLE else 20.0 + (i % 7)] * SAMPLES
    if i in IDLE:
        values["queries_per_second"] = [1.0] * SAMPLES
        values["connections"] = [1.0] * SAMPLES
        values["latency_ms"] = [None] * SAMPLES
    else:
        values["queries_per_second"] = [
            round(400 + (i * 37) % 300 + 250 * math.sin(k / 60 + i), 1)
            + (15_000.0 if i in HOT and k >= SAMPLES - 60 else 0.0) for k in range(SAMPLES)]
        values["latency_ms"] = [2.0 + (i % 5) / 10] * SAMPLES
    return Series.columns(address, [server] * SAMPLES, AT, [10.0] * SAMPLES, values,
                          {m: [(0, "recorded")] for m in METRICS})


def _report() -> dict:
    rows = []
    for i, key_range in enumerate(even_ranges(SHARDS)):
        server = "ab"[i % 2]
        shard = SimpleNamespace(name=key_range.name, lo=key_range.lo, hi=key_range.hi, server=server,
                                dbname=physical_name("orders", key_range), state="active")
        window = _window(f"orders/{key_range.name}", server, i)
        rows.append(_shard_row(shard, window, assess(f"orders/{key_range.name}", window, POLICY)))
    return {"servers": [], "catalog": {"server": "a", "state": "ok"}, "interrupted": [],
            "databases": [_database(rows)]}


def test_status_of_256_shards_with_hours_of_history_fits_120_columns():
    report = _report()
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        render_status(report, colour=False, width=120)
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 120
    shards = report["databases"][0]["shards"]
    assert sorted(s["load"] for s in shards if s["load"] != "normal") == ["cold", "cold", "hot", "hot", "hot"]
    # every shard worth a look is listed, with its whole history in the bounded sparkline
    for s in shards:
        listed = f"orders/{s['name']} " in text
        assert listed == (s["load"] != "normal" or s["name"] in _busiest(shards)), s["name"]
    assert f"{SHARDS - 5 - len(set(_busiest(shards)) - _unusual(shards))} more shards of orders" in text
    assert_golden("status_256_shards.txt", text)


def _busiest(shards: list[dict]) -> set[str]:
    rates = sorted(shards, key=lambda s: s["metrics"]["queries_per_second"]["value"], reverse=True)
    return {s["name"] for s in rates[:BUSIEST]}


def _unusual(shards: list[dict]) -> set[str]:
    return {s["name"] for s in shards if s["load"] != "normal"}


def test_the_sparkline_is_bounded_and_keeps_a_spike():
    values: list[float | None] = [1.0] * 5000
    values[1234] = 90.0
    values[4000:4100] = [None] * 100
    line = sparkline(values)
    assert len(line) == SPARK_WIDTH
    assert line.count("█") == 1 and line.index("█") == 1234 * SPARK_WIDTH // 5000
    assert sparkline([1.0, None, 2.0]) == "▅·█"  # short histories as they were
