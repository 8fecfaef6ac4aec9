"""A comparison's read of changed keys under load: one connection per shard against two.

    python bench/key_lookups.py [--rows 1000000] [--keys 3000] [--writers 24] [--runs 12]

One embedded server, a table of customers (`--rows`) and their history (as bench/split.py's
schema), and pgbench writing both at full speed with `--writers` clients (UPDATE a customer,
INSERT its history row). Timed, alternately, `--runs` times each: the query a key round runs on
a shard (engine/actions/move/compare.py `_key_sums`: per key, rows and checksum, for both
tables) for `--keys` random keys, on one connection (the baseline: what a round did before), and
cut in two halves read at once on two connections (what `BOTH_LANES` does). Under writers that
keep both cores busy a backend gets its share of the CPU; two get two shares.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import Record  # noqa: E402
from engine.servers.embedded import EmbeddedServer, bin_dir  # noqa: E402

SCHEMA = """
CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text NOT NULL, balance bigint NOT NULL DEFAULT 0);
CREATE TABLE history (customer_id bigint NOT NULL REFERENCES customers, id bigserial, delta int NOT NULL,
  at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (customer_id, id));
"""
BY_KEY = ("SELECT customer_id, count(*), coalesce(sum(hash_record_extended(t, 0)), 0)::text FROM {table} t"
          " WHERE customer_id = ANY(%s::bigint[]) GROUP BY 1")
WRITE = """\\set k random(1, {rows})
UPDATE customers SET balance = balance + 1 WHERE customer_id = :k;
INSERT INTO history (customer_id, delta) VALUES (:k, 1);
"""


def read(conn: psycopg.Connection, keys: list[int]) -> int:
    return sum(len(conn.execute(BY_KEY.format(table=table), (keys,)).fetchall()) for table in ("customers", "history"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=3000)
    parser.add_argument("--writers", type=int, default=24)
    parser.add_argument("--runs", type=int, default=12)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shardctl-bench-keys-") as tmp:
        server = EmbeddedServer("k", Path(tmp) / "k")
        server.start()
        try:
            with psycopg.connect(**server.conninfo(), autocommit=True) as admin:
                admin.execute("CREATE DATABASE keys")
            info = server.conninfo("keys")
            with psycopg.connect(**info, autocommit=True) as conn:
                conn.execute(SCHEMA)
                conn.execute("INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, %s) g",
                             (args.rows,))
                conn.execute("INSERT INTO history (customer_id, delta) SELECT 1 + (random() * (%s - 1))::bigint, 1"
                             " FROM generate_series(1, %s)", (args.rows, args.rows))
                conn.execute("VACUUM ANALYZE")
            script = Path(tmp) / "write.sql"
            script.write_text(WRITE.format(rows=args.rows))
            writers = subprocess.Popen([str(bin_dir() / "pgbench"), "-n", "-c", str(args.writers), "-j", "2",
                                        "-T", "3600", "-f", str(script), "-h", str(server.socket_dir), "-p", "5432",
                                        "-U", "postgres", "keys"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            one_ms: list[float] = []
            two_ms: list[float] = []
            rng = random.Random(11)
            try:
                with psycopg.connect(**info, autocommit=True) as first, \
                        psycopg.connect(**info, autocommit=True) as second:
                    read(first, [1])  # both sessions warm before the first timing
                    read(second, [1])
                    deadline = time.monotonic() + 60
                    while first.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'"
                                        " AND datname = 'keys'").fetchone()[0] < args.writers:
                        if time.monotonic() > deadline or writers.poll() is not None:
                            raise SystemExit(f"pgbench did not start its clients: {writers.communicate()[1]}")
                        time.sleep(0.05)  # polling pgbench's start, not a timing
                    for _ in range(args.runs):
                        for two in (False, True):
                            keys = sorted(rng.sample(range(1, args.rows + 1), args.keys))
                            started = time.perf_counter()
                            if two:
                                half = len(keys) // 2
                                other = threading.Thread(target=read, args=(second, keys[half:]))
                                other.start()
                                read(first, keys[:half])
                                other.join()
                                two_ms.append((time.perf_counter() - started) * 1000)
                            else:
                                read(first, keys)
                                one_ms.append((time.perf_counter() - started) * 1000)
                if writers.poll() is not None:
                    raise SystemExit(f"pgbench stopped before the timings ended: {writers.communicate()[1]}")
            finally:
                writers.terminate()
                writers.wait()
        finally:
            server.stop()
    record = Record("key_lookups", load_before=load_before)
    record.measure("one", f"{args.keys:,} keys, both tables, one connection", one_ms, "ms")
    record.measure("two", "the same cut in two, two connections at once", two_ms, "ms",
                   baseline="one", paired=True)
    record.fact("rows", args.rows)
    record.fact("writers", args.writers)
    record.write()
    ratio = record.get("two")["ratio"]
    print(f"one connection: median {record.get('one')['median']:.0f} ms; two: {record.get('two')['median']:.0f} ms;"
          f" ratio {ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}); load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
