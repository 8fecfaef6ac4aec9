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
from dataclasses import dataclass, field

from engine.config.loader import DesiredDatabase
from engine.keyspace import KeyRange
from engine.observe.models import CatalogDatabase, CatalogShard, Observation
from engine.plan.models import MoveShard, Reason, ServerBalance, ShardSpec, transit_name
from engine.plan.placement import capable_targets, preconditions, storage_by_server


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
    placement = list(dict.fromkeys(db.spec.placement))
    if not _may_rebalance(db, recorded, observation, placement):
        return [], []
    active = sorted((s for s in recorded.shards if s.state == "active"), key=lambda s: KeyRange(s.lo, s.hi).lo_unsigned)
    if any(s.server not in placement for s in active):
        return [], []  # draining comes first
    sizes, waits = _measured_sizes(db, active, placement, observation)
    if sizes is None:
        return [], waits
    declared = {s: capacity.get(s) for s in placement}
    weighed = all(declared.values())
    weights = {s: float(c or 1.0) for s, c in declared.items()} if weighed else dict.fromkeys(placement, 1.0)
    total = sum(sizes.values())
    target = {s: total * weights[s] / sum(weights.values()) for s in placement}
    state = _Spread.of(active, placement, sizes)
    before = dict(state.load), dict(state.count)
    picks = _pick_moves(db, recorded, observation, active, placement, sizes, target, state)
    balance = tuple(ServerBalance(server=s, target_bytes=round(target[s]), before_bytes=before[0][s],
                                  after_bytes=state.load[s], before_shards=before[1][s], after_shards=state.count[s])
                    for s in placement)
    policy = db.effective_policy.rebalance
    return [MoveShard(
        database=db.name,
        source=ShardSpec(name=shard.name, lo=shard.lo, hi=shard.hi, server=src, dbname=shard.dbname),
        target=ShardSpec(name=shard.name, lo=shard.lo, hi=shard.hi, server=dst, dbname=shard.dbname),
        balance=balance,
        reason=Reason(cause="config", text=f"rebalancing the storage of {db.name} over its placement"
                      f" [{', '.join(placement)}] at {where} ({'capacity.storage' if weighed else 'equal shares'}):"
                      f" {src} is {over:+.0%} off its target, {dst} {under:+.0%}"
                      f" (rebalance.tolerance_percent {policy.tolerance_percent:g})"))
        for shard, src, dst, over, under in picks], []


def _may_rebalance(db: DesiredDatabase, recorded: CatalogDatabase, observation: Observation,
                   placement: list[str]) -> bool:
    """Rebalancing is on, has room for a move and somewhere to move to, and nothing of the
    database is already moving."""
    policy = db.effective_policy.rebalance
    if not policy.enabled or policy.max_moves == 0 or len(placement) < 2 or recorded.state != "active":
        return False
    return not any(p.database == db.name for p in observation.catalog.pending_moves)


def _measured_sizes(db: DesiredDatabase, active: list[CatalogShard], placement: list[str],
                    observation: Observation) -> tuple[dict[str, int] | None, list[str]]:
    """Each active shard's size, or None (and why, when it is worth saying) when one is unknown."""
    unreachable = [s for s in placement if observation.servers.get(s) is None or not observation.servers[s].reachable]
    if unreachable:
        # sizes on a server that does not answer are unknown, never zero: nothing moves on them
        return None, [f"database.{db.name}: rebalancing waits: server {', '.join(unreachable)} does not answer"]
    sizes: dict[str, int] = {}
    for shard in active:
        live = observation.shards.get(shard.address)
        if live is None or not live.exists:
            return None, []  # not inspected (planning from a recording), or dropped (drift recreates it first)
        if live.size is None:
            return None, [f"database.{db.name}: rebalancing waits: the size of {shard.address} could not be read"]
        sizes[shard.address] = live.size
    return sizes, []


@dataclass
class _Spread:
    """Where the database's storage and shards are as moves are picked (local to one planning)."""

    load: dict[str, int]
    count: dict[str, int]
    where: dict[str, str]
    touched: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, active: list[CatalogShard], placement: list[str], sizes: Mapping[str, int]) -> _Spread:
        return cls(load={s: sum(sizes[x.address] for x in active if x.server == s) for s in placement},
                   count={s: sum(1 for x in active if x.server == s) for s in placement},
                   where={s.address: s.server for s in active})

    def move(self, shard: CatalogShard, src: str, dst: str, size: int) -> None:
        self.load[src] -= size
        self.load[dst] += size
        self.count[src] -= 1
        self.count[dst] += 1
        self.where[shard.address] = dst
        self.touched[src] = self.touched.get(src, 0) + 1
        self.touched[dst] = self.touched.get(dst, 0) + 1


def _pick_moves(db: DesiredDatabase, recorded: CatalogDatabase, observation: Observation,
                active: list[CatalogShard], placement: list[str], sizes: Mapping[str, int],
                target: Mapping[str, float], state: _Spread) -> list[tuple[CatalogShard, str, str, float, float]]:
    """(shard, source, destination, source's and destination's offset from target) of each move,
    best first, while a server is off its target by more than the tolerance."""
    policy = db.effective_policy.rebalance
    tolerance = policy.tolerance_percent / 100.0
    able = set(capable_targets(placement, observation)[0])
    names = {s.name for s in recorded.shards}
    picks: list[tuple[CatalogShard, str, str, float, float]] = []

    def worst(loads: Mapping[str, float]) -> float:
        return max(abs(loads[s] - target[s]) / target[s] if target[s] else 0.0 for s in placement)

    total = sum(sizes.values())
    while len(picks) < policy.max_moves and total and worst(state.load) > tolerance:
        moved = {p[0].address for p in picks}
        candidates = [(shard, state.where[shard.address], dst) for shard in active if shard.address not in moved
                      for dst in placement if _may_take(state, shard, dst, able, policy.max_per_server)]
        best = _best_move(candidates, sizes, state.load, target, tolerance)
        if best is None:
            break
        shard, src, dst = best
        if preconditions(db, [shard], observation) or _taken(shard.name, shard.dbname, src, dst, names, observation):
            break  # the best move is blocked: no partial reshuffle around it
        picks.append((shard, src, dst, (state.load[src] - target[src]) / target[src],
                      (state.load[dst] - target[dst]) / target[dst]))
        state.move(shard, src, dst, sizes[shard.address])
    return picks


def _may_take(state: _Spread, shard: CatalogShard, dst: str, able: set[str], max_per_server: int) -> bool:
    """DST can take SHARD: another server, able to, and neither end past its moves this round."""
    src = state.where[shard.address]
    return (dst != src and dst in able and state.touched.get(dst, 0) < max_per_server
            and state.touched.get(src, 0) < max_per_server)


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
