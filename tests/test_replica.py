"""`data: replica` on real servers: one read-only database holding every row of a 4-shard
database, copied and then kept current by logical replication from each shard while a writer
inserts, updates and deletes through routing; it follows its parent through splits, merges and
moves (also when the apply is killed at any of their steps); reset and deletion leave no slot or
publication behind on the shards."""

import json
import time
from datetime import UTC, datetime

import pytest

import test_branches
from conftest import every_step, wait_until
from engine.catalog.journal import FAILPOINT_ENV
from engine.observe.replica_links import link_name
from engine.servers.embedded import EmbeddedServer
from engine.snapshot import BranchLinkView
from engine.watch.prometheus import exposition
from engine.watch.view import Snapshot, View
from movers import Writer, active_shards, all_rows
from test_branches import _log_lock_waits, _logged_since, _parent_sums, _sums

parent = test_branches.parent  # the same 4-shard parent with customers and their orders

REPLICA = "branches:\n  mirror:\n    from: orders\n    data: replica\n    server: b\n"


def _links(fleet) -> list[tuple[str, str]]:
    """Our slots and publications on every shard: (shard dbname, object)."""
    out = []
    for _name, _lo, _hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            out += [(dbname, f"slot {r[0]}") for r in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'shardctl_rep_%%'"
                " AND database = current_database()")]
            out += [(dbname, f"publication {r[0]}") for r in conn.execute(
                "SELECT pubname FROM pg_publication WHERE pubname LIKE 'shardctl_rep_%%'")]
    return out


def _writer_waits(log: str) -> list[str]:
    """Lock waits of anything but the making of a replication slot: a new logical slot waits for
    the transactions running at that moment to end (that is how it finds a consistent start),
    and nobody waits for it."""
    lines = log.splitlines()
    out = []
    for index, line in enumerate(lines):
        if "still waiting for" in line:
            pid = line.split("[", 1)[1].split("]", 1)[0]
            statement = next((later for later in lines[index + 1:index + 4]
                              if f"[{pid}] STATEMENT:" in later), "")
            if "REPLICATION_SLOT" not in statement and "pg_create_logical_replication_slot" not in statement:
                out.append(line + " " + statement)
    return out


def _caught_up(fleet, tables=("customers", "orders"), timeout: float = 60.0) -> dict:
    """The replica's sums once they equal the parent's (the parent is quiet by then)."""
    want = {t: _parent_sums(fleet, t) for t in tables}
    deadline = time.monotonic() + timeout
    while True:
        with fleet.connect("b", "branch_mirror") as conn:
            got = {t: _sums(conn, t) for t in tables}
        if got == want or time.monotonic() > deadline:
            return {"replica": got, "parent": want}
        time.sleep(0.2)


def test_a_replica_copies_every_shard_and_follows_writes_without_making_writers_wait(parent):
    ends = _log_lock_waits(parent)
    before, _ = all_rows(parent)
    catalog = EmbeddedServer("a", parent.path / ".shardctl" / "servers" / "a").conninfo("shardctl")
    writer = Writer(catalog, start_id=max(before) + 1_000_000)
    writer.start({})
    try:
        parent.write("fleet.yaml", parent.read("fleet.yaml") + REPLICA)
        plan = parent.cli("plan")
        assert "branch.mirror will be created" in plan.out, plan.both
        applied = parent.cli("apply", "--auto-approve")
        writer.goes_on()  # writes after the initial copy, streamed
    finally:
        writer.stop()
    assert applied.code == 0, applied.both
    assert "replica in sync with 4 shards" in applied.out
    assert writer.errors == [] and writer.writes > 50
    assert _writer_waits(_logged_since(ends)) == []

    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"]
    rows, problems = all_rows(parent)
    assert problems == [] and rows == {**before, **writer.expected}
    with parent.connect("b", "branch_mirror") as conn:
        assert dict(conn.execute("SELECT customer_id, name FROM customers").fetchall()) == rows
        with pytest.raises(Exception, match="read-only transaction"):
            conn.execute("INSERT INTO customers (customer_id, name) VALUES (-1, 'no')")
    assert len([x for x in _links(parent) if x[1].startswith("slot")]) == 4
    assert parent.cli("plan", "--detailed-exitcode").code == 0

    # its lag: per shard link and the worst, in status (text and JSON)
    (replica,) = json.loads(parent.cli("status", "--json").out)["replicas"]
    assert replica["branch"] == "mirror" and replica["missing"] == []
    assert [link["state"] for link in replica["links"]] == ["ok"] * 4
    assert all(link["lag_bytes"] is not None and link["lag_bytes"] >= 0 for link in replica["links"])
    assert replica["max_lag_bytes"] == max(link["lag_bytes"] for link in replica["links"])
    status = parent.cli("status").out
    assert "Replica mirror (of orders, on b): lag" in status and "bytes behind" in status

    # reset: rebuilt from the parent's current data, the old links replaced by new ones
    (_name, _lo, _hi, server, dbname), *_ = active_shards(parent)
    with parent.connect(server, dbname) as conn:
        conn.execute("DELETE FROM orders WHERE customer_id IN (SELECT customer_id FROM customers LIMIT 10)")
    reset = parent.cli("branches", "reset", "mirror")
    assert reset.code == 0 and "Reset complete" in reset.out, reset.both
    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"]
    assert len(_links(parent)) == 8  # a slot and a publication per shard, no more

    # a link dropped outside shardctl is drift, and status says the replica misses that shard's writes
    (_name, _lo, _hi, server, dbname), *_ = active_shards(parent)
    with parent.connect("b", "branch_mirror") as conn:
        conn.execute("SET default_transaction_read_only = off")
        sub = link_name("mirror", dbname)  # the subscription is named as its slot
        conn.execute(f'ALTER SUBSCRIPTION "{sub}" DISABLE')
        conn.execute(f'ALTER SUBSCRIPTION "{sub}" SET (slot_name = NONE)')
        conn.execute(f'DROP SUBSCRIPTION "{sub}"')
    with parent.connect(server, dbname) as conn:  # once its walsender has gone
        wait_until(lambda: conn.execute("SELECT NOT active FROM pg_replication_slots WHERE slot_name = %s",
                                        (link_name("mirror", dbname),)).fetchone()[0], "the link's walsender to end")
        conn.execute("SELECT pg_drop_replication_slot(%s)", (link_name("mirror", dbname),))
    drift = json.loads(parent.cli("drift", "--format", "json").out)
    assert drift["status"] == "drifted", drift
    assert "lost its link to 1 of orders's shards" in parent.cli("plan").out
    assert "LINK MISSING" in parent.cli("status").out
    healed = parent.cli("branches", "reset", "mirror")
    assert healed.code == 0, healed.both
    assert json.loads(parent.cli("drift", "--format", "json").out)["status"] == "ok"

    # deleted: its subscriptions, the shards' slots and publications go with its database
    parent.write("fleet.yaml", parent.read("fleet.yaml").replace(REPLICA, "")
                 + "allow_destroy:\n  branches: [mirror]\n")
    gone = parent.cli("apply", "--auto-approve")
    assert gone.code == 0, gone.both
    assert "branch_mirror" not in parent.databases("b")
    assert _links(parent) == []


@pytest.mark.parametrize("step", every_step(["link mirror 40-80", "sync mirror", "activate mirror"],
                                            always="sync mirror"))
def test_a_replica_creation_killed_at_a_step_is_rebuilt_with_exactly_one_link_per_shard(parent, step):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + REPLICA)
    killed = parent.cli("apply", "--auto-approve", env={FAILPOINT_ENV: step})
    assert killed.code == -9, killed.both
    plan = parent.cli("plan", "--detailed-exitcode")
    assert plan.code == 2 and "did not finish building branch mirror" in plan.out, plan.both
    resumed = parent.cli("apply", "--auto-approve")
    assert resumed.code == 0, resumed.both
    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"]
    assert len(_links(parent)) == 8  # what the killed try made was removed, not added to
    assert parent.cli("plan", "--detailed-exitcode").code == 0


def test_abort_of_a_half_linked_replica_removes_its_links(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + REPLICA)
    assert parent.cli("apply", "--auto-approve", env={FAILPOINT_ENV: "sync mirror"}).code == -9
    assert len(_links(parent)) == 8
    (op,) = json.loads(parent.cli("status", "--json").out)["interrupted"]
    aborted = parent.cli("abort", str(op["id"]))
    assert aborted.code == 0, aborted.both
    assert "branch_mirror" not in parent.databases("b")
    assert _links(parent) == []


def test_replica_lag_and_missing_links_are_exposed_to_prometheus():
    snap = Snapshot(who="t", config_dir=".", started_at=datetime(2026, 1, 1, tzinfo=UTC), branch_links=(
        BranchLinkView(branch="mirror", shard="orders/-80", server="a", state="ok", lag_bytes=120),
        BranchLinkView(branch="mirror", shard="orders/80-", server="b", state="ok", lag_bytes=4096),
        BranchLinkView(branch="far", shard="orders/-80", server="a", state="missing")))
    text = exposition(View(snap)).decode()
    assert 'shardctl_branch_replica_lag_bytes{branch="mirror",server="b",shard="orders/80-"} 4096.0' in text
    assert 'shardctl_branch_replica_max_lag_bytes{branch="mirror"} 4096.0' in text
    assert 'shardctl_branch_replica_link_missing{branch="far",shard="orders/-80"} 1.0' in text
    assert 'shardctl_branch_replica_link_missing{branch="mirror",shard="orders/-80"} 0.0' in text


INSTANT = "  instant:\n    from: mirror\n    server: b\n"


def test_an_instant_branch_clones_the_replica_and_the_replica_keeps_following(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + REPLICA + INSTANT)
    first = parent.cli("apply", "--auto-approve")
    assert first.code == 0, first.both
    assert "branch.instant: waits until replica mirror is made" in first.out
    assert _caught_up(parent)["replica"] == _caught_up(parent)["parent"]
    plan = parent.cli("plan")
    assert "an instant clone of replica mirror" in plan.out, plan.out
    made = parent.cli("apply", "--auto-approve")
    assert made.code == 0, made.both
    assert "cloned replica mirror by" in made.out
    want = {t: _parent_sums(parent, t) for t in ("customers", "orders")}
    with parent.connect("b", "branch_instant") as conn:  # the parent's rows as of the pause, and writable
        assert {t: _sums(conn, t) for t in ("customers", "orders")} == want
        conn.execute("INSERT INTO customers (customer_id, name) VALUES (-5, 'mine')")
    assert parent.cli("plan", "--detailed-exitcode").code == 0

    # the replica's subscriptions were resumed: it follows writes made since
    (_name, _lo, _hi, server, dbname), *_ = active_shards(parent)
    with parent.connect(server, dbname) as conn:
        conn.execute("UPDATE customers SET name = name || '!'")
    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"]

    # reset: cloned again, now with those writes; its own row is gone
    reset = parent.cli("branches", "reset", "instant")
    assert reset.code == 0 and "cloned replica mirror by" in reset.out, reset.both
    with parent.connect("b", "branch_instant") as conn:
        assert {t: _sums(conn, t) for t in ("customers", "orders")} == sums["parent"]

    # a reader on the replica: the clone is refused, naming it and the way forward; the replica follows on
    with parent.connect("b", "branch_mirror") as reader:
        reader.execute("SELECT 1")
        refused = parent.cli("branches", "reset", "instant")
        assert refused.code != 0
        assert "could not be cloned" in refused.both and "have them disconnect" in refused.both, refused.both
    with parent.connect(server, dbname) as conn:
        conn.execute("UPDATE customers SET name = name || '?'")
    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"]


def _subscriptions_enabled(fleet) -> list[bool]:
    with fleet.connect("b", "branch_mirror") as conn:
        return [r[0] for r in conn.execute(
            "SELECT subenabled FROM pg_subscription WHERE subname LIKE 'shardctl_rep_%'")]


@pytest.mark.parametrize("then", ["apply", "remove"])
def test_a_clone_killed_while_its_replica_is_paused_resumes_the_replica(parent, then):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + REPLICA)
    assert parent.cli("apply", "--auto-approve").code == 0
    with_replica = parent.read("fleet.yaml")
    parent.write("fleet.yaml", with_replica + INSTANT)
    killed = parent.cli("apply", "--auto-approve", env={FAILPOINT_ENV: "clone instant"})
    assert killed.code == -9, killed.both
    assert _subscriptions_enabled(parent) == [False] * 4  # paused, and its apply is gone
    if then == "remove":  # the half-made clone is deleted and the replica resumed
        parent.write("fleet.yaml", with_replica)
    rerun = parent.cli("apply", "--auto-approve")
    assert rerun.code == 0, rerun.both
    assert _subscriptions_enabled(parent) == [True] * 4
    if then == "apply":
        with parent.connect("b", "branch_instant") as conn:
            assert _sums(conn, "customers") == _parent_sums(parent, "customers")
    else:
        assert "branch_instant" not in parent.databases("b")
    (_name, _lo, _hi, server, dbname), *_ = active_shards(parent)
    with parent.connect(server, dbname) as conn:
        conn.execute("UPDATE customers SET name = name || '#'")
    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"]
    assert parent.cli("plan", "--detailed-exitcode").code == 0


def _replica_state(fleet) -> dict:
    """What links exist, everywhere: slots and publications of replicas on every database of
    every server (retired shards included), and the replica's subscriptions."""
    found: dict = {"slots": [], "publications": [], "subscriptions": []}
    for server in ("a", "b"):
        for dbname in sorted(fleet.databases(server)):
            if dbname.startswith("branch_") or dbname in ("postgres", "shardctl"):
                continue
            with fleet.connect(server, dbname) as conn:
                found["slots"] += [(server, dbname) for (_,) in conn.execute(
                    "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'shardctl_rep_%%'"
                    " AND database = current_database()")]
                found["publications"] += [(server, dbname) for (_,) in conn.execute(
                    "SELECT pubname FROM pg_publication WHERE pubname LIKE 'shardctl_rep_%%'")]
    with fleet.connect("b", "branch_mirror") as conn:
        found["subscriptions"] = [r for (r,) in conn.execute("SELECT subname FROM pg_subscription ORDER BY 1")]
    return found


def _follows_exactly_the_active_shards(fleet) -> None:
    state = _replica_state(fleet)
    active = sorted((server, dbname) for _n, _lo, _hi, server, dbname in active_shards(fleet))
    assert sorted(state["slots"]) == active and sorted(state["publications"]) == active, state
    assert sorted(state["subscriptions"]) == sorted(link_name("mirror", dbname) for _s, dbname in active), state
    with fleet.connect("b", "branch_mirror") as conn:
        assert conn.execute("SELECT bool_and(subenabled) FROM pg_subscription").fetchone() == (True,)


def test_a_replica_follows_a_split_a_merge_and_a_drain_under_a_writer(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + REPLICA)
    assert parent.cli("apply", "--auto-approve").code == 0
    before, _ = all_rows(parent)
    catalog = EmbeddedServer("a", parent.path / ".shardctl" / "servers" / "a").conninfo("shardctl")
    writer = Writer(catalog, start_id=max(before) + 1_000_000)
    writer.start({})  # its own rows only: the preloaded customers have orders referring to them
    try:
        split = parent.cli("apply", "--auto-approve", "-split", "orders/-40")
        assert split.code == 0, split.both
        assert "the replica follows" in split.out, split.out
        writer.goes_on()  # writes to the new shards, streamed
        _follows_exactly_the_active_shards(parent)
        merge = parent.cli("apply", "--auto-approve", "-merge", "orders/40-80,80-c0")
        assert merge.code == 0, merge.both
        # a relocation keeps the shard's database name on its new server: the case where the
        # replica's old and new links would share a name
        parent.write("fleet.yaml", parent.read("fleet.yaml").replace("placement: [a, b]", "placement: [a]"))
        drain = parent.cli("apply", "--auto-approve")
        assert drain.code == 0, drain.both
        assert "move_shard" in parent.cli("history", "--json").out or "move" in drain.out
        writer.goes_on()
    finally:
        writer.stop()
    assert writer.errors == [] and writer.writes > 50
    assert {server for _n, _lo, _hi, server, _d in active_shards(parent)} == {"a"}
    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"], sums
    rows, problems = all_rows(parent)
    assert problems == [] and rows == {**before, **writer.expected}
    with parent.connect("b", "branch_mirror") as conn:
        assert dict(conn.execute("SELECT customer_id, name FROM customers").fetchall()) == rows
    _follows_exactly_the_active_shards(parent)  # none left on the retired copies
    (replica,) = json.loads(parent.cli("status", "--json").out)["replicas"]
    assert [link["state"] for link in replica["links"]] == ["ok"] * len(active_shards(parent))
    assert parent.cli("drift", "--detailed-exitcode").code == 0


def _planned_with_a_replica(tmp_path, versions: dict[str, str], state: str = "active", declared: str = REPLICA,
                            splits=("orders/-40",)):
    """A plan of the 4-shard database with replica mirror (on server b) recorded in STATE, the
    servers at the given versions, and the splits asked for by hand."""
    from datetime import timedelta

    from engine.observe.models import CatalogBranch
    from engine.plan import planner
    from engine.plan.reshard import Requests
    from test_load_planning import FLEET, _desired, _observation
    from test_resharding import _with
    from traces import START

    desired = _desired(tmp_path, declared, fleet=FLEET.replace("shards: 2", "shards: 4"))
    observation = _with(_observation(desired, {}), 4, declared=4)
    now = START
    branches = {} if state is None else {"mirror": CatalogBranch(
        name="mirror", parent="orders", data="replica", sample_percent=None, server="b", dbname="branch_mirror",
        state=state, created_at=now, expires_at=now + timedelta(days=7))}
    # the replica's database exists on b (a recorded branch without it is one dropped by hand)
    servers = {n: s.model_copy(update={"version": versions.get(n, s.version), "databases": (
        *s.databases, *(("branch_mirror",) if n == "b" and state is not None else ()))})
        for n, s in observation.servers.items()}
    observation = observation.model_copy(update={
        "servers": servers, "catalog": observation.catalog.model_copy(update={"branches": branches})})
    return planner.plan(desired, observation, Requests(splits=splits))


def test_a_move_a_replica_on_postgresql_15_could_not_follow_is_held_with_the_reason(tmp_path):
    plan = _planned_with_a_replica(tmp_path, {"b": "15.10 (Debian 15.10-1)"})
    assert [a.kind for a in plan.actions] == []
    (held,) = plan.warnings
    assert "split shard held: orders has replica mirror on PostgreSQL 15" in held and "16 or later" in held


def test_a_move_onto_postgresql_15_is_held_while_a_replica_follows_the_database(tmp_path):
    plan = _planned_with_a_replica(tmp_path, {"a": "15.4"})  # -40 lives on a; its halves stay there
    assert [a.kind for a in plan.actions] == []
    assert "the new shard's server a runs PostgreSQL 15" in plan.warnings[0]


def test_a_replica_on_postgresql_16_or_later_lets_the_move_run(tmp_path):
    plan = _planned_with_a_replica(tmp_path, {"a": "16.2", "b": "18.1"})
    assert [a.kind for a in plan.actions] == ["split_shard"]
    assert not [w for w in plan.warnings if "held" in w]


def test_a_replica_to_be_made_waits_for_the_move_in_the_same_plan(tmp_path):
    plan = _planned_with_a_replica(tmp_path, {}, state=None)
    assert [a.kind for a in plan.actions] == ["split_shard"]
    assert "branch.mirror: the replica waits for this plan's split shard of shard.orders/-40" in plan.warnings[0]


def _write_through_routing(fleet, count: int = 200) -> None:
    """New customers written through routing (to whichever shards own them now)."""
    from engine.client import ShardClient

    catalog = EmbeddedServer("a", fleet.path / ".shardctl" / "servers" / "a").conninfo("shardctl")
    with ShardClient(catalog, "orders") as client:
        for cid in range(9_000_000, 9_000_000 + count):
            client.execute(cid, "INSERT INTO customers (customer_id, name) VALUES (%s, %s)"
                           " ON CONFLICT (customer_id) DO UPDATE SET name = excluded.name || '+'", (cid, f"w{cid}"))


@pytest.mark.parametrize("step", every_step(["follow mirror", "fence", "flip", "hand over mirror", "cleanup"],
                                            always="hand over mirror"))
def test_a_split_killed_at_a_step_converges_with_the_replica_following_the_new_shards(parent, step):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + REPLICA)
    assert parent.cli("apply", "--auto-approve").code == 0
    killed = parent.cli("apply", "--auto-approve", "-split", "orders/-40",
                        env={FAILPOINT_ENV: f"split orders/-40: {step}"})
    assert killed.code == -9, killed.both
    assert "was interrupted at step" in parent.cli("plan").out
    resumed = parent.cli("apply", "--auto-approve")
    assert resumed.code == 0, resumed.both
    assert {"-20", "20-40"} <= {s[0] for s in active_shards(parent)}
    _write_through_routing(parent)
    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"], sums
    _follows_exactly_the_active_shards(parent)
    assert parent.cli("plan", "--detailed-exitcode").code == 0


def test_a_drain_killed_while_handing_the_replica_over_converges(parent):
    """A relocated shard keeps its database's name on its new server: the replica's link to it
    takes the old link's name once that one is gone; killed there, the rerun finishes it."""
    parent.write("fleet.yaml", parent.read("fleet.yaml") + REPLICA)
    assert parent.cli("apply", "--auto-approve").code == 0
    parent.write("fleet.yaml", parent.read("fleet.yaml").replace("placement: [a, b]", "placement: [a]"))
    killed = parent.cli("apply", "--auto-approve", env={FAILPOINT_ENV: "move orders/40-80: hand over mirror"})
    assert killed.code == -9, killed.both
    for _ in range(3):  # the interrupted move first, then the rest of the drain
        if parent.cli("plan", "--detailed-exitcode").code == 0:
            break
        resumed = parent.cli("apply", "--auto-approve")
        assert resumed.code == 0, resumed.both
    assert {s[3] for s in active_shards(parent)} == {"a"}
    _write_through_routing(parent)
    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"], sums
    _follows_exactly_the_active_shards(parent)


def test_an_aborted_split_removes_the_replicas_links_to_its_targets_and_the_replica_follows_on(parent):
    parent.write("fleet.yaml", parent.read("fleet.yaml") + REPLICA)
    assert parent.cli("apply", "--auto-approve").code == 0
    killed = parent.cli("apply", "--auto-approve", "-split", "orders/-40",
                        env={FAILPOINT_ENV: "split orders/-40: sync"})
    assert killed.code == -9, killed.both
    assert any(name.endswith("_next") for name in _replica_state(parent)["subscriptions"])
    (op,) = json.loads(parent.cli("status", "--json").out)["interrupted"]
    aborted = parent.cli("abort", str(op["id"]))
    assert aborted.code == 0, aborted.both
    _follows_exactly_the_active_shards(parent)  # the targets' links went with them
    _write_through_routing(parent)
    sums = _caught_up(parent)
    assert sums["replica"] == sums["parent"], sums
