"""Moving shards between servers online: a server dropped from `placement` is drained under a
writer, a move killed at a step converges on rerun, and a server is removable from the YAML
only once it holds nothing."""

import json

import pytest

from conftest import assert_golden, every_step
from engine.catalog.journal import FAILPOINT_ENV
from engine.render.renderers import render
from movers import active_shards, all_rows, apply_under_writer, preload

# ---------------------------------------------------------------------------- planning, no servers

PLANNED = """\
servers:
  a: {embedded: true, capacity: {storage: 100GiB}}
  b: {embedded: true, capacity: {storage: 100GiB}}
  c: {embedded: true, capacity: {storage: CAPACITY}}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE t (customer_id bigint PRIMARY KEY);"}
    shards: SHARDS
    placement: [a, b, c]
"""
MIB = 2**20


def _planned(tmp_path, sizes: dict[str, int], layout: dict[str, str], capacity: str = "100GiB", extra: str = ""):
    """A plan for shards of the given sizes (MiB) on the given servers, placement [a, b, c]."""
    from engine.config import loader
    from engine.keyspace import even_ranges, physical_name
    from engine.observe.models import CatalogShard, Holding, LiveServer, LiveShard
    from engine.plan import planner
    from test_load_planning import _observation

    (tmp_path / "fleet.yaml").write_text(PLANNED.replace("CAPACITY", capacity).replace("SHARDS", str(len(sizes)))
                                         + extra)
    desired = loader.load(tmp_path, cwd=tmp_path)
    observation = _observation(desired, {})
    recorded = observation.catalog.databases["orders"]
    shards = tuple(CatalogShard(database="orders", name=r.name, lo=r.lo, hi=r.hi, server=layout[r.name],
                                dbname=physical_name("orders", r), state="active") for r in even_ranges(len(sizes)))
    recorded = recorded.model_copy(update={"shards": shards, "declared_shards": len(sizes),
                                           "placement": ("a", "b", "c")})
    observation = observation.model_copy(update={
        "catalog": observation.catalog.model_copy(update={"databases": {"orders": recorded}}),
        "servers": {n: LiveServer(name=n, reachable=True, version="18.6", wal_level="logical") for n in "abc"},
        "shards": {f"orders/{n}": LiveShard(exists=True, holding=Holding(rows=1, exact=True, size_bytes=mib * MIB))
                   for n, mib in sizes.items()}})
    return planner.plan(desired, observation)


def _moved(plan):
    return [(a.source.name, a.source.server, a.target.server) for a in plan.actions if a.kind == "move_shard"]


def test_a_server_added_to_placement_gets_shards_until_no_move_brings_storage_closer(tmp_path):
    sizes = dict.fromkeys(["-40", "40-80", "80-c0", "c0-"], 100)
    plan = _planned(tmp_path, sizes, {"-40": "a", "40-80": "b", "80-c0": "a", "c0-": "b"})
    assert _moved(plan) == [("-40", "a", "c")]
    (move,) = plan.actions
    assert [(b.server, b.before_shards, b.after_shards) for b in move.balance] == [("a", 2, 1), ("b", 2, 2),
                                                                                   ("c", 0, 1)]
    assert "c -100% (rebalance.tolerance_percent 10)" in move.reason.text
    assert "a is +50% off its target" in move.reason.text
    assert_golden("rebalance.txt", render(plan, "text", colour=False))
    # after it: 1, 2, 1 is as close as whole shards get; nothing more is planned
    assert _moved(_planned(tmp_path, sizes, {"-40": "c", "40-80": "b", "80-c0": "a", "c0-": "b"})) == []


def test_rebalancing_is_weighed_by_capacity_and_held_to_the_policy_limits(tmp_path):
    sizes = dict.fromkeys(["-20", "20-40", "40-60", "60-80", "80-a0", "a0-c0", "c0-e0", "e0-"], 100)
    layout = {name: "ab"[i % 2] for i, name in enumerate(sizes)}
    # c has twice the capacity: its target is half the storage, 4 of 8 shards, in one plan of at most 2 per server
    plan = _planned(tmp_path, sizes, layout, capacity="200GiB")
    assert [m[2] for m in _moved(plan)] == ["c", "c"]  # max_per_server (2) for c
    assert {m[1] for m in _moved(plan)} == {"a", "b"}
    limited = _planned(tmp_path, sizes, layout, capacity="200GiB",
                       extra="policies:\n  default:\n    rebalance: {max_moves: 1}\n")
    assert len(_moved(limited)) == 1
    off = _planned(tmp_path, sizes, layout, capacity="200GiB",
                   extra="policies:\n  default:\n    rebalance: {enabled: false}\n")
    assert _moved(off) == []


def test_shards_of_slightly_different_sizes_are_not_shuffled(tmp_path):
    sizes = {"-40": 100, "40-80": 104, "80-c0": 97, "c0-": 103}
    plan = _planned(tmp_path, sizes, {"-40": "a", "40-80": "b", "80-c0": "c", "c0-": "a"})
    assert _moved(plan) == []  # 2, 1, 1: moving one of a's would only make another server the furthest


SERVER_C = "  c:\n    embedded: true\n    capacity: {storage: 20GiB, memory: 4GiB, cpus: 2}\n"


def _with_c(fleet, placement: str) -> None:
    text = fleet.read("fleet.yaml").replace("\ndatabases:", SERVER_C + "\ndatabases:", 1)
    fleet.write("fleet.yaml", text.replace("placement: [a, b]", f"placement: {placement}"))


def _no_replication_left(fleet, servers=("a", "b", "c")):
    for server in servers:
        with fleet.connect(server) as conn:
            assert conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall() == []


@pytest.fixture
def applied(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=5000)
    return fleet


def test_a_server_dropped_from_placement_is_drained_under_a_writer_then_removable(applied):
    fleet = applied
    _with_c(fleet, "[a, c]")
    plan = fleet.cli("plan")
    assert plan.code == 0, plan.both
    assert "2 moves" in plan.out and "server = b -> c (orders_40_80)" in plan.out, plan.out
    assert "server b is not in the placement of orders [a, c]" in plan.out
    # b still holds shards: removing it from the YAML now is refused, with the way forward
    with_c = fleet.read("fleet.yaml")
    fleet.write("fleet.yaml", with_c.replace("  b:\n    embedded: true\n    capacity: {storage: 20GiB, memory: 4GiB,"
                                             " cpus: 2}\n", ""))
    refused = fleet.cli("plan")
    assert refused.code == 1 and "server 'b' is no longer declared, and it still holds shards" in refused.err
    assert "orders/40-80 (active)" in refused.err and "remove it from every database's placement" in refused.err
    fleet.write("fleet.yaml", with_c)

    result, _writer = apply_under_writer(fleet)  # nothing lost, duplicated or misplaced
    assert result.out.count("Move to c complete") == 2
    assert {s[0]: s[3] for s in active_shards(fleet)} == {"-40": "a", "40-80": "c", "80-c0": "a", "c0-": "c"}
    with fleet.catalog() as conn:
        events = [e for (e,) in conn.execute("SELECT detail FROM shardctl.history WHERE event = 'move_shard'")]
        retired = conn.execute("SELECT name, server FROM shardctl.shards WHERE state = 'retired' ORDER BY 1").fetchall()
    assert len(events) == 2 and all(e["verification"] for e in events)
    assert retired == [("40-80@b", "b"), ("c0-@b", "b")]
    _no_replication_left(fleet)
    assert "No changes." in fleet.cli("plan").out
    # the retired copies go after their grace period, and then b may leave the YAML
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + "policies:\n  default:\n    autosplit: {retire_after: 0s}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    assert not {"orders_40_80", "orders_c0_max"} & fleet.databases("b")
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace(
        "  b:\n    embedded: true\n    capacity: {storage: 20GiB, memory: 4GiB, cpus: 2}\n", ""))
    final = fleet.cli("plan")
    assert final.code == 0 and "No changes." in final.out, final.both
    fleet.write("fleet.yaml", with_c)  # so that teardown's `shardctl down` stops b too


@pytest.mark.parametrize("step", every_step(["subscribe", "fence", "flip"], always="fence"))
def test_a_move_killed_at_a_step_converges_on_rerun(applied, step):
    fleet = applied
    _with_c(fleet, "[a, c]")
    before, _ = all_rows(fleet)
    killed = fleet.cli("apply", "--auto-approve", env={FAILPOINT_ENV: f"move orders/40-80: {step}"})
    assert killed.code == -9, killed.both
    plan = fleet.cli("plan")
    assert "was interrupted at step" in plan.out, plan.out
    resumed = fleet.cli("apply", "--auto-approve")
    assert resumed.code == 0, resumed.both
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == before
    # the interrupted move is finished first; the rest of the drain is planned after it
    assert {s[0]: s[3] for s in active_shards(fleet)}["40-80"] == "c"
    assert fleet.cli("apply", "--auto-approve").code == 0
    assert {s[0]: s[3] for s in active_shards(fleet)} == {"-40": "a", "40-80": "c", "80-c0": "a", "c0-": "c"}
    _no_replication_left(fleet)
    with fleet.catalog() as conn:
        assert conn.execute("SELECT count(*) FROM shardctl.operations WHERE state = 'running'").fetchone() == (0,)


def test_a_move_rendered(applied):
    fleet = applied
    _with_c(fleet, "[a, c]")
    assert_golden("move.txt", fleet.cli("plan", "--no-color").out)
    doc = json.loads(fleet.cli("plan", "--format", "json").out)
    moves = [a for a in doc["actions"] if a["kind"] == "move_shard"]
    assert [(m["source"]["server"], m["target"]["server"], m["reason"]["cause"]) for m in moves] == [
        ("b", "c", "config"), ("b", "c", "config")]


SERVER_D = SERVER_C.replace("  c:", "  d:")


def _spans(fleet) -> dict[str, tuple]:
    """Per move operation: when its first and last journal steps were written."""
    with fleet.catalog() as conn:
        return {address: (first, last) for address, first, last in conn.execute(
            "SELECT o.address, min(j.at), max(j.at) FROM shardctl.operations o JOIN shardctl.journal j"
            " ON j.operation = o.id WHERE o.kind = 'move_shard' GROUP BY o.address")}


def test_moves_on_disjoint_servers_run_at_once_under_a_writer(applied):
    fleet = applied
    _with_c(fleet, "[c, d]")
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("\ndatabases:", SERVER_D + "\ndatabases:", 1))
    result, _writer = apply_under_writer(fleet)  # nothing lost, duplicated or misplaced
    assert result.out.count("Running 2 moves at once") == 2, result.out
    assert {s[0]: s[3] for s in active_shards(fleet)} == {"-40": "c", "40-80": "d", "80-c0": "c", "c0-": "d"}
    spans = _spans(fleet)
    for pair in (("shard.orders/-40", "shard.orders/40-80"), ("shard.orders/80-c0", "shard.orders/c0-")):
        (a_first, a_last), (b_first, b_last) = spans[pair[0]], spans[pair[1]]
        assert a_first < b_last and b_first < a_last, spans  # their journals overlap in time
    _no_replication_left(fleet, ("a", "b", "c", "d"))


@pytest.mark.slow  # the kill at the fence and the parallel moves under a writer run in the suite
def test_parallel_moves_killed_midway_converge_on_rerun(applied):
    fleet = applied
    _with_c(fleet, "[c, d]")
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("\ndatabases:", SERVER_D + "\ndatabases:", 1))
    before, _ = all_rows(fleet)
    killed = fleet.cli("apply", "--auto-approve", env={FAILPOINT_ENV: "move orders/40-80: fence"})
    assert killed.code == -9, killed.both
    # the other move of the batch was interrupted too, unless it finished before the kill
    assert fleet.cli("plan").out.count("was interrupted at step") in (1, 2)
    for _ in range(2):  # the interrupted pair, then the other two
        resumed = fleet.cli("apply", "--auto-approve")
        assert resumed.code == 0, resumed.both
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == before
    assert {s[0]: s[3] for s in active_shards(fleet)} == {"-40": "c", "40-80": "d", "80-c0": "c", "c0-": "d"}
    _no_replication_left(fleet, ("a", "b", "c", "d"))
    with fleet.catalog() as conn:
        assert conn.execute("SELECT count(*) FROM shardctl.operations WHERE state = 'running'").fetchone() == (0,)


def test_a_server_added_to_placement_is_filled_under_a_writer_then_another_drained(applied):
    """The issue's sequence: [a, b] -> [a, b, c] rebalances onto c under a writer until no move
    brings storage closer; then b leaves the placement and is drained onto a and c."""
    fleet = applied
    _with_c(fleet, "[a, b, c]")
    plan = fleet.cli("plan")
    assert "rebalancing the storage of orders" in plan.out and "-> c (" in plan.out, plan.out
    _result, writer = apply_under_writer(fleet)  # nothing lost, duplicated or misplaced
    per_server = [s[3] for s in active_shards(fleet)]
    assert sorted(per_server.count(s) for s in "abc") == [1, 1, 2]  # as even as four shards get on three
    assert "No changes." in fleet.cli("plan").out  # balanced: nothing more is planned
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("placement: [a, b, c]", "placement: [a, c]"))
    drained = fleet.cli("apply", "--auto-approve")
    assert drained.code == 0, drained.both
    assert "b" not in {s[3] for s in active_shards(fleet)}
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == writer.expected
    _no_replication_left(fleet)
