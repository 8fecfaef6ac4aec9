"""How a move knows its targets have applied their sources' WAL up to a point, durably: used by
the comparison (up to a round's start) and by the catch-up behind the fence (up to the mark).
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import psycopg

from engine.actions.move.errors import MoveFailed
from engine.actions.move.live import Live
from engine.actions.move.spec import Link
from engine.durations import span
from engine.rows import one


def wait_confirmed(live: Live, marks: dict[str, str], timeout: float, what: str, poll: float = 0.002,
                   stamps: dict[str, int] | None = None, fenced: bool = False) -> None:
    """Until every target has applied its sources' WAL up to their marks, durably. Two ways
    to know, whichever comes first: the target's replication origin has reached the mark
    (asked with flush, which makes it durable at once: the apply worker commits
    asynchronously), or the source's slot has had it confirmed (the subscriber confirms only
    flushed positions; this is how an idle source's position is reached). FENCED: behind the
    fence, where giving up is the fence's overrun."""
    deadline = time.monotonic() + timeout
    spec = live.spec
    with ExitStack() as stack:
        targets = {t.name: stack.enter_context(live.session(t)) for t in spec.targets}
        sources = {s.name: stack.enter_context(live.session(s)) for s in spec.sources}
        if not live.origins:  # asked once per move: not inside the fence each time
            live.origins.update({t: origin_readable(conn) for t, conn in targets.items()})
        waiting = list(spec.links)
        while True:
            waiting = [link for link in waiting
                       if not _applied(live, link, marks, targets, sources, stamps)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                if fenced:
                    raise live.overrun(f"the targets did not confirm {what}")
                raise MoveFailed(f"{spec.label}: the targets did not confirm {what} within {span(timeout)}",
                                 "the source takes writes as before; apply again to retry")
            time.sleep(poll)


def _applied(live: Live, link: Link, marks: dict[str, str], targets: dict[str, psycopg.Connection],
             sources: dict[str, psycopg.Connection], stamps: dict[str, int] | None) -> bool:
    """Whether LINK's target has applied its source's WAL up to the source's mark, durably."""
    name, mark = live.spec.link_name(link), marks[link.source.name]
    target = targets[link.target.name]
    readable = live.origins[link.target.name]
    if readable:
        # flushed only once reached: asked with flush at every poll, each poll waited for a WAL
        # flush of the target (25-50 ms each under 32 pgbench writers, its disk busy)
        applied = target.execute(
            "SELECT CASE WHEN pg_replication_origin_progress('pg_' || oid, false) >= %s::pg_lsn"
            " THEN pg_replication_origin_progress('pg_' || oid, true) >= %s::pg_lsn ELSE false END"
            " FROM pg_subscription WHERE subname = %s", (mark, mark, name)).fetchone()
        if applied and applied[0]:
            return True
    elif stamps and _mark_applied(live, target, link.source.name, stamps[link.source.name]):
        return True
    confirmed = sources[link.source.name].execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
        (mark, name)).fetchone()
    return bool(confirmed and confirmed[0])


def _mark_applied(live: Live, target: psycopg.Connection, source: str, stamp: int) -> bool:
    """For a role that may not read replication origins: the fence's mark row is visible on
    the target, so the apply worker committed the fence's transaction and, in commit order,
    everything the source committed before it. Those commits are asynchronous; a commit of
    ours with synchronous_commit on flushes the target's WAL past them, so they are durable
    too. Faster than waiting for the subscriber to report its flush to the source's slot
    (which it does on its own schedule: 275-704 ms measured for a non-superuser's split)."""
    seen = target.execute("SELECT (extract(epoch FROM at) * 1000000)::bigint = %s FROM _shardctl.fence_marks"
                          " WHERE operation = %s AND source = %s", (stamp, live.spec.operation, source)).fetchone()
    if not seen or not seen[0]:
        return False
    with target.transaction():
        target.execute("SET LOCAL synchronous_commit = on")
        target.execute("SELECT pg_current_xact_id()")
    return True


def origin_readable(conn: psycopg.Connection) -> bool:
    """Whether this role may ask a replication origin's progress: superusers may; others only
    where someone granted EXECUTE on pg_replication_origin_progress in that very database (a
    grant in one database does not reach a new one). Without it, catch-up waits for the source's
    slot to have the mark confirmed, which the subscriber reports only once it is durable."""
    return bool(one(conn.execute("SELECT has_function_privilege('pg_replication_origin_progress(text, boolean)',"
                                 " 'EXECUTE')"))[0])
