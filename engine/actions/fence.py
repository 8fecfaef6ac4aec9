"""The fence of a move: how writes to its sources stop without a table lock, and why that is sound.

The parts, all in the source database:

- `_shardctl.fence()`, a statement-level trigger function (the guard), installed as two
  triggers on every table of the source, partitions included: BEFORE INSERT OR UPDATE OR
  DELETE, and BEFORE TRUNCATE. It raises SQLSTATE 25006 (read_only_sql_transaction, what
  engine.client re-resolves on) when the flag is set, and lets everything pass when it is not.
  The triggers are `ENABLE ALWAYS`: they fire under `session_replication_role = replica` too.
- `_shardctl.fence_commit()`, the commit guard: a deferred constraint trigger on every table
  that holds rows (a partitioned parent's rows are its partitions'), queued once per
  transaction at its first row written (`_shardctl.first_write()` in its WHEN), so it runs as
  that transaction commits. It takes the commit lock (an advisory lock, COMMIT_LOCK) shared
  and then reads the flag: set, it refuses the commit with the same 25006. Also ALWAYS.
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
   takes its locks in, and so does every commit of a transaction that wrote one before: the
   fence never waits for a moment without writers, never queues a writer's statement, and
   never waits for an application to finish its transaction.
2. Drain: wait for the commits already under way, that passed the commit guard before the arm:
   they hold the commit lock shared until they end, so the drain takes it exclusive (with a
   lock timeout below deadlock_timeout: it never waits long enough to take part in a
   deadlock), and lets it go with its own commit. A commit that asks for the lock afterwards,
   or while the drain waits for it, reads the flag after the arm and is refused. A TRUNCATE
   fires no row trigger: a transaction that truncated before the arm holds ACCESS EXCLUSIVE on
   its table until it ends, and the drain waits for it to end (like CREATE INDEX
   CONCURRENTLY's wait for older transactions; one in an aborted state can never commit and is
   not waited for).
   One statement on the server (`drain`), which writes nothing: its commit waits for no WAL
   flush.
3. Mark: a row in `_shardctl.fence_marks`, written after the drain (`mark`). Every write that
   got past the guards committed before it, so its commit precedes the mark's in the WAL, and
   a target that has applied the mark has applied all of them (logical replication applies in
   commit order). The drain's commit-lock wait ended before the mark began, and a commit that
   takes the lock after the drain reads the flag set: the mark need not hold the lock.

Why nothing that commits after the mark can change a source table. A row written in a
transaction queues its commit guard (the first such row of the transaction does; the others
share it). At commit the guard takes the commit lock shared, then reads the flag. If it took
the lock before the drain did, the drain waited for the transaction to end, before the mark.
If after, the arm came before, so the flag it reads is set and the commit is refused. A
transaction that makes the commit guard run early (SET CONSTRAINTS ALL IMMEDIATE) holds the
shared lock from then until it ends, so the drain waits for it. A TRUNCATE is covered by its
statement guard and by the drain's wait for ACCESS EXCLUSIVE holders.

What the fence costs the application, then: a transaction that wrote before the arm and
commits after it is refused (25006, as its next write would have been: engine.client runs the
transaction again on the new owner), where an earlier fence waited for it; under 32 pgbench
writers on two cores that wait was 50-120 ms of every pause, spent waiting for the writers'
own clients to get CPU.

The drain is bounded (DRAIN_LIMIT). Before arming, the fence looks for transactions that have
held a write lock longer than that (idle in transaction, a long batch): while there is one it
does not arm, the source takes writes, and it gives up after `moves.fence_timeout` naming it
(so a long batch is not refused at its commit by a fence that could have waited). A drain
that overruns disarms the fence: the range was unwritable for at most DRAIN_LIMIT, and the
fence tries again later. Whenever the fence gives up (here, or on any overrun behind it) it
disarms the flag: the source takes writes as before. Disarming is a `setval`: it needs no lock
either, so it cannot be blocked.

What the guard does not stop (as PostgreSQL lets their owners do): the table's owner disabling
or dropping the triggers (ALTER TABLE ... DISABLE TRIGGER, DROP TRIGGER), and the statements of
rows a subscription of the source's own applies (logical replication fires no statement
trigger for INSERT, UPDATE or DELETE; its row triggers do fire, so such a transaction's commit
is refused once armed). A table created during the move is neither copied nor guarded.

After the flip the flag stays set: the retired source refuses writes until it is dropped.
After an abort the flag is cleared and the triggers are dropped (a lock per table, retried as
their creation was). They are never part of a schema's fingerprint (engine/observe/introspect
reads columns, constraints but the commit guard's, indexes and sequences, not triggers) and a
branch's dump leaves them out (engine/actions/create_branch.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from engine.actions.reference import COPY_TRIGGER
from engine.rows import one
from engine.servers.locking import LOCK_TIMEOUT_MS

GUARD_TRIGGERS = ("shardctl_fence", "shardctl_fence_truncate", "shardctl_fence_commit")
COMMIT_TRIGGER = "shardctl_fence_commit"
DRAIN_LIMIT = 0.5  # seconds the armed fence waits for the commits under way (and a TRUNCATE), at most

MARKS = """
CREATE SCHEMA IF NOT EXISTS _shardctl;
CREATE TABLE IF NOT EXISTS _shardctl.fence_marks (
    operation bigint NOT NULL,
    source    text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operation, source)
);
"""

# The commit lock: an advisory lock of the source database, taken shared by every commit that
# wrote a guarded table (fence_commit) and exclusive by the drain. Two int4 keys, in a class of
# their own ('shar', 'dctl'), so that an application's own advisory locks never meet it.
COMMIT_LOCK = (0x73686172, 0x6463746C)
MESSAGE = "shard is read-only: shardctl is moving or has moved its rows; re-resolve the route"

# The drain and the mark, each one statement on the server (`drain`, `mark`, and `warm`: both, once,
# without their waits). pg_locks is read anew at each call; pg_stat_clear_snapshot, lest
# pg_stat_activity be kept as the transaction first read it (the documented rule for statistics views).
DRAIN_AND_MARK = f"""
CREATE OR REPLACE FUNCTION _shardctl.drain_and_mark(op bigint, src text, guarded oid[], limit_s float8, lock_ms int,
    what text, OUT lsn text, OUT stamp bigint, OUT drained_s float8, OUT waiting text[])
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    began timestamptz := clock_timestamp();
    marked timestamptz;
    session_lock_timeout text := current_setting('lock_timeout');
BEGIN
  IF what <> 'mark' THEN  -- 'drain', or 'warm': every statement of both once, without their waits
    -- a TRUNCATE that ran before the arm: its transaction holds ACCESS EXCLUSIVE until it ends
    waiting := ARRAY(SELECT DISTINCT l.virtualtransaction FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                      WHERE l.locktype = 'relation' AND l.granted AND l.mode = 'AccessExclusiveLock'
                        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                        AND l.relation = ANY(guarded) AND l.pid IS DISTINCT FROM pg_backend_pid()
                        AND a.state IS DISTINCT FROM 'idle in transaction (aborted)');
    WHILE cardinality(waiting) > 0 AND what = 'drain' LOOP
        IF clock_timestamp() - began > make_interval(secs => limit_s) THEN
            drained_s := extract(epoch FROM clock_timestamp() - began);
            RETURN;
        END IF;
        PERFORM pg_sleep(0.001);
        PERFORM pg_stat_clear_snapshot();
        waiting := ARRAY(SELECT DISTINCT l.virtualtransaction
                           FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                          WHERE l.virtualtransaction = ANY(waiting)
                            AND a.state IS DISTINCT FROM 'idle in transaction (aborted)');
    END LOOP;
    -- the commits under way that passed their check before the arm: they hold the lock shared.
    -- Each wait well below deadlock_timeout (engine/servers/locking.py lock_timeout_ms), tried
    -- again until the limit: the commits queued behind a wait that timed out go on (refused).
    LOOP
        PERFORM set_config('lock_timeout', greatest(1, least(
            lock_ms, (extract(epoch FROM current_setting('deadlock_timeout')::interval) * 250)::int,
            (limit_s * 1000 - extract(epoch FROM clock_timestamp() - began) * 1000)::int))::text, true);
        EXIT WHEN what = 'warm';
        BEGIN
            PERFORM pg_advisory_xact_lock({COMMIT_LOCK[0]}, {COMMIT_LOCK[1]});
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF clock_timestamp() - began > make_interval(secs => limit_s) THEN
                waiting := ARRAY(SELECT DISTINCT l.virtualtransaction FROM pg_locks l
                                  WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {COMMIT_LOCK[0]}::oid
                                    AND l.objid = {COMMIT_LOCK[1]}::oid AND l.objsubid = 2
                                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()));
                drained_s := extract(epoch FROM clock_timestamp() - began);
                RETURN;
            END IF;
        END;
    END LOOP;
    -- the mark waits as any statement behind the fence does (statement_timeout): a lock on the
    -- marks' table is not a commit under way
    PERFORM set_config('lock_timeout', session_lock_timeout, true);
    drained_s := extract(epoch FROM clock_timestamp() - began);
    IF what = 'drain' THEN
        lsn := pg_current_wal_flush_lsn()::text;  -- every commit the drain waited for is flushed
        RETURN;
    END IF;
  END IF;
    marked := clock_timestamp();
    INSERT INTO _shardctl.fence_marks (operation, source, at) VALUES (op, src, marked)
        ON CONFLICT (operation, source) DO UPDATE SET at = excluded.at;
    lsn := pg_current_wal_insert_lsn()::text;
    stamp := (extract(epoch FROM marked) * 1000000)::bigint;
END
$$;
"""

# The commit guard: a deferred constraint trigger queued once per transaction, at its first row
# written to a guarded table (first_write, in the trigger's WHEN: evaluated as the row is
# written, so one event is queued, not one per row); it runs as the transaction commits.
COMMIT_GUARD = f"""
CREATE OR REPLACE FUNCTION _shardctl.first_write() RETURNS boolean LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN pg_catalog.current_setting('shardctl.commit_guard', true) = 'queued' THEN false
                ELSE pg_catalog.set_config('shardctl.commit_guard', 'queued', true) = 'queued' END
$$;
CREATE OR REPLACE FUNCTION _shardctl.fence_commit() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({COMMIT_LOCK[0]}, {COMMIT_LOCK[1]});
    IF (SELECT last_value FROM _shardctl.fence_armed) <> 0 THEN
        RAISE EXCEPTION '{MESSAGE}' USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    RETURN NULL;
END
$$;
"""

# SECURITY DEFINER: a writer needs no privilege on _shardctl to be told the shard is fenced
GUARD = MARKS + f"""
CREATE SEQUENCE IF NOT EXISTS _shardctl.fence_armed MINVALUE 0 START 0;
CREATE TABLE IF NOT EXISTS _shardctl.fence_state (
    operation bigint PRIMARY KEY,
    armed_at  timestamptz NOT NULL
);
CREATE OR REPLACE FUNCTION _shardctl.fence() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF (SELECT last_value FROM _shardctl.fence_armed) <> 0 THEN
        RAISE EXCEPTION '{MESSAGE}' USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    RETURN NULL;
END
$$;
""" + COMMIT_GUARD + DRAIN_AND_MARK

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
    """The tables that lack a trigger of the guard, or have one not enabled ALWAYS (an older
    shardctl's): both statement triggers, and on a table that holds rows (not a partitioned
    parent: its partitions' own fire) the commit guard."""
    conn.execute(GUARD)
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl') AND n.nspname NOT LIKE 'pg_toast%%'"
        f" AND {NOT_REFERENCE}"
        " AND ((SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = ANY(%s) AND t.tgenabled = 'A'"
        "       AND t.tgfoid = '_shardctl.fence()'::regprocedure) < 2"
        "   OR c.relkind = 'r' AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = %s"
        "       AND t.tgenabled = 'A' AND t.tgfoid = '_shardctl.fence_commit()'::regprocedure))"
        " ORDER BY 1, 2", (list(GUARD_TRIGGERS), COMMIT_TRIGGER))]


def install(table: sql.Composable) -> Callable[[psycopg.Connection], None]:
    """The work of one short transaction: the guard's triggers on one table (one lock, SHARE ROW
    EXCLUSIVE, no other wait). The commit guard is a constraint trigger, which has no OR REPLACE:
    made when missing (dropping it first would take ACCESS EXCLUSIVE, and queue readers)."""
    statement = sql.SQL(
        "CREATE OR REPLACE TRIGGER shardctl_fence BEFORE INSERT OR UPDATE OR DELETE ON {t}"
        " FOR EACH STATEMENT EXECUTE FUNCTION _shardctl.fence();"
        " CREATE OR REPLACE TRIGGER shardctl_fence_truncate BEFORE TRUNCATE ON {t}"
        " FOR EACH STATEMENT EXECUTE FUNCTION _shardctl.fence();"
        " ALTER TABLE {t} ENABLE ALWAYS TRIGGER shardctl_fence, ENABLE ALWAYS TRIGGER shardctl_fence_truncate"
    ).format(t=table)
    commit_guard = sql.SQL(
        "CREATE CONSTRAINT TRIGGER shardctl_fence_commit AFTER INSERT OR UPDATE OR DELETE ON {t}"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (_shardctl.first_write())"
        " EXECUTE FUNCTION _shardctl.fence_commit()").format(t=table)
    enable = sql.SQL("ALTER TABLE {t} ENABLE ALWAYS TRIGGER shardctl_fence_commit").format(t=table)

    def work(conn: psycopg.Connection) -> None:
        conn.execute(statement)
        relkind, present = one(conn.execute(
            "SELECT c.relkind, EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = %s)"
            " FROM pg_class c WHERE c.oid = %s::regclass", (COMMIT_TRIGGER, table.as_string(conn))))
        if relkind == "r":
            if not present:
                conn.execute(commit_guard)
            conn.execute(enable)
    return work


def guarded(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """The tables that carry a guard trigger (what removing the guard must visit)."""
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT DISTINCT n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = ANY(%s) ORDER BY 1, 2",
        (list(GUARD_TRIGGERS),))]


def uninstall(table: sql.Composable) -> Callable[[psycopg.Connection], None]:
    statement = sql.SQL("DROP TRIGGER IF EXISTS shardctl_fence ON {t}; DROP TRIGGER IF EXISTS shardctl_fence_truncate"
                        " ON {t}; DROP TRIGGER IF EXISTS shardctl_fence_commit ON {t}").format(t=table)

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


@dataclass(frozen=True)
class Drained:
    """One source's drain: once every commit that may still land has ended, its WAL flushed then
    (LSN); or, past the limit, those still running (their virtual transaction ids) and no LSN.
    A mark: its LSN and its time in microseconds (STAMP)."""

    lsn: str | None
    stamp: int | None
    drained_s: float  # from the statement's start on the server to the drain (or the give-up)
    waiting: frozenset[str]


def drain(conn: psycopg.Connection, operation: int, source: str, oids: list[int], limit_s: float) -> Drained:
    """After the arm (autocommit connection): wait, at most LIMIT_S, for the commits that passed
    the commit guard before the arm (and for a TRUNCATE's transaction); one statement, on the
    server (module docstring, 2).

    On the server rather than polled from here: under 32 pgbench writers on two cores each
    poll's round trip waited for CPU twice (this process, then the backend), 30-90 ms of drain.
    It writes nothing, so its commit waits for no WAL flush: the mark's does, 25-100 ms under
    that load (the disk busy), and the work ahead of the verification runs meanwhile."""
    return _step(conn, operation, source, oids, limit_s, "drain")


def mark(conn: psycopg.Connection, operation: int, source: str) -> Drained:
    """After the drain: the mark row. Its commit waits for the WAL flush (the targets'
    subscriptions only receive flushed WAL); its `at` is the statement's moment."""
    return _step(conn, operation, source, [], 0.0, "mark")


def warm(conn: psycopg.Connection, operation: int, source: str, oids: list[int]) -> None:
    """Before the fence, the drain's and the mark's statements without their waits (and with no
    effect but a mark row, which the real mark overwrites): the backend compiles the function
    and reads the catalogs it needs then, not behind the fence (4-5 ms on a fresh connection
    against 1.1-1.3 ms after, idle; under load that first time took 40 ms and more)."""
    _step(conn, operation, source, oids, 0.0, "warm")


def _step(conn: psycopg.Connection, operation: int, source: str, oids: list[int], limit_s: float,
          what: str) -> Drained:
    row = one(conn.execute("SELECT lsn, stamp, drained_s, waiting"
                           " FROM _shardctl.drain_and_mark(%s, %s, %s::oid[], %s, %s, %s)",
                           (operation, source, oids, limit_s, LOCK_TIMEOUT_MS, what)))
    return Drained(lsn=row[0], stamp=row[1], drained_s=float(row[2] or 0.0), waiting=frozenset(row[3] or ()))
