"""Metric collection rounds, each against a baseline measured in the same run.

    python bench/metrics.py [--databases 300] [--rounds 20]       # one server, many databases
    python bench/metrics.py --fleet [--servers 20] [--shards 15]   # many servers, one of them hung

One server: a round over 300 shard databases against the naive way (a new connection per
database). Each round has a baseline that reads the same things: the interval round (counters,
no sizes) against a connection per database reading the counters; the full round (counters,
`pg_database_size`, `pg_buffercache`) against a connection per database reading the counters and
`pg_database_size` (the buffer cache is not read by it: that baseline does less than the round).

Many servers (--fleet): the round as shardctl runs it (servers read at once, each within the
metrics deadline) against the same servers read one after another on kept connections (the
way rounds ran before, kept here as the baseline), first with every server healthy, then with
one server stopped with SIGSTOP (every process of it: it accepts connections and never
answers). Reports the rounds' medians, the ratio, and how many shards each round read.
Writes its record (bench/record.py): docs/bench/metrics.json, or metrics-fleet.json with --fleet.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.collect.sampling import LiveSampler
from engine.config.models import Server
from engine.observe.models import CatalogShard
from engine.servers.connect import ServerHandle
from engine.servers.embedded import bin_dir
from engine.servers.fleet import Fleet
from record import Record

NAIVE = """
SELECT s.xact_commit + s.xact_rollback, s.active_time, s.numbackends
FROM pg_stat_database s WHERE s.datname = current_database()
"""
NAIVE_WITH_SIZE = """
SELECT s.xact_commit + s.xact_rollback, s.active_time, s.numbackends, pg_database_size(current_database())
FROM pg_stat_database s WHERE s.datname = current_database()
"""


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def sequential_round(sampler: LiveSampler, handles: dict, shards: list[CatalogShard], conns: dict) -> int:
    """The baseline: each server in turn, on a kept connection, every collector, no deadline
    (how a round ran before servers were read at once). Returns the shards read."""
    by_server: dict[str, list[CatalogShard]] = {}
    for shard in shards:
        by_server.setdefault(shard.server, []).append(shard)
    read = 0
    for name, server_shards in sorted(by_server.items()):
        handle = handles[name]
        if name not in conns:
            conns[name] = psycopg.connect(**handle.params(), connect_timeout=5, autocommit=True)
        readings: dict = {}
        for collector in sampler.collectors:
            if collector.applies_to(handle):
                readings = collector.collect(handle, conns[name], server_shards, readings, False)
        read += len(readings)
    return read


def fleet_case(args) -> None:
    started_all = time.perf_counter()
    record = Record("metrics-fleet")
    record.fact("servers", args.servers)
    record.fact("shards_per_server", args.shards)
    with tempfile.TemporaryDirectory(prefix="shardctl-bench-fleet-") as tmp:
        handles = {f"s{i:02d}": ServerHandle(f"s{i:02d}", Server(embedded=True), Path(tmp))
                   for i in range(args.servers)}
        hung_name = sorted(handles)[args.servers // 2]
        servers = [h.embedded for h in handles.values()]

        def prepare(handle: ServerHandle) -> None:
            handle.embedded.start()
            with handle.connect() as conn:
                for j in range(args.shards):
                    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
                        sql.Identifier(f"shard_{j:03d}")))

        try:
            with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two servers set up at once
                list(pool.map(prepare, handles.values()))
            print(f"started {args.servers} servers with {args.shards} shard databases each"
                  f" in {time.perf_counter() - started_all:.0f}s")
            shards = [CatalogShard(database="bench", name=f"{name}_{j:03d}", lo=None, hi=None, server=name,
                                   dbname=f"shard_{j:03d}", state="active")
                      for name in sorted(handles) for j in range(args.shards)]
            fleet = Fleet.__new__(Fleet)
            fleet.servers = handles
            sampler = LiveSampler(fleet, deadline=args.deadline)
            conns: dict = {}
            concurrent = lambda: len(sampler.read(shards, full=False))  # noqa: E731
            sequential = lambda: sequential_round(sampler, handles, shards, conns)  # noqa: E731
            concurrent()
            sequential()  # both warm: a kept connection to every server

            def measure(fn, repeat, key=None, label="", baseline=None):
                times, counts = [], []
                for _ in range(repeat):
                    start = time.perf_counter()
                    counts.append(fn())
                    times.append(time.perf_counter() - start)
                if key:
                    record.measure(key, label, [t * 1000 for t in times], "ms", baseline=baseline)
                    record.fact(f"{key}.shards_read_min", min(counts))
                return statistics.median(times), min(counts)

            total = len(shards)
            record.fact("shards", total)
            seq, seq_read = measure(sequential, args.rounds, "sequential",
                                    "healthy: one server after another on kept connections (baseline)")
            par, par_read = measure(concurrent, args.rounds, "concurrent",
                                    f"healthy: servers read at once, {args.deadline:g} s deadline",
                                    baseline="sequential")
            print(f"healthy fleet, {args.servers} servers x {args.shards} shards ({total} shards):")
            print(f"  one after another (baseline)   {seq * 1000:8.1f} ms   {seq_read}/{total} shards read")
            label = f"at once, {args.deadline:g}s deadline"
            print(f"  {label:<30} {par * 1000:8.1f} ms   {par_read}/{total} shards read   {seq / par:5.2f}x faster")

            hung = handles[hung_name].embedded
            pids = hung.processes()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                par_h, par_h_read = measure(concurrent, max(3, args.rounds // 4), "hung_concurrent",
                                            "one server hung (SIGSTOP): servers read at once")
                _, missing = sampler.read_round(shards, full=False)
                # the baseline blocks on the hung server's kept connection for as long as it hangs:
                # run it in a thread and give up waiting after --baseline-wait seconds
                outcome: dict = {}

                def blocked_round() -> None:
                    start = time.perf_counter()
                    try:
                        outcome["read"] = sequential()
                    except psycopg.Error as exc:
                        outcome["error"] = str(exc).splitlines()[0]
                    outcome["seconds"] = time.perf_counter() - start

                thread = threading.Thread(target=blocked_round, daemon=True)
                thread.start()
                thread.join(args.baseline_wait)
                print(f"one server ({hung_name}, {args.shards} shards) stopped with SIGSTOP:")
                if thread.is_alive():
                    record.fact("hung_sequential", f"did not finish in {args.baseline_wait:g} s")
                    print(f"  one after another (baseline)   did not finish in {args.baseline_wait:g}s:"
                          f" blocked on {hung_name}, every server after it unread")
                else:
                    record.fact("hung_sequential", f"{outcome['seconds'] * 1000:.1f} ms,"
                                f" {outcome.get('read', 0)}/{total} shards read")
                    print(f"  one after another (baseline)   {outcome['seconds'] * 1000:8.1f} ms"
                          f"   {outcome.get('read', 0)}/{total} shards read {outcome.get('error', '')}")
                print(f"  {label:<30} {par_h * 1000:8.1f} ms   {par_h_read}/{total}"
                      f" shards read (all but {hung_name}'s {args.shards})")
                print(f"  reason: {missing.get(hung_name)}")
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
                thread.join(timeout=30)
            sampler.close()
            for conn in conns.values():
                conn.close()
        finally:
            with ThreadPoolExecutor(max_workers=2) as pool:
                list(pool.map(lambda s: s.stop(), servers))
    print(f"whole run {time.perf_counter() - started_all:.0f}s")
    record.fact("whole_run_s", round(time.perf_counter() - started_all))
    record.write()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--databases", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fleet", action="store_true", help="many servers, one of them hung")
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--shards", type=int, default=15, help="shard databases per server (with --fleet)")
    parser.add_argument("--deadline", type=float, default=2.0,
                        help="metrics.deadline for the round (with --fleet)")
    parser.add_argument("--baseline-wait", type=float, default=30.0,
                        help="how long to wait for the baseline round blocked on the hung server")
    args = parser.parse_args()
    if args.fleet:
        fleet_case(args)
        return

    record = Record("metrics")
    record.fact("databases", args.databases)
    with tempfile.TemporaryDirectory(prefix="shardctl-bench-") as tmp:
        handle = ServerHandle("bench", Server(embedded=True), Path(tmp))
        server = handle.embedded
        server.start()
        try:
            names = [f"bench_{i:04d}" for i in range(args.databases)]
            started = time.perf_counter()
            with handle.connect() as conn:
                for name in names:
                    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
            print(f"created {len(names)} databases in {time.perf_counter() - started:.1f}s")
            shards = [CatalogShard(database="bench", name=f"{i:04d}", lo=None, hi=None, server="bench", dbname=n,
                                   state="active") for i, n in enumerate(names)]
            sampler = LiveSampler(Fleet.__new__(Fleet))
            sampler.fleet.servers = {"bench": handle}

            def round_interval():  # what the daemon does every interval, on its warm connection
                sampler.read(shards, full=False)

            def round_full():  # plus tier 3, at most once a minute
                sampler.read(shards, full=True)

            def cold_round():  # what a one-shot CLI command pays: a new connection, then the round
                with LiveSampler(sampler.fleet) as once:
                    once.read(shards, full=False)

            def naive():  # what the interval round reads: counters, no sizes
                for name in names:
                    with handle.connect(name) as conn:
                        conn.execute(NAIVE).fetchone()

            def naive_with_size():  # what the full round reads but the buffer cache
                for name in names:
                    with handle.connect(name) as conn:
                        conn.execute(NAIVE_WITH_SIZE).fetchone()

            for label in ("idle", "under load"):
                bench = None
                if label == "under load":
                    script = Path(tmp) / "select1.sql"
                    script.write_text("SELECT 1;\n")
                    bench = [subprocess.Popen(
                        [str(bin_dir() / "pgbench"), "-n", "-c", "1", "-T", "600", "-f", str(script),
                         "-h", str(server.socket_dir), "-p", "5432", "-U", "postgres", names[i]],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in (0, 1, 2)]
                    time.sleep(2)
                try:
                    round_interval()  # warm the pool
                    ms = lambda values: [v * 1000 for v in values]  # noqa: E731
                    naive_runs = record.measure(f"{label}.naive", f"{label}: baseline, a new connection per"
                                                " database reading the counters", ms(timed(naive, 5)), "ms")
                    record.measure(f"{label}.interval", f"{label}: interval round, warm pooled connection"
                                   " (counters, tiers 1+2 and /proc CPU)", ms(timed(round_interval, args.rounds)),
                                   "ms", baseline=f"{label}.naive")
                    record.measure(f"{label}.cold", f"{label}: interval round, new connection (what a one-shot"
                                   " CLI command pays)", ms(timed(cold_round, 5)), "ms", baseline=f"{label}.naive")
                    sized = record.measure(f"{label}.naive_size", f"{label}: baseline, a new connection per"
                                           " database reading the counters and `pg_database_size`",
                                           ms(timed(naive_with_size, 5)), "ms")
                    record.measure(f"{label}.full", f"{label}: full round (+ `pg_database_size` and"
                                   " `pg_buffercache`)", ms(timed(round_full, max(5, args.rounds // 4))), "ms",
                                   baseline=f"{label}.naive_size")
                    per_db = naive_runs["median"] / 1000
                    per_db_size = sized["median"] / 1000
                    interval = record.get(f"{label}.interval")["median"] / 1000
                    cold = record.get(f"{label}.cold")["median"] / 1000
                    full = record.get(f"{label}.full")["median"] / 1000
                finally:
                    for p in bench or []:
                        p.terminate()
                        p.wait()
                print(f"{label}:")
                print(f"  connection per database (baseline) {per_db * 1000:9.1f} ms")
                for what, seconds in (("interval round, warm connection", interval),
                                      ("interval round, new connection", cold)):
                    print(f"  {what:<36}{seconds * 1000:9.1f} ms   {per_db / seconds:7.1f}x cheaper")
                print(f"  connection per database with sizes  {per_db_size * 1000:9.1f} ms")
                print(f"  full round (+ sizes, buffer cache)  {full * 1000:9.1f} ms"
                      f"   {per_db_size / full:7.1f}x cheaper")
            sampler.close()
        finally:
            server.stop()
    record.write()


if __name__ == "__main__":
    main()
