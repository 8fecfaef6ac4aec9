"""The move's background work (engine/actions/move/live.py `background`) runs on kept threads:
work is handed to an idle one, a thread is started only when none is idle, and a thread held by
work that never ends does not hold up the next work."""

from __future__ import annotations

import os
import threading
import time

import pytest

from engine.actions.move.live import _Threads, background


def idle_becomes(threads: _Threads, count: int, within_s: float = 10.0) -> bool:
    """Until COUNT threads wait for work (they count themselves as they begin to wait)."""
    deadline = time.monotonic() + within_s
    while threads._idle != count:
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.001)
    return True


def test_work_runs_and_its_result_or_error_reaches_the_waiter():
    assert background(lambda: 42).result(timeout=10) == 42

    def fails() -> None:
        raise ValueError("no such row")

    error = background(fails).exception(timeout=10)
    assert isinstance(error, ValueError) and str(error) == "no such row"


def test_work_after_work_runs_on_the_thread_kept_from_before():
    threads = _Threads()
    seen: list[int] = []
    for _ in range(5):
        done = threading.Event()

        def work(done: threading.Event = done) -> None:
            seen.append(threading.get_ident())
            done.set()

        threads.run(work)
        assert done.wait(10)
        assert idle_becomes(threads, 1)
    assert len(set(seen)) == 1


def test_prestarted_threads_take_work_side_by_side_without_starting_more():
    threads = _Threads()
    threads.prestart(4)
    assert idle_becomes(threads, 4)
    running = threading.active_count()
    barrier = threading.Barrier(4, timeout=10)
    passed = threading.Semaphore(0)

    def meet() -> None:
        barrier.wait()  # passes only when four threads run this at the same time
        passed.release()

    for _ in range(4):
        threads.run(meet)
    assert threading.active_count() == running
    assert all(passed.acquire(timeout=10) for _ in range(4))


def test_a_thread_held_by_work_that_never_ends_does_not_hold_up_the_next():
    threads = _Threads()
    threads.prestart(1)
    assert idle_becomes(threads, 1)
    release, started, done = threading.Event(), threading.Event(), threading.Event()

    def hangs() -> None:
        started.set()
        release.wait(30)

    threads.run(hangs)
    assert started.wait(10)
    threads.run(done.set)  # no idle thread: one is started for it
    assert done.wait(10)
    release.set()


def test_a_thread_that_cannot_be_started_raises_and_leaves_nothing_behind(monkeypatch):
    threads = _Threads()
    ran = threading.Event()

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", no_thread)
        with pytest.raises(RuntimeError):
            threads.run(ran.set)
    assert threads._idle == 0 and threads._work.empty()
    done = threading.Event()
    threads.run(done.set)  # threads can be had again: the next work runs, the failed one does not
    assert done.wait(10)
    assert not ran.is_set()


def test_a_forked_child_starts_with_no_kept_threads():
    background(lambda: None).result(timeout=10)  # at least one kept, idle, in this process
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its work must run although the parent's idle threads are not here
        try:
            os.write(write, str(background(lambda: 7).result(timeout=10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as got:
        assert got.read() == "7"
    os.waitpid(child, 0)
