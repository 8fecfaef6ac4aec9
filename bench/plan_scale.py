"""A plan over a recorded observation of 10,000 shards on 20 servers: time and peak memory.

    python bench/plan_scale.py [--databases 100] [--shards 100] [--servers 20]

No server is started: the config is written to a temporary directory and the observation
(catalog, servers, schemas, five metric samples per shard, 1% of shards hot) is built in
memory, as a plan from recorded samples would see it. The baseline, measured in the same run,
is one pass of serialising that observation to JSON: the least any planner must do is read it
once, so the ratio says how much the planning itself costs beyond that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import loader
from engine.keyspace import even_ranges, physical_name
from engine.observe.metrics import METRICS
from engine.observe.models import (
    AppliedStep,
    CatalogDatabase,
    CatalogShard,
    CatalogState,
    HourlySeries,
    LiveServer,
    LiveShard,
    Observation,
)
from engine.observe.series import Series, micros
from engine.plan import planner
from engine.render.renderers import render

SCHEMA = "CREATE TABLE t (k bigint PRIMARY KEY, v text);"


def build(tmp: Path, databases: int, shards: int, servers: int):
    names = [f"s{i:02d}" for i in range(servers)]
    lines = ["servers:"] + [f"  {n}: {{embedded: true}}" for n in names] + ["databases:"]
    for d in range(databases):
        lines += [f"  db{d:03d}:", "    shard_key: {column: k, type: bigint}",
                  f"    schema: {{name: init, sql: \"{SCHEMA}\"}}", f"    shards: {shards}",
                  f"    placement: [{', '.join(names)}]"]
    (tmp / "fleet.yaml").write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    desired = loader.load(tmp, cwd=tmp)
    load_s = time.perf_counter() - started

    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    fingerprint = "f" * 64
    catalog_dbs, live, metrics = {}, {}, {}
    for d, (name, db) in enumerate(desired.databases.items()):
        settings = planner.settings_of(db)
        rows = []
        for i, r in enumerate(even_ranges(shards)):
            shard = CatalogShard(database=name, name=r.name, lo=r.lo, hi=r.hi, server=names[(d + i) % servers],
                                 dbname=physical_name(name, r), state="active", schema_fingerprint=fingerprint)
            rows.append(shard)
            live[shard.address] = LiveShard(exists=True, schema_fingerprint=fingerprint)
            hot = (d * shards + i) % 100 == 0
            # 5m of 10 s samples (the default sustain), in columns as the catalog returns them
            # (engine.observe.series; store.load_windows)
            metrics[shard.address] = Series.columns(
                shard.address, [shard.server] * 31, [micros(now - timedelta(seconds=10 * (30 - k))) for k in range(31)],
                [10.0] * 31, {m: [20000.0 if hot and m == "queries_per_second" else 500.0
                                  if m == "queries_per_second" else 30.0] * 31 for m in METRICS},
                {m: [(0, "recorded")] for m in METRICS})
        applied = tuple(AppliedStep(seq=i + 1, name=s.name, sha256=s.sha256) for i, s in enumerate(db.schema_steps))
        catalog_dbs[name] = CatalogDatabase(
            name=name, key_column="k", key_type="bigint", protect=False, policy_name=db.policy_name,
            policy=settings.policy, placement=settings.placement, state="active",
            schema_steps=applied, shards=tuple(rows))
    observation = Observation(
        catalog=CatalogState(exists=True, schema_version=2, serial=1, epoch=1, databases=catalog_dbs),
        servers={n: LiveServer(name=n, reachable=True, version="18.6", wal_level="logical", databases=())
                 for n in names},
        shards=live, metrics=metrics, metrics_source="recorded", taken_at=now)
    return desired, observation, load_s


def with_hourly(observation: Observation, days: int) -> Observation:
    """Four weeks (or `days`) of hourly means per shard, as the catalog's rollups give a plan:
    a daily cycle at a third of the 10,000/s threshold, 1% of shards near it and growing."""
    import math

    now = observation.taken_at
    at = tuple(now - timedelta(hours=days * 24 - i) for i in range(days * 24))
    hourly = {}
    for n, address in enumerate(sorted(observation.metrics)):
        peak = 9000.0 if n % 100 == 1 else 3300.0
        qps = tuple(peak * (0.6 + 0.4 * math.cos(2 * math.pi * i / 24)) * (1.02 ** (i / 24 - days))
                    for i in range(len(at)))
        hourly[address] = HourlySeries(at=at, values={m: qps if m == "queries_per_second" else (30.0,) * len(at)
                                                      for m in METRICS})
    return observation.model_copy(update={"hourly": hourly})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--databases", type=int, default=100)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--hourly-days", type=int, default=0,
                        help="also plan with this many days of hourly history per shard (forecasts)")
    args = parser.parse_args()
    load_before = os.getloadavg()  # for the record written at the end
    with tempfile.TemporaryDirectory() as tmp:
        desired, observation, load_s = build(Path(tmp), args.databases, args.shards, args.servers)
    total = sum(len(d.shards) for d in observation.catalog.databases.values())

    plans = []
    plan_runs = _timed(lambda: plans.append(planner.plan(desired, observation)), args.repeat)
    plan_s = statistics.median(plan_runs)
    plan = plans[-1]
    text_s = statistics.median(_timed(lambda: render(plan, "text"), args.repeat))
    json_s = statistics.median(_timed(lambda: render(plan, "json"), args.repeat))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the baseline's big dict
    baseline_runs = _timed(lambda: json.dumps(observation.model_dump(mode="json")), args.repeat)
    baseline = statistics.median(baseline_runs)

    print(f"{total} shards, {len(observation.catalog.databases)} databases, {len(observation.servers)} servers")
    print(f"  config load (YAML -> validated models)      {load_s * 1000:8.1f} ms")
    print(f"  baseline: serialise the observation once    {baseline * 1000:8.1f} ms")
    print(f"  plan (diff + detection + load actions)      {plan_s * 1000:8.1f} ms"
          f"   {plan_s / baseline:5.2f}x the baseline")
    print(f"  render text / json                          {text_s * 1000:8.1f} / {json_s * 1000:.1f} ms")
    print(f"  actions: {len(plan.actions)} ({', '.join(f'{v} {k}' for k, v in plan.summary.by_kind.items())})")
    print(f"  peak RSS: config, observation, plans, renders {rss_mb:6.1f} MB")
    if args.hourly_days:
        ahead = with_hourly(observation, args.hourly_days)
        forecast_s = statistics.median(_timed(lambda: plans.append(planner.plan(desired, ahead)), args.repeat))
        notes = sum("forecast" in w for w in plans[-1].warnings)
        print(f"  plan with {args.hourly_days} days of hourly history a shard   {forecast_s * 1000:8.1f} ms"
              f"   (+{(forecast_s - plan_s) * 1000:.0f} ms for forecasts; {notes} forecast notes)")
    from record import Record  # the bench's record, rendered into docs/BENCHMARKS.md by bench/report.py

    record = Record("plan_scale", load_before=load_before)
    record.fact("shards", total)
    record.fact("config_load_ms", round(load_s * 1000))
    record.fact("peak_rss_mb", round(rss_mb, 1))
    record.fact("actions", len(plan.actions))
    record.measure("serialise", "baseline: serialise the observation to JSON once", [v * 1000 for v in baseline_runs],
                   "ms")
    record.measure("plan", "plan (diff, drift, detection, load actions)", [v * 1000 for v in plan_runs], "ms",
                   baseline="serialise")
    record.write()


def _timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


if __name__ == "__main__":
    main()
