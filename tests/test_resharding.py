"""Resharding a person asks for: `shards:` raised or lowered (cause config), and `-split` /
`-merge` by hand (cause manual). Planning from recorded observations first, then the quickstart
on real servers under a writer: raised from 4 to 8, and a split and a merge by hand."""

import json

import pytest

from conftest import assert_golden
from engine.errors import UserError
from engine.keyspace import even_ranges, physical_name
from engine.observe.models import CatalogShard
from engine.plan import planner
from engine.plan.reshard import Requests
from engine.render.renderers import render
from movers import active_shards, all_rows, apply_under_writer, preload
from test_load_planning import FLEET, _desired, _observation


def _with(observation, shards: int, declared: int | None):
    """The observation with `shards` even shards recorded, and `declared` as the `shards:` of the last apply."""
    recorded = observation.catalog.databases["orders"]
    catalog_shards = tuple(
        CatalogShard(database="orders", name=r.name, lo=r.lo, hi=r.hi, server="ab"[i % 2],
                     dbname=physical_name("orders", r), state="active") for i, r in enumerate(even_ranges(shards)))
    recorded = recorded.model_copy(update={"shards": catalog_shards, "declared_shards": declared})
    catalog = observation.catalog.model_copy(update={"databases": {"orders": recorded}})
    return observation.model_copy(update={"catalog": catalog})


def _declaring(tmp_path, count: int):
    return _desired(tmp_path, fleet=FLEET.replace("shards: 2", f"shards: {count}"))


def _moves(plan):
    return [(a.kind, a.address, [t.name for t in getattr(a, "targets", ())] or [s.name for s in a.sources],
             a.reason.cause) for a in plan.actions if a.kind in ("split_shard", "merge_shards")]


def test_raising_shards_splits_the_widest_ranges_evenly(tmp_path):
    desired = _declaring(tmp_path, 6)
    plan = planner.plan(desired, _with(_observation(desired, {}), 4, declared=4))
    assert _moves(plan) == [("split_shard", "shard.orders/-40", ["-20", "20-40"], "config"),
                            ("split_shard", "shard.orders/40-80", ["40-60", "60-80"], "config")]
    assert "`shards: 6` at fleet.yaml:8:5; orders has 4 shards" in plan.actions[0].reason.text
    (update,) = [a for a in plan.actions if a.kind == "update_database"]
    assert [(c.path, c.before, c.after) for c in update.changes] == [("shards", 4, 6)]
    assert not plan.actions[0].automatic  # a person's change: the daemon never applies it
    # from 4 to 12 every shard is divided in three, not halves and quarters
    desired = _declaring(tmp_path, 12)
    plan = planner.plan(desired, _with(_observation(desired, {}), 4, declared=4))
    assert [len(m[2]) for m in _moves(plan)] == [3, 3, 3, 3]
    assert_golden("reshard_raise.txt", render(planner.plan(_declaring(tmp_path, 8), _with(
        _observation(desired, {}), 4, declared=4)), "text", colour=False))


def test_lowering_shards_merges_the_narrowest_neighbours(tmp_path):
    desired = _declaring(tmp_path, 6)
    plan = planner.plan(desired, _with(_observation(desired, {}), 8, declared=8))
    assert _moves(plan) == [("merge_shards", "shard.orders/-40", ["-20", "20-40"], "config"),
                            ("merge_shards", "shard.orders/40-80", ["40-60", "60-80"], "config")]
    assert "`shards:` lowered from 8 to 6" in plan.actions[0].reason.text
    desired = _declaring(tmp_path, 2)
    plan = planner.plan(desired, _with(_observation(desired, {}), 8, declared=8))
    assert [(m[1], len(m[2])) for m in _moves(plan)] == [("shard.orders/-80", 4), ("shard.orders/80-", 4)]


def test_shards_split_by_load_beyond_the_declared_count_are_kept(tmp_path):
    desired = _declaring(tmp_path, 4)
    for declared in (4, None):  # None: a catalog from before the declaration was recorded
        plan = planner.plan(desired, _with(_observation(desired, {}), 8, declared=declared))
        assert plan.actions == (), plan.actions


def test_a_split_and_a_merge_by_hand_are_planned_with_cause_manual(tmp_path):
    desired = _declaring(tmp_path, 4)
    observation = _with(_observation(desired, {}), 4, declared=4)
    plan = planner.plan(desired, observation, Requests(splits=("orders/40-80",), merges=("orders/80-c0,c0-",)))
    assert _moves(plan) == [("merge_shards", "shard.orders/80-", ["80-c0", "c0-"], "manual"),
                            ("split_shard", "shard.orders/40-80", ["40-60", "60-80"], "manual")]
    assert "requested by hand (`-split orders/40-80`)" in plan.actions[1].reason.text
    assert_golden("manual.json", json.dumps(json.loads(render(plan, "json")), indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize(("requests", "what", "hint"), [
    (Requests(splits=("orders/40-90",)), "orders/40-90 is not a shard of orders",
     "its shards: orders/-40, orders/40-80, orders/80-c0, orders/c0-"),
    (Requests(splits=("invoices/40-80",)), "no sharded database 'invoices' is declared and applied",
     "declared and applied: orders"),
    (Requests(splits=("40-80",)), "'40-80' is not a shard address", "DATABASE/RANGE"),
    (Requests(merges=("orders/-40,80-c0",)), "orders/-40 and orders/80-c0 are not adjacent",
     "in order: -40, 40-80, 80-c0, c0-"),
    (Requests(merges=("orders/-40",)), "names 1 shard", "two or more adjacent shards"),
    (Requests(splits=("orders/-40",), merges=("orders/-40,40-80",)), "orders/-40 is named by both",
     "one change per shard"),
])
def test_a_bad_request_by_hand_is_refused_naming_what_exists(tmp_path, requests, what, hint):
    desired = _declaring(tmp_path, 4)
    with pytest.raises(UserError) as caught:
        planner.plan(desired, _with(_observation(desired, {}), 4, declared=4), requests)
    assert what in caught.value.render() and hint in caught.value.render()


# ---------------------------------------------------------------------------- real servers

def test_quickstart_raised_from_4_to_8_shards_splits_online_under_a_writer(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet)
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("shards: 4", "shards: 8"))
    plan = fleet.cli("plan")
    assert plan.code == 0, plan.both
    assert "Plan: 8 to add, 1 to change, 4 to destroy. (4 splits, 1 settings update)" in plan.out, plan.out
    result, _ = apply_under_writer(fleet)  # nothing lost, duplicated or misplaced
    assert result.out.count("Split complete") == 4
    assert [s[0] for s in active_shards(fleet)] == [r.name for r in even_ranges(8)]
    assert {s[3] for s in active_shards(fleet)} == {"a", "b"}
    with fleet.catalog() as conn:
        events = [e for (e,) in conn.execute("SELECT detail FROM shardctl.history WHERE event = 'split_shard'")]
        assert conn.execute("SELECT declared_shards FROM shardctl.databases").fetchone() == (8,)
    assert len(events) == 4 and all(e["verification"] for e in events)  # counts and checksums compared
    again = fleet.cli("plan", "--detailed-exitcode")
    assert again.code == 0 and "No changes." in again.out, again.out


def test_quickstart_lowered_from_4_to_2_shards_merges_online_under_a_writer(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet)
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("shards: 4", "shards: 2"))
    plan = fleet.cli("plan")
    assert plan.code == 0, plan.both
    assert "(2 merges, 1 settings update)" in plan.out, plan.out
    result, _ = apply_under_writer(fleet)  # nothing lost, duplicated or misplaced
    assert result.out.count("Merge complete") == 2, result.out
    assert [s[0] for s in active_shards(fleet)] == [r.name for r in even_ranges(2)]
    with fleet.catalog() as conn:
        events = [e for (e,) in conn.execute("SELECT detail FROM shardctl.history WHERE event = 'merge_shards'")]
        assert conn.execute("SELECT declared_shards FROM shardctl.databases").fetchone() == (2,)
    assert len(events) == 2 and all(e["verification"] for e in events)  # counts and checksums compared
    again = fleet.cli("plan", "--detailed-exitcode")
    assert again.code == 0 and "No changes." in again.out, again.out


def test_a_split_by_hand_is_saved_and_applied_and_a_merge_by_hand_applied_directly(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=3000)
    before, _ = all_rows(fleet)
    bad = fleet.cli("plan", "-split", "orders/40-90")
    assert bad.code == 1 and "orders/40-90 is not a shard of orders" in bad.err and "Traceback" not in bad.both
    saved = fleet.cli("plan", "-split", "orders/40-80", "-out", "split.plan")
    assert saved.code == 0 and "requested by hand (`-split orders/40-80`)" in saved.out, saved.both
    refused = fleet.cli("apply", "split.plan", "-merge", "orders/-40,40-60")
    assert refused.code == 1 and "a saved plan runs only what it holds" in refused.err
    applied = fleet.cli("apply", "split.plan")
    assert applied.code == 0 and "Split complete" in applied.out, applied.both
    assert [s[0] for s in active_shards(fleet)] == ["-40", "40-60", "60-80", "80-c0", "c0-"]
    merged = fleet.cli("apply", "--auto-approve", "-merge", "orders/60-80,80-c0")
    assert merged.code == 0 and "Merge complete" in merged.out, merged.both
    assert [s[0] for s in active_shards(fleet)] == ["-40", "40-60", "60-c0", "c0-"]
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == before
    # `shards: 4` is unchanged and the database has 4 shards: nothing more to do
    assert "No changes." in fleet.cli("plan").out
