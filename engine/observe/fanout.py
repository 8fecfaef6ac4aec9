"""Reading many servers at once, each within a deadline: the fan-out of a metrics round and of
an observation's inventory.

One job per server runs on a bounded thread pool (the work is waiting on servers, not CPU). A
job's deadline counts from when it starts, not from when it was queued, so a long queue never
makes a server late. A job past its deadline is cut off: the connection it registered with
`Watch.connection` has its socket shut down, which wakes the thread blocked on it (a server that
accepts and never answers, or one stopped with SIGSTOP, would otherwise hold it forever: a
server-side statement_timeout cannot fire on a server that does not run). The round never waits
for a late job beyond its deadline and a short grace: its outcome is `late`, and a job that
could not be woken finishes on its own in the background (connecting is bounded by
connect_timeout) with its result dropped.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import psycopg

from engine.config.models import span

T = TypeVar("T")

MAX_WORKERS = 16  # servers read at once; a round over more servers queues the rest
GRACE = 0.5  # seconds a cut-off job gets to notice before the round stops waiting for it


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """One server's result: a value, or why there is none (late, or the error it met)."""

    value: T | None = None
    error: str | None = None
    late: bool = False
    seconds: float = 0.0
    exception: BaseException | None = None  # what the job raised, for callers that must re-raise it

    @property
    def ok(self) -> bool:
        return self.error is None


class Watch:
    """Handed to a job: the time it has left, and the connection to cut when it runs late."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self._lock = threading.Lock()
        self._started: float | None = None
        self._conn: psycopg.Connection | None = None
        self.cut = False

    def start(self) -> None:
        with self._lock:
            self._started = time.monotonic()

    @property
    def started(self) -> float | None:
        return self._started

    def remaining(self) -> float:
        """Seconds left before the deadline (never below a small positive floor)."""
        if self._started is None:
            return self.deadline
        return max(0.05, self.deadline - (time.monotonic() - self._started))

    def connect_timeout(self) -> str:
        """For libpq's connect_timeout: whole seconds, at least 2 (libpq's own floor)."""
        return str(max(2, int(self.remaining() + 0.999)))

    @contextmanager
    def connection(self, conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
        """Register `conn` as the one to cut while the block runs. Unregistered on the way out,
        before the connection is reused, so a late cut never reaches it afterwards."""
        with self._lock:
            if self.cut:
                raise TimeoutError("deadline passed")
            self._conn = conn
        try:
            yield conn
        finally:
            with self._lock:
                self._conn = None

    def cut_off(self) -> None:
        """Past the deadline: shut the registered connection's socket down, so the thread
        blocked reading it wakes up with an error (the connection is then discarded)."""
        with self._lock:
            self.cut = True
            conn = self._conn
            if conn is None or conn.closed:
                return
            try:
                fd = conn.pgconn.socket
            except psycopg.Error:
                return
            try:
                # a duplicate of the descriptor: shutdown acts on the socket itself, and closing
                # the duplicate leaves psycopg's descriptor valid for its own cleanup
                with socket.socket(fileno=os.dup(fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the other side


def fan_out(jobs: dict[str, Callable[[Watch], T]], deadline: float, what: str = "server",
            workers: int = MAX_WORKERS, setting: str = "metrics.deadline") -> dict[str, Outcome[T]]:
    """Run every job at once (at most `workers` at a time); each gets `deadline` seconds from its
    start. Returns one outcome per job name; the call returns within about the longest deadline
    of any batch of jobs, whatever the servers do."""
    if not jobs:
        return {}
    watches = {name: Watch(deadline) for name in jobs}
    outcomes: dict[str, Outcome[T]] = {}
    executor = ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))), thread_name_prefix="shardctl-read")

    def run(name: str) -> T:
        watch = watches[name]
        watch.start()
        return jobs[name](watch)

    try:
        futures: dict[Future, str] = {executor.submit(run, name): name for name in sorted(jobs)}
        pending = set(futures)
        while pending:
            now = time.monotonic()
            # cut off the jobs past their deadline, and give up on those cut off a grace ago
            next_check = now + 0.25
            for future in list(pending):
                name = futures[future]
                watch = watches[name]
                if watch.started is None:
                    continue
                overdue = now - watch.started - deadline
                if overdue >= 0 and not watch.cut:
                    watch.cut_off()
                if overdue >= GRACE:
                    pending.discard(future)
                    outcomes[name] = Outcome(error=late_reason(what, name, deadline, setting), late=True,
                                             seconds=round(now - watch.started, 3))
                    continue
                next_check = min(next_check, watch.started + deadline + (GRACE if watch.cut else 0.0))
            if not pending:
                break
            done, _ = wait(pending, timeout=max(0.01, next_check - time.monotonic()), return_when=FIRST_COMPLETED)
            for future in done:
                pending.discard(future)
                name = futures[future]
                watch = watches[name]
                took = round(time.monotonic() - (watch.started or time.monotonic()), 3)
                if watch.cut:
                    outcomes[name] = Outcome(error=late_reason(what, name, deadline, setting), late=True, seconds=took)
                    continue
                error = future.exception()
                if error is None:
                    outcomes[name] = Outcome(value=future.result(), seconds=took)
                else:
                    outcomes[name] = Outcome(error=describe_error(error), seconds=took, exception=error)
    finally:
        # never join a job that may still be blocked: it ends on its own, its result unused
        executor.shutdown(wait=False, cancel_futures=True)
    return outcomes


def late_reason(what: str, name: str, deadline: float, setting: str) -> str:
    return f"{what} {name} did not answer within its {span(deadline)} deadline ({setting})"


def describe_error(error: BaseException) -> str:
    from engine.errors import UserError, redact

    if isinstance(error, UserError):
        return error.summary
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return redact(text)
