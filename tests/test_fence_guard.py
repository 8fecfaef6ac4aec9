"""The fence's guard on a real server (engine/actions/fence.py): disarmed it lets every write
through; armed it refuses every way of writing a table with SQLSTATE 25006, whatever the
writer's isolation level, role or session_replication_role, and refuses the commit of a
transaction that wrote before it; the drain waits for exactly the commits that may still land;
the guard is no schema drift and no branch's."""

from __future__ import annotations

import subprocess
import threading

import psycopg
import pytest
from psycopg import errors, sql

from engine.actions import fence
from engine.actions.create_branch import without_fence
from engine.observe import introspect
from engine.servers.embedded import EmbeddedServer, bin_dir

SCHEMA = """
CREATE TABLE parent (id bigint PRIMARY KEY, name text NOT NULL DEFAULT '');
CREATE TABLE child (id bigint REFERENCES parent ON DELETE CASCADE, k int, PRIMARY KEY (id, k));
CREATE TABLE events (id bigint, at int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100);
INSERT INTO parent SELECT g FROM generate_series(1, 50) g;
INSERT INTO child SELECT g, 1 FROM generate_series(1, 50) g;
INSERT INTO events SELECT g, g FROM generate_series(1, 50) g;
CREATE ROLE shardctl_guard_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON parent, child, events, events_1 TO shardctl_guard_app;
"""
OPERATION = 77


@pytest.fixture
def shard(applied_fleet):
    with applied_fleet.connect("a") as admin:
        admin.execute("DROP DATABASE IF EXISTS guard_test")
        admin.execute("DROP ROLE IF EXISTS shardctl_guard_app")
        admin.execute("CREATE DATABASE guard_test")
    server = EmbeddedServer("a", applied_fleet.path / ".shardctl" / "servers" / "a")
    params = server.conninfo("guard_test")
    with psycopg.connect(**params, autocommit=True) as conn:
        conn.execute(SCHEMA)
    yield params, server
    with applied_fleet.connect("a") as admin:
        admin.execute("DROP DATABASE guard_test WITH (FORCE)")
        admin.execute("DROP ROLE IF EXISTS shardctl_guard_app")


def _guard(conn: psycopg.Connection) -> None:
    for schema, table in fence.unguarded(conn):
        with conn.transaction():
            fence.install(sql.Identifier(schema, table))(conn)


WRITES = {
    "insert": "INSERT INTO parent VALUES (1000)",
    "update": "UPDATE parent SET name = 'x' WHERE id = 2",
    "delete": "DELETE FROM child WHERE id = 3",
    "upsert": "INSERT INTO parent VALUES (4) ON CONFLICT (id) DO UPDATE SET name = 'y'",
    "merge": "MERGE INTO parent p USING (VALUES (5)) v(id) ON p.id = v.id WHEN MATCHED THEN UPDATE SET name = 'z'",
    "truncate": "TRUNCATE child",
    "partition, through its parent": "INSERT INTO events VALUES (1000, 60)",
    "partition, directly": "INSERT INTO events_1 VALUES (1001, 61)",
}


def test_the_guard_refuses_every_write_once_armed_and_none_before(shard):
    params, _ = shard
    with psycopg.connect(**params, autocommit=True) as conn:
        before = introspect.fingerprint(introspect.snapshot(conn))
        _guard(conn)
        assert fence.unguarded(conn) == []  # every table, partitions included
        assert introspect.fingerprint(introspect.snapshot(conn)) == before  # never schema drift
        writer = psycopg.connect(**params)
        for statement in WRITES.values():  # disarmed: everything passes
            writer.execute(statement)
            writer.rollback()
        snapshot_holder = psycopg.connect(**params)
        snapshot_holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        snapshot_holder.execute("SELECT count(*) FROM parent")  # a snapshot from before the fence
        fence.arm(conn, OPERATION)
        assert fence.armed_for(conn, OPERATION) is not None and fence.armed_for(conn, OPERATION + 1) is None
        refused = {}
        for name, statement in WRITES.items():
            try:
                writer.execute(statement)
                refused[name] = False
            except errors.ReadOnlySqlTransaction:
                refused[name] = True
            writer.rollback()
        assert refused == dict.fromkeys(WRITES, True)
        with pytest.raises(errors.ReadOnlySqlTransaction):  # its snapshot predates the flag: not its value
            snapshot_holder.execute("INSERT INTO parent VALUES (2000)")
        snapshot_holder.rollback()
        with pytest.raises(errors.ReadOnlySqlTransaction), writer.cursor().copy("COPY parent (id) FROM STDIN") as copy:
            copy.write_row((3000,))
        writer.rollback()
        writer.execute("SET session_replication_role = replica")  # skips ordinary triggers, not this one
        with pytest.raises(errors.ReadOnlySqlTransaction):
            writer.execute("DELETE FROM parent WHERE id = 6")
        writer.rollback()
        writer.execute("SET ROLE shardctl_guard_app")  # no privilege on _shardctl: told, not denied
        with pytest.raises(errors.ReadOnlySqlTransaction, match="re-resolve the route"):
            writer.execute("UPDATE parent SET name = 'w' WHERE id = 7")
        writer.rollback()
        # a cascade from a table whose own guard someone disabled still meets the child's
        fence.disarm(conn, OPERATION)
        conn.execute("ALTER TABLE parent DISABLE TRIGGER shardctl_fence")
        fence.arm(conn, OPERATION)
        with pytest.raises(errors.ReadOnlySqlTransaction):
            writer.execute("DELETE FROM parent WHERE id = 8")
        writer.rollback()
        assert fence.disarm(conn, OPERATION) and not fence.disarm(conn, OPERATION)
        writer.execute("DELETE FROM parent WHERE id = 8")  # disarmed: writes pass again
        writer.commit()
        assert conn.execute("SELECT count(*) FROM child WHERE id = 8").fetchone() == (0,)
        writer.close()
        snapshot_holder.close()


def test_a_write_made_before_the_arm_is_refused_at_its_commit_after_it_and_never_waited_for(shard):
    params, _ = shard
    rows = "SELECT (SELECT count(*) FROM parent), (SELECT string_agg(name, ',' ORDER BY id) FROM parent)," \
           " (SELECT count(*) FROM child), (SELECT count(*) FROM events)"
    with psycopg.connect(**params, autocommit=True) as conn:
        _guard(conn)
        oids = [oid for _, _, oid in fence.tables(conn)]
        before = conn.execute(rows).fetchone()
        writers = {}
        for name, statement in WRITES.items():
            if name == "truncate":
                continue
            writer = writers[name] = psycopg.connect(**params)
            if name == "merge":
                writer.execute("SET ROLE shardctl_guard_app")  # no privilege on _shardctl: told, not denied
            if name == "upsert":
                writer.execute("SET session_replication_role = replica")
            writer.execute(statement)  # written while the fence was not armed, not yet committed
        fence.arm(conn, OPERATION)
        drained = fence.drain(conn, OPERATION, "s", oids, 5.0)
        assert drained.waiting == frozenset() and drained.drained_s < 1.0  # nobody waited for
        assert fence.mark(conn, OPERATION, "s").lsn is not None
        for writer in writers.values():
            with pytest.raises(errors.ReadOnlySqlTransaction, match="re-resolve the route"):
                writer.commit()
            writer.close()
        assert conn.execute(rows).fetchone() == before
        fence.disarm(conn, OPERATION)
        with psycopg.connect(**params) as writer:  # disarmed: a commit passes again
            writer.execute(WRITES["update"])
        assert conn.execute("SELECT name FROM parent WHERE id = 2").fetchone() == ("x",)


def test_the_drain_waits_for_commits_checked_before_the_arm_and_a_truncate_but_not_an_aborted_one(shard):
    params, _ = shard
    with psycopg.connect(**params, autocommit=True) as conn:
        _guard(conn)
        oids = [oid for _, _, oid in fence.tables(conn)]
        early, truncated, aborted = (psycopg.connect(**params) for _ in range(3))
        early.execute("SET CONSTRAINTS ALL IMMEDIATE")  # its commit guard runs with each statement
        early.execute("UPDATE parent SET name = 'early' WHERE id = 9")
        truncated.execute("TRUNCATE child")
        aborted.execute("TRUNCATE events_1")
        with pytest.raises(errors.UniqueViolation):
            aborted.execute("INSERT INTO parent VALUES (1)")  # its transaction can never commit now
        fence.warm(conn, OPERATION, "s", oids)  # before the fence: no wait, no flag
        assert fence.armed_for(conn, OPERATION) is None
        stamps = "SELECT (extract(epoch FROM at) * 1000000)::bigint FROM _shardctl.fence_marks"
        (warmed,) = conn.execute(stamps).fetchone()
        fence.arm(conn, OPERATION)
        overran = fence.drain(conn, OPERATION, "s", oids, 0.05)
        vxid = "SELECT virtualtransaction FROM pg_locks WHERE pid = %s AND locktype = 'virtualxid'"
        assert overran.waiting == {conn.execute(vxid, (truncated.info.backend_pid,)).fetchone()[0]}
        assert overran.lsn is None and overran.drained_s >= 0.05
        truncated.rollback()
        overran = fence.drain(conn, OPERATION, "s", oids, 0.05)
        assert overran.waiting == {conn.execute(vxid, (early.info.backend_pid,)).fetchone()[0]}
        assert conn.execute(stamps).fetchall() == [(warmed,)]  # the warm-up's, no new mark
        later = threading.Timer(0.2, early.commit)  # it passed its check before the arm: it commits
        later.start()
        drained = fence.drain(conn, OPERATION, "s", oids, 5.0)
        later.join()
        assert drained.waiting == frozenset() and 0.1 < drained.drained_s < 5.0
        marked = fence.mark(conn, OPERATION, "s")
        lsn, stamp, name = conn.execute(
            "SELECT pg_current_wal_insert_lsn() >= %s::pg_lsn, (extract(epoch FROM at) * 1000000)::bigint,"
            " (SELECT name FROM parent WHERE id = 9) FROM _shardctl.fence_marks WHERE operation = %s AND source = 's'",
            (marked.lsn, OPERATION)).fetchone()
        assert lsn and stamp == marked.stamp and name == "early"  # the mark, after the commit it waited for
        for c in (early, truncated, aborted):
            c.close()


def test_the_guard_is_left_out_of_a_branch_and_removed_by_an_abort(shard):
    params, server = shard
    with psycopg.connect(**params, autocommit=True) as conn:
        _guard(conn)
        dumped = subprocess.run([str(bin_dir() / "pg_dump"), "--schema-only", "--section=post-data",
                                 "--exclude-schema=_shardctl", "-h", str(server.socket_dir), "-p", "5432",
                                 "-U", "postgres", "guard_test"], capture_output=True, text=True, check=True).stdout
        assert "shardctl_fence" in dumped and "ENABLE ALWAYS TRIGGER" in dumped
        kept = without_fence(dumped)
        assert "shardctl_fence" not in kept and "_shardctl" not in kept
        assert kept.count("; Type: FK CONSTRAINT;") == dumped.count("; Type: FK CONSTRAINT;") == 1
        for schema, table in fence.guarded(conn):
            with conn.transaction():
                fence.uninstall(sql.Identifier(schema, table))(conn)
        assert fence.guarded(conn) == []
