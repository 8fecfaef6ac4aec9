"""The live side of one move: what the stages share that is not data. The apply context, the
operation's journal, the connections held from the copy to the flip, and two caches read once
per run (each source's tables, whether a target's role may read replication origins). Also
what every stage says and journals through, and the bounds behind the fence.

Stages receive it explicitly; the state they hand on is theirs (frozen values in
engine/actions/move/spec.py and the stage modules), not fields of this object.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
from psycopg import errors, sql

from engine.actions import fence, reference
from engine.actions.base import ApplyContext
from engine.actions.move.errors import MoveFailed, overrun, verification_failed
from engine.actions.move.spec import MoveSpec
from engine.catalog import store
from engine.catalog.journal import Operation
from engine.durations import span
from engine.errors import UserError
from engine.plan.models import ShardSpec

FENCE_SWITCH_INTERVAL_S = 0.0005  # the GIL's switch interval from the fence to the flip (Live.bounded)


def background(work: Callable[[], object]) -> Future:
    """`work()` in a daemon thread, as a future. Behind the fence a result is waited for with a
    deadline, and a thread that overran it (a statement the server never answers) must not hold
    the process at its exit as a pool's threads would: it is left behind.

    The threads are kept and reused (`_Threads`): starting one waits until it runs, and under 32
    pgbench writers on 2 cores this process waited 20-70 ms for each, so a key round that read
    on 12 connections began its last read 490 ms after its first (bench/split.py, 1M rows)."""
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as exc:  # the waiter re-raises it
            future.set_exception(exc)

    _THREADS.run(run)
    return future


class _Threads:
    """Daemon threads that wait for work and are kept once started: work goes to one that is
    idle, else to a new thread, handed it as it starts (so work that waits for other work never
    waits for a thread). A thread is counted idle by itself, as it waits; one left behind by a
    statement that never ends is simply never idle again."""

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """None kept (a forked child has none of its parent's threads)."""
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for work, not yet promised any

    def run(self, work: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._work.put(work)
                return
        self._start(work)

    def prestart(self, count: int) -> None:
        """About COUNT idle threads, started now (before the work that must not wait for one)."""
        with self._lock:
            missing = max(0, count - self._idle)
        for _ in range(missing):
            self._start(None)

    def _start(self, first: Callable[[], None] | None) -> None:
        # a start that fails (no thread to be had) raises to the caller, and nothing was counted
        threading.Thread(target=self._serve, args=(first,), daemon=True, name="shardctl-move").start()

    def _serve(self, work: Callable[[], None] | None) -> None:
        while True:
            if work is not None:
                work()  # background's run: it never raises
            with self._lock:
                self._idle += 1
            work = self._work.get()


_THREADS = _Threads()
os.register_at_fork(after_in_child=_THREADS.forget)
# threads a move runs on at once, kept ready: behind the fence `bounded` sets the statement
# timeout on every held connection at once (five per source and two per target: 12 for a merge
# of two sources), and the work ahead, the sequences, the catch-up and the verification run side
# by side; a key round reads on two lanes of each shard. More are started when needed.
PRESTARTED_THREADS = 16


SEQUENCES_LANE = 5  # a source's held connection for its sequences' values, behind the fence


def _lane(name: str, lane: int) -> str:
    return name if lane == 1 else f"{name}#{lane}"


@dataclass
class Live:
    ctx: ApplyContext
    op: Operation
    spec: MoveSpec
    held: dict[str, psycopg.Connection] = field(default_factory=dict)  # shard name -> connection, through the fence
    table_cache: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    origins: dict[str, bool] = field(default_factory=dict)  # per target: may this role read origin progress
    stops: list[Callable[[], None]] = field(default_factory=list)  # called before the held connections close
    journal_aside: psycopg.Connection | None = None  # the catalog, for the journal's rows behind the fence

    # ------------------------------------------------------------------ saying and journaling

    def step(self, name: str, **detail: Any) -> AbstractContextManager[dict[str, Any]]:
        return self.op.step(f"{self.spec.label}: {name}", **detail)

    def say(self, text: str) -> None:
        self.ctx.say(f"{self.spec.label}: {text}")

    def progress(self, text: str | None = None, **figures: Any) -> None:
        """A progress report: printed (when there is text), and kept for `status` and the daemon."""
        if text:
            self.say(text)
        report = {"step": self.spec.label, **figures, **({"text": text} if text else {})}
        self.op.progress(report)
        self.ctx.progress(report)

    def failure(self, text: str) -> MoveFailed:
        return verification_failed(self.spec.label, text)

    # ------------------------------------------------------------------ connections

    def connect(self, shard: ShardSpec, **kw: Any) -> AbstractContextManager[psycopg.Connection]:
        return self.ctx.fleet.servers[shard.server].connect(shard.dbname, **kw)

    def session(self, shard: ShardSpec, lane: int = 1) -> AbstractContextManager[psycopg.Connection]:
        """The connection held open from the copy to the flip when there is one, else a new one.
        Held because the steps poll every few milliseconds: a new connection each time forked a
        backend on the source's server per poll (tens per second during the copy), and setting
        one up inside the fence lengthened the pause. LANE: 1 for the steps; 2 for what runs
        beside them behind the fence (on a target, the sequences set); on a source, 3 for the
        decoder (engine/actions/move/decoding.py), 4 and 2 for the verification's work ahead
        while the fence marks (engine/actions/move/compare.py Ahead), and SEQUENCES_LANE for
        the sequences' values read beside it (on lane 2 they waited for the work ahead: up to
        50 ms of a merge's pause at 32 writers, 8M rows)."""
        held = self.held.get(_lane(shard.name, lane))
        return nullcontext(held) if held is not None else self.connect(shard)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """The held connections, for the steps from the copy to the flip: lanes 1 and 2 of
        every source and target, lanes 3, 4 and SEQUENCES_LANE of every source; and one to the
        catalog, where the journal's rows behind the fence are written aside (`bounded`)."""
        with ExitStack() as stack:
            for shard, lanes in [*((s, (1, 2, 3, 4, SEQUENCES_LANE)) for s in self.spec.sources),
                                 *((t, (1, 2)) for t in self.spec.targets)]:
                for name in (_lane(shard.name, lane) for lane in lanes):
                    if name not in self.held:
                        self.held[name] = stack.enter_context(self.connect(shard))
            fleet = self.ctx.fleet
            self.journal_aside = stack.enter_context(fleet.catalog_server.connect(fleet.desired.catalog_database))
            _THREADS.prestart(PRESTARTED_THREADS)
            try:
                yield
            finally:
                self._stop_all()
                self.held.clear()
                self.journal_aside = None

    def on_release(self, stop: Callable[[], None]) -> None:
        """STOP is called before the held connections close (work in threads that uses them)."""
        self.stops.append(stop)

    def _stop_all(self) -> None:
        while self.stops:
            self.stops.pop()()

    def release(self) -> None:
        """Close the held connections now (a target's database is about to be dropped)."""
        self._stop_all()
        for conn in self.held.values():
            conn.close()
        self.held.clear()

    @contextmanager
    def database(self, shard: ShardSpec) -> Iterator[psycopg.Connection | None]:
        """A connection to the shard's database, or None when its server answers and the database
        does not exist (dropped already). A server that does not answer raises ServerUnreachable."""
        handle = self.ctx.fleet.servers.get(shard.server)
        if handle is None:
            raise MoveFailed(f"{self.spec.label}: server {shard.server!r} of {shard.dbname} is no longer declared",
                             "declare it again so shardctl can remove what the move made there")
        with handle.connect() as conn:
            exists = store.database_exists(conn, shard.dbname)
        if not exists:
            yield None
            return
        with handle.connect(shard.dbname) as conn:
            yield conn

    def tables(self, shard: ShardSpec) -> list[tuple[str, str]]:
        """The shard's sharded tables, read once per run (DDL waits while a move is unfinished, and
        the fence must not spend a connection on this); a reference table's copy is the reference
        source's to keep."""
        if shard.name not in self.table_cache:
            with self.connect(shard) as conn:
                self.table_cache[shard.name] = [(r[0], r[1]) for r in conn.execute(
                    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
                    " AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl')"
                    f" AND n.nspname NOT LIKE 'pg_toast%%' AND NOT {reference.GUARDED} ORDER BY 1, 2")]
        return self.table_cache[shard.name]

    # ------------------------------------------------------------------ the sources' state

    def fenced_for(self) -> float | None:
        """How long this operation's fence has held the sources (the longest, in seconds, on each
        source's own clock), from the moment it was armed; None when no source is fenced. A fence
        outlives the process that made it: an apply killed behind it leaves the range unwritable
        until a rerun flips it or an abort lifts it."""
        longest = None
        for source in self.spec.sources:
            with self.connect(source) as conn:
                held = fence.armed_for(conn, self.spec.operation)
            if held is not None:
                longest = max(longest or 0.0, held)
        return longest

    def source_state(self) -> str:
        """What is true of the sources now, said in a failure's way forward: fenced (an
        interrupted run's fence holds: writes to the range fail) or taking writes."""
        names = ", ".join(f"{s.dbname} on server {s.server}" for s in self.spec.sources)
        operation = self.spec.operation
        try:
            fenced = self.fenced_for()
        except (UserError, psycopg.OperationalError):
            return (f"whether the source ({names}) is still fenced is unknown: its server does not answer;"
                    f" `shardctl apply` resumes the move once it does, `shardctl abort {operation}` undoes it")
        if fenced is None:
            return (f"the source ({names}) takes writes as before; `shardctl apply` resumes the move,"
                    f" `shardctl abort {operation}` removes what it created")
        return (f"the source ({names}) is still fenced by an interrupted run, for {span(round(fenced))} now: writes"
                f" to the range fail until `shardctl apply` finishes the move, or `shardctl abort {operation}`"
                " lifts the fence and removes the copy")

    # ------------------------------------------------------------------ behind the fence

    @contextmanager
    def bounded(self) -> Iterator[None]:
        """From the fence to the flip: every statement on the held connections ends within
        `moves.fence_timeout` (a lock wait, a hung query), and then raises; the journal's
        non-durable rows are written aside (engine/catalog/journal.py Operation.rows_aside)."""
        limit = sql.SQL("SET statement_timeout = {}").format(
            sql.Literal(f"{round(self.spec.settings.fence_timeout * 1000)}ms"))
        # at once: one after the other, seven or eight round trips lay between the last key
        # round and the arm, each letting more keys change
        for job in [background(partial(conn.execute, limit)) for conn in self.held.values()]:
            job.result()
        # behind the fence the steps wait on round trips while the decoder and the work ahead
        # parse and sum in other threads: a reply waited up to the interpreter's switch interval
        # (5 ms) for the thread that held the GIL, on every round trip of the pause
        switches = sys.getswitchinterval()
        sys.setswitchinterval(FENCE_SWITCH_INTERVAL_S)
        try:
            with self.op.rows_aside(self.journal_aside) if self.journal_aside is not None else nullcontext():
                yield
        finally:
            sys.setswitchinterval(switches)
            for conn in self.held.values():
                if not conn.closed and not conn.broken:
                    with suppress(psycopg.Error):
                        conn.execute("RESET statement_timeout")

    @contextmanager
    def behind(self, what: str) -> Iterator[None]:
        """A wait behind the fence: a statement its statement_timeout cancelled, or a thread's
        result not there by its deadline, is the fence's overrun; what still runs on the held
        connections is cancelled, and MoveFailed says WHAT did not finish."""
        try:
            yield
        except (FutureTimeout, errors.QueryCanceled):
            for conn in self.held.values():
                with suppress(psycopg.Error):
                    conn.cancel_safe(timeout=1.0)
            raise self.overrun(what) from None

    def within(self, future: Future, deadline: float, what: str) -> Any:
        """The future's result by the deadline (monotonic), else the fence's overrun."""
        with self.behind(what):
            return future.result(timeout=max(0.0, deadline - time.monotonic()))

    def overrun(self, what: str) -> MoveFailed:
        return overrun(self.spec.label, self.spec.operation, self.spec.settings.fence_timeout, what)
