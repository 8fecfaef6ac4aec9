"""Changes made behind shardctl's back are told apart from the plan, in the past tense; an
apply killed midway resumes from the journal and converges."""

import json

import pytest

from conftest import assert_golden
from engine.catalog.journal import FAILPOINT_ENV


@pytest.fixture
def applied(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    return fleet


def test_a_shard_dropped_by_hand_is_drift_and_is_recreated(applied):
    with applied.connect("b") as conn:
        conn.execute("DROP DATABASE orders_40_80 WITH (FORCE)")
    plan = applied.cli("plan", "--detailed-exitcode")
    assert plan.code == 2
    assert_golden("drift_deleted.txt", plan.out)
    doc = json.loads(applied.cli("plan", "--format", "json").out)
    assert doc["summary"]["by_cause"] == {"drift": 1}
    assert applied.cli("apply", "--auto-approve").code == 0
    with applied.connect("b", "orders_40_80") as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    assert applied.cli("plan", "--detailed-exitcode").code == 0


def test_a_schema_altered_by_hand_is_reported_not_repaired(applied):
    with applied.connect("a", "orders_80_c0") as conn:
        conn.execute("ALTER TABLE customers ADD COLUMN hotfix text")
        conn.execute("DROP INDEX orders_placed_at")
    plan = applied.cli("plan", "--detailed-exitcode")
    assert plan.code == 0  # nothing to do: shardctl never reverts a hand-made change on its own
    assert_golden("drift_schema.txt", plan.out)


def test_an_unmanaged_database_that_looks_like_a_shard_is_reported(applied):
    with applied.connect("b") as conn:
        conn.execute("CREATE DATABASE orders_40_60")
    plan = applied.cli("plan")
    assert "# server.b/orders_40_60 looks like a shard of orders but is not in the catalog" in plan.out


@pytest.mark.parametrize("failpoint", ["record orders", "create orders/80-c0", "schema orders/c0-", "activate orders"])
def test_an_apply_killed_at_a_step_resumes_and_converges(fleet, failpoint):
    killed = fleet.cli("apply", "--auto-approve", env={FAILPOINT_ENV: failpoint})
    assert killed.code == -9, killed.both  # SIGKILL: no cleanup ran

    status = json.loads(fleet.cli("status", "--json").out)
    if failpoint != "record orders":
        (op,) = status["interrupted"]
        assert op["last_step"] == failpoint
        plan = fleet.cli("plan")
        assert "an earlier apply was interrupted while creating orders" in plan.out

    resumed = fleet.cli("apply", "--auto-approve")
    assert resumed.code == 0, resumed.both
    assert fleet.cli("plan", "--detailed-exitcode").code == 0
    assert {"orders_min_40", "orders_80_c0"} <= fleet.databases("a")
    assert {"orders_40_80", "orders_c0_max"} <= fleet.databases("b")
    with fleet.catalog() as conn:
        states = conn.execute("SELECT DISTINCT state FROM shardctl.shards").fetchall()
        assert states == [("active",)]
        assert conn.execute("SELECT count(*) FROM shardctl.operations WHERE state = 'running'").fetchone() == (0,)
    # every shard ran its schema step exactly once
    for server, dbname in [("a", "orders_min_40"), ("b", "orders_c0_max")]:
        with fleet.connect(server, dbname) as conn:
            assert conn.execute("SELECT count(*) FROM _shardctl.schema_steps").fetchone() == (1,)
