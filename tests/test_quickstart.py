"""The quickstart, end to end on two real embedded servers: plan, apply, re-plan to no changes,
real shard databases with the declared tables, and a catalog that routes every key once."""

import json

from conftest import assert_golden

# the quickstart fleet's shards: (server, database)
SHARDS = [("a", "orders_min_40"), ("b", "orders_40_80"), ("a", "orders_80_c0"), ("b", "orders_c0_max")]


def test_apply_creates_every_shard_on_both_servers(applied_fleet):
    assert {"orders_min_40", "orders_80_c0", "shardctl"} <= applied_fleet.databases("a")
    assert {"orders_40_80", "orders_c0_max"} <= applied_fleet.databases("b")
    for server, dbname in SHARDS:
        with applied_fleet.connect(server, dbname) as conn:
            tables = {r[0] for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
            assert tables == {"customers", "orders"}
            pk = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                              " WHERE conname = 'orders_pkey'").fetchone()
            assert pk == ("PRIMARY KEY (customer_id, order_id)",)


def test_replan_after_apply_has_no_changes(applied_fleet):
    result = applied_fleet.cli("plan", "--detailed-exitcode")
    assert result.code == 0, result.both
    assert result.out.strip() == "No changes. Your fleet matches the configuration."


def test_every_key_routes_to_exactly_one_shard(applied_fleet):
    with applied_fleet.catalog() as conn:
        rows = conn.execute(
            "SELECT k, count(*), min(r.shard) FROM generate_series(-5000, 5000) k,"
            " LATERAL shardctl.route('orders', k::bigint) r GROUP BY k"
        ).fetchall()
        assert len(rows) == 10001 and all(count == 1 for _, count, _ in rows)
        by_shard: dict[str, int] = {}
        for _, _, shard in rows:
            by_shard[shard] = by_shard.get(shard, 0) + 1
        assert sorted(by_shard) == ["-40", "40-80", "80-c0", "c0-"]
        assert min(by_shard.values()) > 10001 / 4 * 0.85  # the hash spreads keys evenly
        # the route agrees with the shard's recorded range, checked independently in SQL
        mismatches = conn.execute(
            """SELECT count(*) FROM generate_series(1, 2000) k, LATERAL shardctl.route('orders', k::bigint) r
               JOIN shardctl.shards s ON s.database = 'orders' AND s.name = r.shard
               WHERE NOT ((s.lo IS NULL OR hashint8extended(k, 0) >= s.lo)
                      AND (s.hi IS NULL OR hashint8extended(k, 0) < s.hi))"""
        ).fetchone()[0]
        assert mismatches == 0


def test_routing_extremes_of_the_keyspace(applied_fleet):
    with applied_fleet.catalog() as conn:
        for key in (-(2**63), 2**63 - 1, 0):
            assert len(conn.execute("SELECT * FROM shardctl.route('orders', %s::bigint)", (key,)).fetchall()) == 1


def test_status_lists_servers_databases_and_shards(applied_fleet):
    result = applied_fleet.cli("status", "--json")
    assert result.code == 0, result.both
    report = json.loads(result.out)
    assert [s["state"] for s in report["servers"]] == ["running", "running"]
    (orders,) = report["databases"]
    assert [(s["name"], s["server"]) for s in orders["shards"]] == [
        ("-40", "a"), ("40-80", "b"), ("80-c0", "a"), ("c0-", "b")]
    text = applied_fleet.cli("status").out
    assert "orders/40-80" in text and "orders_c0_max" in text


def test_the_catalog_records_history_and_a_finished_journal(applied_fleet):
    with applied_fleet.catalog() as conn:
        assert conn.execute("SELECT event FROM shardctl.history").fetchall() == [("create_database",)]
        ops = conn.execute("SELECT kind, state FROM shardctl.operations").fetchall()
        assert ops == [("create_database", "done")]
        steps = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'begin'), count(*) FILTER (WHERE status = 'done')"
            " FROM shardctl.journal").fetchone()
        assert steps[0] == steps[1] == 10  # record, 4 x (create, schema), activate


def test_first_plan_renders_as_golden_text_markdown_and_json(fleet):
    text = fleet.cli("plan")
    assert text.code == 0, text.both
    assert_golden("create_orders.txt", text.out)
    assert_golden("create_orders.md", fleet.cli("plan", "--format", "markdown").out)
    assert_golden("create_orders.json", fleet.cli("plan", "--format", "json").out)
    assert "Starting embedded server a..." in text.err
