"""`shardctl drift` on real servers: each cause gives exit 2 and is named apart; an untouched
fleet gives 0; an apply in flight is waited for."""

import json

import pytest

from conftest import Background
from engine.catalog.lock import apply_lock


@pytest.fixture
def applied(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    return fleet


def _drift(fleet):
    result = fleet.cli("drift", "--detailed-exitcode", "--format", "json")
    assert result.code in (0, 2), result.both
    return result.code, json.loads(result.out)


def test_an_untouched_fleet_is_in_sync(applied):
    code, doc = _drift(applied)
    assert code == 0 and doc["status"] == "ok"
    assert doc["counts"] == {"config": 0, "waiting": 0, "outside": 0, "interrupted": 0, "load": 0}
    text = applied.cli("drift")
    assert text.out.startswith("Drift Status: OK") and text.code == 0


def test_a_shard_dropped_by_hand_is_drift_outside_shardctl(applied):
    with applied.connect("b") as conn:
        conn.execute("DROP DATABASE orders_c0_max WITH (FORCE)")
    code, doc = _drift(applied)
    assert code == 2 and doc["counts"]["outside"] == 1
    assert doc["outside"][0]["address"] == "shard.orders/c0-"
    assert "has been deleted" in doc["outside"][0]["summary"]


def test_a_schema_altered_by_hand_is_drift_outside_shardctl(applied):
    with applied.connect("a", "orders_min_40") as conn:
        conn.execute("ALTER TABLE orders ADD COLUMN sneaky int")
    code, doc = _drift(applied)
    assert code == 2 and doc["counts"] == {"config": 0, "waiting": 0, "outside": 1, "interrupted": 0, "load": 0}
    assert "+ public.orders.columns.sneaky: integer" in doc["outside"][0]["summary"]


def test_an_edited_yaml_is_drift_of_the_configuration(applied):
    applied.write("fleet.yaml", applied.read("fleet.yaml").replace("    policy: default\n",
                                                                     "    policy: default\n    protect: true\n"))
    code, doc = _drift(applied)
    assert code == 2 and doc["counts"] == {"config": 1, "waiting": 0, "outside": 0, "interrupted": 0, "load": 0}
    assert doc["config"][0]["address"] == "database.orders"
    text = applied.cli("drift", "--detailed-exitcode")
    assert "The configuration changed (apply would change the fleet): 1" in text.out


def test_drift_waits_for_an_apply_in_flight(applied):
    conn = applied.catalog()
    with apply_lock(conn, "apply"):
        drift = Background("-C", "fleet", "drift", "--detailed-exitcode", cwd=applied.base,
                           err_path=applied.base / "drift.err")
        drift.wait_for_err("Waiting for an apply in flight to finish...")
        assert drift.proc.poll() is None, "drift must wait while an apply holds the lock"
    conn.close()
    result = drift.finish()
    assert result.code == 0, result.both
