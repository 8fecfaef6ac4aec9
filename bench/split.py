"""Online splits and merges under application load, measured against the raw COPY pipe, in one run.

    python bench/split.py [--sizes 1000000,8000000] [--cycles 5]

For each shard size N (rows in the moving shard):

1. Baseline: the raw COPY pipe of the shard's table (binary COPY out of the source into a table
   with the same primary key on the other server), without load.
2. One split without load: its copy phase (subscribe + initial sync) against the baseline.
3. `--cycles` times, a split of the shard and a merge of its halves back, each while pgbench
   (4 clients, full speed, an UPDATE and an INSERT per transaction) writes the moving shard and
   two engine.client writers insert keys of the moving range, re-routing at the cutover. The
   figure is what the application sees: the range is unwritable from the last write the source
   accepted to the first write a target accepted (the writers' timeline, merged). Also: the
   pause as shardctl measures it (fence locks to routing flip), and pgbench's throughput during
   the copy against before it.
4. One split and one merge under the same load with the copy throttle (`moves.copy_streams: 1`):
   pgbench's throughput and the copy's duration against the unthrottled moves.

Prints per size: p50, p99 and max of the unwritable window over the splits (and the merges),
and the 8M/1M ratio when both sizes ran.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import workflow  # noqa: E402
from engine.client import ShardClient, hashint8extended  # noqa: E402
from engine.servers.embedded import bin_dir  # noqa: E402
from engine.servers.fleet import Fleet  # noqa: E402

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now(), balance numeric(12,2) NOT NULL DEFAULT 0);
      CREATE TABLE history (customer_id bigint NOT NULL, id bigserial, delta int NOT NULL,
      at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (customer_id, id));"}
    shards: 2
    placement: [a, b]
policies:
  default:
    autosplit: {cooldown: 0s, retire_after: 0s}
"""

# pgbench's own transaction shape, on our tables: UPDATE a balance, INSERT a history row
PGBENCH = """\
\\set r random(1, :maxid)
BEGIN;
SELECT customer_id AS c FROM customers WHERE customer_id >= :r ORDER BY customer_id LIMIT 1 \\gset
UPDATE customers SET balance = balance + 1 WHERE customer_id = :c;
INSERT INTO history (customer_id, delta) VALUES (:c, 1);
END;
"""


def samples_file(fleet_dir: Path, state: dict[str, float]) -> str:
    """Recorded samples that make the named shards hot or cold now (others in between)."""
    with Fleet(workflow.load(str(fleet_dir))).catalog() as conn:
        shards = conn.execute("SELECT database || '/' || name, server FROM shardctl.shards WHERE state = 'active'"
                              ).fetchall()
    now = datetime.now(timezone.utc)
    count = 190  # 31.5 minutes at 10 s: the default policy's sustain (5m) and cold_for (30m)
    out = [{"shard": address, "server": server, "at": (now - timedelta(seconds=10 * (count - 1 - k))).isoformat(),
            "metrics": {"queries_per_second": state.get(address, 500.0), "cpu_percent": 1.0, "memory_percent": 2.0,
                        "storage_percent": 1.0, "connections": 1.0, "latency_ms": 0.5}}
           for address, server in shards for k in range(count)]
    path = fleet_dir.parent / "samples.json"
    path.write_text(json.dumps({"samples": out}))
    return str(path)


def shard_row(fleet: Fleet, name: str):
    with fleet.catalog() as conn:
        return conn.execute("SELECT lo, hi, server, dbname FROM shardctl.shards WHERE database = 'orders'"
                            " AND name = %s AND state = 'active'", (name,)).fetchone()


def in_range(h: int, lo, hi) -> bool:
    return (lo is None or h >= lo) and (hi is None or h < hi)


class Writer(threading.Thread):
    """Inserts keys of one range through engine.client; remembers when each write was accepted
    and by which physical database."""

    def __init__(self, catalog, lo, hi, seed: int):
        super().__init__(daemon=True)
        self.catalog, self.lo, self.hi, self.seed = catalog, lo, hi, seed
        self.accepted: list[tuple[float, str]] = []
        self.stop_flag = threading.Event()

    def run(self):
        rng = random.Random(self.seed)
        with ShardClient(self.catalog, "orders", retry_timeout=120) as client:
            while not self.stop_flag.is_set():
                key = rng.randint(10**12, 2 * 10**12)
                if not in_range(hashint8extended(key), self.lo, self.hi):
                    continue
                client.execute(key, "INSERT INTO customers (customer_id, name) VALUES (%s, 'w')"
                                    " ON CONFLICT DO NOTHING", (key,))
                self.accepted.append((time.monotonic(), client.shard_for(key).dbname))
                time.sleep(0.002)


def unwritable_ms(writers: list[Writer], sources: set[str]) -> float:
    """From the last write a source accepted to the first write a target accepted after it."""
    timeline = sorted(a for w in writers for a in w.accepted)
    last_source = max(t for t, db in timeline if db in sources)
    first_target = min(t for t, db in timeline if db not in sources and t > last_source)
    return (first_target - last_source) * 1000


def pgbench(fleet_dir: Path, fleet: Fleet, server: str, dbname: str, maxid: int) -> subprocess.Popen:
    script = fleet_dir.parent / f"{dbname}.sql"
    script.write_text(PGBENCH)
    embedded = fleet.servers[server].embedded
    return subprocess.Popen(
        [str(bin_dir() / "pgbench"), "-n", "-c", "4", "-j", "2", "-T", "3600", "-P", "1", "-D", f"maxid={maxid}",
         "-f", str(script), "-h", str(embedded.socket_dir), "-p", "5432", "-U", "postgres", dbname],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tps_by_second(report: str) -> list[float]:
    return [float(m) for m in re.findall(r"progress: [\d.]+ s, ([\d.]+) tps", report)]


def move(fleet_dir: Path, fleet: Fleet, kind: str, names: list[str], load: bool, maxid: int = 0) -> dict:
    """One split (of names[0]) or merge (of names), with or without load; its figures."""
    rows = [shard_row(fleet, n) for n in names]
    sources = {r[3] for r in rows}
    lo, hi = rows[0][0], rows[-1][1]
    heat = 50000.0 if kind == "split" else 1.0
    metrics = samples_file(fleet_dir, {f"orders/{n}": heat for n in names})
    writers, benches = [], []
    if load:
        catalog = fleet.catalog_server.params("shardctl")
        writers = [Writer(catalog, lo, hi, seed) for seed in (1, 2)]
        for w in writers:
            w.start()
        benches = [pgbench(fleet_dir, fleet, r[2], r[3], maxid) for r in rows]
        time.sleep(2)
    marks: dict[str, float] = {}

    def say(text: str) -> None:
        if "caught up" in text and "copied" not in marks:
            marks["copied"] = time.monotonic()

    started = time.monotonic()
    workflow.apply(workflow.load(str(fleet_dir)), None, say=say, metrics_file=metrics)
    if load:
        time.sleep(1)
        for w in writers:
            w.stop_flag.set()
            w.join()
        for b in benches:
            b.terminate()
    reports = [b.communicate()[1] for b in benches]
    with fleet.catalog() as conn:
        detail = conn.execute("SELECT detail FROM shardctl.history WHERE event IN ('split_shard', 'merge_shards')"
                              " ORDER BY id DESC LIMIT 1").fetchone()[0]
    out = {"timings": detail["timings"], "pause_ms": detail.get("pause_ms"),
           "copy_s": marks.get("copied", time.monotonic()) - started,
           "verified_changed_keys": detail.get("verified_changed_keys"), "key_rounds": detail.get("key_rounds")}
    if load:
        out["unwritable_ms"] = unwritable_ms(writers, sources)
        # pgbench throughput during the copy against the seconds before the move began
        copy_s = int(marks.get("copied", started) - started)
        per_second = [tps_by_second(r) for r in reports]
        before = [sum(s[:2]) / 2 for s in per_second if len(s) >= 2]
        during = [statistics.mean(s[2:2 + copy_s]) for s in per_second if len(s) > 2 + copy_s and copy_s > 0]
        if before and during:
            out["copy_throughput_ratio"] = sum(during) / sum(before)
    print(f"  [{kind}{' under load' if load else ''}] " + json.dumps(
        {k: v for k, v in out.items() if k != "key_rounds"}), flush=True)
    # the retired sources go now, so that their range names are free for the next move
    workflow.apply(workflow.load(str(fleet_dir)), None, metrics_file=samples_file(fleet_dir, {}))
    return out


def load_shard(fleet: Fleet, name: str, rows: int) -> int:
    lo, hi, server, dbname = shard_row(fleet, name)
    with fleet.servers[server].connect(dbname) as conn:
        conn.execute("INSERT INTO customers (customer_id, name, balance) SELECT g, md5(g::text), g %% 1000"
                     " FROM generate_series(1, %s) g"
                     " WHERE (%s::bigint IS NULL OR hashint8extended(g::bigint, 0) >= %s)"
                     " AND (%s::bigint IS NULL OR hashint8extended(g::bigint, 0) < %s)",
                     (rows * 2 + rows // 50, lo, lo, hi, hi))
        conn.execute("VACUUM ANALYZE customers")
        return conn.execute("SELECT count(*) FROM customers").fetchone()[0]


def baseline_copy_s(fleet: Fleet, name: str) -> float:
    lo, hi, server, dbname = shard_row(fleet, name)
    other = "a" if server == "b" else "b"
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
    elapsed = time.monotonic() - started
    with fleet.servers[other].connect() as admin:
        admin.execute("DROP DATABASE copy_baseline")
    return elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_size(rows_wanted: int, cycles: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="shardctl-split-") as tmp:
        fleet_dir = Path(tmp) / "fleet"
        fleet_dir.mkdir()
        (fleet_dir / "fleet.yaml").write_text(FLEET)
        desired = workflow.load(str(fleet_dir))
        workflow.apply(desired, None)
        fleet = Fleet(desired)
        try:
            for handle in fleet.servers.values():
                # both servers hold sources and targets here, so each one's WAL carries the copy
                # into its targets as well as pgbench: the embedded 2GB cap per slot is too small
                # for an 8M-row move under load (the move would fail, naming the setting)
                with handle.connect() as conn:
                    conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '16GB'")
                    conn.execute("SELECT pg_reload_conf()")
            rows = load_shard(fleet, "-80", rows_wanted)
            baseline = baseline_copy_s(fleet, "-80")
            quiet = move(fleet_dir, fleet, "split", ["-80"], load=False)
            move(fleet_dir, fleet, "merge", ["-40", "40-80"], load=False)
            copy_s = quiet["timings"]["subscribe"] + quiet["timings"]["sync"]
            splits, merges = [], []
            for _ in range(cycles):
                splits.append(move(fleet_dir, fleet, "split", ["-80"], load=True, maxid=rows_wanted * 2))
                merges.append(move(fleet_dir, fleet, "merge", ["-40", "40-80"], load=True, maxid=rows_wanted * 2))
            # the copy throttle: one link at a time, same load
            (fleet_dir / "fleet.yaml").write_text(FLEET.replace(
                "autosplit: {cooldown: 0s, retire_after: 0s}",
                "autosplit: {cooldown: 0s, retire_after: 0s}\n    moves: {copy_streams: 1}"))
            workflow.apply(workflow.load(str(fleet_dir)), None, metrics_file=samples_file(fleet_dir, {}))
            throttled = [move(fleet_dir, fleet, "split", ["-80"], load=True, maxid=rows_wanted * 2),
                         move(fleet_dir, fleet, "merge", ["-40", "40-80"], load=True, maxid=rows_wanted * 2)]
        finally:
            for handle in fleet.servers.values():
                handle.embedded.stop()
    return {"rows": rows, "baseline_s": baseline, "copy_s": copy_s, "splits": splits, "merges": merges,
            "throttled": throttled}


def report(size: dict) -> None:
    rows = size["rows"]
    print(f"\n== {rows:,} rows in the moving shard")
    print(f"baseline raw COPY pipe, no load      {size['baseline_s']:7.2f} s  {rows / size['baseline_s']:10,.0f} rows/s")
    print(f"split copy phase, no load            {size['copy_s']:7.2f} s  {rows / size['copy_s']:10,.0f} rows/s"
          f"   = {size['baseline_s'] / size['copy_s']:.2f}x the baseline's throughput")
    for label, moves in (("splits", size["splits"]), ("merges", size["merges"])):
        windows = [m["unwritable_ms"] for m in moves]
        pauses = [m["pause_ms"] for m in moves]
        print(f"{label} under load ({len(moves)}): unwritable as the application sees it: p50"
              f" {percentile(windows, 0.5):.0f} ms, p99 {percentile(windows, 0.99):.0f} ms, max {max(windows):.0f} ms;"
              f" pause fence-to-flip p50 {percentile(pauses, 0.5):.0f} ms, max {max(pauses):.0f} ms")
        print("  each: " + ", ".join(f"{w:.0f}" for w in windows) + " ms; keys rechecked behind the fence: "
              + ", ".join(str(m["verified_changed_keys"]) for m in moves))
        for step in ("fence", "catch_up", "sequences", "verify", "flip"):
            print(f"  {step:10s} " + ", ".join(f"{m['timings'].get(step, 0) * 1000:.0f}" for m in moves) + " ms")
        if VERBOSE:
            for m in moves:
                print("  key rounds:", m["key_rounds"])
        ratios = [m["copy_throughput_ratio"] for m in moves if "copy_throughput_ratio" in m]
        if ratios:
            print(f"  pgbench throughput during the copy: {statistics.mean(ratios):.2f}x of before the move")


VERBOSE = False


def report_throttle(size: dict) -> None:
    for i, kind in enumerate(("split", "merge")):
        free = size["splits" if kind == "split" else "merges"]
        slow = size["throttled"][i]
        free_ratio = statistics.mean(m["copy_throughput_ratio"] for m in free if "copy_throughput_ratio" in m)
        free_copy = statistics.mean(m["copy_s"] for m in free)
        print(f"copy throttle, {kind}: pgbench during the copy {slow.get('copy_throughput_ratio', float('nan')):.2f}x"
              f" of before (without: {free_ratio:.2f}x); copy phase {slow['copy_s']:.1f} s (without: {free_copy:.1f} s)")


def main() -> None:
    global VERBOSE
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,8000000", help="rows in the moving shard, comma-separated")
    parser.add_argument("--cycles", type=int, default=5, help="splits (and merges back) under load per size")
    parser.add_argument("--verbose", action="store_true", help="print each move's last key rounds")
    args = parser.parse_args()
    VERBOSE = args.verbose
    results = {}
    for size in (int(s) for s in args.sizes.split(",")):
        results[size] = run_size(size, args.cycles)
        report(results[size])
        report_throttle(results[size])
    if len(results) >= 2:
        small, large = results[min(results)], results[max(results)]
        p99 = [percentile([m["unwritable_ms"] for m in r["splits"]], 0.99) for r in (small, large)]
        print(f"\nsplit p99 unwritable, {large['rows']:,} rows against {small['rows']:,}: {p99[1] / p99[0]:.2f}x")


if __name__ == "__main__":
    main()
