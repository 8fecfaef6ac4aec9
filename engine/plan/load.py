"""Load-driven actions: split hot shards, merge cold neighbours, within policy. No I/O.

The detector says which shards are hot or cold and why; this module applies the rules around
acting on that: the global and per-database switches, the cooldown after a split or merge of an
overlapping range, the maximum shard count, the maximum of operations per plan, and where the
new shards go (another server first, the least loaded by storage).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta

from engine.config.loader import Desired, DesiredDatabase
from engine.config.models import Policy, span
from engine.config.sqlcheck import qualified
from engine.detect.detector import Assessment, assess
from engine.detect.forecast import merged_forecast_hot
from engine.keyspace import KeyRange, physical_name
from engine.observe import strays
from engine.observe.metrics import METRICS
from engine.observe.models import CatalogShard, Observation
from engine.plan import checks
from engine.plan.models import MergeShards, Reason, ShardSpec, SplitShard
from engine.plan.needs import active_replicas


def _spec(shard: CatalogShard) -> ShardSpec:
    return ShardSpec(name=shard.name, lo=shard.lo, hi=shard.hi, server=shard.server, dbname=shard.dbname)


def _overlaps(a: tuple[int | None, int | None], b: tuple[int | None, int | None]) -> bool:
    a_lo, a_hi = a
    b_lo, b_hi = b
    return (a_lo is None or b_hi is None or a_lo < b_hi) and (b_lo is None or a_hi is None or b_lo < a_hi)


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
                if e.at + cooldown > now and any(_overlaps((shard.lo, shard.hi), r) for r in e.ranges)]
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


def taken(db: DesiredDatabase, observation: Observation, ranges) -> tuple[str, datetime | None] | None:
    """Why a new shard of one of these ranges cannot be made yet, and until when (None: until
    something else is done first), or None when nothing stands in its name's way. A retired
    shard past its grace period is dropped by the same plan (engine.plan.planner), before the
    new one is made: its name is free."""
    recorded = {s.name: s for s in observation.catalog.databases[db.name].shards}
    grace = timedelta(seconds=db.effective_policy.autosplit.retire_after)
    now = observation.now()  # a grace period is about real time, never a recording's
    for r in ranges:
        shard = recorded.get(r.name)
        if shard is None:
            continue
        if shard.state == "retired" and shard.retired_at is not None:
            until = shard.retired_at + grace
            if until <= now:
                continue
            return (f"shard {r.name} of the same range is the retired source of an earlier split, merge or move,"
                    f" kept read-only until {until.strftime('%Y-%m-%dT%H:%M:%SZ')} (autosplit.retire_after"
                    f" {span(grace.total_seconds())}); the first plan after then drops it and does this"), until
        return (f"shard {r.name} of the same range exists ({shard.state}): an unfinished split, merge or move"
                " made it; `shardctl apply` finishes it (or `shardctl abort` it)"), None
    return None


def name_taken(db: DesiredDatabase, observation: Observation, ranges) -> str | None:
    found = taken(db, observation, ranges)
    return found[0] if found else None


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


_PK = re.compile(r"^PRIMARY KEY \((.*)\)")


def preconditions(db: DesiredDatabase, shards: list[CatalogShard], observation: Observation) -> str | None:
    """Why rows of these shards cannot move with logical replication, or None. Checked on what
    was observed; the executor checks again before it creates anything."""
    key = db.spec.shard_key.column
    reference = {qualified(t) for t in db.spec.reference_tables}  # replicated from their source, not moved
    for shard in shards:
        server = observation.servers.get(shard.server)
        if server is not None and server.reachable and server.wal_level != "logical":
            return f"server {shard.server} has wal_level = {server.wal_level} (logical is needed)"
        refused = checks.why_not(server, "move_source")
        if refused:
            return refused
        live = observation.shards.get(shard.address)
        snapshot = live.schema_snapshot if live else None
        for table, info in sorted((snapshot or {}).get("tables", {}).items()):
            if info.get("kind") not in ("table", "partitioned table") or qualified(table) in reference:
                continue
            if not key_in_primary_key(info, key):
                return (f"table {table} has no primary key that contains the shard key {key} (a row filter needs"
                        " the key in the replica identity, or UPDATE and DELETE on the source would fail)")
        if observation.strays.get(shard.address):
            return (f"{shard.address} holds {strays.describe(observation.strays[shard.address])};"
                    f" `shardctl strays {shard.address} --move` moves them to the shards that own them")
    for branch in active_replicas(observation, db.name):
        refused = checks.why_not(observation.servers.get(branch.server), "replica_target")
        if refused:  # the replica follows the move with subscriptions of its own
            return f"{refused} (replica {branch.name} follows every move of {db.name})"
    return None


def key_in_primary_key(table_info: dict, key: str) -> bool:
    for definition in table_info.get("constraints", {}).values():
        match = _PK.match(definition)
        if match and key in [c.strip().strip('"') for c in match.group(1).split(",")]:
            return True
    return False


def _latest_storage(observation: Observation, address: str) -> float | None:
    window = observation.metrics.get(address)
    # read from the column: building a Sample for each of thousands of shards' windows cost seconds
    values = window.values("storage_percent") if window is not None else []
    return next((v for v in reversed(values) if v is not None), None)


def storage_by_server(observation: Observation) -> dict[str, float]:
    """Storage share in use per server, summed over every shard seen there (computed once a plan)."""
    load: dict[str, float] = {}
    for database in observation.catalog.databases.values():
        for shard in database.shards:
            value = _latest_storage(observation, shard.address)
            load[shard.server] = load.get(shard.server, 0.0) + (value or 0.0)
    return load


def capable_targets(placement, observation: Observation) -> tuple[list[str], str | None]:
    """The placement's servers that can take a move's target (the preflight checks of
    engine/plan/checks.py), and why none can when none can."""
    able = [s for s in placement if checks.why_not(observation.servers.get(s), "move_target") is None]
    if able:
        return able, None
    return [], "no server of its placement can take a move's target: " + "; ".join(
        str(checks.why_not(observation.servers.get(s), "move_target")) for s in dict.fromkeys(placement))


def split_targets(db: DesiredDatabase, shard: CatalogShard, storage: dict[str, float], placement,
                  parts: int) -> tuple[ShardSpec, ...]:
    """Where a split's `parts` even ranges go: servers other than the source's first, then the
    least loaded by storage, then by name."""
    order = sorted(placement, key=lambda s: (s == shard.server, storage.get(s, 0.0), s))
    ranges = KeyRange(shard.lo, shard.hi).split(parts)
    return tuple(
        ShardSpec(name=r.name, lo=r.lo, hi=r.hi, server=order[i % len(order)], dbname=physical_name(db.name, r))
        for i, r in enumerate(ranges)
    )


def _split(db: DesiredDatabase, shard: CatalogShard, verdict: Assessment, storage: dict[str, float],
           placement=None) -> SplitShard:
    policy = db.effective_policy
    worst = max(verdict.evidence, key=lambda e: e.low / e.threshold)
    return split_action(db, shard, policy.autosplit.targets, storage, placement or db.spec.placement,
                        Reason(cause="load", text=f"{shard.address} is hot: {worst.metric} over its threshold for"
                               f" {span(worst.window_seconds)} ({worst.samples} samples)"),
                        evidence=verdict.evidence, automatic=policy.autosplit.enabled)


def split_action(db: DesiredDatabase, shard: CatalogShard, parts: int, storage: dict[str, float], placement,
                 reason: Reason, evidence: tuple = (), automatic: bool = False) -> SplitShard:
    """A split of `shard` into `parts` even ranges, whatever caused it (load, `shards:`, by hand)."""
    targets = split_targets(db, shard, storage, placement, parts)
    return SplitShard(database=db.name, source=_spec(shard), targets=targets, evidence=evidence,
                      automatic=automatic, reason=reason)


def _merge(db: DesiredDatabase, shards: list[CatalogShard], verdicts: dict[str, Assessment],
           observation: Observation, storage: dict[str, float]) -> MergeShards:
    evidence = tuple(e for s in shards for e in verdicts[s.address].evidence)
    return merge_action(db, shards, observation, storage, Reason(
        cause="load", text=f"{' and '.join(s.address for s in shards)} are adjacent and cold for "
        f"{span(db.effective_policy.cold_for_seconds)}"), evidence=evidence,
        automatic=db.effective_policy.automerge.enabled)


def merge_action(db: DesiredDatabase, shards: list[CatalogShard], observation: Observation,
                 storage: dict[str, float], reason: Reason, evidence: tuple = (),
                 automatic: bool = False, held: Mapping[str, int] | None = None) -> MergeShards:
    """A merge of adjacent `shards` into one, whatever caused it (load, `shards:`, by hand).
    `held`: how many of the database's shards each server holds once the plan's earlier actions
    are done, so that several merges of one plan spread over the placement."""
    joint = KeyRange(shards[0].lo, shards[-1].hi)
    # the target lives where the larger source is (less data moves); sources within 10% of the
    # largest count as equal (moving either costs about the same), and among them the server
    # holding fewer of the database's shards, then the less loaded one, wins. Only a server of
    # the declared placement that can take a move's target: a source left on another server
    # (one being drained, one of another major version) never draws the target there
    placement = list(db.spec.placement)
    able = set(capable_targets([s.server for s in shards if s.server in placement], observation)[0])
    candidates = [s for s in shards if s.server in able] or shards
    size = {s.address: _latest_storage(observation, s.address) or 0.0 for s in candidates}
    largest = max(size.values())
    similar = [s for s in candidates if size[s.address] >= 0.9 * largest]
    held = held or {}
    home = min(similar, key=lambda s: (held.get(s.server, 0), storage.get(s.server, 0.0),
                                       s.server != shards[0].server)).server
    if home not in able:  # elsewhere in the placement, then (the callers hold a merge none of it can take)
        home = next(iter(capable_targets(placement, observation)[0]), placement[0])
    return MergeShards(
        database=db.name, sources=tuple(_spec(s) for s in shards),
        target=ShardSpec(name=joint.name, lo=joint.lo, hi=joint.hi, server=home, dbname=physical_name(db.name, joint)),
        evidence=evidence, automatic=automatic, reason=reason,
    )
