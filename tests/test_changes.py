"""Changes to the YAML after the first apply: each gives the plan an operator expects, pinned by
golden files, and applying it does what the plan said on the real servers."""

import json
import re

import pytest

from conftest import assert_golden

# the quickstart fleet's shards: (server, database)
SHARDS = [("a", "orders_min_40"), ("b", "orders_40_80"), ("a", "orders_80_c0"), ("b", "orders_c0_max")]

INVOICES = """
  invoices:
    shard_key: {column: account, type: text}
    schema: {name: 001_invoices, sql: "CREATE TABLE invoices (account text, id bigint, PRIMARY KEY (account, id));"}
    shards: 2
    placement: [b]
"""


@pytest.fixture
def applied(fleet):
    result = fleet.cli("apply", "--auto-approve")
    assert result.code == 0, result.both
    return fleet


def _edit(fleet, old, new):
    text = fleet.read("fleet.yaml")
    assert old in text
    fleet.write("fleet.yaml", text.replace(old, new))


def test_a_new_schema_step_is_planned_and_applied_to_every_shard(applied):
    (applied.path / "schema" / "002_note.sql").write_text(
        "ALTER TABLE orders ADD COLUMN note text;\nCREATE INDEX orders_note ON orders (note);\n")
    _edit(applied, "schema: schema/001_init.sql", "schema: [schema/001_init.sql, schema/002_note.sql]")
    plan = applied.cli("plan", "--detailed-exitcode")
    assert plan.code == 2, plan.both
    # the reason points at the step's own place in the list, not at the `schema:` key (17:5)
    assert "new schema step schema/002_note.sql declared at fleet/fleet.yaml:17:35" in plan.out
    assert_golden("schema_step.txt", plan.out)
    assert_golden("schema_step.md", applied.cli("plan", "--format", "markdown").out)
    assert applied.cli("apply", "--auto-approve").code == 0
    for server, dbname in SHARDS:
        with applied.connect(server, dbname) as conn:
            assert conn.execute("SELECT count(*) FROM information_schema.columns"
                                " WHERE table_name = 'orders' AND column_name = 'note'").fetchone() == (1,)
    assert applied.cli("plan", "--detailed-exitcode").code == 0


def test_editing_an_applied_schema_step_is_refused_with_its_location(applied):
    sql = applied.path / "schema" / "001_init.sql"
    sql.write_text(sql.read_text() + "\nCREATE INDEX extra ON customers (name);\n")
    result = applied.cli("plan")
    assert result.code == 1
    assert ("fleet/fleet.yaml:17:13: error: schema step 'schema/001_init.sql' was changed after it was applied"
            in result.err)
    assert "append-only" in result.err


def test_adding_and_removing_databases(applied):
    applied.write("fleet.yaml", applied.read("fleet.yaml") + INVOICES)
    plan = applied.cli("plan")
    assert_golden("add_database.txt", plan.out)
    assert applied.cli("apply", "--auto-approve").code == 0
    assert {"invoices_min_80", "invoices_80_max"} <= applied.databases("b")
    with applied.catalog() as conn:
        # text keys route with hashtextextended
        rows = conn.execute("SELECT count(*) FROM generate_series(1, 500) k,"
                            " LATERAL shardctl.route('invoices', 'acct-' || k) r").fetchone()
        assert rows == (500,)

    applied.write("fleet.yaml", applied.read("fleet.yaml").replace(INVOICES, ""))
    plan = applied.cli("plan", "--detailed-exitcode")
    assert plan.code == 2
    assert_golden("remove_database.txt", plan.out)
    # the fleet's identity is a UUID made with its catalog: the same in every plan of this fleet only
    document = re.sub(r'"fleet_id": "[0-9a-f-]{36}"', '"fleet_id": "<this fleet>"',
                      applied.cli("plan", "--format", "json").out)
    assert_golden("remove_database.json", document)
    applied_result = applied.cli("apply", "--auto-approve")
    assert "Apply complete! Resources: 0 added, 0 changed, 1 destroyed." in applied_result.out
    assert not {"invoices_min_80", "invoices_80_max"} & applied.databases("b")


def test_a_protected_database_cannot_be_destroyed(applied):
    _edit(applied, "    policy: default\n", "    policy: default\n    protect: true\n")
    plan = applied.cli("plan")
    assert_golden("protect.txt", plan.out)
    assert applied.cli("apply", "--auto-approve").code == 0

    without = applied.read("fleet.yaml").split("databases:")[0] + "databases: {}\n"
    applied.write("fleet.yaml", without)
    result = applied.cli("plan")
    assert result.code == 1
    assert "database 'orders' cannot be destroyed: it is protected" in result.err
    assert "first apply with `protect: false`" in result.err
    assert applied.cli("apply", "--auto-approve").code == 1
    assert "orders_min_40" in applied.databases("a")  # nothing was touched


def test_changing_the_shard_key_of_a_protected_database_is_refused_at_the_line(applied):
    _edit(applied, "    policy: default\n", "    policy: default\n    protect: true\n")
    assert applied.cli("apply", "--auto-approve").code == 0
    _edit(applied, "{column: customer_id, type: bigint}", "{column: customer_id, type: text}")
    result = applied.cli("plan")
    assert result.code == 1
    assert result.err.startswith("fleet/fleet.yaml:16:5: error: database 'orders' cannot be destroyed")


def test_a_threshold_change_is_an_in_place_policy_update(applied):
    _edit(applied, "    policy: default\n",
          "    policy: default\n    thresholds:\n      hot: {queries_per_second: 5000}\n")
    plan = applied.cli("plan", "--detailed-exitcode")
    assert plan.code == 2
    assert_golden("threshold.txt", plan.out)
    doc = json.loads(applied.cli("plan", "--format", "json").out)
    (action,) = doc["actions"]
    assert action["kind"] == "update_database"
    assert action["changes"] == [{"path": "policy.hot.queries_per_second", "before": 10000.0, "after": 5000.0}]
    assert applied.cli("apply", "--auto-approve").code == 0
    assert applied.cli("plan", "--detailed-exitcode").code == 0


def test_outputs_are_deterministic(applied):
    _edit(applied, "    policy: default\n", "    policy: default\n    thresholds:\n      hot: {latency_ms: 50}\n")
    for fmt in ("text", "markdown", "json"):
        first = applied.cli("plan", "--format", fmt).out
        assert first == applied.cli("plan", "--format", fmt).out
