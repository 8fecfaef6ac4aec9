"""The move's background work (engine/actions/move/live.py `background`) runs on kept threads:
work is handed to an idle one, a thread is started only when none is idle, and a thread held by
work that never ends does not hold up the next work."""

from __future__ import annotations

import os
import threading

from engine.actions.move.live import _Threads, background


def test_work_runs_and_its_result_or_error_reaches_the_waiter():
    assert background(lambda: 42).result(timeout=10) == 42

    def fails() -> None:
        raise ValueError("no such row")

    error = background(fails).exception(timeout=10)
    assert isinstance(error, ValueError) and str(error) == "no such row"


def test_work_one_after_the_other_reuses_one_thread():
    threads = _Threads()
    seen: set[int] = set()
    for _ in range(20):
        done = threading.Event()

        def work(done: threading.Event = done) -> None:
            seen.add(threading.get_ident())
            done.set()

        threads.run(work)
        assert done.wait(10)
    # a thread is idle again only once it has asked for more work: at most one more was started
    # while the first was between its work and its next wait
    assert len(seen) <= 2


def test_a_thread_held_by_work_that_never_ends_does_not_hold_up_the_next():
    threads = _Threads()
    threads.prestart(1)
    release = threading.Event()
    started = threading.Event()

    def hangs() -> None:
        started.set()
        release.wait(30)

    threads.run(hangs)
    assert started.wait(10)
    done = threading.Event()
    threads.run(done.set)  # no idle thread: one is started for it
    assert done.wait(10)
    release.set()


def test_prestarted_threads_take_work_at_once_side_by_side():
    threads = _Threads()
    threads.prestart(4)
    barrier = threading.Barrier(4, timeout=10)
    passed = threading.Semaphore(0)
    idents: set[int] = set()

    def meet() -> None:
        barrier.wait()  # passes only when four threads run this at the same time
        idents.add(threading.get_ident())
        passed.release()

    for _ in range(4):
        threads.run(meet)
    assert all(passed.acquire(timeout=10) for _ in range(4))
    assert len(idents) == 4


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
