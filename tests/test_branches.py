"""Branches on real servers: schema-only, sampled and full copies of a 4-shard database in one
database each, never writing to the parent; expiry and removal."""

import threading

import pytest

from conftest import wait_until
from engine.servers.embedded import EmbeddedServer
from movers import Writer, active_shards, all_rows, preload

BRANCHES = """
branches:
  dev_full:
    from: orders
    data: full
    server: b
  dev_sample:
    from: orders
    data: sample
    sample_percent: 10
    server: b
  dev_schema:
    from: orders
    server: a
"""


def _sums(conn, table):
    return conn.execute(f"SELECT count(*), coalesce(sum(hash_record_extended(t, 0)), 0) FROM {table} t").fetchone()


def _parent_sums(fleet, table):
    count = total = 0
    for _name, _lo, _hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            c, t = _sums(conn, table)
            count, total = count + c, total + t
    return count, total


@pytest.fixture
def parent(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=8000)
    for _name, _lo, _hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            conn.execute("INSERT INTO orders (customer_id, order_id, amount)"
                         " SELECT customer_id, k, k * 1.5 FROM customers, generate_series(1, 2) k")
    return fleet


def test_schema_sample_and_full_branches(parent):
    before = {t: _parent_sums(parent, t) for t in ("customers", "orders")}
    parent.write("fleet.yaml", parent.read("fleet.yaml") + BRANCHES)
    plan = parent.cli("plan")
    assert "Plan: 3 to add, 0 to change, 0 to destroy. (3 branches to create)" in plan.out
    applied = parent.cli("apply", "--auto-approve")
    assert applied.code == 0, applied.both

    with parent.connect("b", "branch_dev_full") as conn:  # exactly the union of the shards' rows
        for table in ("customers", "orders"):
            assert _sums(conn, table) == before[table]
        fks = conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f'").fetchone()[0]
        assert fks == 1
    with parent.connect("b", "branch_dev_sample") as conn:
        customers = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
        assert 0.07 * 8000 < customers < 0.13 * 8000
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 2 * customers
        assert conn.execute("SELECT count(*) FROM orders o LEFT JOIN customers c USING (customer_id)"
                            " WHERE c.customer_id IS NULL").fetchone() == (0,)
        assert conn.execute("SELECT convalidated FROM pg_constraint WHERE contype = 'f'").fetchone() == (True,)
    with parent.connect("a", "branch_dev_schema") as conn:
        assert _sums(conn, "customers") == (0, 0)
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_placed_at'").fetchone() == (1,)
        assert conn.execute("SELECT to_regclass('_shardctl.schema_steps')").fetchone() == (None,)

    assert {t: _parent_sums(parent, t) for t in ("customers", "orders")} == before  # the parent is untouched
    listing = parent.cli("branches")
    assert "dev_sample" in listing.out and "sample 10%" in listing.out and "password" not in listing.out
    assert parent.cli("plan", "--detailed-exitcode").code == 0


def test_an_expired_branch_is_deleted_and_not_made_again(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + "branches:\n  brief:\n    from: orders\n"
                 "    server: a\n    ttl: 2s\n")
    assert parent.cli("apply", "--auto-approve").code == 0
    assert "branch_brief" in parent.databases("a")

    def expired_plan():
        plan = parent.cli("plan")
        return plan if plan.code == 0 and "# branch.brief will be destroyed" in plan.out else None

    plan = wait_until(expired_plan, "the plan to see the 2s ttl run out", timeout=60, every=0.5)
    assert "its ttl ran out at" in plan.out
    assert parent.cli("apply", "--auto-approve").code == 0
    assert "branch_brief" not in parent.databases("a")
    again = parent.cli("plan", "--detailed-exitcode")
    assert again.code == 0 and "branch.brief: expired at" in again.out


def test_a_branch_removed_from_the_yaml_is_deleted(parent):
    original = parent.read("fleet.yaml")
    parent.write("fleet.yaml", original + "branches:\n  gone:\n    from: orders\n    server: b\n")
    assert parent.cli("apply", "--auto-approve").code == 0
    parent.write("fleet.yaml", original)
    plan = parent.cli("plan")
    assert "# branch.gone will be destroyed" in plan.out and "branch gone is not in the configuration" in plan.out
    assert parent.cli("apply", "--auto-approve").code == 0
    assert "branch_gone" not in parent.databases("b")


def test_a_branch_schema_change_merges_into_every_shard(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + "branches:\n  feat:\n    from: orders\n    server: b\n"
                 "    merge_schema: true\n")
    assert parent.cli("apply", "--auto-approve").code == 0
    assert parent.cli("plan", "--detailed-exitcode").code == 0  # nothing changed on the branch yet
    with parent.connect("b", "branch_feat") as conn:
        conn.execute("ALTER TABLE orders ADD COLUMN note text")
        conn.execute("CREATE INDEX orders_note ON orders (note)")
    plan = parent.cli("plan")
    assert "# branch.feat.schema will be updated in-place" in plan.out
    assert 'ALTER TABLE "public"."orders" ADD COLUMN "note" text;' in plan.out
    assert "lint (warning): index built without CONCURRENTLY" in plan.out
    md = parent.cli("plan", "--format", "markdown").out
    assert "lint (warning): index built without CONCURRENTLY" in md
    doc = __import__("json").loads(parent.cli("plan", "--format", "json").out)
    assert doc["actions"][0]["findings"][0][0] == "warning"
    assert parent.cli("apply", "--auto-approve").code == 0
    for _name, _lo, _hi, server, dbname in active_shards(parent):
        with parent.connect(server, dbname) as conn:
            assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_note'").fetchone() == (1,)
    assert parent.cli("plan", "--detailed-exitcode").code == 0  # every shard now equals the branch

    # a shard dropped by hand afterwards comes back with the merged step too, not only the YAML's
    (_name, _lo, _hi, server, dbname), *_ = active_shards(parent)
    with parent.connect(server) as conn:
        conn.execute(f'DROP DATABASE "{dbname}" WITH (FORCE)')
    recreated = parent.cli("apply", "--auto-approve")
    assert recreated.code == 0, recreated.both
    with parent.connect(server, dbname) as conn:
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_note'").fetchone() == (1,)
        assert [r[0] for r in conn.execute("SELECT name FROM _shardctl.schema_steps ORDER BY seq")][-1] \
            .startswith("branch:feat")
    assert parent.cli("plan", "--detailed-exitcode").code == 0  # no drift: its schema equals the others'


def test_a_schema_merge_is_refused_when_a_shard_drifted_or_it_drops_data(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + "branches:\n  feat:\n    from: orders\n    server: b\n"
                 "    merge_schema: true\n")
    assert parent.cli("apply", "--auto-approve").code == 0
    with parent.connect("b", "branch_feat") as conn:
        conn.execute("ALTER TABLE customers DROP COLUMN created_at")
    plan = parent.cli("plan", "--detailed-exitcode")
    assert plan.code == 0
    assert "schema merge refused: drops a column and its data" in plan.out
    assert "set allow_destructive: true" in plan.out
    with parent.connect("a", "orders_80_c0") as conn:  # a hotfix on one shard since the branch was made
        conn.execute("CREATE INDEX hotfix ON customers (name)")
    destructive = parent.read("fleet.yaml").replace("    merge_schema: true\n",
                                                    "    merge_schema: true\n    allow_destructive: true\n")
    parent.write("fleet.yaml", destructive)
    plan = parent.cli("plan")
    assert "schema merge refused: orders/80-c0 no longer match the schema the branch was made from" in plan.out


def _log_lock_waits(fleet) -> dict:
    """Every lock wait longer than 10 ms goes to the servers' logs from now on; returns where
    each log ends now, to read only what comes after."""
    ends = {}
    for server in ("a", "b"):
        with fleet.connect(server) as conn:
            conn.execute("ALTER SYSTEM SET log_lock_waits = on")
            conn.execute("ALTER SYSTEM SET deadlock_timeout = '10ms'")
            conn.execute("SELECT pg_reload_conf()")
        log = EmbeddedServer(server, fleet.path / ".shardctl" / "servers" / server).log_file
        ends[server] = (log, log.stat().st_size)

    def reloaded() -> bool:  # a new session sees the reloaded settings
        for server in ("a", "b"):
            with fleet.connect(server) as conn:
                if conn.execute("SELECT current_setting('log_lock_waits'), current_setting('deadlock_timeout')"
                                ).fetchone() != ("on", "10ms"):
                    return False
        return True

    wait_until(reloaded, "the servers to reload log_lock_waits")
    return ends


def _logged_since(ends: dict) -> str:
    text = ""
    for log, offset in ends.values():
        with log.open(errors="replace") as f:
            f.seek(offset)
            text += f.read()
    return text


def test_writers_never_wait_while_a_full_branch_is_made_and_reset(parent):
    ends = _log_lock_waits(parent)
    # the check itself works: a writer held by a table lock for 200 ms is logged
    (_name, _lo, _hi, server, dbname), *_ = active_shards(parent)
    with parent.connect(server, dbname) as locker, parent.connect(server, dbname) as blocked:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
        waiter = threading.Thread(target=lambda: blocked.execute("UPDATE customers SET name = name WHERE false"))
        waiter.start()
        wait_until(lambda: "still waiting for" in _logged_since(ends), "the held writer to be logged")
        locker.execute("COMMIT")
        waiter.join()

    ends = _log_lock_waits(parent)
    before, _ = all_rows(parent)
    catalog = EmbeddedServer("a", parent.path / ".shardctl" / "servers" / "a").conninfo("shardctl")
    writer = Writer(catalog, start_id=max(before) + 1_000_000)
    writer.start({})  # its own rows only: the parent's customers have orders referencing them
    try:
        parent.write("fleet.yaml", parent.read("fleet.yaml") + BRANCHES.split("  dev_sample:")[0])
        applied = parent.cli("apply", "--auto-approve")
        reset = parent.cli("branches", "reset", "dev_full")  # a reset reads the parent the same way
        writer.goes_on()  # and the writer goes on after it
    finally:
        writer.stop()
    assert applied.code == 0, applied.both
    assert reset.code == 0 and "Reset complete" in reset.out, reset.both
    assert "branch_dev_full" in parent.databases("b")
    assert writer.errors == [] and writer.writes > 50
    waits = [line for line in _logged_since(ends).splitlines() if "still waiting for" in line]
    assert waits == []  # no writer (nor anything else) waited 10 ms for a lock on any server
    rows, problems = all_rows(parent)
    assert problems == [] and rows == {**before, **writer.expected}
