"""A branch's creation, reset and schema merge are journaled steps, as moves are: an apply
killed (SIGKILL, no cleanup) at any step is shown by status, plan and drift until a rerun
converges or `shardctl abort` cleans up; resets keep the branch's name, connection string and
expiry; a branch without a declared ttl says so in the plan."""

import json

import pytest

from conftest import every_step
from engine.catalog.journal import FAILPOINT_ENV
from movers import active_shards, preload

BRANCH = "branches:\n  dev:\n    from: orders\n    data: full\n    server: b\n"


@pytest.fixture
def parent(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=3000)
    return fleet


def _grow(fleet, customers: int) -> None:
    """The parent moves on: customers up to N, each on the shard that owns it."""
    for _name, lo, hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            conn.execute(
                "INSERT INTO customers (customer_id, name) SELECT g, 'c' || g FROM generate_series(1, %s) g"
                " WHERE (%s::bigint IS NULL OR hashint8extended(g::bigint, 0) >= %s)"
                " AND (%s::bigint IS NULL OR hashint8extended(g::bigint, 0) < %s) ON CONFLICT DO NOTHING",
                (customers, lo, lo, hi, hi))


def _parent_rows(fleet) -> set[tuple]:
    rows = set()
    for _name, _lo, _hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            rows |= set(conn.execute("SELECT customer_id, name FROM customers").fetchall())
    return rows


def _branch_rows(fleet, server="b", dbname="branch_dev") -> set[tuple]:
    with fleet.connect(server, dbname) as conn:
        return set(conn.execute("SELECT customer_id, name FROM customers").fetchall())


def _running(fleet) -> list[tuple]:
    with fleet.catalog() as conn:
        return conn.execute("SELECT id, kind FROM shardctl.operations WHERE state = 'running'").fetchall()


def _unfinished_is_shown(fleet, step: str, text: str) -> int:
    """status names the interrupted operation at its step; plan and drift show the branch."""
    (op,) = json.loads(fleet.cli("status", "--json").out)["interrupted"]
    assert op["last_step"] == step and op["address"] == "branch.dev", op
    plan = fleet.cli("plan", "--detailed-exitcode")
    assert plan.code == 2, plan.both
    assert "branch.dev" in plan.out and text in plan.out and f"operation {op['id']}" in plan.out, plan.out
    drift = json.loads(fleet.cli("drift", "--format", "json").out)
    assert drift["status"] == "drifted" and [f["address"] for f in drift["interrupted"]] == ["branch.dev"]
    return op["id"]


CREATION_STEPS = ["record", "database", "pre-data", "data", "post-data", "activate"]


@pytest.mark.parametrize("step", every_step(CREATION_STEPS, always="data"))
def test_a_branch_creation_killed_at_each_step_is_shown_then_rebuilt(parent, step):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + BRANCH)
    killed = parent.cli("apply", "--auto-approve", env={FAILPOINT_ENV: f"{step} dev"})
    assert killed.code == -9, killed.both
    _unfinished_is_shown(parent, f"{step} dev", "did not finish building branch dev")

    resumed = parent.cli("apply", "--auto-approve")
    assert resumed.code == 0, resumed.both
    assert _branch_rows(parent) == _parent_rows(parent)
    with parent.connect("b", "branch_dev") as conn:  # post-data ran once: two primary keys, one foreign key
        assert conn.execute("SELECT count(*) FROM pg_constraint WHERE contype IN ('p', 'f')"
                            " AND connamespace = 'public'::regnamespace").fetchone() == (3,)
    assert _running(parent) == []
    assert parent.cli("plan", "--detailed-exitcode").code == 0
    assert json.loads(parent.cli("drift", "--format", "json").out)["status"] == "ok"


def test_abort_drops_a_half_built_branch_and_plan_creates_it_afresh(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + BRANCH)
    assert parent.cli("apply", "--auto-approve", env={FAILPOINT_ENV: "post-data dev"}).code == -9
    assert "branch_dev" in parent.databases("b")
    op = _unfinished_is_shown(parent, "post-data dev", "did not finish building branch dev")
    aborted = parent.cli("abort", str(op))
    assert aborted.code == 0, aborted.both
    assert f"Operation {op} aborted" in aborted.out
    assert "branch_dev" not in parent.databases("b") and _running(parent) == []
    with parent.catalog() as conn:
        assert conn.execute("SELECT count(*) FROM shardctl.branches").fetchone() == (0,)
        assert conn.execute("SELECT state FROM shardctl.operations WHERE id = %s", (op,)).fetchone() == ("aborted",)
    plan = parent.cli("plan")
    assert "# branch.dev will be created" in plan.out and "does not exist yet" in plan.out


def test_a_half_built_branch_removed_from_the_yaml_is_deleted_without_consent(parent):
    original = parent.read("fleet.yaml")
    parent.write("fleet.yaml", original + BRANCH)
    assert parent.cli("apply", "--auto-approve", env={FAILPOINT_ENV: "post-data dev"}).code == -9
    parent.write("fleet.yaml", original)
    plan = parent.cli("plan")
    assert plan.code == 0, plan.both  # no allow_destroy needed: a half-built copy holds no one's work
    assert "# branch.dev will be destroyed" in plan.out and "left half-built" in plan.out
    assert parent.cli("apply", "--auto-approve").code == 0
    assert "branch_dev" not in parent.databases("b") and _running(parent) == []
    assert parent.cli("plan", "--detailed-exitcode").code == 0


def test_a_branch_without_a_ttl_says_it_gets_the_default(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + BRANCH + "  kept:\n    from: orders\n    server: a\n"
                 "    ttl: 2d\n")
    plan = parent.cli("plan").out
    assert "ttl       = 7 days (the default: no ttl declared)" in plan
    assert "ttl       = 2 days\n" in plan


MERGE_BRANCH = "branches:\n  feat:\n    from: orders\n    server: b\n    merge_schema: true\n"


def _merged_everywhere(fleet) -> None:
    for _name, _lo, _hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_note'").fetchone() == (1,)
            assert conn.execute("SELECT count(*) FROM _shardctl.schema_steps WHERE name LIKE 'branch:feat:%'"
                                ).fetchone() == (1,)
    with fleet.catalog() as conn:
        assert conn.execute("SELECT count(*) FROM shardctl.schema_steps WHERE name LIKE 'branch:feat:%'"
                            ).fetchone() == (1,)


MERGE_STEPS = ["schema orders/-40", "schema orders/80-c0", "record feat schema"]


@pytest.mark.parametrize("step", every_step(MERGE_STEPS, always="schema orders/80-c0"))
def test_a_schema_merge_killed_at_each_step_resumes_and_converges(parent, step):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + MERGE_BRANCH)
    assert parent.cli("apply", "--auto-approve").code == 0
    with parent.connect("b", "branch_feat") as conn:
        conn.execute("ALTER TABLE orders ADD COLUMN note text")
        conn.execute("CREATE INDEX orders_note ON orders (note)")
    killed = parent.cli("apply", "--auto-approve", env={FAILPOINT_ENV: step})
    assert killed.code == -9, killed.both
    (op,) = json.loads(parent.cli("status", "--json").out)["interrupted"]
    assert op["last_step"] == step and op["address"] == "branch.feat.schema"
    plan = parent.cli("plan", "--detailed-exitcode")
    assert plan.code == 2, plan.both
    assert f"operation {op['id']} was interrupted at step '{step}'" in plan.out
    assert "schema merge refused" not in plan.out  # the shards that ran it are not taken for drift
    refused = parent.cli("abort", str(op["id"]))
    assert refused.code == 1 and "cannot be aborted" in refused.err and "shardctl apply" in refused.err

    resumed = parent.cli("apply", "--auto-approve")
    assert resumed.code == 0, resumed.both
    _merged_everywhere(parent)
    assert _running(parent) == []
    assert parent.cli("plan", "--detailed-exitcode").code == 0


def _expiry(fleet, name="dev"):
    with fleet.catalog() as conn:
        return conn.execute("SELECT expires_at, dbname, server FROM shardctl.branches WHERE name = %s",
                            (name,)).fetchone()


def test_a_declared_reset_remakes_the_branch_from_the_parent_now(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + BRANCH + "    reset: 1\n")
    assert parent.cli("apply", "--auto-approve").code == 0
    assert parent.cli("plan", "--detailed-exitcode").code == 0  # the first value resets nothing
    before = _expiry(parent)
    with parent.connect("b", "branch_dev") as conn:  # the branch's own work, which a reset replaces
        conn.execute("INSERT INTO customers (customer_id, name) VALUES (-1, 'branch only')")
        conn.execute("ALTER TABLE customers ADD COLUMN scratch text")
    _grow(parent, 3500)  # the parent moved on
    parent.write("fleet.yaml", parent.read("fleet.yaml").replace("    reset: 1\n", "    reset: 2\n"))
    plan = parent.cli("plan")
    assert "# branch.dev will be reset" in plan.out and "reset value changed (1 -> 2)" in plan.out, plan.out
    assert "Plan: 0 to add, 1 to change, 0 to destroy. (1 branch to reset)" in plan.out
    applied = parent.cli("apply", "--auto-approve")
    assert applied.code == 0, applied.both
    assert _branch_rows(parent) == _parent_rows(parent) and len(_parent_rows(parent)) == 3500
    with parent.connect("b", "branch_dev") as conn:
        assert conn.execute("SELECT count(*) FROM information_schema.columns WHERE column_name = 'scratch'"
                            ).fetchone() == (0,)
    assert _expiry(parent) == before  # same expiry, database and server: the same connection string
    assert parent.cli("plan", "--detailed-exitcode").code == 0


@pytest.mark.parametrize("step", every_step(["reset", "database", "data", "activate"], always="data"))
def test_a_reset_killed_at_each_step_is_shown_then_finished(parent, step):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + BRANCH)
    assert parent.cli("apply", "--auto-approve").code == 0
    before = _expiry(parent)
    _grow(parent, 3300)
    killed = parent.cli("branches", "reset", "dev", env={FAILPOINT_ENV: f"{step} dev"})
    assert killed.code == -9, killed.both
    _unfinished_is_shown(parent, f"{step} dev", "was interrupted while resetting branch dev")
    resumed = parent.cli("apply", "--auto-approve")
    assert resumed.code == 0, resumed.both
    assert _branch_rows(parent) == _parent_rows(parent) and len(_parent_rows(parent)) == 3300
    assert _expiry(parent) == before and _running(parent) == []
    assert parent.cli("plan", "--detailed-exitcode").code == 0


def test_branches_reset_command_and_an_abort_before_the_reset_touched_anything(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + BRANCH)
    assert parent.cli("apply", "--auto-approve").code == 0
    with parent.connect("b", "branch_dev") as conn:
        conn.execute("INSERT INTO customers (customer_id, name) VALUES (-1, 'branch only')")
    assert parent.cli("branches", "reset", "dev", env={FAILPOINT_ENV: "reset dev"}).code == -9
    (op,) = json.loads(parent.cli("status", "--json").out)["interrupted"]
    aborted = parent.cli("abort", str(op["id"]))
    assert aborted.code == 0 and "it keeps its data" in aborted.out, aborted.both
    assert (-1, "branch only") in _branch_rows(parent)  # called off before anything was dropped
    assert parent.cli("plan", "--detailed-exitcode").code == 0

    reset = parent.cli("branches", "reset", "dev")
    assert reset.code == 0, reset.both
    assert "Reset complete" in reset.out
    assert _branch_rows(parent) == _parent_rows(parent)
    missing = parent.cli("branches", "reset", "nope")
    assert missing.code == 1 and "there is no branch 'nope'" in missing.err and "dev" in missing.err
    assert "Traceback" not in missing.err
    assert parent.cli("branches", "--json").code == 0
