"""Every wait behind the fence is bounded: made to hang, it is given up after moves.fence_timeout,
the fence is lifted (the source takes writes again, as a writer straight into it sees), the
journal's step says what did not finish, and the rerun finishes the same move.

The hangs are real database conditions where there is one (a table a test session keeps
locked: the source's mark table, a target's, a target's table, the catalog's routing) and a
slowpoint inside the thread where there is none (the sequences, the decoding, the sources' side
read ahead while the fence drains: a thread whose result is not there by its deadline). One
representative runs in the README's command."""

from __future__ import annotations

import psycopg
import pytest

from engine.catalog.journal import SLOWPOINT_ENV
from movers import HeldApply, Probe, active_shards, all_rows, hot_file, preload
from test_fence_contention import fleet_params

SPLIT = "split orders/40-80"
BOUND = 3.0  # moves.fence_timeout in these tests

# case: (the step the apply is held at while the test takes its lock, the lock: server role,
# database role, statement; or a slowpoint; what the journal's failed step says)
CASES = {
    "mark": ("fence", ("source", "LOCK TABLE _shardctl.fence_marks IN ACCESS EXCLUSIVE MODE"), None,
             "fence", "the fence's mark was not written"),
    "catch up": ("fence", ("target", "LOCK TABLE _shardctl.fence_marks IN ACCESS EXCLUSIVE MODE"), None,
                 "catch up", "the targets did not confirm the fence's mark"),
    "sequences": (None, None, "sequences", "verify", "the targets' sequences were not set"),
    "changes": (None, None, "changes", "verify", "the sources' last changes were not decoded"),
    # the sources' side was read while the fence drained: behind it, the targets' is what waits
    "verify": ("verify", ("target", "LOCK TABLE customers IN ACCESS EXCLUSIVE MODE"), None,
               "verify", "the last keys were not compared"),
    "ahead": (None, None, "ahead", "verify", "the last keys were not compared"),
    "flip": ("flip", ("catalog", "LOCK TABLE shardctl.state IN EXCLUSIVE MODE"), None,
             "flip", "the routing flip did not commit"),
}
REPRESENTATIVE = "catch up"


@pytest.fixture
def bounded(fleet):
    fleet.write("fleet.yaml", fleet.read("fleet.yaml")
                + f"policies:\n  default:\n    moves: {{fence_timeout: {BOUND:g}s}}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    hot_file(fleet.base / "hot.json")
    return fleet


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c == REPRESENTATIVE else [pytest.mark.slow])
                                  for c in CASES])
def test_a_wait_behind_the_fence_that_hangs_lifts_the_fence_within_its_bound(bounded, case):
    fleet = bounded
    hold_at, lock, slow, step, said = CASES[case]
    before, _ = all_rows(fleet)
    _, lo, hi, server, dbname = next(s for s in active_shards(fleet) if s[0] == "40-80")
    with Probe(fleet_params(fleet, server, dbname), lo, hi) as probe:
        if hold_at is None:
            # the thread sleeps past its deadline (the apply leaves it behind when it exits)
            result = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json",
                               env={SLOWPOINT_ENV: f"{SPLIT}: {slow}={BOUND + 3:g}"})
            code, out, err = result.code, result.out, result.err
        else:
            held = HeldApply(fleet, f"{SPLIT}: {hold_at}", "--metrics", "hot.json")
            locker = _locker(fleet, lock[0], server, dbname)
            try:
                locker.execute(lock[1])  # held until the apply has given up
                held.release()
                code, out, err = _finish_once_lifted(held, probe, locker)
            finally:
                locker.rollback()
                locker.close()
    assert code == 1, out + err
    assert "Traceback" not in out + err and "bug" not in out + err
    assert f"{said} within 3s behind the fence (moves.fence_timeout)" in err, err
    assert "the fence is lifted: the source takes writes again" in err
    with fleet.catalog() as conn:
        failed = conn.execute("SELECT step, detail->>'error' FROM shardctl.journal WHERE status = 'failed'"
                              " ORDER BY seq").fetchall()
    assert failed == [(f"{SPLIT}: {step}", f"{SPLIT}: {said} within 3s behind the fence (moves.fence_timeout)")]
    # the range was unwritable once: from the fence to the overrun, which came after the bound
    # (it hung for real) and not much later (the machine's load and a probe's round trip)
    windows = probe.refused_windows()
    assert len(windows) == 1 and BOUND * 0.9 < windows[0] < BOUND + 3, windows
    assert probe.errors == [] and probe.accepted[-1][0] > probe.refused[-1]  # writable again
    rerun = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json")
    assert rerun.code == 0 and "Resuming operation" in rerun.out and "Split complete" in rerun.out, rerun.both
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == {**before, **{k: "probe" for _, k in probe.accepted}}


def _locker(fleet, role: str, server: str, dbname: str) -> psycopg.Connection:
    if role == "catalog":
        params = fleet_params(fleet, "a", "shardctl")
    elif role == "source":
        params = fleet_params(fleet, server, dbname)
    else:  # a target of the split: orders_40_60, on whichever server the plan put it
        with fleet.catalog() as conn:
            target_server, target_db = conn.execute(
                "SELECT server, dbname FROM shardctl.shards WHERE name = '40-60'").fetchone()
        params = fleet_params(fleet, target_server, target_db)
    return psycopg.connect(**params)


def _finish_once_lifted(held: HeldApply, probe: Probe, locker: psycopg.Connection) -> tuple[int, str, str]:
    """The lock stays until the probe has seen the range refuse writes and then take them again
    (the fence lifted), or the apply ended; then it goes, so that the apply can finish (its last
    catalog writes may need the table the flip case keeps locked)."""
    import time

    deadline = time.monotonic() + 120
    while held.proc.poll() is None and time.monotonic() < deadline:
        if probe.refused and probe.accepted and probe.accepted[-1][0] > probe.refused[-1]:
            break
        time.sleep(0.05)
    locker.rollback()
    return held.finish()
