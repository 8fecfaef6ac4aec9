"""An online split measured against the physical baseline, in one run.

    python bench/split.py [--rows 1000000] [--fence-runs 5]

1. Baseline: the raw COPY pipe for the same rows (COPY (SELECT .. WHERE range) TO STDOUT into
   COPY .. FROM STDIN of a table with the same primary key on the other server).
2. The split of that shard (two targets, one on each server) while a writer inserts into the
   moving range every ~2 ms through engine.client: copy-phase throughput, fence duration, and
   the writer's latency (p99 and max) over the cutover window (fence start to split complete).
3. Further splits of smaller shards, to see the fence duration over several runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import workflow  # noqa: E402
from engine.client import ShardClient, hashint8extended  # noqa: E402
from engine.servers.fleet import Fleet  # noqa: E402

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now(), balance numeric(12,2) NOT NULL DEFAULT 0);"}
    shards: 4
    placement: [a, b]
policies:
  default:
    autosplit: {cooldown: 0s}
"""


def hot_samples(fleet_dir: Path, hot: str) -> Path:
    with Fleet(workflow.load(str(fleet_dir))).catalog() as conn:
        shards = conn.execute("SELECT database || '/' || name, server FROM shardctl.shards WHERE state = 'active'").fetchall()
    now = datetime.now(timezone.utc)
    out = []
    for address, server in shards:
        for k in range(5):
            qps = 50000.0 if address == hot else 5.0
            out.append({"shard": address, "server": server, "at": (now - timedelta(seconds=10 * (4 - k))).isoformat(),
                        "metrics": {"queries_per_second": qps}})
    path = fleet_dir.parent / "hot.json"
    path.write_text(json.dumps({"samples": out}))
    return path


def shard_row(fleet: Fleet, name: str):
    with fleet.catalog() as conn:
        return conn.execute("SELECT lo, hi, server, dbname FROM shardctl.shards WHERE database = 'orders' AND name = %s",
                            (name,)).fetchone()


def in_range(h: int, lo, hi) -> bool:
    return (lo is None or h >= lo) and (hi is None or h < hi)


class Writer(threading.Thread):
    def __init__(self, catalog, lo, hi):
        super().__init__(daemon=True)
        self.catalog, self.lo, self.hi = catalog, lo, hi
        self.samples: list[tuple[float, float]] = []
        self.stop_flag = threading.Event()

    def run(self):
        rng = random.Random(1)
        with ShardClient(self.catalog, "orders") as client:
            while not self.stop_flag.is_set():
                key = rng.randint(10**12, 2 * 10**12)
                if not in_range(hashint8extended(key), self.lo, self.hi):
                    continue
                began = time.monotonic()
                client.execute(key, "INSERT INTO customers (customer_id, name) VALUES (%s, 'w') ON CONFLICT DO NOTHING",
                               (key,))
                self.samples.append((began, time.monotonic() - began))
                time.sleep(0.002)


def split_once(fleet_dir: Path, fleet: Fleet, shard: str, with_writer: bool):
    lo, hi, server, dbname = shard_row(fleet, shard)
    marks: dict[str, float] = {}

    def say(text: str) -> None:
        if "writes fenced in" in text:
            marks["fenced"] = time.monotonic()
            marks["fence_ms"] = float(text.rsplit("in ", 1)[1].split()[0])
        if "Split complete" in text:
            marks["done"] = time.monotonic()

    writer = None
    if with_writer:
        catalog = fleet.catalog_server.params("shardctl")
        writer = Writer(catalog, lo, hi)
        writer.start()
        time.sleep(0.5)
    desired = workflow.load(str(fleet_dir))
    workflow.apply(desired, None, say=say, metrics_file=str(hot_samples(fleet_dir, f"orders/{shard}")))
    if writer:
        time.sleep(0.5)
        writer.stop_flag.set()
        writer.join()
    with fleet.catalog() as conn:
        detail = conn.execute("SELECT detail FROM shardctl.history WHERE event = 'split_shard' ORDER BY id DESC LIMIT 1"
                              ).fetchone()[0]
    return detail, marks, writer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the whole database (a quarter is split)")
    parser.add_argument("--fence-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardctl-split-") as tmp:
        fleet_dir = Path(tmp) / "fleet"
        fleet_dir.mkdir()
        (fleet_dir / "fleet.yaml").write_text(FLEET)
        desired = workflow.load(str(fleet_dir))
        workflow.apply(desired, None)
        fleet = Fleet(desired)
        try:
            run(fleet_dir, fleet, args)
        finally:
            for handle in fleet.servers.values():
                handle.embedded.stop()


def run(fleet_dir: Path, fleet: Fleet, args) -> None:
    lo, hi, server, dbname = shard_row(fleet, "40-80")
    with fleet.servers[server].connect(dbname) as conn:
        conn.execute("INSERT INTO customers (customer_id, name, balance) SELECT g, md5(g::text), g %% 1000"
                     " FROM generate_series(1, %s) g WHERE hashint8extended(g::bigint, 0) >= %s"
                     " AND hashint8extended(g::bigint, 0) < %s", (args.rows, lo, hi))
        conn.execute("VACUUM ANALYZE customers")
        rows = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
    other = "a" if server == "b" else "b"
    # 1. the baseline: the raw COPY pipe into a table with the same primary key on the other server
    with fleet.servers[other].connect() as admin:
        admin.execute("DROP DATABASE IF EXISTS copy_baseline")
        admin.execute("CREATE DATABASE copy_baseline")
    with fleet.servers[other].connect("copy_baseline") as dst:
        dst.execute("CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text NOT NULL,"
                    " created_at timestamptz NOT NULL DEFAULT now(), balance numeric(12,2) NOT NULL DEFAULT 0)")
    started = time.monotonic()
    with fleet.servers[server].connect(dbname) as src, fleet.servers[other].connect("copy_baseline") as dst:
        with src.cursor().copy("COPY customers TO STDOUT (FORMAT binary)") as out, \
                dst.cursor().copy("COPY customers FROM STDIN (FORMAT binary)") as into:
            for chunk in out:
                into.write(chunk)
    baseline_s = time.monotonic() - started
    with fleet.servers[other].connect() as admin:
        admin.execute("DROP DATABASE copy_baseline")

    # 2. the split under a writer
    detail, marks, writer = split_once(fleet_dir, fleet, "40-80", with_writer=True)
    t = detail["timings"]
    copy_s = t["subscribe"] + t["sync"]
    window = [lat for began, lat in writer.samples
              if marks["fenced"] - marks["fence_ms"] / 1000 - 0.05 <= began <= marks["done"]]
    window.sort()
    p99 = window[int(len(window) * 0.99) - 1] if window else 0.0
    print(f"rows moved: {rows:,} (one shard of {args.rows:,})")
    print(f"baseline raw COPY pipe (binary, PK on target)  {baseline_s:6.2f} s  {rows / baseline_s:10,.0f} rows/s")
    print(f"split copy phase (subscribe + initial sync)     {copy_s:6.2f} s  {rows / copy_s:10,.0f} rows/s"
          f"   {baseline_s / copy_s:.2f}x the baseline's throughput")
    print("split steps: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    print(f"fence held (lock + trigger, one transaction)    {marks['fence_ms']:6.1f} ms")
    print(f"writer during the cutover: {len(window)} writes, p99 {p99 * 1000:.1f} ms, max {max(window) * 1000:.1f} ms"
          f" (whole run: {len(writer.samples)} writes, max {max(l for _, l in writer.samples) * 1000:.1f} ms)")

    # 3. more splits for the fence's distribution
    fences = [marks["fence_ms"]]
    shard = "40-60"
    for _ in range(args.fence_runs - 1):
        detail, marks, _ = split_once(fleet_dir, fleet, shard, with_writer=False)
        fences.append(marks["fence_ms"])
        lo_name = shard.split("-")[0]
        shard = min((t["name"] for t in detail["targets"] if t["name"].startswith(lo_name)), default=shard)
    fences.sort()
    print(f"fence over {len(fences)} splits: median {statistics.median(fences):.1f} ms, max {fences[-1]:.1f} ms")


if __name__ == "__main__":
    main()
