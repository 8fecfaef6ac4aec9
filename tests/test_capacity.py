"""Issue 30, items 1 and 2: what `shards:` declares is reached, or shown waiting with why and
until when; `plan` and `drift` never say the fleet matches while it does not. On the quickstart,
as a user meets it: 4 -> 8 -> 6 shards with the default grace period (autosplit.retire_after 1h),
and a merge by hand right after a split."""

from __future__ import annotations

import re

from conftest import FleetDir
from engine.plan import planner
from engine.plan.reshard import Requests
from movers import active_shards, all_rows, preload
from test_load_planning import _observation
from test_resharding import _declaring, _moves, _with


def _grace_over(fleet: FleetDir) -> None:
    """The retired sources' grace period is over (their retirement moved two hours back)."""
    with fleet.catalog() as conn:
        conn.execute("UPDATE shardctl.shards SET retired_at = now() - interval '2 hours' WHERE state = 'retired'")


def test_4_to_8_to_6_with_the_default_grace_period_waits_then_reaches_6(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    before, _ = all_rows(fleet)
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("shards: 4", "shards: 8"))
    raised = fleet.cli("apply", "--auto-approve")
    assert raised.code == 0 and raised.out.count("Split complete") == 4, raised.both

    # a merge by hand right after the split: refused with the real state and when it ends
    early = fleet.cli("plan", "-merge", "orders/-20,20-40")
    assert early.code == 1, early.both
    assert re.search(r"shard -40 of the same range is the retired source of an earlier split, merge or move, kept"
                     r" read-only until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(autosplit.retire_after 1h\)", early.err), \
        early.err

    # lowered to 6 while the retired sources' names are held: the update is recorded, the
    # merges wait, and nothing says the fleet matches
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("shards: 8", "shards: 6"))
    lowered = fleet.cli("plan")
    assert lowered.code == 0, lowered.both
    assert "~ shards = 8 -> 6" in lowered.out and "Waiting" in lowered.out, lowered.out
    assert lowered.out.count(" waits until ") == 2, lowered.out
    assert "needs orders/-20 + 20-40 merged: shard -40 of the same range is the retired source" in lowered.out
    applied = fleet.cli("apply", "--auto-approve")
    assert applied.code == 0 and "Not done yet: 2 changes the configuration asks for wait" in applied.out, applied.both
    assert len(active_shards(fleet)) == 8
    for command in (("plan", "--detailed-exitcode"), ("plan", "--format", "markdown")):
        shown = fleet.cli(*command)
        assert "matches the configuration" not in shown.out, shown.out
    waiting = fleet.cli("plan", "--detailed-exitcode")
    assert waiting.code == 0 and "No changes now. The fleet does not match the configuration yet: 2 changes wait" \
        in waiting.out, waiting.out
    drift = fleet.cli("drift", "--detailed-exitcode")
    assert drift.code == 2 and "The configuration is not reached yet (a later plan does it): 2" in drift.out, drift.out

    # once the grace period is over, the next plan drops the retired shards and does the rest
    _grace_over(fleet)
    after = fleet.cli("plan")
    assert after.out.count("will be merged") == 2 and after.out.count("# (because retired by a split") == 4, after.out
    assert "Waiting" not in after.out
    done = fleet.cli("apply", "--auto-approve")
    assert done.code == 0 and done.out.count("Merge complete") == 2, done.both
    assert [s[0] for s in active_shards(fleet)] == ["-40", "40-80", "80-a0", "a0-c0", "c0-e0", "e0-"]
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == before
    again = fleet.cli("plan", "--detailed-exitcode")
    assert again.code == 0 and "No changes. Your fleet matches the configuration." in again.out, again.out

    # and a merge by hand once the grace period is over is planned with the drop it needs
    _grace_over(fleet)
    late = fleet.cli("plan", "-merge", "orders/80-a0,a0-c0")
    assert late.code == 0 and "requested by hand (`-merge orders/80-a0,a0-c0`)" in late.out, late.both


def test_a_lowering_whose_first_plan_had_to_wait_is_still_owed(tmp_path):
    desired = _declaring(tmp_path, 2)
    # `shards: 2` applied together with a split by hand: 5 active shards, the declaration recorded
    observation = _with(_observation(desired, {}), 5, declared=2)
    recorded = observation.catalog.databases["orders"]
    lowered = recorded.model_copy(update={"shards_lowered": True, "kept_shards": 0})
    plan = planner.plan(desired, observation.model_copy(update={"catalog": observation.catalog.model_copy(
        update={"databases": {"orders": lowered}})}))
    assert [m[0] for m in _moves(plan)] == ["merge_shards"] * 2 and not plan.waiting
    assert "(lowered by an earlier apply, not reached yet)" in plan.actions[0].reason.text
    # shards split by load (or by hand) since the lowering are kept
    kept = lowered.model_copy(update={"kept_shards": 3})
    plan = planner.plan(desired, observation.model_copy(update={"catalog": observation.catalog.model_copy(
        update={"databases": {"orders": kept}})}))
    assert _moves(plan) == [] and not plan.waiting
    # never lowered (the extra shards came from load): nothing is owed to the declaration
    plan = planner.plan(desired, observation)
    assert _moves(plan) == []


def test_shards_lowered_beside_a_split_by_hand_waits_for_it(tmp_path):
    desired = _declaring(tmp_path, 2)
    observation = _with(_observation(desired, {}), 4, declared=4)
    plan = planner.plan(desired, observation, Requests(splits=("orders/40-80",)))
    (waiting,) = plan.waiting
    assert "is planned once the split or merge asked for by hand is applied" in waiting.reason


# ---------------------------------------------------------------------------- items 3 and 6: branches

BRANCH = """
branches:
  dev:
    from: orders
    data: sample
    sample_percent: 10
    server: b
    ttl: 1h
"""


def test_a_branch_ttl_edited_moves_its_expiry_and_a_branch_dropped_by_hand_is_drift(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=500)
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + BRANCH)
    assert fleet.cli("apply", "--auto-approve").code == 0
    with fleet.catalog() as conn:
        created, expires = conn.execute("SELECT created_at, expires_at FROM shardctl.branches").fetchone()
    assert round((expires - created).total_seconds()) == 3600
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("ttl: 1h", "ttl: 3d"))
    plan = fleet.cli("plan")
    assert "# branch.dev will be updated in-place" in plan.out, plan.out
    assert '~ ttl        = "1h" -> "3d"' in plan.out and "~ expires_at" in plan.out, plan.out
    drift = fleet.cli("drift")
    assert "branch.dev will be updated in-place: ttl changed at" in drift.out, drift.out
    assert fleet.cli("apply", "--auto-approve").code == 0
    with fleet.catalog() as conn:
        (expires,) = conn.execute("SELECT expires_at FROM shardctl.branches").fetchone()
    assert round((expires - created).total_seconds()) == 3 * 86400
    assert "No changes. Your fleet matches the configuration." in fleet.cli("plan").out

    # dropped by hand: drift, with the way forward, and apply makes it again
    with fleet.connect("b") as conn:
        conn.execute("DROP DATABASE branch_dev WITH (FORCE)")
    drift = fleet.cli("drift", "--detailed-exitcode")
    assert drift.code == 2 and "branch.dev has been deleted (database branch_dev on server b)" in drift.out, drift.out
    plan = fleet.cli("plan")
    assert "# branch.dev will be reset" in plan.out and "was dropped outside shardctl" in plan.out, plan.out
    assert fleet.cli("apply", "--auto-approve").code == 0
    assert "branch_dev" in fleet.databases("b")
    with fleet.catalog() as conn:
        assert conn.execute("SELECT expires_at FROM shardctl.branches").fetchone() == (expires,)
    assert "No changes. Your fleet matches the configuration." in fleet.cli("plan").out


# ---------------------------------------------------------------------------- item 9: unknown is never cold

def test_unknown_samples_never_count_toward_cold(tmp_path):
    from engine.config.models import Policy
    from engine.detect.detector import assess, premise_holds
    from traces import samples

    policy = Policy.model_validate({"hot": {"queries_per_second": 10000}, "cold": {"queries_per_second": 100},
                                    "detection": {"sustain": "1m", "cold_for": "5m", "max_age": "5m"}})
    quiet = samples("s", {"queries_per_second": [5.0] * 40})
    (evidence,) = assess("s", quiet, policy).evidence
    # minutes without a sample (rejected and not stored) inside the window: not cold, even though
    # every missing round is shorter than detection.max_age
    gap = quiet[:15] + quiet[30:]
    assert assess("s", gap, policy).state == "normal"
    # a saved merge whose window now holds unknown samples: its premise fails
    unknown = samples("s", {"queries_per_second": [5.0] * 25 + [None] * 12 + [5.0] * 3})
    held, why = premise_holds(evidence, unknown, policy)
    assert not held and "unknown never counts as cold" in why, why


def test_a_saved_merge_is_refused_when_a_shard_turns_unknown(fleet):
    import json

    from movers import COLD_SAMPLES, cold_file, floor_below_shards
    from traces import samples, to_file

    assert fleet.cli("apply", "--auto-approve").code == 0
    floor_below_shards(fleet, 2)
    cold_file(fleet.base / "cold.json")
    saved = fleet.cli("plan", "--metrics", "cold.json", "-out", "merge.plan")
    assert saved.code == 0 and "will be merged" in saved.out, saved.both
    # the same window, but orders/-40 answered nothing for two minutes of it (rejected values)
    doc = json.loads((fleet.base / "cold.json").read_text())
    rest = [s for s in doc["samples"] if s["shard"] != "orders/-40"]
    unknown = samples("orders/-40", {"queries_per_second": [5.0] * (COLD_SAMPLES - 15) + [None] * 12 + [5.0] * 3})
    (fleet.base / "unknown.json").write_text(json.dumps({"samples": rest + to_file({"x": unknown})["samples"]}))
    refused = fleet.cli("apply", "merge.plan", "--metrics", "unknown.json")
    assert refused.code == 1 and "A premise of the saved plan no longer holds" in refused.err, refused.both
    assert "unknown never counts as cold" in refused.err
    assert fleet.cli("plan", "--metrics", "unknown.json").out.count("will be merged") <= 1


# ---------------------------------------------------------------------------- item 7: one truth

def test_a_split_by_hand_shows_on_the_daemons_dashboard_api_and_metrics(fleet):
    import os
    import subprocess
    import sys

    from test_watch_daemon import FAST_POLICY, Watch

    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("policy: default", "policy: fast") + FAST_POLICY)
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    watch = Watch(fleet)
    try:
        watch.wait("leadership", lambda: watch.status()["role"] == "leader", timeout=60)
        release = fleet.base / "release"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCTL_")}
        env.update({"NO_COLOR": "1", "SHARDCTL_HOLDPOINT": f"split orders/40-80: sync={release}"})
        person = subprocess.Popen([sys.executable, "-m", "engine", "-C", "fleet", "apply", "--auto-approve",
                                   "-split", "orders/40-80"], cwd=fleet.base, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            seen = watch.wait("the person's split in /api/status", lambda: "split_shard shard.orders/40-80" in (
                watch.status().get("activity") or "") and watch.status(), timeout=90)
            assert "run by" in seen["activity"] and seen["activity_since"], seen
            assert [op["address"] for op in seen["operations"] if op["in_progress"]] == ["shard.orders/40-80"]
            page = watch.text("/")
            assert "No split or merge is running" not in page and "split_shard shard.orders/40-80" in page
            metrics = watch.text("/metrics")
            assert "shardctl_move_in_progress 1.0" in metrics, metrics
        finally:
            release.write_text("go")
            out, _ = person.communicate(timeout=300)
        assert person.returncode == 0 and "Split complete" in out, out
        watch.wait("idle again", lambda: watch.status()["activity"] == "idle"
                   and not watch.status()["operations"], timeout=60)
        assert "shardctl_move_in_progress 0.0" in watch.text("/metrics")
        assert "No split or merge is running" in watch.text("/")
    finally:
        watch.stop()


def test_the_last_error_goes_once_what_failed_works_again():
    from datetime import UTC, datetime

    from engine.watch.daemon import _cleared
    from engine.watch.view import Snapshot

    snap = Snapshot(who="x", config_dir=".", started_at=datetime.now(UTC), last_error="collection failed: gone")
    assert _cleared(snap, "collection failed") == {"last_error": None}
    assert _cleared(snap, "check failed") == {}  # another failure is still shown until its own success


# ---------------------------------------------------------------------------- items 4 and 5: the directory

def test_a_copied_directory_is_refused_then_adopted_and_its_client_writes_only_into_the_copy(fleet):
    import json
    import subprocess

    from conftest import run_cli
    from engine.client import ShardClient

    assert fleet.cli("apply", "--auto-approve").code == 0
    assert fleet.cli("down").code == 0
    copy = fleet.base / "copy"
    subprocess.run(["cp", "-a", str(fleet.path), str(copy)], check=True)  # ownership kept, as a user's cp -a
    try:
        assert fleet.cli("up").code == 0  # the original runs again, beside the copy
        refused = run_cli("-C", "copy", "plan", cwd=fleet.base)
        assert refused.code == 1 and "Traceback" not in refused.both, refused.both
        assert "is a copy of" in refused.err and "`shardctl adopt`" in refused.err, refused.err
        adopted = run_cli("-C", "copy", "adopt", cwd=fleet.base)
        assert adopted.code == 0 and "is its own now" in adopted.err, adopted.both
        status = json.loads(run_cli("-C", "copy", "status", "--json", cwd=fleet.base).out)
        original = json.loads(fleet.cli("status", "--json").out)
        assert status["catalog"]["connection"] != original["catalog"]["connection"]
        with ShardClient(status["catalog"]["connection"], "orders") as client:
            client.execute(4242, "INSERT INTO customers (customer_id, name) VALUES (%s, %s)", (4242, "copy"))
            server, dbname = client.shard_for(4242).server, client.shard_for(4242).dbname
        with fleet.connect(server, dbname) as conn:
            assert conn.execute("SELECT count(*) FROM customers WHERE customer_id = 4242").fetchone() == (0,)
        with ShardClient(status["catalog"]["connection"], "orders") as client:
            assert client.execute(4242, "SELECT name FROM customers WHERE customer_id = 4242") == [("copy",)]
        with fleet.catalog() as conn:
            fleet_a = conn.execute("SELECT value FROM shardctl.meta WHERE key = 'fleet_id'").fetchone()
        plan = run_cli("-C", "copy", "plan", "--format", "json", cwd=fleet.base)
        assert plan.code == 0 and json.loads(plan.out)["fleet"]["fleet_id"] != fleet_a[0], plan.both
        assert "No changes." in run_cli("-C", "copy", "plan", cwd=fleet.base).out
    finally:
        run_cli("-C", "copy", "down", cwd=fleet.base)


def test_a_server_removed_from_the_yaml_is_named_and_stopped_by_down(fleet):
    text = fleet.read("fleet.yaml")
    fleet.write("fleet.yaml", text.replace("databases:", "  c:\n    embedded: true\n\ndatabases:", 1))
    assert fleet.cli("apply", "--auto-approve").code == 0
    fleet.write("fleet.yaml", text)  # c held no shards: it leaves the YAML
    status = fleet.cli("status")
    assert "server c: no longer declared in the configuration (embedded, running): shardctl no longer manages it;" \
           " `shardctl down` stops it" in status.out, status.out
    down = fleet.cli("down")
    assert "server c: no longer declared in the configuration; stopped" in down.out, down.out
    assert "server c: no longer declared in the configuration (embedded, stopped)" in fleet.cli("status").out
