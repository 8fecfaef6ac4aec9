"""A PostgreSQL server that dies mid-move never costs a committed row.

Four embedded servers: `a` holds only the catalog, the shards of `orders` live on `b`, `c` and
`d`. A split of orders/40-80 (on c) puts its targets on b and d; a merge of orders/-40 (on b)
and orders/40-80 (on c) puts its target on c. While a writer inserts through routing and
records every key whose INSERT returned, the apply is held at a step of the move (a holdpoint,
engine/catalog/journal.py) and the server of the catalog, of the source or of a target is killed
with SIGKILL there, the apply let go on; then `shardctl up` starts the server again and apply
is rerun as an operator would. Every committed key must then be in the active shards exactly
once, `plan` must say No changes, and no slot, publication or subscription may be left on any
server. One representative step per server role runs in the README's command; the others are
marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FleetDir, wait_until
from engine.catalog.journal import FAILPOINT_ENV, HOLDPOINT_ENV, SLOWPOINT_ENV
from engine.client import hashint8extended
from engine.servers.embedded import EmbeddedServer
from movers import CrashWriter, active_shards, all_rows, floor_below_shards, preload

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
  c: {embedded: true}
  d: {embedded: true}
catalog: {server: a, database: shardctl}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: schema/001_init.sql
    shards: 4
    placement: [b, c, d]
    policy: steady
policies:
  steady:
    extends: default
    rebalance: {enabled: false}  # a split leaves c without shards: that is this test's layout, not drift
"""
SERVERS = ("a", "b", "c", "d")
SPLIT, MERGE = "split orders/40-80", "merge orders/-80"
# whose server is killed: the catalog's; a source's (and none of the targets'); a target's
ROLES = {SPLIT: {"catalog": "a", "source": "c", "target": "b"},
         MERGE: {"catalog": "a", "source": "b", "target": "c"}}  # a merge's target is on a source's server
STEPS = ["record", "targets", "publish", "subscribe", "guard", "sync", "compare", "converge", "fence", "catch up",
         "verify", "flip", "flip, committed", "cleanup"]
# one step per role in the README's command: the catalog and a target right after the cutover's
# commit (the journal once lost the first, cleanup once skipped the second), the source behind its
# fence (the resumed run keeps it and reports the whole outage)
REPRESENTATIVE = {"catalog": "flip, committed", "target": "flip, committed", "source": "catch up"}


@pytest.fixture
def crashfleet(tmp_path):
    fleet = FleetDir(tmp_path)
    fleet.write("fleet.yaml", FLEET)
    try:
        applied = fleet.cli("apply", "--auto-approve")
        assert applied.code == 0, applied.both
        assert [(s[0], s[3]) for s in active_shards(fleet)] == [("-40", "b"), ("40-80", "c"), ("80-c0", "d"),
                                                                 ("c0-", "b")]
        preload(fleet, customers=3000)
        yield fleet
    finally:
        fleet.stop()


def _cases(kind: str) -> list:
    out = []
    for role in ("catalog", "source", "target"):
        for step in STEPS:
            marks = [] if REPRESENTATIVE[role] == step and kind == SPLIT else [pytest.mark.slow]
            out.append(pytest.param(role, step, marks=marks, id=f"{role}-{step.replace(', ', '-')}"))
    return out


def _server(fleet, name: str) -> EmbeddedServer:
    return EmbeddedServer(name, fleet.path / ".shardctl" / "servers" / name)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCTL_")}
    env.update({"NO_COLOR": "1", **extra})
    return env


def _leftovers(fleet) -> list[str]:
    """Every slot, subscription and publication on every server (this fleet has no replica, so
    each one is a move's)."""
    out = []
    for name in SERVERS:
        with fleet.connect(name) as conn:
            out += [f"{name}: slot {r[0]}" for r in conn.execute("SELECT slot_name FROM pg_replication_slots")]
            out += [f"{name}: subscription {r[0]}" for r in conn.execute("SELECT subname FROM pg_subscription")]
        for dbname in sorted(fleet.databases(name) - {"postgres"}):
            with fleet.connect(name, dbname) as conn:
                out += [f"{name}/{dbname}: publication {r[0]}"
                        for r in conn.execute("SELECT pubname FROM pg_publication")]
    return out


def _kill_mid_move(fleet, kind: str, step: str, victim: str, args: list[str],
                   slow: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Apply, held at STEP of the move; the victim's postmaster is killed there, then the apply goes
    on (and meets the dead server). SLOW: more test points for the apply. Returns the finished
    apply."""
    release = fleet.base / "release"
    held = fleet.base / "release.held"
    proc = subprocess.Popen([sys.executable, "-m", "engine", "-C", "fleet", "apply", "--auto-approve", *args],
                            cwd=fleet.base, env=_env(**{HOLDPOINT_ENV: f"{kind}: {step}={release}", **(slow or {})}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not held.exists():
            assert proc.poll() is None, f"apply ended before step {step!r}: " + "".join(proc.communicate())
            assert time.monotonic() < deadline, f"apply never reached step {step!r}"
            time.sleep(0.05)
        assert held.read_text() == f"{kind}: {step}"
        pid = _server(fleet, victim).running_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        release.write_text("go")
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _crash_and_recover(fleet, kind: str, role: str, step: str, args: list[str]) -> tuple[CrashWriter, list]:
    before, problems = all_rows(fleet)
    assert problems == []
    writer = CrashWriter(_server(fleet, "a").conninfo("shardctl"), start_id=max(before) + 1_000_000)
    writer.start()
    reruns = []
    try:
        victim = ROLES[kind][role]
        # behind the fence the verification's work ahead reads the source from the drain on, beside
        # the hold, and a killed postmaster's backends answer a moment longer: the killed run could
        # read all it needs and flip without its source (sound; the likely reading of a CI run in
        # which no rerun had a pause to report), which is not this case, a source dying while the
        # fence still needs it. Slowed 2 s, the work ahead meets the dead server, well within the
        # fence's bound.
        slow = {SLOWPOINT_ENV: f"{kind}: ahead=2"} if (role, step) == ("source", "catch up") else None
        killed = _kill_mid_move(fleet, kind, step, victim, args, slow)
        both = killed.stdout + killed.stderr
        assert "Traceback" not in both and "bug" not in both, both
        assert killed.returncode in (0, 1), both
        if killed.returncode:
            assert "Error: " in killed.stderr, both
        down = time.monotonic()
        up = fleet.cli("up")
        assert up.code == 0 and f"server {victim}: started" in up.out, up.both  # not "already running"
        reruns.append(time.monotonic() - down)
        for _ in range(3):
            # a copy the crash made impossible to finish is undone: the operator asks for the move again
            again = args if len(reruns) > 1 and "start the move afresh" in reruns[-1].err else []
            rerun = fleet.cli("apply", "--auto-approve", *again)
            reruns.append(rerun)
            assert "Traceback" not in rerun.both and "bug" not in rerun.both, rerun.both
            if rerun.code == 0:
                break
        assert reruns[-1].code == 0, "\n---\n".join(r.both for r in reruns[1:])
        mark = writer.mark
        deadline = time.monotonic() + 30
        while writer.committed_since(mark) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)  # writes go on after the move, through the new routing
    finally:
        writer.stop()
    writer.check(fleet, before)
    assert writer.committed_since(mark) >= 20, writer.failures[-5:]
    plan = fleet.cli("plan")
    assert plan.code == 0 and "No changes." in plan.out, plan.both
    assert _leftovers(fleet) == []
    with fleet.catalog() as conn:
        assert conn.execute("SELECT count(*) FROM shardctl.operations WHERE state = 'running'").fetchone() == (0,)
    return writer, reruns


@pytest.mark.parametrize(("role", "step"), _cases(SPLIT))
def test_a_server_killed_at_each_step_of_a_split_costs_no_committed_row(crashfleet, role, step):
    _, reruns = _crash_and_recover(crashfleet, SPLIT, role, step, ["-split", "orders/40-80"])
    assert [s[0] for s in active_shards(crashfleet)] == ["-40", "40-60", "60-80", "80-c0", "c0-"]
    if (role, step) == ("source", "catch up"):
        # the source came back fenced, and the resumed move kept its fence: the outage it reports
        # runs from that first fence to the flip, the server's death and restart included
        (pause,) = [r for r in reruns[1:] if "paused for" in r.out]
        assert "from the fence an interrupted run left" in pause.out, pause.out
        with crashfleet.catalog() as conn:
            (event,) = conn.execute("SELECT detail FROM shardctl.history WHERE event = 'split_shard'").fetchone()
        assert event["pause_ms"] >= reruns[0] * 1000, (event["pause_ms"], reruns[0])


@pytest.mark.parametrize(("role", "step"), _cases(MERGE))
def test_a_server_killed_at_each_step_of_a_merge_costs_no_committed_row(crashfleet, role, step):
    floor_below_shards(crashfleet, 2)  # the merge below the declared count is the operator's own
    _crash_and_recover(crashfleet, MERGE, role, step, ["-merge", "orders/-40,40-80"])
    assert [s[0] for s in active_shards(crashfleet)] == ["-80", "80-c0", "c0-"]


def test_abort_after_the_cutover_is_refused_and_apply_finishes_the_move(crashfleet):
    """The apply dies right after the cutover's commit: the move is past its cutover by the
    routing (even with the journal's record of it taken away, as an older shardctl could lose
    it); abort is refused with the ways forward, and apply finishes the hand-over and cleanup."""
    before, _ = all_rows(crashfleet)
    killed = crashfleet.cli("apply", "--auto-approve", "-split", "orders/40-80",
                            env={FAILPOINT_ENV: f"{SPLIT}: flip, committed"})
    assert killed.code == -9, killed.both
    (op,) = json.loads(crashfleet.cli("status", "--json").out)["interrupted"]
    assert op["past_cutover"] is True
    with crashfleet.catalog() as conn:  # what the journal lost in the old crash window
        conn.execute("DELETE FROM shardctl.journal WHERE operation = %s AND step LIKE '%%: flip'"
                     " AND status = 'done'", (op["id"],))
    refused = crashfleet.cli("abort", str(op["id"]))
    assert refused.code == 1, refused.both
    assert f"operation {op['id']} (split_shard shard.orders/40-80) has passed its cutover" in refused.err
    assert "`shardctl apply` finishes it" in refused.err
    assert "`shardctl apply -merge orders/40-60,orders/60-80`" in refused.err
    assert {"orders_40_60", "orders_60_80"} <= crashfleet.databases("b") | crashfleet.databases("d")  # not dropped
    plan = crashfleet.cli("plan")
    assert "past its cutover: only cleanup is left" in plan.out, plan.out
    status = crashfleet.cli("status")
    assert "past its cutover: the new shards own the range" in status.out, status.out
    finished = crashfleet.cli("apply", "--auto-approve")
    assert finished.code == 0 and "Split complete" in finished.out, finished.both
    rows, problems = all_rows(crashfleet)
    assert problems == [] and rows == before
    assert [s[0] for s in active_shards(crashfleet)] == ["-40", "40-60", "60-80", "80-c0", "c0-"]
    assert _leftovers(crashfleet) == []


def test_a_link_failing_since_the_resume_is_named_and_the_source_is_told_as_it_is(fleet):
    """Errors counted before the resumed step began (the crash's own) are not held against a
    link; errors that go on after it are: the move stops naming the target's server, and says
    the source takes writes (it was never fenced). Once the cause is gone, apply finishes."""
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    before, _ = all_rows(fleet)
    killed = fleet.cli("apply", "--auto-approve", "-split", "orders/40-80", env={FAILPOINT_ENV: f"{SPLIT}: subscribe"})
    assert killed.code == -9, killed.both
    key = min(_keys_of(fleet, "orders_40_60", before))
    with fleet.connect("a", "orders_40_60") as conn:  # a row the copy will meet again: every sync fails
        conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'in the way')", (key,))
    failed = fleet.cli("apply", "--auto-approve")
    assert failed.code == 1, failed.both
    assert "replication into orders_40_60 on server a is failing: 0 apply errors and" in failed.err, failed.err
    assert "table-sync errors in the" in failed.err and "since this step began" in failed.err
    assert "the source (orders_40_80 on server b) takes writes as before" in failed.err
    with fleet.connect("a", "orders_40_60") as conn:
        conn.execute("DELETE FROM customers WHERE customer_id = %s", (key,))
    finished = fleet.cli("apply", "--auto-approve")
    assert finished.code == 0, finished.both
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == before


def _keys_of(fleet, dbname: str, keys) -> set[int]:
    """The keys among KEYS that the (empty, just made) target shard will own."""
    with fleet.catalog() as conn:
        lo, hi = conn.execute("SELECT lo, hi FROM shardctl.shards WHERE dbname = %s", (dbname,)).fetchone()
    return {k for k in keys if (lo is None or hashint8extended(k) >= lo) and (hi is None or hashint8extended(k) < hi)}


def test_up_starts_a_server_whose_postmaster_was_just_killed(fleet):
    """Right after SIGKILL the postmaster is a zombie until it is reaped, its pid still in
    postmaster.pid and its socket file left: `up` waits for it to be gone and starts the server,
    never "already running"."""
    assert fleet.cli("up").code == 0
    server = _server(fleet, "b")
    os.kill(server.running_pid(), signal.SIGKILL)
    up = fleet.cli("up")
    assert up.code == 0 and "server b: started" in up.out, up.both
    with fleet.connect("b") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_zombie_is_not_a_running_server():
    """An exited child not yet reaped still answers kill(pid, 0): it must not count as alive."""
    from engine.servers.embedded import _alive

    child = subprocess.Popen(["true"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")  # its state follows the command name, in parentheses
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", "the child to exit", timeout=10)
        os.kill(child.pid, 0)  # the kernel still knows it
        assert not _alive(child.pid)
    finally:
        child.wait()
    assert _alive(os.getpid())
