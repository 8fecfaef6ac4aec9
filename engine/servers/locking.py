"""Taking locks on a live shard without ever joining a deadlock, and naming who is in the way.

Every statement that locks a table an application writes (installing or removing a move's
guard triggers, a restore point's cut) runs through `with_lock_retries` (or
`with_lock_retries_all`, for several servers that must lock together):
a lock timeout far below the server's `deadlock_timeout`, so our wait ends before PostgreSQL's
deadlock detector would run and pick a victim (the application's transaction or ours); a
rollback that releases whatever we held; a short randomised backoff; and a bounded number of
tries within a total time budget. Between tries it records who held the locks we waited for,
so that giving up names them, and cancels an autovacuum among them. A database condition is
never reported as a bug: the caller gets `LockContention` with the blockers and what to do.

The fence itself takes no table lock (engine/actions/fence.py); `write_holders` tells it which
transactions hold a lock that writing the shard's tables takes, the ones it waits for.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg import errors, sql

from engine.errors import UserError
from engine.rows import one

LOCK_TIMEOUT_MS = 100  # at most a quarter of deadlock_timeout; see lock_timeout_ms()
TRIES = 10_000  # in practice the time budget ends it
BUDGET_S = 30.0
# QueryCanceled: our own statement_timeout, which caps a statement that waits on several locks
RETRYABLE = (errors.LockNotAvailable, errors.DeadlockDetected, errors.QueryCanceled)


class LockContention(UserError):
    """Could not take the locks within the budget: the shard is as it was."""


@dataclass(frozen=True)
class Blocker:
    pid: int | None  # None: a prepared transaction (two-phase commit), which has no session
    application_name: str
    state: str
    xact_age_s: float | None
    query_start: str
    backend_type: str = "client backend"
    wraparound: bool = False  # an autovacuum that prevents xid wraparound: never cancelled
    vxid: str = ""  # its virtual transaction id: gone from pg_locks once the transaction ended

    @property
    def autovacuum(self) -> bool:
        return self.backend_type == "autovacuum worker"

    def describe(self) -> str:
        if self.pid is None:
            return f"prepared transaction {self.vxid} (COMMIT PREPARED or ROLLBACK PREPARED ends it)"
        age = f", in a transaction for {self.xact_age_s:.1f}s" if self.xact_age_s is not None else ""
        app = "autovacuum" if self.autovacuum else self.application_name or "no application_name"
        return f"pid {self.pid} ({app}, {self.state}{age}): {self.query_start!r}"


_LITERAL = re.compile(r"'(?:[^']|'')*'|\$[A-Za-z_]*\$.*?\$[A-Za-z_]*\$|\b\d+(?:\.\d+)?\b", re.S)


def query_start(query: str | None, length: int = 60) -> str:
    """The start of a statement with its literal values masked: a blocker is named by what it
    runs, never by the data it carries (parameters, values, secrets)."""
    text = " ".join(_LITERAL.sub("?", query or "").split())
    return text[:length] + ("..." if len(text) > length else "")


def blockers(conn: psycopg.Connection, relations: list[str]) -> list[Blocker]:
    """Sessions other than ours holding a lock on any of `relations` (qualified names)."""
    rows = conn.execute(
        """SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.state, ''),
                  extract(epoch FROM now() - a.xact_start)::float8, a.query,
                  coalesce(a.backend_type, ''), coalesce(a.query LIKE '%%(to prevent wraparound)%%', false)
             FROM pg_stat_activity a
            WHERE a.pid <> pg_backend_pid()
              AND a.pid IN (SELECT l.pid FROM pg_locks l
                             WHERE l.granted AND l.relation = ANY(%s::regclass[]))
            ORDER BY a.xact_start NULLS LAST, a.pid LIMIT 5""", (relations,)).fetchall()
    return [Blocker(r[0], r[1], r[2], r[3], query_start(r[4]), r[5], r[6]) for r in rows]


# the locks a write takes: RowExclusive by INSERT, UPDATE, DELETE, MERGE and COPY FROM; ACCESS
# EXCLUSIVE by TRUNCATE
WRITE_MODES = ("RowExclusiveLock", "AccessExclusiveLock")


def write_holders(conn: psycopg.Connection, oids: list[int]) -> list[Blocker]:
    """Transactions other than ours that hold a write lock on any of the tables `oids` of this
    database, oldest first; a transaction in an aborted state (it can never commit) is left out.
    Ages and states of other roles' sessions are None and '' without pg_read_all_stats."""
    rows = conn.execute(
        """SELECT l.virtualtransaction, l.pid, coalesce(a.application_name, ''), coalesce(a.state, ''),
                  extract(epoch FROM clock_timestamp() - a.xact_start)::float8, a.query,
                  coalesce(a.backend_type, '')
             FROM (SELECT DISTINCT virtualtransaction, pid FROM pg_locks
                    WHERE locktype = 'relation' AND granted AND mode = ANY(%s)
                      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                      AND relation = ANY(%s::oid[]) AND pid IS DISTINCT FROM pg_backend_pid()) l
             LEFT JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE a.state IS DISTINCT FROM 'idle in transaction (aborted)'
            ORDER BY a.xact_start NULLS LAST, l.pid""", (list(WRITE_MODES), oids)).fetchall()
    return [Blocker(r[1], r[2], r[3], r[4], query_start(r[5]), r[6], vxid=r[0]) for r in rows]


def lock_timeout_ms(conn: psycopg.Connection) -> int:
    """Well below this server's deadlock_timeout, so our waits never last long enough for the
    deadlock detector to run on their account."""
    deadlock_ms = one(conn.execute("SELECT setting::int FROM pg_settings WHERE name = 'deadlock_timeout'"))[0]
    return max(10, min(LOCK_TIMEOUT_MS, deadlock_ms // 4))  # twice this stays under deadlock_timeout


def with_lock_retries(conn: psycopg.Connection, work: Callable[[psycopg.Connection], None], *, what: str,
                      relations: list[str], say: Callable[[str], None] = lambda _: None,
                      tries: int = TRIES, budget_s: float = BUDGET_S) -> int:
    """Run `work(conn)` in one transaction of `conn` (autocommit off) with a short lock timeout,
    retrying on lock timeouts and deadlocks. Returns the number of tries it took."""
    return with_lock_retries_all([(conn, work, relations)], what=what, say=say, tries=tries, budget_s=budget_s)


def with_lock_retries_all(parts: list[tuple[psycopg.Connection, Callable[[psycopg.Connection], None], list[str]]],
                          *, what: str, say: Callable[[str], None] = lambda _: None,
                          tries: int = TRIES, budget_s: float = BUDGET_S,
                          between: Callable[[], None] | None = None,
                          held: Callable[[], None] | None = None,
                          finish: Callable[[psycopg.Connection], None] | None = None) -> int:
    """Run each part's `work(conn)` in a transaction of its connection (autocommit off, one
    server each, at once), all with a short lock timeout, and commit them only when every part
    succeeded: a part that meets a lock or a deadlock rolls them all back, and they try again
    together. So no part holds its locks (or commits its effect) while another waits: a merge's
    fence holds one source read-only only as long as it takes to lock them all. `between` runs
    between tries (the fence keeps its comparison current with it); `held` runs once every part
    holds its locks, before they are let go (an exception from it rolls them all back); `finish`
    ends each part instead of its commit (a restore point keeps its transactions' snapshots)."""
    timeouts = [lock_timeout_ms(conn) for conn, _, _ in parts]
    for conn, _, _ in parts:
        conn.rollback()
    started = time.monotonic()
    seen: list[Blocker] = []
    cancelled: set[int] = set()
    rng = random.Random()
    attempt = 0

    def one(i: int) -> BaseException | None:
        conn, work, _ = parts[i]
        try:
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{timeouts[i]}ms")))
            # one statement may wait on several locks in turn: cap the whole at twice that
            conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(f"{2 * timeouts[i]}ms")))
            work(conn)
            return None
        except BaseException as exc:
            return exc

    while True:
        attempt += 1
        if len(parts) == 1:
            outcomes = [one(0)]
        else:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                outcomes = list(pool.map(one, range(len(parts))))
        failed = [(i, exc) for i, exc in enumerate(outcomes) if exc is not None]
        if not failed:
            _let_go(parts, held, finish)
            return attempt
        for conn, _, _ in parts:
            conn.rollback()
        fatal = [exc for _, exc in failed if not isinstance(exc, RETRYABLE)]
        if fatal:
            raise fatal[0]
        last = failed[-1][1]
        kind = "a deadlock" if isinstance(last, errors.DeadlockDetected) else "a lock held by another session"
        now_blocking = _blocking(parts, [i for i, _ in failed], cancelled, what, say)
        if now_blocking:
            seen = now_blocking
        elapsed = time.monotonic() - started
        timeout = max(timeouts)
        if attempt >= tries or elapsed >= budget_s:
            who = "; ".join(b.describe() for b in seen) or "sessions that finished before they could be named"
            first = next((b.pid for b in seen if b.pid is not None), None)
            raise LockContention(
                f"could not {what}: {attempt} tries over {elapsed:.1f}s each gave up after {timeout} ms"
                f" ({kind} on the last); blocked by {who}",
                "nothing changed: the shard takes writes as before. A transaction that keeps locks on these"
                " tables for long (idle in transaction?) must end first"
                + (f" (SELECT pg_terminate_backend({first}) ends it)" if first else "")
                + "; then apply again") from None
        if attempt == 1 or attempt % 10 == 0:
            who = ", ".join(f"pid {b.pid} ({b.application_name or 'no application_name'}, {b.state})"
                            for b in now_blocking) or "short transactions"
            say(f"waiting to {what}: try {attempt} gave way to {who}")
        # backoff with jitter: give the application's transactions room to finish, and never
        # retry in lockstep with another waiter
        time.sleep(min(0.5, 0.02 * attempt) * (0.5 + rng.random()))
        if between is not None:
            between()


def _let_go(parts: list, held: Callable[[], None] | None,
            finish: Callable[[psycopg.Connection], None] | None) -> None:
    """Every part holds its locks: run `held`, then end each part (commit, unless `finish`)."""
    if held is not None:
        try:
            held()
        except BaseException:
            for conn, _, _ in parts:
                conn.rollback()
            raise
    for conn, _, _ in parts:
        (finish or psycopg.Connection.commit)(conn)


def _blocking(parts: list, failed: list[int], cancelled: set[int], what: str,
              say: Callable[[str], None]) -> list[Blocker]:
    """Who held the locks the failed parts waited for; autovacuums among them are cancelled."""
    out: list[Blocker] = []
    for i in failed:
        conn, _, relations = parts[i]
        found = blockers(conn, relations)
        conn.rollback()
        out += found
        for blocker in found:
            if (blocker.autovacuum and not blocker.wraparound and blocker.pid is not None
                    and blocker.pid not in cancelled):
                cancelled.add(blocker.pid)
                _cancel_autovacuum(conn, blocker, what, say)
    return out


def _cancel_autovacuum(conn: psycopg.Connection, blocker: Blocker, what: str, say: Callable[[str], None]) -> None:
    """An autovacuum holds its lock for as long as it runs (seconds to minutes on a big table).
    PostgreSQL cancels one that blocks a lock request only after deadlock_timeout, and our waits
    are shorter on purpose, so it never would: we cancel it, as PostgreSQL would have. It runs
    again on its next cycle. One that prevents xid wraparound is never cancelled (PostgreSQL
    does not either); a role that may not signal it (pg_signal_autovacuum_worker on 18) waits."""
    try:
        conn.execute("SELECT pg_cancel_backend(%s)", (blocker.pid,))
        conn.commit()
        say(f"to {what}: cancelled an autovacuum (pid {blocker.pid}) holding the lock; it runs again later")
    except errors.InsufficientPrivilege:
        conn.rollback()
