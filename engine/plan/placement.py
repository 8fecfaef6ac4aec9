"""Where shards go and whether they may move: the preconditions every split, merge and move of a
plan shares (logical replication's needs, strays, replicas that follow), names still taken by
an earlier shard, servers able to take a target, and the split and merge actions placed on them.
No I/O. The planners that decide to act (engine/plan/load_rules.py for load, reshard.py for
`shards:` and requests, relocate.py for placement and rebalancing, forecast.py) all build here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta

from engine.config.loader import DesiredDatabase
from engine.config.names import qualified
from engine.durations import span
from engine.keyspace import KeyRange, physical_name
from engine.observe import strays
from engine.observe.models import CatalogShard, Observation
from engine.plan import checks
from engine.plan.models import MergeShards, Reason, ShardSpec, SplitShard
from engine.plan.needs import active_replicas


def spec_of(shard: CatalogShard) -> ShardSpec:
    return ShardSpec(name=shard.name, lo=shard.lo, hi=shard.hi, server=shard.server, dbname=shard.dbname)


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


def split_action(db: DesiredDatabase, shard: CatalogShard, parts: int, storage: dict[str, float], placement,
                 reason: Reason, evidence: tuple = (), automatic: bool = False) -> SplitShard:
    """A split of `shard` into `parts` even ranges, whatever caused it (load, `shards:`, by hand)."""
    targets = split_targets(db, shard, storage, placement, parts)
    return SplitShard(database=db.name, source=spec_of(shard), targets=targets, evidence=evidence,
                      automatic=automatic, reason=reason)


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
        database=db.name, sources=tuple(spec_of(s) for s in shards),
        target=ShardSpec(name=joint.name, lo=joint.lo, hi=joint.hi, server=home, dbname=physical_name(db.name, joint)),
        evidence=evidence, automatic=automatic, reason=reason,
    )


def overlaps(a: tuple[int | None, int | None], b: tuple[int | None, int | None]) -> bool:
    a_lo, a_hi = a
    b_lo, b_hi = b
    return (a_lo is None or b_hi is None or a_lo < b_hi) and (b_lo is None or a_hi is None or b_lo < a_hi)
