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

from engine.durations import span

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


def fan_out_grouped(groups: dict[str, dict[str, Callable[[Watch], T]]], deadline: float, per_group: int = 4,
                    workers: int = MAX_WORKERS, what: str = "server",
                    setting: str = "the inventory's deadline") -> dict[str, dict[str, Outcome[T]]]:
    """Many jobs per server (one per shard database): at most `per_group` of a group's jobs run
    at once and `workers` in all, taking the groups in turn; a group has `deadline` seconds from
    its first job's start for all of its jobs. Past it, its running jobs are cut off (as in
    fan_out) and the ones not started are not run: their outcome is `late`, so a server that hangs
    costs its own jobs and at most `per_group` workers for `deadline`, never the other groups'."""
    return _Grouped(groups, deadline, per_group, what, setting).run(workers)


class _Grouped(Generic[T]):
    """fan_out_grouped's bookkeeping, shared by its worker threads under one condition."""

    def __init__(self, groups: dict[str, dict[str, Callable[[Watch], T]]], deadline: float, per_group: int,
                 what: str, setting: str):
        self.groups, self.deadline, self.per_group = groups, deadline, per_group
        self.what, self.setting = what, setting
        self.pending = {group: sorted(jobs) for group, jobs in groups.items() if jobs}
        self.outcomes: dict[str, dict[str, Outcome[T]]] = {group: {} for group in groups}
        self.total = sum(len(jobs) for jobs in self.pending.values())
        self.lock = threading.Condition()
        self.running: dict[str, int] = dict.fromkeys(self.pending, 0)
        self.started: dict[str, float] = {}
        self.active: dict[tuple[str, str], Watch] = {}
        self.order = sorted(self.pending)
        self.turn = 0

    def _late(self, group: str, seconds: float = 0.0) -> Outcome[T]:
        return Outcome(error=late_reason(self.what, group, self.deadline, self.setting), late=True, seconds=seconds)

    def _overdue(self, group: str, now: float) -> bool:
        return group in self.started and now - self.started[group] >= self.deadline

    def _expire(self, now: float) -> None:
        """Under the lock: a group past its deadline has the rest of its jobs never run."""
        for group in [g for g in self.order if self.pending.get(g) and self._overdue(g, now)]:
            for name in self.pending.pop(group):
                self.outcomes[group][name] = self._late(group)

    def _next_group(self) -> str | None:
        for i in range(len(self.order)):
            group = self.order[(self.turn + i) % len(self.order)]
            if self.pending.get(group) and self.running[group] < self.per_group:
                self.turn = (self.turn + i + 1) % len(self.order)
                return group
        return None

    def _take(self) -> tuple[str, str] | None:
        """The next job to run (the groups in turn), or None when every job has been taken."""
        with self.lock:
            while True:
                now = time.monotonic()
                self._expire(now)
                if not any(self.pending.values()):
                    return None
                group = self._next_group()
                if group is not None:
                    self.running[group] += 1
                    self.started.setdefault(group, now)
                    return group, self.pending[group].pop(0)
                self.lock.wait(0.05)

    def _worker(self) -> None:
        while (job := self._take()) is not None:
            group, name = job
            watch = Watch(max(0.05, self.deadline - (time.monotonic() - self.started[group])))
            watch.start()
            with self.lock:
                self.active[job] = watch
            t0 = time.monotonic()
            try:
                value = self.groups[group][name](watch)
                outcome: Outcome[T] = Outcome(value=value, seconds=round(time.monotonic() - t0, 3))
            except BaseException as exc:
                outcome = Outcome(error=describe_error(exc), seconds=round(time.monotonic() - t0, 3), exception=exc)
            with self.lock:
                self.active.pop(job, None)
                self.running[group] -= 1
                if watch.cut:
                    outcome = self._late(group, outcome.seconds)
                self.outcomes[group].setdefault(name, outcome)
                self.lock.notify_all()

    def run(self, workers: int) -> dict[str, dict[str, Outcome[T]]]:
        if not self.pending:
            return self.outcomes
        threads = [threading.Thread(target=self._worker, name="shardctl-read", daemon=True)
                   for _ in range(max(1, min(workers, self.total, self.per_group * len(self.pending))))]
        for thread in threads:
            thread.start()
        with self.lock:
            while True:
                now = time.monotonic()
                self._expire(now)
                for (group, name), watch in list(self.active.items()):
                    if self._overdue(group, now) and not watch.cut:
                        watch.cut_off()
                    if group in self.started and now - self.started[group] >= self.deadline + GRACE:
                        # cut and still not back: given up on, its thread ends on its own
                        self.active.pop((group, name))
                        self.outcomes[group].setdefault(name, self._late(group))
                if sum(len(o) for o in self.outcomes.values()) >= self.total:
                    return self.outcomes
                self.lock.wait(0.05)  # woken by every job that ends
