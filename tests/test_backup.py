"""Backups on real embedded servers, with Barman: a restore point placed under a writer, more
writes, a split; branches restored from the backups to that point and to the latest moment hold
exactly the rows of their moment (counted and checksummed per table); the restore drill passes,
and fails loudly when a WAL segment is gone; a `backups create` and a branch build killed at
their steps resume.

One fleet for the module (a base backup and a restore point take a while): each test checks
its own outcome and leaves the fleet usable for the next.
"""

import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psycopg
import pytest

from conftest import FleetDir, every_step, wait_until
from engine.catalog.journal import FAILPOINT_ENV
from engine.client import ShardClient
from engine.servers.embedded import EmbeddedServer
from movers import active_shards, preload

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None,
                                reason="Barman restores with rsync: install Debian's rsync (.ci/run does)")

TABLES = ("customers", "orders")


@dataclass
class InsertWriter:
    """Inserts customers through the client helper, one transaction each, and remembers when
    each insert was sent and when its commit returned (this host's clock, as the servers')."""

    catalog: dict
    start_id: int = 1_000_000
    sent: dict[int, float] = field(default_factory=dict)
    committed: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def wait_for(self, more: int) -> None:
        goal = len(self.committed) + more
        deadline = time.monotonic() + 60
        while len(self.committed) < goal and not self.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.committed) >= goal, self.errors

    def _loop(self) -> None:
        key = self.start_id
        with ShardClient(self.catalog, "orders", retry_timeout=60) as client:
            while not self._stop.is_set():
                key += 1
                self.sent[key] = time.time()
                try:
                    client.execute(key, "INSERT INTO customers (customer_id, name) VALUES (%s, %s)", (key, f"w{key}"))
                except psycopg.Error as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                self.committed[key] = time.time()
                time.sleep(0.003)


def _sums(conn, table: str) -> tuple[int, int]:
    count, total = conn.execute(f"SELECT count(*), coalesce(sum(hash_record_extended(t, 0)), 0) FROM {table} t"
                                ).fetchone()
    return int(count), int(total)


def _parent_sums(fleet) -> dict[str, tuple[int, int]]:
    out = {}
    for table in TABLES:
        count = total = 0
        for _name, _lo, _hi, server, dbname in active_shards(fleet):
            with fleet.connect(server, dbname) as conn:
                c, t = _sums(conn, table)
                count, total = count + c, total + t
        out[table] = (count, total)
    return out


def _branch_sums(fleet, server: str, dbname: str) -> dict[str, tuple[int, int]]:
    with fleet.connect(server, dbname) as conn:
        return {table: _sums(conn, table) for table in TABLES}


def _point(fleet, name: str | None = None) -> dict:
    with fleet.catalog() as conn:
        row = conn.execute("SELECT name, servers, checksums, shard_map FROM shardctl.restore_points"
                           " WHERE (%s::text IS NULL AND kind = 'backup' OR name = %s) ORDER BY created_at DESC"
                           " LIMIT 1", (name, name)).fetchone()
    return {"name": row[0], "servers": row[1], "checksums": row[2], "shard_map": row[3]}


def _recorded_sums(point: dict) -> dict[str, tuple[int, int]]:
    """The point's per-shard counts and checksums summed per table: the whole database then."""
    out = {}
    for table in TABLES:
        tables = [shard[f"public.{table}"] for shard in point["checksums"].values()]
        out[table] = (sum(int(t[0]) for t in tables), sum(int(t[1]) for t in tables))
    return out


def _running(fleet) -> list[tuple]:
    with fleet.catalog() as conn:
        return conn.execute("SELECT id, kind FROM shardctl.operations WHERE state = 'running'").fetchall()


def _no_scratch_left(fleet) -> None:
    scratch = fleet.path / ".shardctl" / "scratch"
    assert not scratch.exists() or list(scratch.iterdir()) == [], list(scratch.iterdir())


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory):
    """The quickstart with `backups:`, 3,000 customers with 2 orders each, then a `backups create`
    while a writer inserts customers through the routing: its restore point falls among them."""
    fleet = FleetDir(tmp_path_factory.mktemp("backups"))
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + "backups: {retention: REDUNDANCY 2}\n")
    applied = fleet.cli("apply", "--auto-approve")
    assert applied.code == 0, applied.both
    preload(fleet, customers=3000)
    for _name, _lo, _hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            conn.execute("INSERT INTO orders (customer_id, order_id, amount)"
                         " SELECT customer_id, k, k * 1.5 FROM customers, generate_series(1, 2) k")
    writer = InsertWriter(EmbeddedServer("a", fleet.path / ".shardctl" / "servers" / "a").conninfo("shardctl"))
    writer.start()
    try:
        writer.wait_for(50)
        created = fleet.cli("backups", "create")
        writer.wait_for(50)  # writes go on after the point
    finally:
        writer.stop()
    assert created.code == 0, created.both
    assert "Restore point backup-op" in created.out and writer.errors == []
    yield fleet, _point(fleet), writer
    fleet.stop()


def test_branches_restored_to_a_restore_point_and_to_the_latest_moment_across_a_split(backed_up):
    fleet, point, writer = backed_up
    recorded = _recorded_sums(point)
    assert recorded["customers"][0] > 3000 and recorded["orders"] == (6000, recorded["orders"][1])
    at_point = {t: (int(v[0]), v[1]) for t, v in recorded.items()}

    # after the point: more rows, then a split of one shard (its targets are born after the base backup)
    split = fleet.cli("apply", "-split", "orders/40-80", "--auto-approve")
    assert split.code == 0, split.both
    with ShardClient(EmbeddedServer("a", fleet.path / ".shardctl/servers/a").conninfo("shardctl"), "orders") as client:
        for key in range(5_000_000, 5_000_040):
            client.execute(key, "INSERT INTO customers (customer_id, name) VALUES (%s, %s)", (key, "after split"))
    live = _parent_sums(fleet)

    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + (
        f"branches:\n  at_point: {{from: orders, data: backup, at: {point['name']}, server: b}}\n"
        "  newest: {from: orders, data: backup, at: latest, server: a}\n"))
    plan = fleet.cli("plan")
    assert f"backup at {point['name']}: its shards then" in plan.out and "from      = orders (4 shards)" in plan.out
    assert "backup at latest" in plan.out and "from      = orders (5 shards)" in plan.out
    applied = fleet.cli("apply", "--auto-approve")
    assert applied.code == 0, applied.both
    assert "Restored server a to restore point" in applied.out and "Restored server b to restore point" in applied.out

    # the point's branch: exactly the rows recorded at the point, per table, by count and checksum
    assert _branch_sums(fleet, "b", "branch_at_point") == at_point
    with fleet.connect("b", "branch_at_point") as conn:
        ids = {r[0] for r in conn.execute("SELECT customer_id FROM customers WHERE customer_id >= 1000000")}
    placed = min(json_time(s["at"]) for s in point["servers"].values())
    last_placed = max(json_time(s["at"]) for s in point["servers"].values())
    before = {k for k, t in writer.committed.items() if t < placed}
    after = {k for k, t in writer.sent.items() if t > last_placed}
    assert before and after and before <= ids and not (after & ids)
    assert not any(k >= 5_000_000 for k in ids)

    # the latest moment, after the split: every row now, each once (the primary keys hold)
    assert _branch_sums(fleet, "a", "branch_newest") == live
    assert _running(fleet) == []
    _no_scratch_left(fleet)
    listing = json.loads(fleet.cli("backups", "list", "--json").out)
    kinds = {p["name"]: p["kind"] for p in listing["restore_points"]}
    assert kinds[point["name"]] == "backup" and "branch" in kinds.values()
    assert all(s["wal"]["streaming"] for s in listing["servers"]), listing["servers"]
    assert fleet.cli("plan", "--detailed-exitcode").code == 0


def json_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_the_restore_drill_passes_and_fails_loudly_when_a_wal_segment_is_gone(backed_up):
    fleet, _, _ = backed_up
    drill = fleet.cli("backups", "verify")
    assert drill.code == 0, drill.both
    assert "Restore drill passed" in drill.out and drill.out.count("checksums equal") >= 4
    point = _point(fleet)
    wal = point["servers"]["a"]["wal"]
    segment = fleet.path / ".shardctl" / "backups" / "a" / "wals" / wal[:16] / wal
    assert segment.exists()
    aside = fleet.base / wal
    shutil.move(segment, aside)
    try:
        failed = fleet.cli("backups", "verify")
        assert failed.code == 1, failed.both
        assert "FAILED server a" in failed.out and wal in failed.out and "Restore drill FAILED" in failed.err
        assert "ok     server b" in failed.out  # the other server is restored and checked all the same
    finally:
        shutil.move(aside, segment)
    _no_scratch_left(fleet)


@pytest.mark.slow
def test_a_branch_restored_to_a_time_before_a_split_reads_the_shard_map_of_that_time(backed_up):
    """Rows A, the moment T, rows B, a split, rows C: the branch at T holds A and neither B nor C,
    read from the shard the catalog's map of T names (the split's source, retired since)."""
    fleet, _, _ = backed_up
    catalog = EmbeddedServer("a", fleet.path / ".shardctl/servers/a").conninfo("shardctl")

    def insert(first: int) -> None:
        with ShardClient(catalog, "orders") as client:
            for key in range(first, first + 30):
                client.execute(key, "INSERT INTO customers (customer_id, name) VALUES (%s, %s)", (key, "timed"))

    insert(6_000_000)
    with fleet.catalog() as conn:  # the servers' clock, after every commit of A and before any of B
        moment = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    insert(7_000_000)
    split = fleet.cli("apply", "-split", "orders/80-c0", "--auto-approve")
    assert split.code == 0, split.both
    insert(8_000_000)
    at = moment.isoformat(timespec="microseconds")
    original = fleet.read("fleet.yaml")
    fleet.write("fleet.yaml", original + ("branches:\n" if "branches:" not in original else "")
                + f"  timed: {{from: orders, data: backup, at: '{at}', server: b}}\n")
    plan = fleet.cli("plan")
    assert "shard.orders" not in plan.out and "# branch.timed will be created" in plan.out, plan.out
    with fleet.catalog() as conn:
        then = conn.execute("SELECT shards FROM shardctl.shard_maps WHERE database = 'orders' AND at <= %s"
                            " ORDER BY at DESC, id DESC LIMIT 1", (moment,)).fetchone()[0]
    assert "80-c0" in {s["name"] for s in then}  # the split's source owned its range at the moment
    assert fleet.cli("apply", "--auto-approve").code == 0
    with fleet.connect("b", "branch_timed") as conn:
        ids = {r[0] for r in conn.execute("SELECT customer_id FROM customers WHERE customer_id >= 6000000")}
        branch = {t: _sums(conn, t) for t in TABLES}
    assert ids == set(range(6_000_000, 6_000_030))
    expected = {}
    for table in TABLES:
        count = total = 0
        for _name, _lo, _hi, server, dbname in active_shards(fleet):
            with fleet.connect(server, dbname) as conn:
                c, t = conn.execute(f"SELECT count(*), coalesce(sum(hash_record_extended(t, 0)), 0) FROM {table} t"
                                    " WHERE customer_id < 7000000").fetchone()
                count, total = count + c, total + int(t)
        expected[table] = (count, total)
    assert branch == expected  # every row of the moment once: none lost, none twice across the split
    fleet.write("fleet.yaml", original + "allow_destroy: {branches: [timed]}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    fleet.write("fleet.yaml", original)


def test_the_daemon_keeps_wal_streaming_and_takes_a_backup_when_one_is_due(backed_up):
    """A receiver that stops is started again (the daemon's own child), a base backup older than
    backups.every is taken again, and status, the dashboard and /metrics show both."""
    import os
    import signal

    from test_watch_daemon import Watch

    fleet, _, _ = backed_up
    barman = fleet.path / ".shardctl" / "barman" / "barman.conf"
    listed = subprocess.run([sys.executable, "-m", "barman.cli", "-c", str(barman), "-f", "json", "list-processes",
                             "--", "a"], capture_output=True, text=True, check=True)
    for process in json.loads(listed.stdout)["a"]:  # the receiver `backups create` started, stopped here
        if process["name"] == "receive-wal":
            os.kill(int(process["pid"]), signal.SIGTERM)
    stopped = wait_until(lambda: not _streaming(fleet, "a"), "the receiver of a to stop")
    assert stopped
    with fleet.catalog() as conn:  # the newest base backups ended two days ago: due under `every: 1d`
        conn.execute("UPDATE shardctl.backups SET end_at = end_at - interval '2 days'")
    watch = Watch(fleet)
    try:
        watch.wait("WAL streaming of a again", lambda: watch.events("wal_streaming_started"))
        done = watch.wait("a scheduled base backup", lambda: watch.events("backup_done"), timeout=180)
        assert done[0]["servers"] == ["a", "b"] and done[0]["restore_point"].startswith("backup-op")

        def streaming_series() -> str | None:
            text = watch.text("/metrics")
            return text if 'shardctl_backup_wal_streaming{server="a"} 1.0' in text else None

        metrics = watch.wait("the backup series", streaming_series, timeout=60)
        assert 'shardctl_backup_age_seconds{server="b"}' in metrics and "shardctl_backup_wal_lag_bytes" in metrics
        assert "<h2>Backups</h2>" in watch.text("/") and watch.status()["backups"][0]["server"] == "a"
        status = fleet.cli("status")
        assert "Backups of a: last base backup" in status.out and "WAL streaming" in status.out
    finally:
        assert watch.stop() == 0, watch.logs()
    assert watch.events("wal_streaming_ended")  # its receiver ends with it (another daemon takes over)


def _streaming(fleet, server: str) -> bool:
    with fleet.connect(server) as conn:
        row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = 'shardctl_backup'").fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize("step", every_step(["backup a", "backup b", "point", "archive a", "retention"],
                                            always="point"))
def test_a_backup_killed_at_each_step_is_shown_then_resumed(backed_up, step):
    fleet, _, _ = backed_up
    killed = fleet.cli("backups", "create", env={FAILPOINT_ENV: step})
    assert killed.code == -9, killed.both
    status = json.loads(fleet.cli("status", "--json").out)
    (op,) = [o for o in status["interrupted"] if o["kind"] == "create_backup"]
    assert op["last_step"].startswith(step), op
    assert "shardctl backups create" in fleet.cli("status").out

    resumed = fleet.cli("backups", "create")
    assert resumed.code == 0, resumed.both
    assert f"Resuming operation {op['id']} (backups create)" in resumed.err
    assert _running(fleet) == []
    with fleet.catalog() as conn:
        backups = conn.execute("SELECT server FROM shardctl.backups WHERE operation = %s ORDER BY 1",
                               (op["id"],)).fetchall()
        points = conn.execute("SELECT count(*) FROM shardctl.restore_points WHERE operation = %s"
                              " AND checksums IS NOT NULL", (op["id"],)).fetchone()
    assert backups == [("a",), ("b",)] and points == (1,)  # each server backed up once, one point
    listing = json.loads(fleet.cli("backups", "list", "--json").out)
    assert all(b["status"] == "DONE" for s in listing["servers"] for b in s["backups"]), listing


@pytest.mark.parametrize("step", every_step(["record", "point", "restore", "database", "data", "scratch", "activate"],
                                            always="restore"))
def test_a_branch_from_backups_killed_at_each_step_is_rebuilt(backed_up, step):
    fleet, _, _ = backed_up
    name = f"k_{step}"
    original = fleet.read("fleet.yaml")
    fleet.write("fleet.yaml", original + ("branches:\n" if "branches:" not in original else "")
                + f"  {name}: {{from: orders, data: backup, server: b}}\n")
    killed = fleet.cli("apply", "--auto-approve", env={FAILPOINT_ENV: f"{step} {name}"})
    assert killed.code == -9, killed.both
    status = json.loads(fleet.cli("status", "--json").out)
    (op,) = [o for o in status["interrupted"] if o["address"] == f"branch.{name}"]
    plan = fleet.cli("plan")
    assert f"operation {op['id']} did not finish building branch {name}" in plan.out
    resumed = fleet.cli("apply", "--auto-approve")
    assert resumed.code == 0, resumed.both
    assert _branch_sums(fleet, "b", f"branch_{name}") == _parent_sums(fleet)  # nothing was written since
    assert _running(fleet) == []
    _no_scratch_left(fleet)
    fleet.write("fleet.yaml", original + f"allow_destroy: {{branches: [{name}]}}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0  # the branch goes
    fleet.write("fleet.yaml", original)


@pytest.mark.slow
def test_abort_removes_a_half_built_branch_and_its_restored_servers(backed_up):
    fleet, _, _ = backed_up
    original = fleet.read("fleet.yaml")
    fleet.write("fleet.yaml", original + ("branches:\n" if "branches:" not in original else "")
                + "  aborted: {from: orders, data: backup, server: b}\n")
    assert fleet.cli("apply", "--auto-approve", env={FAILPOINT_ENV: "database aborted"}).code == -9
    scratch = fleet.path / ".shardctl" / "scratch"
    assert len(list(scratch.iterdir())) == 2  # both servers restored, still running
    (op,) = [o for o in json.loads(fleet.cli("status", "--json").out)["interrupted"]
             if o["address"] == "branch.aborted"]
    aborted = fleet.cli("abort", str(op["id"]))
    assert aborted.code == 0, aborted.both
    _no_scratch_left(fleet)
    assert "branch_aborted" not in fleet.databases("b") and _running(fleet) == []
    fleet.write("fleet.yaml", original)
