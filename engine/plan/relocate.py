"""Relocation: shards on servers outside their database's declared placement move onto it. No I/O.

Shards also move to even out a database's storage over its placement (`rebalance` in the
policy), e.g. after a server is added to it.

A server dropped from `placement:` is drained this way: every active shard on it moves, one
MoveShard each, to the placement's server with the fewest of the database's shards (then the
least storage, then by name). A move keeps the shard's range and name; the copy left behind
retires like a split's source. A server removed from `servers:` while it still holds shards is
refused by the planner (engine/plan/planner.py), with the way forward.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.config.loader import DesiredDatabase
from engine.keyspace import KeyRange
from engine.observe.models import CatalogDatabase, CatalogShard, Observation
from engine.plan.load import capable_targets, preconditions, storage_by_server
from engine.plan.models import MoveShard, Reason, ServerBalance, ShardSpec, transit_name


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


def rebalance(db: DesiredDatabase, recorded: CatalogDatabase, observation: Observation,
              capacity: Mapping[str, float | None], where: str) -> tuple[list[MoveShard], list[str]]:
    """Moves that bring each placement server's storage of this database toward its share
    (capacity.storage, else equal), within `rebalance` of the policy: planned while a server is
    further than `tolerance_percent` from its target, each the move that puts the most storage
    where it belongs, and only when that is at least `tolerance_percent` of the shard's size (so
    shards of slightly different sizes never shuffle back and forth)."""
    policy = db.effective_policy.rebalance
    placement = list(dict.fromkeys(db.spec.placement))
    if not policy.enabled or policy.max_moves == 0 or len(placement) < 2 or recorded.state != "active":
        return [], []
    if any(p.database == db.name for p in observation.catalog.pending_moves):
        return [], []
    active = sorted((s for s in recorded.shards if s.state == "active"), key=lambda s: KeyRange(s.lo, s.hi).lo_unsigned)
    if any(s.server not in placement for s in active):
        return [], []  # draining comes first
    unreachable = [s for s in placement if observation.servers.get(s) is None or not observation.servers[s].reachable]
    if unreachable:
        # sizes on a server that does not answer are unknown, never zero: nothing moves on them
        return [], [f"database.{db.name}: rebalancing waits: server {', '.join(unreachable)} does not answer"]
    sizes: dict[str, int] = {}
    for shard in active:
        live = observation.shards.get(shard.address)
        if live is None or not live.exists:
            return [], []  # not inspected (planning from a recording), or dropped (drift recreates it first)
        if live.size is None:
            return [], [f"database.{db.name}: rebalancing waits: the size of {shard.address} could not be read"]
        sizes[shard.address] = live.size
    declared = {s: capacity.get(s) for s in placement}
    weights = {s: float(c or 1.0) for s, c in declared.items()} if all(declared.values()) else dict.fromkeys(
        placement, 1.0)
    total = sum(sizes.values())
    target = {s: total * weights[s] / sum(weights.values()) for s in placement}
    load = {s: sum(sizes[x.address] for x in active if x.server == s) for s in placement}
    count = {s: sum(1 for x in active if x.server == s) for s in placement}
    before = dict(load), dict(count)
    tolerance = policy.tolerance_percent / 100.0
    able = set(capable_targets(placement, observation)[0])
    names = {s.name for s in recorded.shards}
    where_now = {s.address: s.server for s in active}
    touched: dict[str, int] = {}
    picks: list[tuple[CatalogShard, str, str, float, float]] = []

    def worst(loads: Mapping[str, float]) -> float:
        return max(abs(loads[s] - target[s]) / target[s] if target[s] else 0.0 for s in placement)

    while len(picks) < policy.max_moves and total and worst(load) > tolerance:
        moved = {p[0].address for p in picks}
        candidates = [(shard, where_now[shard.address], dst) for shard in active for dst in placement
                      if shard.address not in moved and dst != where_now[shard.address] and dst in able
                      and touched.get(dst, 0) < policy.max_per_server
                      and touched.get(where_now[shard.address], 0) < policy.max_per_server]
        best = _best_move(candidates, sizes, load, target, tolerance)
        if best is None:
            break
        shard, src, dst = best
        if preconditions(db, [shard], observation) or _taken(shard.name, shard.dbname, src, dst, names, observation):
            break  # the best move is blocked: no partial reshuffle around it
        off = {s: (load[s] - target[s]) / target[s] for s in (src, dst)}
        picks.append((shard, src, dst, off[src], off[dst]))
        load[src] -= sizes[shard.address]
        load[dst] += sizes[shard.address]
        count[src] -= 1
        count[dst] += 1
        where_now[shard.address] = dst
        touched[src] = touched.get(src, 0) + 1
        touched[dst] = touched.get(dst, 0) + 1
    balance = tuple(ServerBalance(server=s, target_bytes=round(target[s]), before_bytes=before[0][s],
                                  after_bytes=load[s], before_shards=before[1][s], after_shards=count[s])
                    for s in placement)
    weighed = "capacity.storage" if all(declared.values()) else "equal shares"
    return [MoveShard(
        database=db.name,
        source=ShardSpec(name=shard.name, lo=shard.lo, hi=shard.hi, server=src, dbname=shard.dbname),
        target=ShardSpec(name=shard.name, lo=shard.lo, hi=shard.hi, server=dst, dbname=shard.dbname),
        balance=balance,
        reason=Reason(cause="config", text=f"rebalancing the storage of {db.name} over its placement"
                      f" [{', '.join(placement)}] at {where} ({weighed}): {src} is {over:+.0%} off its target,"
                      f" {dst} {under:+.0%}"
                      f" (rebalance.tolerance_percent {policy.tolerance_percent:g})"))
        for shard, src, dst, over, under in picks], []


def _best_move(candidates, sizes: Mapping[str, int], load: Mapping[str, float], target: Mapping[str, float],
               tolerance: float):
    """The candidate (shard, source, destination) that puts the most storage where it belongs,
    if it is worth a move: at least `tolerance` of the shard's size lands where it belongs, and
    the destination ends at least `tolerance` less over its target than the source was (a move
    that only makes another server the furthest one is a shuffle, not a balance)."""
    best, best_key = None, None
    for shard, src, dst in candidates:
        size = sizes[shard.address]
        before = abs(load[src] - target[src]) + abs(load[dst] - target[dst])
        after = abs(load[src] - size - target[src]) + abs(load[dst] + size - target[dst])
        gain = before - after
        src_over = (load[src] - target[src]) / target[src] if target[src] else 0.0
        dst_after = (load[dst] + size - target[dst]) / target[dst] if target[dst] else float("inf")
        if not size or gain < max(tolerance, 1e-9) * size or dst_after > src_over - tolerance:
            continue
        key = (gain, -KeyRange(shard.lo, shard.hi).lo_unsigned, dst)
        if best_key is None or key > best_key:
            best, best_key = (shard, src, dst), key
    return best
