"""Replication that outlived its operation is loud, removable, and never stops a drop.

The leftovers are made as an older shardctl left them: a split killed at its cleanup, then
recorded as done (it used to say "Apply complete!" while a server did not answer). Its
subscriptions on the targets and its slots and publications on the source now belong to no
running operation: status, drift, doctor, the dashboard and /metrics show them with the WAL
the slots keep; `shardctl orphans --remove` drops them; and dropping the retired source first
removes what replicates out of it. A cleanup that meets a server that does not answer keeps
its operation open and lists what is left."""

from __future__ import annotations

import json

import pytest

from conftest import FleetDir
from engine import workflow
from engine.catalog.journal import FAILPOINT_ENV
from engine.collect.observer import observe
from engine.render.dashboard import render_dashboard
from engine.servers.fleet import Fleet
from engine.watch.daemon import replication_views
from engine.watch.prometheus import exposition
from engine.watch.view import Snapshot, View, now
from movers import active_shards, all_rows, preload
from test_server_crash import _kill_mid_move

SPLIT = "split orders/40-80"


@pytest.fixture
def left(fleet: FleetDir):
    """The quickstart, split orders/40-80 (on b, into 40-60 on a and 60-80 on b), its cleanup
    never run and its operation recorded as done."""
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    killed = fleet.cli("apply", "--auto-approve", "-split", "orders/40-80", env={FAILPOINT_ENV: f"{SPLIT}: cleanup"})
    assert killed.code == -9, killed.both
    with fleet.catalog() as conn:
        (op,) = conn.execute("SELECT id FROM shardctl.operations WHERE state = 'running'").fetchone()
        conn.execute("UPDATE shardctl.operations SET state = 'done', finished_at = now() WHERE id = %s", (op,))
    fleet.operation = op
    return fleet


def _objects(fleet) -> list[str]:
    out = []
    for server in ("a", "b"):
        with fleet.connect(server) as conn:
            out += [f"{server}: slot {r[0]}" for r in conn.execute("SELECT slot_name FROM pg_replication_slots")]
            out += [f"{server}: subscription {r[0]}" for r in conn.execute("SELECT subname FROM pg_subscription")]
        for dbname in sorted(fleet.databases(server) - {"postgres"}):
            with fleet.connect(server, dbname) as conn:
                out += [f"{server}/{dbname}: publication {r[0]}"
                        for r in conn.execute("SELECT pubname FROM pg_publication")]
    return sorted(out)


def test_leftovers_are_shown_everywhere_and_removed_by_orphans(left):
    op = left.operation
    made = _objects(left)
    assert sorted(made) == sorted([f"a: subscription shardctl_op{op}_0", f"b: subscription shardctl_op{op}_1",
                                   f"b: slot shardctl_op{op}_0", f"b: slot shardctl_op{op}_1",
                                   f"b: slot shardctl_op{op}_v0",
                                   f"b/orders_40_80: publication shardctl_op{op}_0",
                                   f"b/orders_40_80: publication shardctl_op{op}_1"]), made
    status = left.cli("status")
    assert status.code == 0, status.both
    assert "Leftover replication: 5 objects of shardctl's that no running operation owns" in status.out, status.out
    assert f"slot shardctl_op{op}_0 on server b (database orders_40_80): retains" in status.out
    assert f"operation {op} is not running: it finished or was aborted" in status.out
    assert "`shardctl orphans --remove` drops them" in status.out
    orphans = json.loads(left.cli("status", "--json").out)["orphans"]
    assert {(o["server"], o["kind"], o["name"]) for o in orphans} == {
        ("a", "subscription", f"shardctl_op{op}_0"), ("b", "subscription", f"shardctl_op{op}_1"),
        ("b", "slot", f"shardctl_op{op}_0"), ("b", "slot", f"shardctl_op{op}_1"), ("b", "slot", f"shardctl_op{op}_v0")}
    assert all(o["retained_bytes"] is not None and o["retained_bytes"] > 0 for o in orphans if o["kind"] == "slot")
    drift = left.cli("drift", "--detailed-exitcode")
    assert drift.code == 2, drift.both
    assert "# server.b holds 4 replication objects of shardctl's that no running operation owns" in drift.out
    assert "# server.a holds 1 replication object of shardctl's" in drift.out
    doctor = left.cli("doctor")
    assert "! leftover replication" in doctor.out and "`shardctl orphans --remove` drops them" in doctor.out, doctor.out

    # what the daemon shows each collection round: the same list, on the dashboard and in /metrics
    desired = workflow.load(str(left.path))
    fleet = Fleet(desired)
    with fleet.catalog() as conn:
        links, views = replication_views(observe(fleet, conn, inspect_schemas=False))
    snapshot = Snapshot(who="t", config_dir="/x", started_at=now(), branch_links=links, orphans=views)
    metrics = exposition(View(snapshot)).decode()
    assert "shardctl_leftover_replication_objects 5.0" in metrics
    series = f'{{database="orders_40_80",server="b",slot="shardctl_op{op}_0"}}'
    assert f"shardctl_leftover_replication_retained_bytes{series}" in metrics
    page = render_dashboard(snapshot, {}, now=now())
    assert "5 replication objects of shardctl's belong to no running operation" in page
    assert f"slot shardctl_op{op}_0" in page and "<h2>Leftover replication</h2>" in page

    listed = left.cli("orphans")
    assert listed.code == 2 and f"slot shardctl_op{op}_0 on server b (database orders_40_80): retains" in listed.out
    assert f"publication shardctl_op{op}_0 on server b (database orders_40_80)" in listed.out, listed.out
    removed = left.cli("orphans", "--remove")
    assert removed.code == 0 and "Removed 7 objects." in removed.out, removed.both
    assert _objects(left) == []
    assert left.cli("orphans").code == 0
    with left.catalog() as conn:  # journaled: one step per object
        steps = [r[0] for r in conn.execute(
            "SELECT j.step FROM shardctl.journal j JOIN shardctl.operations o ON o.id = j.operation"
            " WHERE o.kind = 'remove_orphans' AND j.status = 'done' ORDER BY j.seq")]
    assert steps[:2] == [f"drop subscription shardctl_op{op}_0 on a", f"drop subscription shardctl_op{op}_1 on b"]
    assert len(steps) == 7
    assert left.cli("drift", "--detailed-exitcode").code == 0
    assert "No changes." in left.cli("plan").out


def test_dropping_a_retired_shard_first_removes_what_replicates_out_of_it(left):
    """Its slots still stream to the targets' subscriptions: the drop removes those subscriptions
    and the slots, then the database, where DROP DATABASE alone would refuse it."""
    before, _ = all_rows(left)
    left.write("fleet.yaml", left.read("fleet.yaml") + "policies:\n  default:\n    autosplit: {retire_after: 0s}\n")
    plan = left.cli("plan")
    assert "# shard.orders/40-80 will be destroyed" in plan.out, plan.out
    dropped = left.cli("apply", "--auto-approve")
    assert dropped.code == 0 and "Destruction complete" in dropped.out, dropped.both
    assert "orders_40_80" not in left.databases("b")
    assert _objects(left) == []
    rows, problems = all_rows(left)
    assert problems == [] and rows == before
    assert [s[0] for s in active_shards(left)] == ["-40", "40-60", "60-80", "80-c0", "c0-"]


def test_a_cleanup_that_meets_a_silent_server_keeps_the_operation_open(fleet):
    """Server b (the source's, and the target 60-80's) dies just after the cutover: apply says the
    cutover is done and the cleanup is not, lists what is left, exits 1 (never "Apply
    complete!"); status lists the operation with why it stopped; once b is back, apply finishes."""
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    before, _ = all_rows(fleet)
    failed = _kill_mid_move(fleet, SPLIT, "cleanup", "b", ["-split", "orders/40-80"])
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Apply complete" not in failed.stdout
    assert ("split orders/40-80: the cutover is done (40-60, 60-80 own the range and take writes), but its cleanup"
            " is not: server b did not answer") in failed.stderr, failed.stderr
    op = failed.stderr.split("shardctl_op", 1)[1].split("_", 1)[0]
    assert f"subscription shardctl_op{op}_1 on server b (database orders_60_80)" in failed.stderr
    assert f"slot shardctl_op{op}_0 on server b (database orders_40_80)" in failed.stderr
    assert f"subscription shardctl_op{op}_0" not in failed.stderr  # a answered: its subscription is gone
    assert "`shardctl apply` finishes the cleanup" in failed.stderr
    status = fleet.cli("status")
    assert f"Interrupted: operation {op} split_shard shard.orders/40-80 at step 'split orders/40-80: cleanup'; past" \
           " its cutover" in status.out, status.out
    assert "it stopped on: split orders/40-80: the cutover is done" in status.out
    assert fleet.cli("up").code == 0
    finished = fleet.cli("apply", "--auto-approve")
    assert finished.code == 0 and "Apply complete!" in finished.out, finished.both
    assert _objects(fleet) == []
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == before
