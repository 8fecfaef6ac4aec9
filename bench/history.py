"""The catalog's long metric history: size and collection CPU for 300 shards over 30 days at a
10 s interval, rollups (what shardctl does) against storing every raw sample, in the same run,
against a real embedded catalog server.

    python bench/history.py [--shards 300] [--rounds 360] [--fill-days 1]

What is measured, and what is extrapolated (30 days x 8,640 rounds would take hours):

- collection CPU: `--rounds` rounds (default 360 = one simulated hour) of `store.save_samples`
  for every shard, through the real code: raw insert, 1-minute and 1-hour rollup upserts and
  the retention deletes (raw retention is scaled down to 20 minutes here so that the deletes
  of the steady state run inside the hour). The baseline inserts the same raw samples and
  keeps them all (the catalog before rollups, without its newest-N trim). CPU is this
  process's plus every process of the catalog server's (from /proc), per round.
- size: bytes per row measured on the tables filled here (raw rows by the rounds; rollup rows
  by `--fill-days` of 1-minute and 1-hour buckets generated in SQL for every shard), times the
  rows each layout holds after 30 days: raw for all 30 days (baseline) against raw for
  metrics.retention.raw (6 h) + 1-minute buckets for 8 days + 1-hour buckets for 30 days. Each
  layout's raw rows are sized by its own table: the baseline's (raw rows only, no deletes) and
  the rollup run's (raw rows churned through their retention, the space its deletes freed
  included), so neither side is given the other's row size.
- spread: the CPU is taken per chunk of rounds (--chunks, default 6), each chunk one run.
Writes its record (bench/record.py) to docs/bench/history.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.catalog import schema, store
from engine.config.models import Retention
from engine.observe.metrics import METRICS, MetricValue, Reading, Sample
from engine.observe.rollup import rollup_rows
from engine.servers.embedded import EmbeddedServer
from record import Record

INTERVAL = 10.0
DAYS = 30
SOURCES = {"queries_per_second": "pg_stat_statements calls", "cpu_percent": "host /proc CPU of backends, of cpus",
           "memory_percent": "pg_buffercache / capacity.memory", "storage_percent": "pg_database_size / capacity",
           "connections": "pg_stat_activity client backends", "latency_ms": "pg_stat_statements mean exec time"}


def server_cpu(pid: int) -> float:
    """CPU seconds of the postmaster and its children (every backend of the catalog server)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid or int(entry.name) == pid:  # ppid or the postmaster itself
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def round_of(shards: list[str], at: datetime, i: int) -> list[tuple[Reading, Sample]]:
    rows = []
    for n, shard in enumerate(shards):
        load = 1000.0 + (n * 37 + i) % 500
        reading = Reading(shard=shard, server="a", dbname=shard.replace("/", "_"), at=at,
                          counters={"xacts": 1e6 + i * load, "calls": 2e6 + i * load, "exec_ms": 3e5 + i,
                                    "active_ms": 4e5 + i},
                          gauges={"connections": 12.0, "size_bytes": 2.1e9, "buffer_bytes": 3.0e8},
                          notes={"proc": "yes"})
        metrics = {m: MetricValue(value=round(load / (k + 1), 3), source=SOURCES[m]) for k, m in enumerate(METRICS)}
        rows.append((reading, Sample(shard=shard, server="a", at=at, interval_s=INTERVAL, metrics=metrics)))
    return rows


def run(conn: psycopg.Connection, pid: int, shards: list[str], rounds: int, mode: str, chunks: int) -> list[float]:
    """CPU seconds per round, one figure per chunk of rounds."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    keep = dict.fromkeys(shards, 33)
    retention = dict.fromkeys(shards, Retention(raw=1200))
    per_chunk = max(1, rounds // chunks)
    out = []
    cpu0, srv0 = time.process_time(), server_cpu(pid)
    for i in range(rounds):
        if i and i % per_chunk == 0:
            cpu1, srv1 = time.process_time(), server_cpu(pid)
            out.append((cpu1 - cpu0 + srv1 - srv0) / per_chunk)
            cpu0, srv0 = cpu1, srv1
        rows = round_of(shards, start + timedelta(seconds=INTERVAL * i), i)
        if mode == "rollups":
            store.save_samples(conn, rows, keep, retention)
        else:  # the baseline: every raw sample kept
            with conn.transaction():
                conn.execute(
                    "INSERT INTO shardctl.metric_samples (shard, server, at, reading, metrics)"
                    " SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::jsonb[], %s::jsonb[])",
                    ([s.shard for _, s in rows], [s.server for _, s in rows], [s.at for _, s in rows],
                     [psycopg.types.json.Jsonb(r.model_dump(mode="json")) for r, _ in rows],
                     [psycopg.types.json.Jsonb(s.model_dump(mode="json")) for _, s in rows]))
    done = rounds - per_chunk * len(out)
    if done:
        out.append((time.process_time() - cpu0 + server_cpu(pid) - srv0) / done)
    return out


def bytes_per_row(conn: psycopg.Connection, table: str, where: str = "") -> float:
    size = conn.execute(f"SELECT pg_total_relation_size('shardctl.{table}')").fetchone()[0]
    count = conn.execute(f"SELECT count(*) FROM shardctl.{table} {where}").fetchone()[0]
    return size / max(count, 1)


def fill_rollups(conn: psycopg.Connection, shards: list[str], days: int) -> None:
    """`days` of 1-minute and 1-hour buckets per shard, as the rounds would leave them."""
    columns = ", ".join(f"{m}_sum, {m}_n, {m}_max" for m in METRICS)
    values = ", ".join("1234.5 * n, n, 999.25" for _ in METRICS)
    conn.execute("TRUNCATE shardctl.metric_rollups")
    for resolution in (60, 3600):
        count = days * 86400 // resolution
        conn.execute(
            f"INSERT INTO shardctl.metric_rollups (shard, resolution, bucket, samples, {columns})"
            f" SELECT s, {resolution}, timestamptz '2025-12-01' + make_interval(secs => {resolution} * g), n, {values}"
            f" FROM unnest(%s::text[]) s, generate_series(0, {count - 1}) g, (SELECT {resolution // 10} AS n) k",
            (shards,))
    conn.execute("VACUUM ANALYZE shardctl.metric_rollups")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=360)
    parser.add_argument("--fill-days", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=6, help="the rounds in this many chunks: one CPU figure each")
    args = parser.parse_args()
    record = Record("history")
    shards = [f"orders/{i:04x}" for i in range(args.shards)]
    retention = Retention()
    with tempfile.TemporaryDirectory(prefix="shardctl-bench-history-") as tmp:
        server = EmbeddedServer("bench", Path(tmp) / "bench")
        server.start()
        try:
            with psycopg.connect(**server.conninfo(), autocommit=True) as admin:
                admin.execute("CREATE DATABASE raw_only")
                admin.execute("CREATE DATABASE rolled")
            pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
            results = {}
            for mode, dbname in (("raw", "raw_only"), ("rollups", "rolled")):
                with psycopg.connect(**server.conninfo(dbname), autocommit=True) as conn:
                    schema.migrate(conn)
                    results[mode] = run(conn, pid, shards, args.rounds, mode, args.chunks)
                    conn.execute("VACUUM ANALYZE shardctl.metric_samples")
                    results[mode + "_raw_row"] = bytes_per_row(conn, "metric_samples")
                    if mode == "rollups":
                        results["rollup_rows_per_round"] = len(rollup_rows(s for _, s in round_of(shards, datetime(
                            2026, 1, 1, tzinfo=UTC), 0)))
                        fill_rollups(conn, shards, args.fill_days)
                        results["minute_row"] = bytes_per_row(conn, "metric_rollups")
        finally:
            server.stop()
    per_day = 86400 / INTERVAL
    raw_rows = args.shards * per_day * DAYS
    baseline = raw_rows * results["raw_raw_row"]
    # each layout's raw rows at the size measured in its own table: the rollup layout's raw
    # table is churned by its retention, and what its deletes free is space it holds
    kept_raw = args.shards * retention.raw / INTERVAL * results["rollups_raw_row"]
    minute = args.shards * min(retention.minute, DAYS * 86400) / 60 * results["minute_row"]
    hour = args.shards * min(retention.hour, DAYS * 86400) / 3600 * results["minute_row"]
    rolled = kept_raw + minute + hour
    gib = 1024 ** 3
    print(f"{args.shards} shards, {INTERVAL:g} s interval, {args.rounds} rounds measured, sizes for {DAYS} days")
    print(f"bytes per row: raw sample {results['raw_raw_row']:.0f} (baseline table), "
          f"{results['rollups_raw_row']:.0f} (the rollup run's raw table: live rows of a 20-minute retention, with the"
          f" space its deletes freed), rollup bucket {results['minute_row']:.0f}")
    print(f"catalog size after {DAYS} days: raw samples only {baseline / gib:.1f} GiB ({raw_rows:,.0f} rows);"
          f" rollups {rolled / gib:.2f} GiB (raw {retention.raw / 3600:g} h {kept_raw / gib:.2f} GiB +"
          f" 1-minute {retention.minute / 86400:g} d {minute / gib:.2f} GiB + 1-hour {DAYS} d {hour / gib:.3f} GiB)"
          f" = {baseline / rolled:.1f}x smaller; it stops growing at the hour retention ({retention.hour / 86400:g} d)"
          f" (raw only grows {args.shards * per_day * results['raw_raw_row'] / gib:.2f} GiB a day)")
    record.fact("shards", args.shards)
    record.fact("rounds", args.rounds)
    record.fact("days", DAYS)
    record.fact("raw_rows_baseline", raw_rows)
    record.fact("bucket_upserts_per_round", results["rollup_rows_per_round"])
    record.measure("raw_row", "bytes per raw row, baseline table (raw rows only)", [results["raw_raw_row"]], "B")
    record.measure("rolled_raw_row", "bytes per live raw row, the rollup run's table (retention deletes)",
                   [results["rollups_raw_row"]], "B", baseline="raw_row")
    record.measure("bucket_row", "bytes per rollup bucket", [results["minute_row"]], "B")
    record.measure("size_raw", f"baseline: catalog size after {DAYS} days, raw samples only", [baseline / gib], "GiB")
    record.measure("size_rollups", f"catalog size after {DAYS} days, rollups (raw {retention.raw / 3600:g} h"
                   f" + 1-minute {retention.minute / 86400:g} d + 1-hour {DAYS} d)", [rolled / gib], "GiB",
                   baseline="size_raw")
    record.measure("growth_raw", "baseline: growth a day, for ever", [args.shards * per_day * results["raw_raw_row"]
                                                                        / gib], "GiB")
    cpu_raw = record.measure("cpu_raw", "baseline: collection CPU per round, raw insert only (client + catalog server)",
                             [v * 1000 for v in results["raw"]], "ms")
    cpu_rolled = record.measure("cpu_rollups", "collection CPU per round, rollups + retention deletes",
                                [v * 1000 for v in results["rollups"]], "ms", baseline="cpu_raw")
    print(f"collection CPU per round (client + catalog server, median of {len(results['raw'])} chunks): raw only"
          f" {cpu_raw['median']:.1f} ms, rollups + retention {cpu_rolled['median']:.1f} ms"
          f" ({cpu_rolled['ratio']['median']:.2f}x; {results['rollup_rows_per_round']} bucket upserts a round);"
          f" {cpu_rolled['median'] / 1000 / INTERVAL * 100:.2f}% of one core at a {INTERVAL:g} s interval")
    record.write()


if __name__ == "__main__":
    main()
