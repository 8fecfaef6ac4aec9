"""Planning from load: hot shards split, cold neighbours merge, within policy; recorded samples
in, plan out, no servers needed. Rendered plans are pinned by golden files."""

from datetime import timedelta

import pytest

from conftest import assert_golden
from engine.config import loader
from engine.keyspace import even_ranges, physical_name
from engine.observe.models import (
    AppliedStep,
    CatalogDatabase,
    CatalogShard,
    CatalogState,
    LiveServer,
    Observation,
    ReshardEvent,
)
from engine.plan import planner
from engine.render.renderers import render
from traces import START, samples, unknown

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE t (customer_id bigint PRIMARY KEY);"}
    shards: 2
    placement: [a, b]
"""


def _desired(tmp_path, extra: str = "", fleet: str = FLEET):
    (tmp_path / "fleet.yaml").write_text(fleet + extra)
    return loader.load(tmp_path, cwd=tmp_path)


def _observation(desired, windows, shards: int = 4, events=(), now_offset: int | None = None,
                 metrics_offset: int | None = None):
    """`now_offset` is the wall clock and `metrics_offset` the instant the metrics describe, in
    seconds after START; both default to the newest sample, as `plan --metrics FILE` does."""
    newest = max((s.at for w in windows.values() for s in w), default=START)
    metrics_at = newest if metrics_offset is None else START + timedelta(seconds=metrics_offset)
    taken_at = newest if now_offset is None else START + timedelta(seconds=now_offset)
    db = desired.databases["orders"]
    steps = tuple(AppliedStep(seq=i + 1, name=s.name, sha256=s.sha256) for i, s in enumerate(db.schema_steps))
    catalog_shards = tuple(
        CatalogShard(database="orders", name=r.name, lo=r.lo, hi=r.hi, server="ab"[i % 2],
                     dbname=physical_name("orders", r), state="active")
        for i, r in enumerate(even_ranges(shards))
    )
    settings = planner.settings_of(db)
    recorded = CatalogDatabase(
        name="orders", key_column="customer_id", key_type="bigint", protect=False, policy_name=db.policy_name,
        policy=settings.policy, placement=settings.placement, state="active", schema_steps=steps,
        shards=catalog_shards,
    )
    servers = {n: LiveServer(name=n, reachable=True, version="18.6", wal_level="logical", databases=())
               for n in ("a", "b")}
    return Observation(
        catalog=CatalogState(exists=True, schema_version=2, serial=7, epoch=1, databases={"orders": recorded},
                             reshard_events=tuple(events)),
        servers=servers, shards={}, metrics=windows, metrics_source="recorded traces.yaml",
        taken_at=taken_at, metrics_at=metrics_at,
    )


SUSTAINED = 31  # samples 10 s apart: over a threshold for 5m10s, past the default 5m sustain
COLD_FOR = 181  # quiet for 30m10s, past the default 30m cold_for
HOT = {"queries_per_second": [15000, 16000, 15500, 17000, 16500] * 6 + [16000]}


def _windows(hot_shards=("orders/40-80",), cold=False):
    names = [f"orders/{r.name}" for r in even_ranges(4)]
    length = COLD_FOR if cold else SUSTAINED
    quiet = {"queries_per_second": [5.0] * length}
    hot = {"queries_per_second": (HOT["queries_per_second"] * 6)[:length]}
    return {n: samples(n, hot if n in hot_shards else quiet) for n in names}


def test_a_hot_shard_is_split_onto_the_other_server_with_evidence(tmp_path):
    desired = _desired(tmp_path)
    plan = planner.plan(desired, _observation(desired, _windows()))
    (split,) = plan.actions
    assert split.kind == "split_shard" and split.source.name == "40-80"
    assert [(t.name, t.server) for t in split.targets] == [("40-60", "a"), ("60-80", "b")]
    (evidence,) = split.evidence
    assert evidence.metric == "queries_per_second" and evidence.samples == 30  # 5m of 10 s samples
    assert (evidence.low, evidence.high) == (15000, 17000)
    assert evidence.policy_location == "policies/default.yaml:10:7"
    assert plan.summary.add == 2 and plan.summary.destroy == 1 and plan.summary.by_cause == {"load": 1}
    assert_golden("split.txt", render(plan, "text"))
    assert_golden("split.md", render(plan, "markdown"))
    assert_golden("split.json", render(plan, "json"))


def test_a_database_threshold_override_is_the_evidence_source(tmp_path):
    desired = _desired(tmp_path, "    thresholds:\n      hot: {queries_per_second: 1000}\n")
    windows = {n: samples(n, {"queries_per_second": [1500] * SUSTAINED}) if n == "orders/-40" else w
               for n, w in _windows(hot_shards=()).items()}
    (split,) = planner.plan(desired, _observation(desired, windows)).actions
    assert split.evidence[0].threshold == 1000
    assert split.evidence[0].policy_location == "fleet.yaml:11:13"


def test_no_load_no_action_and_unknown_no_action(tmp_path):
    desired = _desired(tmp_path)
    assert planner.plan(desired, _observation(desired, _windows(hot_shards=()))).actions == ()
    down = {n: unknown(n, 10) for n in _windows()}
    assert planner.plan(desired, _observation(desired, down)).actions == ()


def test_cold_neighbours_merge_down_to_the_declared_shard_count(tmp_path):
    desired = _desired(tmp_path, "    policy: relaxed\npolicies:\n  relaxed:\n"
                                 "    cold: {queries_per_second: 100}\n    autosplit: {max_concurrent: 4}\n")
    plan = planner.plan(desired, _observation(desired, _windows(hot_shards=(), cold=True)))
    merges = [a for a in plan.actions if a.kind == "merge_shards"]
    assert [(m.sources[0].name, m.sources[1].name, m.target.name) for m in merges] == [
        ("-40", "40-80", "-80"), ("80-c0", "c0-", "80-")]
    assert merges[0].target.dbname == "orders_min_80"
    assert_golden("merge.txt", render(plan, "text"))
    # at the declared count there is nothing more to merge
    at_floor = _desired(tmp_path, fleet="    shards: 4\n".join(FLEET.split("    shards: 2\n")))
    plan = planner.plan(at_floor, _observation(at_floor, _windows(hot_shards=(), cold=True)))
    assert plan.actions == ()
    assert any("declared shard count" in w for w in plan.warnings)


def test_a_recent_split_holds_the_range_back_for_the_cooldown(tmp_path):
    desired = _desired(tmp_path)
    r = even_ranges(4)[1]
    event = ReshardEvent(at=START, database="orders", ranges=((r.lo, r.hi),))
    plan = planner.plan(desired, _observation(desired, _windows(), events=[event]))
    assert plan.actions == ()
    assert any("held back by the cooldown until 2026-11-26T10:30:00Z" in w for w in plan.warnings)
    later = planner.plan(desired, _observation(desired, _windows(), events=[event], now_offset=1801))
    assert [a.kind for a in later.actions] == ["split_shard"]


def test_a_zero_cooldown_holds_nothing_back_even_an_event_after_now(tmp_path):
    desired = _desired(tmp_path, "policies:\n  default:\n    autosplit: {cooldown: 0s}\n")
    r = even_ranges(4)[1]
    after_now = ReshardEvent(at=START + timedelta(hours=5), database="orders", ranges=((r.lo, r.hi),))
    plan = planner.plan(desired, _observation(desired, _windows(), events=[after_now]))
    assert [a.kind for a in plan.actions] == ["split_shard"]
    assert not any("cooldown" in w for w in plan.warnings)


def test_a_what_if_on_an_old_recording_judges_cooldowns_at_the_present(tmp_path):
    """The load comes from a recording made three days ago; the catalog's splits since then are
    judged against the present, as the real apply would be: one 10 minutes ago still cools, one
    two hours ago no longer does (its 30-minute cooldown is over), whatever the recording's age."""
    desired = _desired(tmp_path)
    r = even_ranges(4)[1]
    three_days = 3 * 24 * 3600
    now = three_days + 300  # the present, seconds after START; the recording ends at START + 300 s
    recent = ReshardEvent(at=START + timedelta(seconds=now - 600), database="orders", ranges=((r.lo, r.hi),))
    old = ReshardEvent(at=START + timedelta(seconds=now - 7200), database="orders", ranges=((r.lo, r.hi),))
    held = planner.plan(desired, _observation(desired, _windows(), events=[recent], now_offset=now))
    assert held.actions == () and any("held back by the cooldown" in w for w in held.warnings)
    free = planner.plan(desired, _observation(desired, _windows(), events=[old], now_offset=now))
    assert [a.kind for a in free.actions] == ["split_shard"]


def test_max_concurrent_defers_the_rest_and_max_shards_refuses(tmp_path):
    desired = _desired(tmp_path)
    plan = planner.plan(desired, _observation(desired, _windows(hot_shards=("orders/-40", "orders/c0-"))))
    assert len(plan.actions) == 1
    assert any("deferred to a later plan (autosplit.max_concurrent is 1)" in w for w in plan.warnings)
    capped = _desired(tmp_path, "    policy: capped\npolicies:\n  capped:\n    hot: {queries_per_second: 10000}\n"
                                "    autosplit: {max_shards: 4}\n")
    plan = planner.plan(capped, _observation(capped, _windows()))
    assert plan.actions == () and any("max_shards" in w for w in plan.warnings)


@pytest.mark.parametrize("switch,expected", [
    ("    resharding: false\n", "resharding is disabled for orders"),
    ("resharding: {enabled: false}\n", "resharding is disabled for the whole fleet"),
])
def test_resharding_can_be_switched_off_per_database_and_globally(tmp_path, switch, expected):
    desired = _desired(tmp_path, switch)
    plan = planner.plan(desired, _observation(desired, _windows()))
    assert plan.actions == ()
    assert any(expected in w for w in plan.warnings)


def test_a_shard_near_its_threshold_gets_a_warning_not_an_action(tmp_path):
    desired = _desired(tmp_path)
    windows = _windows(hot_shards=())
    windows["orders/80-c0"] = samples("orders/80-c0", {"latency_ms": [99] * 26 + [98, 103, 99, 101, 97]})
    plan = planner.plan(desired, _observation(desired, windows))
    assert plan.actions == ()
    near = "shard.orders/80-c0: latency_ms 97 ms is near the hot threshold 100 ms"
    assert any(w.startswith(near) for w in plan.warnings)
    windows["orders/80-c0"] = samples("orders/80-c0", {"latency_ms": [99] * 27 + [101] * 4})
    plan = planner.plan(desired, _observation(desired, windows))
    assert plan.actions == ()
    assert any(w.startswith("shard.orders/80-c0: latency_ms over the hot threshold 100 ms for 40s of the 5m sustain")
               for w in plan.warnings)


def test_a_shard_whose_samples_stopped_is_stale_and_never_split(tmp_path):
    desired = _desired(tmp_path)
    windows = _windows()
    plan = planner.plan(desired, _observation(desired, windows, metrics_offset=300 + 31))
    assert plan.actions == ()
    assert "shard.orders/40-80: stale: newest sample 2026-11-26T10:05:00Z is 31s old, older than detection.max_age" \
        " (30s); no split or merge is judged on it" in plan.warnings
