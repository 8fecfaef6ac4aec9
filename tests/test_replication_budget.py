"""Replication budgets on real servers (engine/plan/budget.py): embedded servers are configured
for the fleet they serve, so a replica of a database of more shards than PostgreSQL 18's
default 10 replication origins is built; a server whose settings fall short is named by
`doctor` with the setting and the number needed, and `plan` refuses what it could not finish
before anything is made."""

import re
import shutil
import time
from types import SimpleNamespace

import pytest

from conftest import EXAMPLES
from engine.config import loader
from engine.observe.models import CatalogState, Observation
from engine.observe.replica_links import link_name
from engine.plan import budget
from engine.servers.embedded import EmbeddedServer, wheel_major
from movers import Writer, active_shards, all_rows, preload
from test_privilege_needs import live

REPLICA = "branches:\n  mirror:\n    from: orders\n    data: replica\n    server: b\n"
SHARDS = 12  # over PostgreSQL 18's default max_active_replication_origins (10)
MANY = 64  # the size issue 27 asks a replica to be built and to follow a split at


def _setting(fleet, server: str, name: str) -> int:
    with fleet.connect(server) as conn:
        return int(conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()[0])


def _slots(fleet) -> list[str]:
    out = []
    for _name, _lo, _hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            out += [r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots"
                                               " WHERE database = current_database()")]
    return out


def test_a_replica_of_a_database_of_more_shards_than_the_default_origins_is_built(fleet):
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("shards: 4", f"shards: {SHARDS}"))
    assert fleet.cli("apply", "--auto-approve").code == 0
    assert len(active_shards(fleet)) == SHARDS
    preload(fleet, customers=3000)
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + REPLICA)
    applied = fleet.cli("apply", "--auto-approve")
    assert applied.code == 0, applied.both
    assert f"replica in sync with {SHARDS} shards" in applied.out, applied.out
    # the replica's server holds one origin per link and per table-sync worker copying at once
    origins = "max_active_replication_origins" if wheel_major() >= 18 else "max_replication_slots"
    assert _setting(fleet, "b", origins) >= SHARDS + budget.SYNC
    assert _setting(fleet, "b", "max_logical_replication_workers") >= SHARDS + budget.SYNC
    assert _setting(fleet, "b", "max_worker_processes") > _setting(fleet, "b", "max_logical_replication_workers")
    with fleet.connect("b", "branch_mirror") as conn:  # every shard's rows, copied
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (3000,)
    doctor = fleet.cli("doctor")
    assert "replication budget" in doctor.out and "the fleet needs at most" in doctor.out, doctor.both
    assert fleet.cli("plan", "--detailed-exitcode").code == 0


def _replica_rows(fleet) -> dict[int, str]:
    with fleet.connect("b", "branch_mirror") as conn:
        return dict(conn.execute("SELECT customer_id, name FROM customers").fetchall())


def _subscriptions(fleet) -> list[str]:
    with fleet.connect("b", "branch_mirror") as conn:
        return sorted(r[0] for r in conn.execute("SELECT subname FROM pg_subscription WHERE subenabled"))


@pytest.mark.slow  # 64 shards made, linked and split on embedded servers: minutes on a busy machine
def test_a_replica_of_a_64_shard_database_is_built_and_follows_a_split_under_a_writer(fleet):
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("shards: 4", f"shards: {MANY}"))
    made = fleet.cli("apply", "--auto-approve")
    assert made.code == 0, made.both
    assert len(active_shards(fleet)) == MANY
    preload(fleet, customers=6400)
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + REPLICA)
    # the running servers were sized for the fleet without the replica: the settings it needs
    # are written, and apply refuses, before anything is made, until they are restarted
    refused = fleet.cli("apply", "--auto-approve")
    assert refused.code == 1 and "take effect when it restarts" in refused.err, refused.both
    assert "branch_mirror" not in fleet.databases("b")
    assert fleet.cli("down").code == 0 and fleet.cli("up").code == 0
    linked = fleet.cli("apply", "--auto-approve")
    assert linked.code == 0, linked.both
    assert f"replica in sync with {MANY} shards" in linked.out, linked.out
    assert len(_replica_rows(fleet)) == 6400

    # a split of the database while the replica follows it, under a writer routed by the catalog
    before, _ = all_rows(fleet)
    (first, *_rest) = active_shards(fleet)
    catalog = EmbeddedServer("a", fleet.path / ".shardctl" / "servers" / "a").conninfo("shardctl")
    writer = Writer(catalog, start_id=max(before) + 1_000_000)
    writer.start({})
    try:
        split = fleet.cli("apply", "--auto-approve", "-split", f"orders/{first[0]}")
        assert split.code == 0, split.both
        assert "the replica follows" in split.out, split.out
        time.sleep(0.5)  # writes to the new shards, streamed
    finally:
        writer.stop()
    assert writer.errors == [] and writer.writes > 50
    shards = active_shards(fleet)
    assert len(shards) == MANY + 1 and first[0] not in {s[0] for s in shards}
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == {**before, **writer.expected}
    deadline = time.monotonic() + 120
    while _replica_rows(fleet) != rows and time.monotonic() < deadline:
        time.sleep(0.5)  # the last writes are streamed
    assert _replica_rows(fleet) == rows  # every row of the 65 shards, none of the retired copy's twice
    # exactly one link per active shard: the split's targets linked, the retired source's gone
    assert _subscriptions(fleet) == sorted(link_name("mirror", dbname) for *_, dbname in shards)
    assert fleet.cli("plan", "--detailed-exitcode").code == 0


@pytest.mark.slow  # a restart of two servers: about 45 s on a busy machine
def test_a_server_with_too_few_origins_is_named_and_nothing_is_made(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    origins = "max_active_replication_origins" if wheel_major() >= 18 else "max_replication_slots"
    # an operator's setting (postgresql.auto.conf) wins over the one shardctl writes
    with fleet.connect("b") as conn:
        conn.execute(f"ALTER SYSTEM SET {origins} = 4")
    assert fleet.cli("down").code == 0
    assert fleet.cli("up").code == 0
    assert _setting(fleet, "b", origins) == 4
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + REPLICA)
    shards = len(active_shards(fleet))
    needed = shards + budget.SYNC  # a link per shard, and the initial copy's table-sync workers

    doctor = fleet.cli("doctor")
    assert doctor.code == 1, doctor.both
    line = next(x for x in doctor.out.splitlines() if origins in x and "the fleet needs up to" in x)
    assert re.search(rf"{origins} = 4, the fleet needs up to (\d+)", line), line
    assert int(re.search(r"needs up to (\d+)", line).group(1)) >= needed

    before = (_slots(fleet), fleet.databases("b"))
    plan = fleet.cli("plan")
    assert plan.code == 1, plan.both
    assert f"server b's {origins} is 4, and it needs {needed}" in plan.err, plan.both
    applied = fleet.cli("apply", "--auto-approve")
    assert applied.code == 1 and "nothing was changed" in applied.err, applied.both
    assert (_slots(fleet), fleet.databases("b")) == before  # no link, no replica database


def _replica(name: str, shards: int) -> SimpleNamespace:
    """A plan's replica creation (what budget.action_use reads of one): `shards` links to a."""
    return SimpleNamespace(kind="create_branch", data="replica", clone_of=None, server="b", branch=name,
                           address=f"branch.{name}", operation=None,
                           shards=[SimpleNamespace(server="a") for _ in range(shards)])


def test_the_declared_fleet_sizes_the_embedded_settings(tmp_path):
    shutil.copytree(EXAMPLES / "quickstart", tmp_path / "fleet")
    (tmp_path / "fleet" / "fleet.yaml").write_text((tmp_path / "fleet" / "fleet.yaml").read_text().replace(
        "shards: 4", f"shards: {SHARDS}") + REPLICA)
    need = budget.fleet_needs(loader.load(tmp_path / "fleet"))
    # b holds the replica: a link per shard, its initial copy's table-sync workers, and a move's
    assert need["b"]["origins"] >= SHARDS + budget.SYNC
    assert any("replica mirror" in why for why in need["b"].why["origins"])
    on_18 = budget.embedded_settings(need["b"], 18, {})
    assert on_18["max_active_replication_origins"] >= need["b"]["origins"] + 8
    assert on_18["max_worker_processes"] > on_18["max_logical_replication_workers"] >= need["b"]["workers"]
    on_17 = budget.embedded_settings(need["b"], 17, {})  # before 18, slots bound the origins too
    assert "max_active_replication_origins" not in on_17
    assert on_17["max_replication_slots"] >= need["b"]["origins"]


def test_a_replica_that_fits_the_setting_but_not_what_is_free_waits():
    servers = {"a": live("a", max_replication_slots=40, max_wal_senders=40),
               "b": live("b", max_replication_origins=10, used_replication_origins=0,
                         max_logical_replication_workers=40, max_worker_processes=60)}
    observation = Observation(catalog=CatalogState(exists=True), servers=servers, shards={})
    first, second, never = _replica("one", 4), _replica("two", 4), _replica("big", 20)
    admitted = budget.admit([first, second, never], observation)
    # PostgreSQL 18's default 10 origins: one takes a link per shard and its copy's table-sync
    # workers (budget.PG_SYNC for a server that did not say); two needs as many, more than is left
    assert budget.action_use(first, observation)["b"]["origins"] == 4 + budget.PG_SYNC
    assert admitted.kept == [first]
    (waiting,) = admitted.waiting
    assert waiting.startswith("branch.two: create branch waiting for a replication origin on server b")
    (problem,) = admitted.problems
    assert problem[0] == "b" and "server b's max_active_replication_origins is 10, and it needs" in problem[1]
