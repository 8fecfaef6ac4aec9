"""The fence stage, and lifting it: how a move stops writes on its sources without a table lock
(engine/actions/fence.py says why that is sound), and gives them back after a failure or an
abort.

The stage hands on `Fenced`: each source's mark (its LSN, and the mark's time for a target
whose role cannot read replication origins), how the fence was taken, and the pause as it
stands. A resumed run whose sources an interrupted run fenced keeps that fence and counts the
pause from it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import psycopg
from psycopg import sql

from engine.actions import fence
from engine.actions.fence import DRAIN_LIMIT
from engine.actions.move import sequences
from engine.actions.move.compare import Ahead, Comparison
from engine.actions.move.live import Live, background
from engine.actions.move.spec import Pause
from engine.catalog import journal
from engine.clock import system_clock
from engine.errors import UserError
from engine.plan.models import ShardSpec
from engine.servers.locking import Blocker, LockContention, with_lock_retries, write_holders

T = TypeVar("T")

LIFT_TIMEOUT_S = 10  # a statement that disarms the fence takes no lock: this is for a server that stalls


@dataclass(frozen=True)
class Fenced:
    """What the fence hands on to the catch-up, the verification and the flip."""

    marks: dict[str, str]  # per source: its mark's LSN (LSNs of different servers do not compare)
    stamps: dict[str, int]  # per source: its mark's time, in microseconds
    figures: dict[str, float]  # how the fence was taken, for the history
    pause: Pause
    ahead: Ahead  # the verification's work begun while the fence drained
    sequences: Future  # the targets' sequences being set since the fence drained (sequences.py)


@dataclass
class _Attempts:
    """The fence's tries so far: when it began trying, who was in the way, whom it has seen
    writing (a writer's virtual transaction -> when first seen), and the pause while it holds."""

    started: float
    pause: Pause
    first_seen: dict[str, float] = field(default_factory=dict)
    in_the_way: list[Blocker] = field(default_factory=list)
    count: int = 0


@dataclass(frozen=True)
class Ready:
    """What the fence reads before the last key rounds, so that nothing stands between the last
    round and the arm but the check for long writers: every key written in that gap is one more
    to compare behind the fence (a merge's new connections and catalog reads there took
    150-180 ms under 32 pgbench clients, about 1,000 keys)."""

    oids: dict[str, list[int]]  # per source: the tables the guard covers
    since: float | None  # an interrupted run's fence: when it was armed (monotonic), else None


def ready(live: Live) -> Ready:
    """The sources' guarded tables, and whether an interrupted run's fence still holds (the
    range has been unwritable since then), read on the held connections; and the fence's
    statements run once there without their waits (engine/actions/fence.py warm)."""
    oids: dict[str, list[int]] = {}
    longest = None
    for source in live.spec.sources:
        with live.session(source) as conn:
            oids[source.name] = [oid for _, _, oid in fence.tables(conn)]
            held = fence.armed_for(conn, live.spec.operation)
            fence.warm(conn, live.spec.operation, source.name, oids[source.name])
        if held is not None:
            longest = max(longest or 0.0, held)
    return Ready(oids=oids, since=None if longest is None else time.monotonic() - longest)


def fence_stage(live: Live, prepared: Ready, comparison: Comparison) -> Fenced:
    """Stop writes on every source.

    No table lock: while a transaction has held a write lock on a source longer than
    DRAIN_LIMIT, wait with the source writable; then arm every source's guard, and on each wait
    (at most DRAIN_LIMIT) for the commits under way, one statement on the server, then write
    its mark (engine/actions/fence.py: a transaction that wrote before the arm and commits after
    it is refused, not waited for). A drain that overruns disarms every source and tries again;
    after `moves.fence_timeout` the fence gives up naming who was in the way, and the sources
    take writes as before. A merge arms its sources only when none of them has such a writer,
    so one source is never held read-only while another waits. PREPARED: what `ready` read
    before the last key rounds.

    The COMPARISON's part: once the fence has drained, its work ahead (compare.py Ahead);
    between tries, a key round (what changed while the fence waited is not left for behind it:
    a fence that waited 7 s once left 35,000 keys to recheck). Nothing else runs between the
    last key round and the arm: every key written meanwhile is one more to compare behind the
    fence (decoding before the arm, tried, made the pause longer: 2,300-6,200 keys behind it
    instead of 1,500-3,600)."""
    with live.step("fence", durable=False) as record:
        began = time.monotonic()
        oids = prepared.oids
        pause = Pause(since=prepared.since, inherited=True) if prepared.since is not None else Pause()
        with ExitStack() as stack:
            conns = {s.name: stack.enter_context(live.session(s)) for s in live.spec.sources}
            with live.behind("the fence was not taken"):
                taken = _take(live, conns, oids, _Attempts(started=time.monotonic(), pause=pause), comparison)
            figures = {"tries": taken.count, "acquired_ms": round((time.monotonic() - began) * 1000, 1),
                       "drain_ms": taken.drain_ms}
        marks, stamps, pause = taken.marks, taken.stamps, taken.pause
        record.update(figures)
        since = pause.since if pause.since is not None else began
        record["fenced_at"] = round(system_clock().timestamp() - (time.monotonic() - since), 3)
        return Fenced(marks=marks, stamps=stamps, figures=figures, pause=pause, ahead=taken.ahead,
                      sequences=taken.sequences)


@dataclass(frozen=True)
class _Taken:
    count: int  # tries
    drain_ms: float  # the last drain's
    pause: Pause
    ahead: Ahead
    sequences: Future
    marks: dict[str, str]  # per source: its mark's LSN
    stamps: dict[str, int]  # per source: its mark's time, in microseconds


def _take(live: Live, conns: dict[str, psycopg.Connection], oids: dict[str, list[int]], tries: _Attempts,
          comparison: Comparison) -> _Taken:
    """Arm and drain, trying again until it holds or `moves.fence_timeout` has passed. Returns
    the tries, the last drain's milliseconds and the pause since the arm."""
    rng = random.Random()
    while True:
        tries.count += 1
        now = time.monotonic()
        holders = [h for name in conns for h in write_holders(conns[name], oids[name])]
        for h in holders:
            tries.first_seen.setdefault(h.vxid, now)
        # a writer's age from its transaction's start, or (another role's, without
        # pg_read_all_stats) since we first saw it
        old = [h for h in holders
               if h.pid is None or max(h.xact_age_s or 0.0, now - tries.first_seen[h.vxid]) > DRAIN_LIMIT]
        if old:
            tries.in_the_way = old
            if tries.pause.since is not None:  # an interrupted run's fence: writable while we wait
                tries.pause = _disarm(live, conns)
        else:
            taken = _arm_and_drain(live, conns, oids, tries, comparison)
            if taken is not None:
                return taken
        _give_up_after_budget(live, tries)
        if tries.count == 1 or tries.count % 10 == 0:
            live.say(f"waiting to fence writes: try {tries.count} gave way to "
                     + ", ".join(f"pid {b.pid} ({b.application_name or 'no application_name'}, {b.state})"
                                 for b in tries.in_the_way[:5]))
        time.sleep(min(0.5, 0.02 * tries.count) * (0.5 + rng.random()))
        comparison.key_rounds(final=True)


def _arm_and_drain(live: Live, conns: dict[str, psycopg.Connection], oids: dict[str, list[int]],
                   tries: _Attempts, comparison: Comparison) -> _Taken | None:
    """One try: arm every source, then on each (a merge's at once) drain, one statement on the
    server (engine/actions/fence.py drain). Drained, the work ahead begins, beside the marks
    (whose commits wait for a WAL flush), and so does the setting of the targets' sequences. The
    fence taken, or None (disarmed again)."""
    journal.points(f"{live.spec.label}: arm")  # a test point: kill, hold or slow the fence right here
    if tries.pause.since is None:
        tries.pause = Pause(since=time.monotonic())  # before the flag: the pause is never understated
    operation = live.spec.operation
    _on_each(live, lambda source: fence.arm(conns[source.name], operation))
    armed = time.monotonic()
    tries.pause = tries.pause.marked("armed", armed)
    names = [s.name for s in live.spec.sources]
    with live.behind("the fence did not drain"):
        drains = dict(zip(names, _on_each(live, lambda source: fence.drain(
            conns[source.name], operation, source.name, oids[source.name], DRAIN_LIMIT)), strict=True))
    left = {name: d.waiting for name, d in drains.items() if d.waiting}
    if not left:
        drained = time.monotonic()
        pause = tries.pause.marked("drained", drained)
        # the sources can change no longer: their side of the keys, now, beside the marks
        ahead = Ahead(comparison, {n: str(d.lsn) for n, d in drains.items()})
        setting = sequences.begin(live)
        with live.behind("the fence's mark was not written"):
            marks = dict(zip(names, _on_each(live, lambda source: fence.mark(conns[source.name], operation,
                                                                               source.name)), strict=True))
        pause = pause.marked("marked", time.monotonic())
        return _Taken(tries.count, round((drained - armed) * 1000, 1), pause, ahead, setting,
                      marks={n: str(m.lsn) for n, m in marks.items()},
                      stamps={n: int(m.stamp or 0) for n, m in marks.items()})
    tries.in_the_way = [h for name, vxids in left.items() for h in write_holders(conns[name], oids[name])
                        if h.vxid in vxids] or tries.in_the_way
    for h in tries.in_the_way:
        tries.first_seen.setdefault(h.vxid, armed)
    tries.pause = _disarm(live, conns)
    live.say(f"the fence waited {DRAIN_LIMIT * 1000:.0f} ms for commits under way"
             f" ({', '.join(b.describe() for b in tries.in_the_way[:3])}); lifted, trying again")
    return None


def _on_each(live: Live, work: Callable[[ShardSpec], T]) -> list[T]:
    """WORK on every source, in the sources' order: a merge's at once, each on its own
    connection and server (the arm and the mark one after the other added their round trips,
    and the mark's WAL flush, up inside the pause: 18-57 ms to arm two sources under 32
    pgbench clients)."""
    sources = live.spec.sources
    others = [background(partial(work, source)) for source in sources[1:]]
    # the first on this thread, which would only wait: a thread handed the work waited for the CPU
    # first (the arm of a merge's two sources came 23 ms after the pause began, a split's 1-2 ms)
    try:
        first = work(sources[0])
    except BaseException:
        # the others end first (each statement is bounded behind the fence): whoever handles
        # this lifts the fence, and an arm still under way on another source must not come after
        wait(others, timeout=live.spec.settings.fence_timeout)
        raise
    return [first, *(job.result() for job in others)]


def _give_up_after_budget(live: Live, tries: _Attempts) -> None:
    elapsed = time.monotonic() - tries.started
    if elapsed < live.spec.settings.fence_timeout:
        return
    names = ", ".join(s.dbname for s in live.spec.sources)
    who = "; ".join(b.describe() for b in tries.in_the_way[:5])
    first = next((b.pid for b in tries.in_the_way if b.pid is not None), None)
    raise LockContention(
        f"could not fence writes on {names}: {tries.count} tries over {elapsed:.1f}s; blocked by {who}",
        "nothing changed: the shard takes writes as before. A transaction that keeps writing to these"
        " tables for long (idle in transaction?) must end first"
        + (f" (SELECT pg_terminate_backend({first}) ends it)" if first else "") + "; then apply again")


def _disarm(live: Live, conns: dict[str, psycopg.Connection]) -> Pause:
    """Every source takes writes again: no pause any longer."""
    for source in live.spec.sources:
        fence.disarm(conns[source.name], live.spec.operation)
    return Pause()


def lift(live: Live) -> None:
    """Disarm every source's guard: they take writes again. No table lock: nothing can hold it
    back but a source that does not answer (then ServerUnreachable)."""
    for source in live.spec.sources:
        with live.connect(source) as conn:
            conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(f"{LIFT_TIMEOUT_S}s")))
            fence.disarm(conn, live.spec.operation)


def lift_after_failure(live: Live) -> None:
    """Whatever went wrong behind the fence, the source takes writes again; a source that does
    not answer keeps its fence (source_state says so, and a rerun or abort lifts it)."""
    try:
        lift(live)
    except (UserError, psycopg.Error) as exc:
        live.say(f"the fence could not be lifted ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__});"
                 f" writes to the range fail until `shardctl apply` finishes the move or"
                 f" `shardctl abort {live.spec.operation}` undoes it")


def remove_guard(live: Live) -> None:
    """Drop the guard triggers (an abort): one table per short transaction, as they were made."""
    table_by_table(live, fence.guarded, fence.uninstall,
                   lambda source, schema, table: f"remove the fence's guard from {schema}.{table} of {source.dbname}")


def table_by_table(live: Live, find: Callable[[psycopg.Connection], list[tuple[str, str]]],
                   change: Callable[[sql.Identifier], Callable[[psycopg.Connection], None]],
                   what: Callable[[ShardSpec, str, str], str]) -> None:
    """On every source, CHANGE each table that FIND lists, one table per short transaction with
    a lock timeout and retries (engine/servers/locking.py): how the guard's triggers are made
    and dropped, never holding more than one table's lock."""
    for source in live.spec.sources:
        with live.connect(source) as conn:
            tables = find(conn)
        if not tables:
            continue
        with live.connect(source, autocommit=False) as conn:
            for schema, table in tables:
                relation = sql.Identifier(schema, table)
                with_lock_retries(conn, change(relation), relations=[relation.as_string(conn)],
                                  what=what(source, schema, table), say=live.say,
                                  budget_s=live.spec.settings.fence_timeout)
