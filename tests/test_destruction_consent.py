"""No config mistake destroys rows: a plan that would destroy a database holding rows names what
it would lose and is refused unless `allow_destroy` acknowledges that destruction; a declared
rename (`moved:`) changes names in the catalog and keeps every row. On real servers."""

import json

import pytest

from movers import active_shards, preload


@pytest.fixture
def with_rows(fleet):
    result = fleet.cli("apply", "--auto-approve")
    assert result.code == 0, result.both
    preload(fleet, customers=200)
    for _name, _lo, _hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            conn.execute("INSERT INTO orders (customer_id, order_id, amount)"
                         " SELECT customer_id, k, 9.99 FROM customers, generate_series(1, 2) k")
    assert _rows(fleet) == (200, 400)
    return fleet


def _shards(fleet, database="orders"):
    with fleet.catalog() as conn:
        return conn.execute("SELECT name, lo, hi, server, dbname FROM shardctl.shards WHERE database = %s"
                            " AND state = 'active' ORDER BY lo NULLS FIRST", (database,)).fetchall()


def _rows(fleet, database="orders") -> tuple[int, int]:
    customers = orders = 0
    for _name, _lo, _hi, server, dbname in _shards(fleet, database):
        with fleet.connect(server, dbname) as conn:
            customers += conn.execute("SELECT count(*) FROM customers").fetchone()[0]
            orders += conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    return customers, orders


def _edit(fleet, old, new):
    text = fleet.read("fleet.yaml")
    assert old in text
    fleet.write("fleet.yaml", text.replace(old, new))


def test_a_shard_key_typo_on_a_database_with_rows_is_refused_naming_what_would_be_lost(with_rows):
    _edit(with_rows, "{column: customer_id, type: bigint}", "{column: customer, type: bigint}")
    plan = with_rows.cli("plan")
    assert plan.code == 1, plan.both
    assert "Traceback" not in plan.both
    assert ("fleet/fleet.yaml:16:5: error: changing the shard key of 'orders' from customer_id (bigint) to customer"
            " (bigint) replaces every shard would destroy 600 rows (orders/-40: ") in plan.err
    for shard in ("-40", "40-80", "80-c0", "c0-"):
        assert f"orders/{shard}: " in plan.err
    assert "if this is a typo, restore `shard_key: {column: customer_id, type: bigint}`" in plan.err
    # and the schema has no such column: what validate says too
    assert "fleet/schema/001_init.sql:3:1: error: table customers has no column customer, the shard key" in plan.err
    assert with_rows.cli("apply", "--auto-approve").code == 1
    assert _rows(with_rows) == (200, 400)


def test_removing_a_database_with_rows_needs_allow_destroy(with_rows):
    original = with_rows.read("fleet.yaml")
    with_rows.write("fleet.yaml", original.split("databases:")[0] + "databases: {}\n")
    refused = with_rows.cli("plan")
    assert refused.code == 1
    assert "database 'orders' is not in the configuration, and destroying it would destroy 600 rows" in refused.err
    assert "allow_destroy: {databases: [orders]}" in refused.err
    assert with_rows.cli("apply", "--auto-approve").code == 1
    assert _rows(with_rows) == (200, 400)

    with_rows.write("fleet.yaml", original.split("databases:")[0] + "databases: {}\nallow_destroy:\n"
                    "  databases: [orders]\n")
    plan = with_rows.cli("plan", "--detailed-exitcode")
    assert plan.code == 2, plan.both
    assert "# database.orders will be destroyed" in plan.out
    assert 'shard "-40"' in plan.out and " rows, " in plan.out and "MiB" in plan.out
    doc = json.loads(with_rows.cli("plan", "--format", "json").out)
    (action,) = doc["actions"]
    assert sum(h["rows"] for h in action["holdings"].values()) == 600
    # consent taken back after planning: the saved plan is refused
    assert with_rows.cli("plan", "-out", "destroy.plan").code == 0
    with_rows.write("fleet.yaml", original.split("databases:")[0] + "databases: {}\n")
    withdrawn = with_rows.cli("apply", "destroy.plan")
    assert withdrawn.code == 1 and "allow_destroy no longer names it" in withdrawn.err, withdrawn.both
    assert _rows(with_rows) == (200, 400)
    with_rows.write("fleet.yaml", original.split("databases:")[0] + "databases: {}\nallow_destroy:\n"
                    "  databases: [orders]\n")
    assert with_rows.cli("apply", "destroy.plan").code == 0
    assert not {"orders_min_40", "orders_80_c0"} & with_rows.databases("a")
    after = with_rows.cli("plan")
    assert "this plan destroys no rows of database orders; remove the acknowledgement" in after.out


def test_a_declared_rename_keeps_every_row(with_rows):
    before = {}
    for _name, _lo, _hi, server, dbname in active_shards(with_rows):
        with with_rows.connect(server, dbname) as conn:
            before[dbname] = conn.execute(
                "SELECT count(*), sum(hash_record_extended(c, 0)) FROM customers c").fetchone()
    _edit(with_rows, "databases:\n  orders:", "moved:\n  - {from: orders, to: sales}\ndatabases:\n  sales:")
    plan = with_rows.cli("plan", "--detailed-exitcode")
    assert plan.code == 2, plan.both
    assert "# database.sales will be updated in-place" in plan.out
    assert 'name = "orders" -> "sales"' in plan.out
    assert "Plan: 0 to add, 1 to change, 0 to destroy." in plan.out
    applied = with_rows.cli("apply", "--auto-approve")
    assert applied.code == 0, applied.both
    assert with_rows.cli("plan", "--detailed-exitcode").code == 0
    assert _rows(with_rows, "sales") == (200, 400)
    with with_rows.catalog() as conn:
        assert conn.execute("SELECT DISTINCT database FROM shardctl.shards").fetchall() == [("sales",)]
        routed = conn.execute("SELECT r.dbname FROM shardctl.route('sales', 42::bigint) r").fetchone()[0]
    after = {}
    for _name, _lo, _hi, server, dbname in _shards(with_rows, "sales"):
        with with_rows.connect(server, dbname) as conn:
            after[dbname] = conn.execute("SELECT count(*), sum(hash_record_extended(c, 0)) FROM customers c").fetchone()
    assert after == before and routed in after

    # a new database under the old name would adopt the renamed shards' databases: refused
    renamed = with_rows.read("fleet.yaml").replace("moved:\n  - {from: orders, to: sales}\n", "")
    with_rows.write("fleet.yaml", renamed + "  orders:\n"
                    "    shard_key: {column: customer_id, type: bigint}\n    schema: schema/001_init.sql\n"
                    "    shards: 4\n    placement: [a, b]\n")
    clash = with_rows.cli("plan")
    assert clash.code == 1
    assert "would create orders_min_40 on server a, which already exists (a shard of 'sales')" in clash.err
