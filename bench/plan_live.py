"""`shardctl plan` with no changes on a live database of many shards, against the floor.

    python bench/plan_live.py [--shards 256] [--runs 5]

Two embedded servers a and b and one database of `--shards` shards placed on both, made by
`shardctl apply`. Timed: `shardctl plan --detailed-exitcode` end to end, each run a new process
(imports, config, catalog, server inventory, every shard's introspection, a fresh load sample,
planning, rendering), no daemon running (so the plan takes its own sample). The floor, measured
in the same run between the plan runs: one new connection and one query (`SELECT 1`) to each
shard database, 8 at a time; and the same one after another. The first plan after apply reads
every schema (no schema cache yet) and is reported on its own; the runs after it are the
steady state. Prints the medians, the spread and the ratio plan/floor, and the load average.

Every shardctl process runs from compiled bytecode, as an installed shardctl does (pip compiles
a package when it installs it): the bench keeps it in a pycache of its own temporary directory,
written by the apply, whatever PYTHONDONTWRITEBYTECODE says (with it set, an editable checkout
compiles every module it imports at each start, ~0.25 s more).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.servers.embedded import EmbeddedServer  # noqa: E402

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text NOT NULL);"}
    shards: SHARDS
    placement: [a, b]
"""


def cli(directory: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(directory / "pycache")
    return subprocess.run([sys.executable, "-m", "engine", "-C", str(directory), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600, env=env)


def shard_databases(directory: Path) -> list[tuple[str, str]]:
    catalog = EmbeddedServer("a", directory / ".shardctl" / "servers" / "a")
    with psycopg.connect(**catalog.conninfo("shardctl")) as conn:
        return conn.execute("SELECT server, dbname FROM shardctl.shards WHERE state = 'active' ORDER BY lo NULLS FIRST"
                            ).fetchall()


def floor(directory: Path, shards: list[tuple[str, str]], workers: int) -> float:
    servers = {name: EmbeddedServer(name, directory / ".shardctl" / "servers" / name) for name in ("a", "b")}

    def one(shard: tuple[str, str]) -> None:
        server, dbname = shard
        with psycopg.connect(**servers[server].conninfo(dbname)) as conn:
            conn.execute("SELECT 1").fetchone()

    started = time.perf_counter()
    if workers == 1:
        for shard in shards:
            one(shard)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, shards))
    return time.perf_counter() - started


def timed_plan(directory: Path) -> float:
    started = time.perf_counter()
    result = cli(directory, "plan", "--detailed-exitcode")
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"plan did not say 'no changes' (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    if "could not be read" in result.stdout + result.stderr:  # shards left unknown past the deadline
        raise SystemExit(f"plan did not read every shard:\n{result.stdout}{result.stderr}")
    return seconds


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()  # for the record written at the end
    with tempfile.TemporaryDirectory(prefix="shardctl-plan-live-") as tmp:
        directory = Path(tmp)
        (directory / "fleet.yaml").write_text(FLEET.replace("SHARDS", str(args.shards)))
        try:
            started = time.perf_counter()
            applied = cli(directory, "apply", "--auto-approve")
            if applied.returncode != 0:
                raise SystemExit(f"apply failed:\n{applied.stdout}{applied.stderr}")
            print(f"apply of {args.shards} shards: {time.perf_counter() - started:.1f} s", flush=True)
            shards = shard_databases(directory)
            assert len(shards) == args.shards, len(shards)
            first = timed_plan(directory)
            plans, floors8, floors1 = [], [], []
            for _ in range(args.runs):
                floors8.append(floor(directory, shards, 8))
                plans.append(timed_plan(directory))
                floors1.append(floor(directory, shards, 1))
            load = os.getloadavg()
        finally:
            cli(directory, "down")
    print(f"shards: {args.shards}; load average after the runs: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"first plan after apply (every schema read): {first:.2f} s")
    print(f"plan, no changes:            {spread(plans)}")
    print(f"floor, 8 at a time:          {spread(floors8)}")
    print(f"floor, one after another:    {spread(floors1)}")
    print(f"plan / floor (8 at a time):  {statistics.median(plans) / statistics.median(floors8):.2f}x")
    from record import Record  # the bench's record, rendered into docs/BENCHMARKS.md by bench/report.py

    record = Record(f"plan_live-{args.shards}", load_before=load_before)
    record.fact("shards", args.shards)
    record.measure("first", "first plan after apply (every schema read, no schema cache yet)", [first], "s")
    record.measure("floor8", "floor: a new connection and `SELECT 1` per shard database, 8 at a time", floors8, "s")
    record.measure("floor1", "floor: the same, one after another", floors1, "s")
    record.measure("plan", "`shardctl plan --detailed-exitcode`, no changes, a new process", plans, "s",
                   baseline="floor8", paired=True)  # each plan run follows its floor run
    record.write()


if __name__ == "__main__":
    main()
