"""Load-driven actions: split hot shards, merge cold neighbours, within policy. No I/O.

The detector says which shards are hot or cold and why; this module applies the rules around
acting on that: the global and per-database switches, the cooldown after a split or merge of an
overlapping range, the maximum shard count, the maximum of operations per plan. Whether shards
may move and where the new ones go is engine/plan/placement.py's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from engine.config.loader import Desired, DesiredDatabase
from engine.config.models import Policy
from engine.detect.detector import Assessment, assess
from engine.detect.forecast import merged_forecast_hot
from engine.durations import span
from engine.keyspace import KeyRange
from engine.observe.metrics import METRICS
from engine.observe.models import CatalogShard, Observation
from engine.plan.models import MergeShards, Reason, SplitShard
from engine.plan.placement import (
    capable_targets,
    merge_action,
    name_taken,
    overlaps,
    preconditions,
    split_action,
    storage_by_server,
)


def assessments(desired: Desired, observation: Observation) -> dict[str, Assessment]:
    """Every active shard of every declared database that the catalog knows, assessed."""
    out: dict[str, Assessment] = {}
    for name, db in desired.databases.items():
        recorded = observation.catalog.databases.get(name)
        if recorded is None or recorded.state != "active":
            continue
        locations = {(kind, m): desired.threshold_location(name, kind, m) for kind in ("hot", "cold") for m in METRICS}
        for shard in recorded.shards:
            if shard.state == "active":
                out[shard.address] = assess(shard.address, observation.metrics.get(shard.address, ()),
                                            db.effective_policy, locations, at=judged_at(observation))
    return out


def judged_at(observation: Observation):
    """The instant load is judged at: what the metrics describe, else when they were taken."""
    return observation.metrics_at or observation.taken_at


def load_actions(desired: Desired, observation: Observation) -> tuple[list, list[str]]:
    actions: list = []
    warnings: list[str] = list(observation.metrics_notes)
    now = observation.now()  # cooldowns are about real time, never the recording's
    verdicts = assessments(desired, observation)
    storage = storage_by_server(observation)
    for name, db in desired.databases.items():
        recorded = observation.catalog.databases.get(name)
        if recorded is None or recorded.state != "active":
            continue
        if any(p.database == name for p in observation.catalog.pending_moves):
            continue  # an unfinished split or merge comes first
        shards = sorted(
            (s for s in recorded.shards if s.state == "active"), key=lambda s: KeyRange(s.lo, s.hi).lo_unsigned
        )
        for shard in shards:
            verdict = verdicts[shard.address]
            for line in verdict.near:
                warnings.append(f"shard.{shard.address}: {line}")
            if verdict.state == "stale":
                warnings.append(f"shard.{shard.address}: stale: {verdict.why}; no split or merge is judged on it")
        hot = [verdicts[s.address] for s in shards if verdicts[s.address].state == "hot"]
        cold = {s.address for s in shards if verdicts[s.address].state == "cold"}
        if not (hot or cold):
            continue
        switched_off = ("resharding is disabled for the whole fleet (resharding: {enabled: false})"
                        if not desired.resharding_enabled else
                        f"resharding is disabled for {name} (resharding: false)" if not db.spec.resharding else None)
        if switched_off:
            for a in hot:
                warnings.append(f"shard.{a.shard}: hot, but {switched_off}")
            continue
        actions_for_db, notes = _plan_database(db, shards, hot, cold, verdicts, observation, storage, now)
        actions += actions_for_db
        warnings += notes
    return actions, warnings


def _plan_database(db: DesiredDatabase, shards: list[CatalogShard], hot: list[Assessment], cold: set[str],
                   verdicts: dict[str, Assessment], observation: Observation, storage: dict[str, float],
                   now: datetime) -> tuple[list, list[str]]:
    policy = db.effective_policy
    cooldown = timedelta(seconds=policy.autosplit.cooldown)
    events = [e for e in observation.catalog.reshard_events if e.database == db.name]

    def cooling(shard: CatalogShard) -> datetime | None:
        if cooldown <= timedelta(0):
            return None  # a zero cooldown holds nothing back, not even an event stamped after `now`
        ends = [e.at + cooldown for e in events
                if e.at + cooldown > now and any(overlaps((shard.lo, shard.hi), r) for r in e.ranges)]
        return max(ends) if ends else None

    by_address = {s.address: s for s in shards}
    candidates: list[tuple[str, SplitShard | MergeShards]] = []
    notes: list[str] = []
    count = len(shards)
    for verdict in sorted(hot, key=lambda a: (-a.severity, a.shard)):
        shard = by_address[verdict.shard]
        until = cooling(shard)
        if until:
            notes.append(f"shard.{shard.address}: hot, but held back by the cooldown until "
                         f"{until.strftime('%Y-%m-%dT%H:%M:%SZ')} (autosplit.cooldown {policy.autosplit.cooldown:g}s)")
            continue
        if count + policy.autosplit.targets - 1 > policy.autosplit.max_shards:
            notes.append(f"shard.{shard.address}: hot, but {db.name} would exceed autosplit.max_shards"
                         f" ({policy.autosplit.max_shards})")
            continue
        able, none_able = capable_targets(db.spec.placement, observation)
        blocked = (preconditions(db, [shard], observation) or none_able
                   or name_taken(db, observation, KeyRange(shard.lo, shard.hi).split(policy.autosplit.targets)))
        if blocked:
            notes.append(f"shard.{shard.address}: hot, but it cannot be split: {blocked}")
            continue
        candidates.append(("split", _split(db, shard, verdict, storage, able)))
        count += policy.autosplit.targets - 1

    # merges never go below the declared shard count: that layout is the operator's decision
    floor = db.spec.shards
    merged = 0
    i = 0
    while i < len(shards) - 1:
        left, right = shards[i], shards[i + 1]
        if left.address in cold and right.address in cold and left.hi == right.lo:
            held = cooling(left) or cooling(right)
            if len(shards) - merged - 1 < floor:
                notes.append(f"shard.{left.address} and shard.{right.address}: cold, but {db.name} is at its"
                             f" declared shard count ({floor}); lower `shards:` to allow merges")
                break
            blocked = (preconditions(db, [left, right], observation)
                       or capable_targets(db.spec.placement, observation)[1]
                       or name_taken(db, observation, [KeyRange(left.lo, right.hi)])
                       or _merged_too_busy(policy, verdicts[left.address], verdicts[right.address])
                       or _merged_forecast_hot(policy, [left, right], observation))
            if held:
                notes.append(f"shard.{left.address} and shard.{right.address}: cold, but held back by the cooldown"
                             f" until {held.strftime('%Y-%m-%dT%H:%M:%SZ')}")
            elif blocked:
                notes.append(
                    f"shard.{left.address} and shard.{right.address}: cold, but they cannot be merged: {blocked}"
                )
            else:
                candidates.append(("merge", _merge(db, [left, right], verdicts, observation, storage)))
                merged += 1
                i += 2
                continue
        i += 1

    limit = policy.autosplit.max_concurrent
    chosen = [action for _, action in candidates[:limit]]
    for _, action in candidates[limit:]:
        notes.append(f"{action.address}: {action.kind.replace('_', ' ')} deferred to a later plan"
                     f" (autosplit.max_concurrent is {limit})")
    return chosen, notes


ADDITIVE = ("queries_per_second", "connections", "cpu_percent", "memory_percent", "storage_percent")


def _merged_too_busy(policy: Policy, left: Assessment, right: Assessment) -> str | None:
    """Hysteresis between cold and hot: a merge whose summed peaks would come within the
    tolerance of a hot threshold would be split again; say so instead of planning it."""
    band = 1 - policy.detection.tolerance_percent / 100.0
    peaks: dict[str, float] = {}
    for verdict in (left, right):
        for e in verdict.evidence:
            if e.metric in ADDITIVE:
                peaks[e.metric] = peaks.get(e.metric, 0.0) + e.high
    for metric, total in sorted(peaks.items()):
        threshold = getattr(policy.hot, metric)
        if threshold is not None and total >= threshold * band:
            return (f"together their {metric} peaks at {total:g}, within the {policy.detection.tolerance_percent:g}%"
                    f" tolerance of the hot threshold {threshold:g}, so the merged shard could be split again")
    return None


def _merged_forecast_hot(policy: Policy, shards: list[CatalogShard], observation: Observation) -> str | None:
    """A forecast never plans a merge, but it holds one back that would be split again."""
    if policy.forecast.mode == "off":
        return None
    return merged_forecast_hot([observation.hourly.get(s.address, ()) for s in shards], policy,
                               judged_at(observation) or observation.now())


def _split(db: DesiredDatabase, shard: CatalogShard, verdict: Assessment, storage: dict[str, float],
           placement=None) -> SplitShard:
    policy = db.effective_policy
    worst = max(verdict.evidence, key=lambda e: e.low / e.threshold)
    return split_action(db, shard, policy.autosplit.targets, storage, placement or db.spec.placement,
                        Reason(cause="load", text=f"{shard.address} is hot: {worst.metric} over its threshold for"
                               f" {span(worst.window_seconds)} ({worst.samples} samples)"),
                        evidence=verdict.evidence, automatic=policy.autosplit.enabled)


def _merge(db: DesiredDatabase, shards: list[CatalogShard], verdicts: dict[str, Assessment],
           observation: Observation, storage: dict[str, float]) -> MergeShards:
    evidence = tuple(e for s in shards for e in verdicts[s.address].evidence)
    return merge_action(db, shards, observation, storage, Reason(
        cause="load", text=f"{' and '.join(s.address for s in shards)} are adjacent and cold for "
        f"{span(db.effective_policy.cold_for_seconds)}"), evidence=evidence,
        automatic=db.effective_policy.automerge.enabled)
