"""Relocation: shards on servers outside their database's declared placement move onto it. No I/O.

A server dropped from `placement:` is drained this way: every active shard on it moves, one
MoveShard each, to the placement's server with the fewest of the database's shards (then the
least storage, then by name). A move keeps the shard's range and name; the copy left behind
retires like a split's source. A server removed from `servers:` while it still holds shards is
refused by the planner (engine/plan/planner.py), with the way forward.
"""

from __future__ import annotations

from engine.config.loader import DesiredDatabase
from engine.keyspace import KeyRange
from engine.observe.models import CatalogDatabase, Observation
from engine.plan.load import capable_targets, preconditions, storage_by_server
from engine.plan.models import MoveShard, Reason, ShardSpec, transit_name


def relocations(db: DesiredDatabase, recorded: CatalogDatabase, observation: Observation,
                where: str) -> tuple[list[MoveShard], list[str]]:
    if recorded.state != "active" or any(p.database == db.name for p in observation.catalog.pending_moves):
        return [], []
    placement = list(db.spec.placement)
    active = sorted((s for s in recorded.shards if s.state == "active"), key=lambda s: KeyRange(s.lo, s.hi).lo_unsigned)
    outside = [s for s in active if s.server not in placement]
    if not outside:
        return [], []
    able, none_able = capable_targets(placement, observation)
    counts = {server: sum(1 for s in active if s.server == server) for server in placement}
    storage = storage_by_server(observation)
    names = {s.name for s in recorded.shards}
    actions: list[MoveShard] = []
    notes: list[str] = []
    for shard in outside:
        blocked = none_able or preconditions(db, [shard], observation)
        if not blocked:
            dest = min(able, key=lambda s: (counts[s], storage.get(s, 0.0), s))
            blocked = _taken(shard.name, shard.dbname, shard.server, dest, names, observation)
        if blocked:
            notes.append(f"shard.{shard.address}: on server {shard.server}, outside the placement"
                         f" [{', '.join(placement)}], but it cannot be moved: {blocked}")
            continue
        counts[dest] += 1
        actions.append(MoveShard(
            database=db.name,
            source=ShardSpec(name=shard.name, lo=shard.lo, hi=shard.hi, server=shard.server, dbname=shard.dbname),
            target=ShardSpec(name=shard.name, lo=shard.lo, hi=shard.hi, server=dest, dbname=shard.dbname),
            reason=Reason(cause="config", text=f"server {shard.server} is not in the placement of {db.name}"
                          f" [{', '.join(placement)}] at {where}: its shards move onto the placement (drain);"
                          f" {dest} has the fewest of them")))
    return actions, notes


def _taken(name: str, dbname: str, source: str, dest: str, names: set[str], observation: Observation) -> str | None:
    for other in (transit_name(name, source), transit_name(name, dest)):
        if other in names:
            return (f"its copy {other} still exists (retired); it is dropped when its grace period"
                    " (autosplit.retire_after) is over")
    live = observation.servers.get(dest)
    if live is not None and dbname in live.databases:
        return f"database {dbname} already exists on server {dest}"
    return None
