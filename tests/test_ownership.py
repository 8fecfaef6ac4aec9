"""No name or file makes shardctl destroy what it does not own (issue 26, items 1 and 2): two
declarations that would make one database are refused at validate with both lines; a database
that exists on a server and that shardctl did not create is refused at plan and never dropped,
reused or replaced at apply, whatever the action kind (the catalog above all). Every refusal
leaves every server, the catalog included, as it was."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from engine.catalog.journal import FAILPOINT_ENV
from movers import preload
from untouched import catalog_intact, server_state

CATALOG_AS_BRANCH = "catalog: {server: a, database: branch_dev}\n"
BRANCH = "branches:\n  dev:\n    from: orders\n    data: {data}\n    server: {server}\n"


def _branch(fleet, data: str = "schema", server: str = "a") -> None:
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + BRANCH.format(data=data, server=server))


def _by_hand(fleet, server: str, dbname: str) -> None:
    """A database someone made, with rows of their own."""
    with fleet.connect(server) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    with fleet.connect(server, dbname) as conn:
        conn.execute("CREATE TABLE precious (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO precious SELECT g, 'keep me ' || g FROM generate_series(1, 100) g")


def _still_there(fleet, server: str, dbname: str) -> None:
    with fleet.connect(server, dbname) as conn:
        assert conn.execute("SELECT count(*) FROM precious").fetchone() == (100,)


def _refused_cleanly(result, *texts: str) -> None:
    assert result.code == 1, result.both
    assert "Traceback" not in result.both and "This is a bug" not in result.both
    for text in texts:
        assert text in result.err, result.err


# ---------------------------------------------------------------------------- item 1: the catalog


@pytest.mark.parametrize("catalog, data", [
    (CATALOG_AS_BRANCH, "schema"),
    ("catalog: {database: branch_dev}\n", "full"),  # the catalog's server by default: a, the branch's too
    (CATALOG_AS_BRANCH, "replica"),
])
def test_a_branch_named_like_the_catalog_is_refused_at_validate_with_both_lines(fleet, catalog, data):
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + catalog + BRANCH.format(data=data, server="a"))
    for command in ("validate", "plan", "apply"):
        result = fleet.cli(command, *(["--auto-approve"] if command == "apply" else []))
        _refused_cleanly(result, "fleet/fleet.yaml:23:3: error: branch 'dev' would be database branch_dev on server a,"
                                 " which is the control database (declared at fleet/fleet.yaml:21:")
    assert not (fleet.path / ".shardctl").exists()  # refused before any server was started


def test_a_branch_declared_beside_an_applied_catalog_of_its_name_never_reaches_it(fleet):
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + CATALOG_AS_BRANCH)
    assert fleet.cli("apply", "--auto-approve").code == 0
    before = server_state(fleet, ("a", "b"))
    valid = fleet.read("fleet.yaml")
    _branch(fleet)
    for command in ("plan", "apply"):
        result = fleet.cli(command, *(["--auto-approve"] if command == "apply" else []))
        _refused_cleanly(result, "branch 'dev' would be database branch_dev on server a, which is the control database")
    assert server_state(fleet) == before
    with fleet.connect("a", "branch_dev") as conn:  # the catalog, with every shard's route
        assert conn.execute("SELECT count(*) FROM shardctl.shards WHERE state = 'active'").fetchone() == (4,)
    fleet.write("fleet.yaml", valid)  # so that `down` at teardown can read it and stop the servers


def test_apply_never_drops_or_reuses_the_catalog_whatever_an_action_names(fleet):
    """The executors' own guard, below the planner's: a plan hand-edited to drop the catalog, or
    to build a branch in it, is refused at the database and the catalog stays whole."""
    assert fleet.cli("apply", "--auto-approve").code == 0
    _branch(fleet)
    assert fleet.cli("plan", "-out", "dev.plan").code == 0
    plan = json.loads((fleet.base / "dev.plan").read_text())
    plan["actions"][0]["dbname"] = "shardctl"  # the branch's database: the catalog's name
    (fleet.base / "edited.plan").write_text(json.dumps(plan))
    before = server_state(fleet)
    result = fleet.cli("apply", "edited.plan")
    _refused_cleanly(result, "database shardctl on server a exists, and shardctl did not create it:"
                             " it will not drop it")
    after = server_state(fleet)
    for server in ("a", "b"):
        assert set(after[server]) == set(before[server])
        for name in set(after[server]) - {"shardctl"}:
            assert after[server][name] == before[server][name]
    with fleet.catalog() as conn:  # still the catalog: its routes, its serial
        assert conn.execute("SELECT count(*) FROM shardctl.shards WHERE state = 'active'").fetchone() == (4,)


# ---------------------------------------------------------------------------- item 2: made by hand


@pytest.fixture
def applied(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    return fleet


@pytest.mark.parametrize("data", ["schema", "replica"])
def test_a_branch_over_a_database_made_by_hand_is_refused_and_the_database_kept(applied, data):
    _by_hand(applied, "b", "branch_dev")
    before = server_state(applied)
    _branch(applied, data=data, server="b")
    for command in ("plan", "apply"):
        result = applied.cli(command, *(["--auto-approve"] if command == "apply" else []))
        _refused_cleanly(result, "branch 'dev' would create branch_dev on server b, which already exists"
                                 " (a database shardctl does not manage)")
    _still_there(applied, "b", "branch_dev")
    assert server_state(applied) == before
    catalog_intact(applied, before)


def test_a_split_onto_a_database_made_by_hand_is_refused(applied):
    _by_hand(applied, "a", "orders_40_60")
    before = server_state(applied)
    for command in ("plan", "apply"):
        result = applied.cli(command, "-split", "orders/40-80", *(["--auto-approve"] if command == "apply" else []))
        _refused_cleanly(result, "shard.orders/40-80 would create orders_40_60 on server a, which already exists"
                                 " (a database shardctl does not manage)", "shardctl never replaces a database")
    _still_there(applied, "a", "orders_40_60")
    assert server_state(applied) == before


def test_a_branch_build_resumed_over_a_database_made_meanwhile_is_refused_at_the_database(applied):
    """The executor's guard: the plan saw nothing (the build had begun), the database appeared
    between the killed try and the rerun; neither apply nor abort drops it."""
    _branch(applied, server="b")
    killed = applied.cli("apply", "--auto-approve", env={FAILPOINT_ENV: "database dev"})
    assert killed.code == -9, killed.both
    _by_hand(applied, "b", "branch_dev")
    before = server_state(applied)
    result = applied.cli("apply", "--auto-approve")
    _refused_cleanly(result, "database branch_dev on server b exists, and shardctl did not create it:"
                             " it will not drop it")
    (op,) = json.loads(applied.cli("status", "--json").out)["interrupted"]
    result = applied.cli("abort", str(op["id"]))
    _refused_cleanly(result, "it will not drop it")
    _still_there(applied, "b", "branch_dev")
    after = server_state(applied)
    assert {s: {n: t for n, t in d.items() if n != "shardctl"} for s, d in after.items()} == \
        {s: {n: t for n, t in d.items() if n != "shardctl"} for s, d in before.items()}


def test_a_move_resumed_over_a_target_made_meanwhile_never_reuses_it(applied):
    preload(applied, customers=500)
    assert applied.cli("plan", "-split", "orders/40-80", "-out", "split.plan").code == 0
    target = json.loads((applied.base / "split.plan").read_text())["actions"][0]["targets"][0]
    killed = applied.cli("apply", "split.plan", env={FAILPOINT_ENV: "split orders/40-80: targets"})
    assert killed.code == -9, killed.both
    _by_hand(applied, target["server"], target["dbname"])
    result = applied.cli("apply", "--auto-approve")
    _refused_cleanly(result, f"database {target['dbname']} on server {target['server']} exists, and shardctl did not"
                             " create it: it will not reuse or replace it")
    _still_there(applied, target["server"], target["dbname"])
    with applied.connect(target["server"], target["dbname"]) as conn:  # no schema step ran in it
        assert conn.execute("SELECT to_regclass('customers')").fetchone() == (None,)


def test_a_destroy_never_drops_a_shard_database_replaced_by_hand(applied):
    with applied.connect("a") as conn:
        conn.execute('DROP DATABASE "orders_min_40" WITH (FORCE)')
    _by_hand(applied, "a", "orders_min_40")  # same name, someone else's database now
    applied.write("fleet.yaml", applied.read("fleet.yaml").split("databases:")[0]
                  + "allow_destroy:\n  databases: [orders]\n")
    result = applied.cli("apply", "--auto-approve")
    _refused_cleanly(result, "database orders_min_40 on server a exists, and shardctl did not create it:"
                             " it will not drop it")
    _still_there(applied, "a", "orders_min_40")


def test_a_validate_time_clash_is_told_with_both_lines_without_any_server(tmp_path):
    (tmp_path / "fleet.yaml").write_text(
        "servers:\n  a: {embedded: true}\n  b: {embedded: true}\n"
        "catalog: {server: b, database: branch_dev}\n"
        "databases:\n  orders:\n    shard_key: {column: id, type: bigint}\n"
        "    schema: {name: init, sql: \"CREATE TABLE t (id bigint PRIMARY KEY);\"}\n    placement: [a]\n"
        "branches:\n  dev: {from: orders, server: a}\n  dev2: {from: orders, server: b}\n")
    result = run_cli("-C", ".", "validate", cwd=tmp_path)
    # dev lives on a: no clash with the catalog on b; dev2 would be branch_dev2, no clash either
    assert result.code == 0, result.both
    (tmp_path / "fleet.yaml").write_text((tmp_path / "fleet.yaml").read_text().replace("server: a}", "server: b}"))
    result = run_cli("-C", ".", "validate", cwd=tmp_path)
    _refused_cleanly(result, "fleet.yaml:11:3: error: branch 'dev' would be database branch_dev on server b, which is"
                             " the control database (declared at fleet.yaml:4:32)")
    assert not (tmp_path / ".shardctl").exists()
