"""`plan` opens the shards' connections while it starts (engine/collect/early.py): the inspection
takes exactly the ones opened with the parameters the fleet gives now, sees what it saw without
them, leaves none open, and keeps no secret in the record it starts from."""

import json
import stat
from pathlib import Path

from conftest import wait_until
from engine import workflow
from engine.collect import early
from engine.config import models
from engine.servers.connect import ServerHandle


class Counting(early.EarlyConnections):
    """The real early connections, counting what the inspection took from them."""

    taken = 0

    def take(self, server, params, timeout):
        conn = super().take(server, params, timeout)
        type(self).taken += conn is not None
        return conn


def _none_left_open(fleet) -> None:
    """Every inventory session ends (a backend leaves pg_stat_activity just after its client closed)."""
    wait_until(lambda: _inventory_sessions(fleet) == 0, "the inventory's sessions to end", timeout=10)


def _inventory_sessions(fleet) -> int:
    total = 0
    for server in ("a", "b"):
        with fleet.connect(server) as conn:
            total += conn.execute("SELECT count(*) FROM pg_stat_activity"
                                  " WHERE application_name = %s", (early.APPLICATION,)).fetchone()[0]
    return total


def _plan(fleet, opened):
    try:
        return workflow.make_plan(workflow.load(str(fleet.path)), early=opened)
    finally:
        if opened is not None:
            opened.close()


def test_the_inspection_takes_the_connections_opened_early_and_sees_the_same(applied_fleet):
    fleet = applied_fleet
    assert fleet.cli("plan", "--detailed-exitcode").code == 0  # records what it connected to
    record = fleet.path / early.FILE
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    servers = json.loads(record.read_text())["servers"]
    assert sum(len(s["databases"]) for s in servers.values()) == 4
    assert all(0 < s["recipe"]["ahead"] <= early.MAX_AHEAD for s in servers.values())  # from each one's room

    Counting.taken = 0
    opened = Counting.start(fleet.path)
    assert opened is not None
    with_early = _plan(fleet, opened)
    assert Counting.taken == 4  # every shard's connection came from the early ones
    without = _plan(fleet, None)
    assert with_early.plan.has_changes is without.plan.has_changes is False
    assert {a: s.schema_fingerprint for a, s in with_early.observation.shards.items()} == \
        {a: s.schema_fingerprint for a, s in without.observation.shards.items()}
    _none_left_open(fleet)


def test_a_connection_opened_with_other_parameters_is_not_used(applied_fleet):
    fleet = applied_fleet
    assert fleet.cli("plan").code == 0
    record = fleet.path / early.FILE
    data = json.loads(record.read_text())
    data["servers"]["a"]["recipe"]["params"]["options"] = "-c work_mem=64kB"  # not what the fleet says
    record.write_text(json.dumps(data))
    Counting.taken = 0
    planned = _plan(fleet, Counting.start(fleet.path))
    assert Counting.taken == 2  # b's shards only; a's were connected to as the fleet says
    assert not planned.plan.has_changes
    _none_left_open(fleet)
    assert fleet.cli("plan").code == 0  # and the record is made right again
    assert "options" not in record.read_text()


def test_a_database_gone_since_the_last_plan_costs_only_its_own_connection(applied_fleet, monkeypatch):
    fleet = applied_fleet
    monkeypatch.setattr(early, "WORKERS", 1)  # one after another: the failure comes first
    assert fleet.cli("plan").code == 0
    record = fleet.path / early.FILE
    data = json.loads(record.read_text())
    data["servers"]["a"]["databases"].insert(0, "orders_retired_by_apply")  # dropped since
    record.write_text(json.dumps(data))
    Counting.taken = 0
    planned = _plan(fleet, Counting.start(fleet.path))
    assert Counting.taken == 4  # the server's other databases were still opened early
    assert not planned.plan.has_changes
    _none_left_open(fleet)


def test_a_server_that_does_not_answer_is_not_waited_for(applied_fleet, tmp_path):
    fleet = applied_fleet
    assert fleet.cli("plan").code == 0
    data = json.loads((fleet.path / early.FILE).read_text())
    data["servers"]["a"]["recipe"]["params"]["host"] = str(tmp_path)  # no server listens there
    copy = tmp_path / "config"
    (copy / early.FILE).parent.mkdir(parents=True)
    (copy / early.FILE).write_text(json.dumps(data))
    opened = early.EarlyConnections.start(copy)
    assert opened is not None
    b = data["servers"]["b"]
    params = {**b["recipe"]["params"], "dbname": b["databases"][0]}
    conn = opened.take("b", params, timeout=10)
    assert conn is not None and conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()
    a = data["servers"]["a"]
    assert opened.take("a", {**a["recipe"]["params"], "dbname": a["databases"][0]}, timeout=10) is None
    opened.close()


def test_a_dsn_is_kept_as_the_name_of_its_variable(monkeypatch):
    monkeypatch.setenv("ORDERS_DSN", "host=db.example port=6432 user=app password=s3cret dbname=postgres")
    handle = ServerHandle("a", models.Server(dsn_env="ORDERS_DSN"), Path("/nowhere"))
    kept = early.recipe(handle, free=70)
    assert kept == {"dsn_env": "ORDERS_DSN", "ahead": 35}  # half of what was free
    assert early.recipe(handle, free=1)["ahead"] == 0  # a server with no room: nothing opened ahead
    assert early.recipe(handle, free=None)["ahead"] == early.DEFAULT_AHEAD
    # read again when the next plan starts: the same parameters the fleet gives, secret included
    assert early._params(kept, "orders_min_40") == handle.params("orders_min_40")
