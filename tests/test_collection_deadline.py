"""Collection that grows with the fleet: servers are read at once, each within a deadline, so a
server that hangs costs its own shards' samples and nobody else's.

Two kinds of hang, both real: a TCP listener that accepts connections and never says a word (as
a wedged proxy or a half-dead host does), and an embedded PostgreSQL server whose every process
is stopped with SIGSTOP, after the sampler already holds a connection to it (so the read itself,
not only the connect, has to be cut off: a server-side statement_timeout cannot fire there).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from psycopg import sql

from conftest import FleetDir
from engine import workflow
from engine.collect.observer import inspect_servers
from engine.collect.sampling import LiveSampler
from engine.observe.models import CatalogShard
from engine.servers.embedded import EmbeddedServer
from engine.servers.fleet import Fleet

DEADLINE = 1.0
# The bound a round must keep whatever a server does: its deadline, the grace a cut-off read
# gets, and room for a loaded two-core machine. Without a deadline these rounds never end.
BOUND = DEADLINE + 4.0


class SilentListener:
    """Accepts TCP connections on 127.0.0.1 and never answers; keeps them open."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)  # held open, never read, never written

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def fleet3(tmp_path, monkeypatch):
    """The quickstart's servers a and b, running, with shard databases of their own, and a
    third server `silent` declared by DSN and reached at the silent listener."""
    listener = SilentListener()
    fleet = FleetDir(tmp_path)
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace(
        "databases:", "  silent:\n    dsn_env: SILENT_DSN\n\ndatabases:"))
    monkeypatch.setenv("SILENT_DSN", f"host=127.0.0.1 port={listener.port} user=postgres dbname=postgres")
    try:
        assert fleet.cli("up").code == 0
        shards = []
        for server in ("a", "b"):
            with fleet.connect(server) as conn:
                for i in range(3):
                    name = f"t_{server}_{i}"
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    shards.append(CatalogShard(database="t", name=f"{server}{i}", lo=None, hi=None, server=server,
                                               dbname=name, state="active"))
        shards += [CatalogShard(database="t", name=f"s{i}", lo=None, hi=None, server="silent", dbname=f"t_s_{i}",
                                state="active") for i in range(2)]
        yield fleet, Fleet(workflow.load(str(fleet.path))), shards
    finally:
        listener.close()
        _resume_all(fleet.path / ".shardctl" / "servers" / "b")
        fleet.stop()


def _stop_all(server_root: Path) -> None:
    for pid in EmbeddedServer(server_root.name, server_root).processes():
        os.kill(pid, signal.SIGSTOP)


def _resume_all(server_root: Path) -> None:
    for pid in EmbeddedServer(server_root.name, server_root).processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _timed(fn):
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def test_a_silent_listener_costs_only_its_own_shards(fleet3):
    _, fleet, shards = fleet3
    with LiveSampler(fleet, deadline=DEADLINE) as sampler:
        fresh, took = _timed(lambda: sampler.sample_round(shards))
    assert took < BOUND + 1.0 + DEADLINE, took  # two readings (no previous one), the silent one asked once
    answered = {s.address for s in shards if s.server in ("a", "b")}
    assert set(fresh.pairs) == answered
    assert set(fresh.unknown) == {"t/s0", "t/s1"}
    assert all(all(v is None for v in s.metrics.values()) for s in fresh.unknown.values())
    assert fresh.missing == {"silent": "server silent did not answer within its 1s deadline (metrics.deadline)"}
    assert fresh.notes() == ("server silent: server silent did not answer within its 1s deadline (metrics.deadline);"
                             " its 2 shard(s) are unknown this round (the other servers' samples are unaffected)",)
    # the other servers' samples are real ones
    assert all(pair[1].value("connections") is not None for pair in fresh.pairs.values())


def test_a_stopped_server_is_cut_off_mid_read_and_comes_back(fleet3):
    fleet_dir, fleet, shards = fleet3
    live = [s for s in shards if s.server != "silent"]
    b_root = fleet_dir.path / ".shardctl" / "servers" / "b"
    with LiveSampler(fleet, deadline=DEADLINE) as sampler:
        warm = sampler.sample_round(live)  # the sampler now holds a connection to each server
        assert set(warm.pairs) == {s.address for s in live} and not warm.missing
        _stop_all(b_root)
        try:
            fresh, took = _timed(lambda: sampler.sample_round(live))
            assert took < BOUND, took
            assert set(fresh.pairs) == {s.address for s in live if s.server == "a"}
            assert set(fresh.unknown) == {s.address for s in live if s.server == "b"}
            assert fresh.missing == {"b": "server b did not answer within its 1s deadline (metrics.deadline)"}
            # a second round, now that its kept connection was cut: the connect itself is bounded
            again, took = _timed(lambda: sampler.sample_round(live))
            assert took < BOUND + 2.0, took  # libpq's connect_timeout is at least 2s; the round does not wait it
            assert set(again.unknown) == {s.address for s in live if s.server == "b"}
            assert set(again.pairs) == {s.address for s in live if s.server == "a"}
            # the inventory of an observation is bounded the same way
            inventory, took = _timed(lambda: inspect_servers(fleet, ["a", "b", "silent"], deadline=DEADLINE))
            assert took < BOUND, took
            assert inventory["a"].reachable
            assert not inventory["b"].reachable and "did not answer within its 1s deadline" in inventory["b"].error
            assert not inventory["silent"].reachable
        finally:
            _resume_all(b_root)
        # once it runs again, its shards are read again (the late reads left nothing behind)
        deadline = time.monotonic() + 30
        back = sampler.sample_round(live)
        while back.missing and time.monotonic() < deadline:
            time.sleep(0.5)
            back = sampler.sample_round(live)
        assert not back.missing and set(back.pairs) == {s.address for s in live}


def test_a_plan_with_a_stopped_server_ends_and_names_it(fleet3):
    fleet_dir, _, _ = fleet3
    b_root = fleet_dir.path / ".shardctl" / "servers" / "b"
    _stop_all(b_root)
    try:
        started = time.monotonic()
        plan = fleet_dir.cli("plan", timeout=120)
        took = time.monotonic() - started
    finally:
        _resume_all(b_root)
    # the inventory's 10s deadline, not forever; the plan would create shards on b, so it is refused
    assert took < 60, took
    assert plan.code == 1 and "Traceback" not in plan.both, plan.both
    assert "server 'b' is unreachable" in plan.err
    assert "server b did not answer within its 10s deadline" in plan.err


def test_the_deadline_is_checked_where_it_is_written(tmp_path):
    from engine.config import loader
    from engine.errors import ConfigError

    (tmp_path / "fleet.yaml").write_text(
        "servers:\n  a: {embedded: true}\npolicies:\n  default:\n    metrics: {deadline: 50ms}\n")
    with pytest.raises(ConfigError) as refused:  # the rendered error is what the user sees
        loader.load(tmp_path, cwd=tmp_path)
    text = refused.value.render()
    assert "fleet.yaml:5" in text and "metrics.deadline (0.05s) must be between 100ms and 1m" in text


def test_the_daemon_judges_a_late_servers_shards_unknown_at_once_and_says_why():
    from engine.config.models import Policy
    from engine.detect.detector import assess
    from engine.observe.metrics import METRICS, Sample
    from engine.observe.models import CatalogState, LiveServer, Observation
    from engine.watch.daemon import _silence, _with_unknown
    from traces import START, samples

    stored = {"orders/-80": samples("orders/-80", {"queries_per_second": [20000.0] * 40}, server="a"),
              "orders/80-": samples("orders/80-", {"queries_per_second": [5.0] * 40}, server="b")}
    newest = stored["orders/-80"][-1].at
    late = {"orders/-80": Sample(shard="orders/-80", server="a", at=newest.replace(second=newest.second + 1),
                                 metrics=dict.fromkeys(METRICS))}
    observation = Observation(catalog=CatalogState(exists=True), servers={}, shards={}, metrics=stored,
                              taken_at=START, metrics_at=START)
    judged = _with_unknown(observation, late)
    assert judged.metrics["orders/80-"] == stored["orders/80-"]  # the other server's window is untouched
    verdict = assess("orders/-80", judged.metrics["orders/-80"], Policy())
    assert verdict.state == "unknown" and "every metric unknown" in verdict.why  # not judged on older samples
    assert assess("orders/-80", stored["orders/-80"], Policy()).state != "unknown"  # judged on them before
    reason = "server a did not answer within its 5s deadline (metrics.deadline)"
    assert _silence("a", {"a": reason}, observation) == reason
    down = observation.model_copy(update={"servers": {"b": LiveServer(name="b", reachable=False, error="refused")}})
    assert _silence("b", {}, down) == "refused"
