"""The fence of a move: how writes to its sources stop without a table lock, and why that is sound.

The parts, all in the source database:

- `_shardctl.fence()`, a statement-level trigger function (the guard), installed as two
  triggers on every table of the source, partitions included: BEFORE INSERT OR UPDATE OR
  DELETE, and BEFORE TRUNCATE. It raises SQLSTATE 25006 (read_only_sql_transaction, what
  engine.client re-resolves on) when the flag is set, and lets everything pass when it is not.
  The triggers are `ENABLE ALWAYS`: they fire under `session_replication_role = replica` too.
- `_shardctl.fence_armed`, the flag: a sequence whose value is 0 (writes pass) or the
  operation whose fence refuses them. A sequence because its value is not MVCC: `setval` is
  seen at once by every session, whatever its snapshot (a REPEATABLE READ transaction that
  began before the fence reads the flag as set, where it would read a flag table's old row).
  `setval` is WAL-logged; the arm's commit does not wait for its flush (`arm` says why), the
  mark's commit does and flushes the arm with it: a fence that has its mark survives a crash.
- `_shardctl.fence_state`, one row per armed operation with the moment it was armed: where a
  resumed run reads how long the range has been unwritable.

The guard goes up during the copy, long before the fence, one table per short transaction
(`CREATE TRIGGER` takes SHARE ROW EXCLUSIVE on that table alone; engine/servers/locking.py
retries it with a lock timeout far below deadlock_timeout). Holding at most one lock and
waiting on none while holding it, it cannot close a cycle with the application's
transactions; a writer waits behind it at most that lock timeout. It refuses nothing yet.

The fence itself takes no table lock:

1. Arm: `setval` of the flag (and the state row), in one statement. From that instant every
   statement that writes a source table fails at its guard, whichever order the application
   takes its locks in: the fence never waits for a moment without writers, never queues a
   writer, and never takes part in a deadlock.
2. Drain: like CREATE INDEX CONCURRENTLY's wait for older transactions. A transaction that
   wrote a table before the flag was set holds a RowExclusive lock on it (ACCESS EXCLUSIVE for
   TRUNCATE) from before its guard ran until it ends. Read from pg_locks after the arm, those
   holders are a superset of every transaction that may still commit a write the guard let
   through; the fence waits until each of them has ended (its virtual transaction id is gone
   from pg_locks). A transaction in an aborted state can never commit: it is not waited for.
3. Mark: a row in `_shardctl.fence_marks`, written after the drain. Every write that got past
   the guard committed before it, so its commit precedes the mark's in the WAL, and a target
   that has applied the mark has applied all of them (logical replication applies in commit
   order).

Why nothing that commits after the mark can change a source table: a write runs its
statement's BEFORE trigger after taking its table lock. If the guard ran after the arm, it
saw the flag and failed the statement. If it ran before, the lock was granted before the arm,
is held until the transaction ends, and so was among the holders the drain waited for.

The drain is bounded (DRAIN_LIMIT). Before arming, the fence looks for transactions that have
held a write lock longer than that (idle in transaction, a long batch): while there is one it
does not arm, the source takes writes, and it gives up after `moves.fence_timeout` naming it.
One that began just before the arm and does not end within DRAIN_LIMIT disarms the fence:
the range was unwritable for at most DRAIN_LIMIT, and the fence tries again later. Whenever
the fence gives up (here, or on any overrun behind it) it disarms the flag: the source takes
writes as before. Disarming is a `setval`: it needs no lock either, so it cannot be blocked.

What the guard does not stop (as PostgreSQL lets their owners do): the table's owner disabling
or dropping the trigger (ALTER TABLE ... DISABLE TRIGGER, DROP TRIGGER), and rows a
subscription of the source's own applies (logical replication fires no statement trigger
for INSERT, UPDATE or DELETE). A table created during the move is neither copied nor guarded.

After the flip the flag stays set: the retired source refuses writes until it is dropped.
After an abort the flag is cleared and the triggers are dropped (a lock per table, retried as
their creation was). They are never part of a schema's fingerprint (engine/observe/introspect
reads columns, constraints, indexes and sequences, not triggers) and a branch's dump leaves
them out (engine/actions/create_branch.py).
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from psycopg import sql

from engine.actions.reference import COPY_TRIGGER

GUARD_TRIGGERS = ("shardctl_fence", "shardctl_fence_truncate")
DRAIN_LIMIT = 0.5  # seconds the armed fence waits for transactions that wrote before it, at most

MARKS = """
CREATE SCHEMA IF NOT EXISTS _shardctl;
CREATE TABLE IF NOT EXISTS _shardctl.fence_marks (
    operation bigint NOT NULL,
    source    text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operation, source)
);
"""

# SECURITY DEFINER: a writer needs no privilege on _shardctl to be told the shard is fenced
GUARD = MARKS + """
CREATE SEQUENCE IF NOT EXISTS _shardctl.fence_armed MINVALUE 0 START 0;
CREATE TABLE IF NOT EXISTS _shardctl.fence_state (
    operation bigint PRIMARY KEY,
    armed_at  timestamptz NOT NULL
);
CREATE OR REPLACE FUNCTION _shardctl.fence() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF (SELECT last_value FROM _shardctl.fence_armed) <> 0 THEN
        RAISE EXCEPTION 'shard is read-only: shardctl is moving or has moved its rows; re-resolve the route'
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    RETURN NULL;
END
$$;
"""

# every table of the shard, partitions included (a statement on a partition fires only its own),
# but a reference table's copy: its source's replication writes it, and it is not the move's
NOT_REFERENCE = f"NOT EXISTS (SELECT 1 FROM pg_trigger r WHERE r.tgrelid = c.oid AND r.tgname = '{COPY_TRIGGER}')"
TABLES = f"""
SELECT n.nspname, c.relname, c.oid::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' AND {NOT_REFERENCE}
   AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl') AND n.nspname NOT LIKE 'pg_toast%%'
 ORDER BY 1, 2
"""


def tables(conn: psycopg.Connection) -> list[tuple[str, str, int]]:
    """(schema, table, oid) of every table the guard covers."""
    return [(r[0], r[1], int(r[2])) for r in conn.execute(TABLES)]


def unguarded(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """The tables that lack either trigger, or have one not enabled ALWAYS (an older shardctl's)."""
    conn.execute(GUARD)
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl') AND n.nspname NOT LIKE 'pg_toast%%'"
        f" AND {NOT_REFERENCE}"
        " AND (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = ANY(%s) AND t.tgenabled = 'A'"
        "      AND t.tgfoid = '_shardctl.fence()'::regprocedure) < 2 ORDER BY 1, 2", (list(GUARD_TRIGGERS),))]


def install(table: sql.Composable) -> Callable[[psycopg.Connection], None]:
    """The work of one short transaction: both triggers on one table (one lock, no other wait)."""
    statement = sql.SQL(
        "CREATE OR REPLACE TRIGGER shardctl_fence BEFORE INSERT OR UPDATE OR DELETE ON {t}"
        " FOR EACH STATEMENT EXECUTE FUNCTION _shardctl.fence();"
        " CREATE OR REPLACE TRIGGER shardctl_fence_truncate BEFORE TRUNCATE ON {t}"
        " FOR EACH STATEMENT EXECUTE FUNCTION _shardctl.fence();"
        " ALTER TABLE {t} ENABLE ALWAYS TRIGGER shardctl_fence, ENABLE ALWAYS TRIGGER shardctl_fence_truncate"
    ).format(t=table)

    def work(conn: psycopg.Connection) -> None:
        conn.execute(statement)
    return work


def guarded(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """The tables that carry a guard trigger (what removing the guard must visit)."""
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT DISTINCT n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = ANY(%s) ORDER BY 1, 2",
        (list(GUARD_TRIGGERS),))]


def uninstall(table: sql.Composable) -> Callable[[psycopg.Connection], None]:
    statement = sql.SQL("DROP TRIGGER IF EXISTS shardctl_fence ON {t}; DROP TRIGGER IF EXISTS shardctl_fence_truncate"
                        " ON {t}").format(t=table)

    def work(conn: psycopg.Connection) -> None:
        conn.execute(statement)
    return work


def arm(conn: psycopg.Connection, operation: int) -> None:
    """Set the flag (autocommit connection): writes fail from the moment this statement runs. The
    state row keeps the first arming's time when the fence is armed again by a resumed run.

    Committed without waiting for the source's WAL flush (synchronous_commit off for this
    statement's transaction only): the flag is seen at once however it commits, and the wait
    was a flush inside the pause (20-450 ms measured under pgbench). A source that crashes
    before the mark row commits (durably, flushing the arm's WAL with it) may come back
    unfenced: nothing relied on the fence yet, and the resumed run finds no fence and takes it
    anew; the flag without its state row reads as armed just now (`armed_for`)."""
    conn.execute("WITH lazily AS (SELECT set_config('synchronous_commit', 'off', true)),"
                 " state AS (INSERT INTO _shardctl.fence_state (operation, armed_at)"
                 " VALUES (%s, clock_timestamp()) ON CONFLICT (operation) DO NOTHING)"
                 " SELECT setval('_shardctl.fence_armed', %s) FROM lazily", (operation, operation))


def disarm(conn: psycopg.Connection, operation: int) -> bool:
    """Clear the flag if this operation set it; whether it was set. Takes no lock a writer holds."""
    if conn.execute("SELECT to_regclass('_shardctl.fence_armed')").fetchone() == (None,):
        return False
    row = conn.execute("WITH state AS (DELETE FROM _shardctl.fence_state WHERE operation = %s)"
                       " SELECT setval('_shardctl.fence_armed', 0) FROM _shardctl.fence_armed WHERE last_value = %s",
                       (operation, operation)).fetchone()
    return row is not None


def armed_for(conn: psycopg.Connection, operation: int) -> float | None:
    """Seconds since this operation armed the fence (on the source's clock); None when it is not
    armed by it. Armed with no state row (a crash between the two): 0."""
    if conn.execute("SELECT to_regclass('_shardctl.fence_state')").fetchone() == (None,):
        return None
    row = conn.execute(
        "SELECT coalesce((SELECT extract(epoch FROM clock_timestamp() - armed_at)::float8 FROM _shardctl.fence_state"
        " WHERE operation = %s), 0) FROM _shardctl.fence_armed WHERE last_value = %s",
        (operation, operation)).fetchone()
    return None if row is None else max(0.0, float(row[0]))


def drained(conn: psycopg.Connection, waiting: set[str]) -> set[str]:
    """Those of the virtual transactions `waiting` that have not ended (one poll)."""
    if not waiting:
        return set()
    return {r[0] for r in conn.execute(
        "SELECT DISTINCT l.virtualtransaction FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.virtualtransaction = ANY(%s) AND a.state IS DISTINCT FROM 'idle in transaction (aborted)'",
        (sorted(waiting),))}
