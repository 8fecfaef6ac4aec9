"""Resharding a person asked for: the declared `shards:` count, and `plan -split/-merge` by hand. No I/O.

The rule for `shards: N`, as README "Changing the shard count" tells it:

- N is the count the operator wants. While a database has fewer active shards than N, the plan
  splits the widest ranges evenly until it has N (cause `config`).
- Lowering N below the count recorded at the last apply merges adjacent shards, the narrowest
  pair first, until the database has N (cause `config`). The count is compared with the ACTIVE
  shards at every plan, not only when it changes: a lowering whose merges had to wait (a retired
  shard's name, its grace period) is done by the next plan after the wait.
- Shards that load split beyond N (up to autosplit.max_shards), or a person split by hand, are
  kept: an unchanged N never merges them (the catalog counts them since the last change of N);
  only cold-load merges do, and never below N.
- What the count needs and cannot be done yet is `Waiting` in the plan, with why and until when:
  the plan never says the fleet matches the configuration meanwhile.

A split or merge asked for by hand (`-split orders/40-80`, `-merge orders/-40,40-80`) is planned
with cause `manual`; a bad address is refused, naming the shards that exist.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from engine.config.loader import Desired, DesiredDatabase
from engine.errors import UserError
from engine.keyspace import SIGNED_MIN, KeyRange
from engine.observe.models import CatalogDatabase, CatalogShard, Observation
from engine.plan.models import MergeShards, Reason, SplitShard, Waiting
from engine.plan.placement import (
    capable_targets,
    merge_action,
    name_taken,
    preconditions,
    split_action,
    storage_by_server,
    taken,
)


@dataclass(frozen=True)
class Requests:
    """Splits and merges asked for on the command line (addresses as the user typed them)."""

    splits: tuple[str, ...] = ()
    merges: tuple[str, ...] = ()  # each "orders/-40,orders/40-80" (later items may omit "orders/")

    def __bool__(self) -> bool:
        return bool(self.splits or self.merges)


def _active(recorded: CatalogDatabase) -> list[CatalogShard]:
    # by lower bound, the bottom (None) first: KeyRange(lo, hi).lo_unsigned without making the range
    return sorted((s for s in recorded.shards if s.state == "active"),
                  key=lambda s: 0 if s.lo is None else s.lo - SIGNED_MIN)


def _width(shards: list[CatalogShard]) -> int:
    return KeyRange(shards[-1].lo, shards[-1].hi).hi_unsigned - KeyRange(shards[0].lo, shards[0].hi).lo_unsigned


def recorded_count(recorded: CatalogDatabase, declared: int) -> int:
    """The `shards:` recorded at the last apply. A catalog from before it was recorded: the
    active count, capped at the declaration (so that load splits beyond it read as unchanged)."""
    if recorded.declared_shards is not None:
        return recorded.declared_shards
    return min(len(_active(recorded)), declared)


def goal(db: DesiredDatabase, recorded: CatalogDatabase) -> int | None:
    """The count the database's merges must reach for its declaration, or None when no merge is
    owed to it (the count was raised, or never lowered): lowered in this plan, the declared
    count; lowered by an earlier apply, the declared count plus the shards kept since (load and
    by hand), so that merges whose first plan had to wait are still done."""
    target, before = db.spec.shards, recorded_count(recorded, db.spec.shards)
    if target < before:
        return target
    if target == before and recorded.shards_lowered:
        return target + max(0, recorded.kept_shards)
    return None


def declared_actions(db: DesiredDatabase, recorded: CatalogDatabase, observation: Observation,
                     where: str) -> tuple[list[SplitShard | MergeShards], list[Waiting]]:
    """Splits up to `shards:`, or merges down to it when it was lowered; what cannot be done
    yet, waiting."""
    shards, target = _active(recorded), db.spec.shards
    if recorded.state != "active":
        return [], []  # an unfinished create comes first
    pending = [p for p in observation.catalog.pending_moves if p.database == db.name]
    wanted = goal(db, recorded)
    if len(shards) < target or (wanted is not None and len(shards) > wanted):
        if pending:
            return [], [Waiting(address=f"database.{db.name}", reason=(
                f"`shards: {target}` at {where}: {db.name} has {len(shards)} active shards; the resharding waits"
                f" until operation {pending[0].operation} ({pending[0].kind.replace('_', ' ')}) is finished"
                " (`shardctl apply`, or `shardctl abort` it)"))]
        if len(shards) < target:
            return _splits_to(db, shards, target, observation, where)
        assert wanted is not None
        return _merges_to(db, shards, wanted, observation, where, recorded_count(recorded, target),
                          recorded.kept_shards if wanted > target else 0)
    return [], []


def _waiting(db: DesiredDatabase, observation: Observation, ranges, address: str,
             text: str) -> Waiting | None:
    """Why a split or merge the declaration needs waits, or None when nothing stands in its way
    but its own preconditions (said as a problem instead)."""
    found = taken(db, observation, ranges)
    if found is None:
        return None
    return Waiting(address=address, reason=f"{text}: {found[0]}", until=found[1])


def _splits_to(db: DesiredDatabase, shards: list[CatalogShard], target: int, observation: Observation,
               where: str) -> tuple[list[SplitShard | MergeShards], list[Waiting]]:
    """Give a shard one more part at a time, always the one whose parts are widest (then the
    lowest range): from equal shards this is even over the keyspace."""
    parts = {s.address: 1 for s in shards}
    widths = {s.address: _width([s]) for s in shards}
    for _ in range(target - len(shards)):
        widest = max(shards, key=lambda s: (widths[s.address] / parts[s.address], -KeyRange(s.lo, s.hi).lo_unsigned))
        parts[widest.address] += 1
    storage = storage_by_server(observation)
    actions: list[SplitShard | MergeShards] = []
    waits: list[Waiting] = []
    for shard in shards:
        k = parts[shard.address]
        if k == 1:
            continue
        text = f"`shards: {target}` at {where} needs {shard.address} split into {k}"
        ranges = KeyRange(shard.lo, shard.hi).split(k)
        waiting = _waiting(db, observation, ranges, f"shard.{shard.address}", text)
        able, none_able = capable_targets(db.spec.placement, observation)
        blocked = preconditions(db, [shard], observation) or none_able
        if waiting is not None or blocked:
            waits.append(waiting or Waiting(address=f"shard.{shard.address}", reason=f"{text}, and it cannot be"
                                            f" split: {blocked}"))
            continue
        actions.append(split_action(db, shard, k, storage, able, Reason(
            cause="config", text=f"`shards: {target}` at {where}; {db.name} has {len(shards)} shards, so the"
            f" widest ranges are split evenly: {shard.name} into {k}")))
    return actions, waits


def _merges_to(db: DesiredDatabase, shards: list[CatalogShard], wanted: int, observation: Observation,
               where: str, before: int, kept: int) -> tuple[list[SplitShard | MergeShards], list[Waiting]]:
    """Merge the adjacent pair of groups that is narrowest together (then the lowest) until
    `wanted` groups are left; each group of two or more shards is one merge."""
    groups = [[s] for s in shards]
    while len(groups) > wanted:
        i = min(range(len(groups) - 1), key=lambda j: (_width(groups[j] + groups[j + 1]), j))
        groups[i:i + 2] = [groups[i] + groups[i + 1]]
    storage = storage_by_server(observation)
    held = _held(shards)
    target = db.spec.shards
    lowered = (f"`shards:` lowered from {before} to {target} at {where}" if before > target else
               f"`shards: {target}` at {where} (lowered by an earlier apply, not reached yet)")
    counted = (f"{db.name} has {len(shards)} active shards"
               + (f", {kept} of them kept from load-driven or by-hand splits since" if kept else ""))
    actions: list[SplitShard | MergeShards] = []
    waits: list[Waiting] = []
    for group in groups:
        if len(group) == 1:
            continue
        names = " + ".join(s.name for s in group)
        text = f"`shards: {target}` at {where} needs {db.name}/{names} merged"
        address = f"shard.{group[0].address}"
        waiting = _waiting(db, observation, [KeyRange(group[0].lo, group[-1].hi)], address, text)
        blocked = (preconditions(db, group, observation)
                   or capable_targets(db.spec.placement, observation)[1])
        if waiting is not None or blocked:
            waits.append(waiting or Waiting(address=address, reason=f"{text}, and they cannot be merged: {blocked}"))
            continue
        merge = merge_action(db, group, observation, storage, Reason(
            cause="config", text=f"{lowered}; {counted}, so adjacent ones are merged, the narrowest first:"
            f" {names}"), held=held)
        actions.append(merge)
        held = _after(held, merge)
    return actions, waits


# ---------------------------------------------------------------------------- by hand

def manual_actions(desired: Desired, observation: Observation,
                   requests: Requests) -> list[SplitShard | MergeShards]:
    """The splits and merges asked for by hand, each checked; any bad request refuses them all."""
    actions: list[SplitShard | MergeShards] = []
    used: dict[str, str] = {}

    def claim(shard: CatalogShard, request: str) -> None:
        if shard.address in used:
            raise UserError(f"{shard.address} is named by both `{used[shard.address]}` and `{request}`",
                            "ask for one change per shard in a plan")
        used[shard.address] = request

    storage = storage_by_server(observation)
    held_by: dict[str, dict[str, int]] = {}  # per database, shards per server once earlier merges are done
    added: dict[str, int] = {}
    for text in requests.splits:
        request = f"-split {text}"
        db, recorded, shard = _resolve(desired, observation, text, request)
        claim(shard, request)
        parts = db.effective_policy.autosplit.targets
        count = len(_active(recorded)) + added.get(db.name, 0) + parts - 1
        if count > db.effective_policy.autosplit.max_shards:
            raise UserError(f"`{request}` would give {db.name} {count} shards, over autosplit.max_shards"
                            f" ({db.effective_policy.autosplit.max_shards})",
                            "raise max_shards in the database's policy, or merge other shards first")
        added[db.name] = added.get(db.name, 0) + parts - 1
        able, none_able = capable_targets(db.spec.placement, observation)
        blocked = (preconditions(db, [shard], observation) or none_able
                   or name_taken(db, observation, KeyRange(shard.lo, shard.hi).split(parts)))
        if blocked:
            raise UserError(f"`{request}`: {shard.address} cannot be split: {blocked}")
        actions.append(split_action(db, shard, parts, storage, able, Reason(
            cause="manual", text=f"requested by hand (`{request}`): {shard.name} is divided into {parts} even"
            " ranges (autosplit.targets)")))
    for text in requests.merges:
        request = f"-merge {text}"
        items = [t.strip() for t in text.split(",") if t.strip()]
        if len(items) < 2:
            raise UserError(f"`{request}` names {len(items)} shard{'s' if len(items) != 1 else ''}",
                            "name two or more adjacent shards, comma-separated: -merge orders/-40,orders/40-80")
        first_db = _strip(items[0]).partition("/")[0]
        resolved = [_resolve(desired, observation, t if "/" in _strip(t) else f"{first_db}/{t}", request)
                    for t in items]
        db, recorded = resolved[0][0], resolved[0][1]
        if any(r[0].name != db.name for r in resolved):
            raise UserError(f"`{request}` names shards of different databases",
                            "a merge joins adjacent shards of one database")
        group = sorted((r[2] for r in resolved), key=lambda s: KeyRange(s.lo, s.hi).lo_unsigned)
        for a, b in itertools.pairwise(group):
            if a.address == b.address:
                raise UserError(f"`{request}` names {a.address} twice", "name each shard once")
            if a.hi != b.lo:
                raise UserError(f"`{request}`: {a.address} and {b.address} are not adjacent",
                                f"adjacent shards of {db.name}, in order: "
                                + ", ".join(s.name for s in _active(recorded)))
        for shard in group:
            claim(shard, request)
        blocked = (preconditions(db, group, observation)
                   or capable_targets(db.spec.placement, observation)[1]
                   or name_taken(db, observation, [KeyRange(group[0].lo, group[-1].hi)]))
        if blocked:
            raise UserError(f"`{request}`: {' + '.join(s.address for s in group)} cannot be merged: {blocked}")
        held = held_by.setdefault(db.name, _held(_active(recorded)))
        merge = merge_action(db, group, observation, storage, Reason(
            cause="manual", text=f"requested by hand (`{request}`): {' + '.join(s.name for s in group)}"
            " become one shard"), held=held)
        actions.append(merge)
        held_by[db.name] = _after(held, merge)
    return actions


def _held(shards: list[CatalogShard]) -> dict[str, int]:
    return dict(Counter(s.server for s in shards))


def _after(held: dict[str, int], merge: MergeShards) -> dict[str, int]:
    """Shards per server once `merge` is done: its sources gone, its target added."""
    out = Counter(held)
    out.subtract(s.server for s in merge.sources)
    out[merge.target.server] += 1
    return dict(out)


def _strip(text: str) -> str:
    return text.strip().removeprefix("shard.")


def _resolve(desired: Desired, observation: Observation, text: str,
             request: str) -> tuple[DesiredDatabase, CatalogDatabase, CatalogShard]:
    address = _strip(text)
    database, slash, name = address.partition("/")
    applied = sorted(n for n in desired.databases if n in observation.catalog.databases)
    if not slash or not name:
        raise UserError(f"`{request}`: {text!r} is not a shard address",
                        "name a shard as DATABASE/RANGE, e.g. orders/40-80 (`shardctl status` lists them)")
    db, recorded = desired.databases.get(database), observation.catalog.databases.get(database)
    if db is None or recorded is None:
        raise UserError(f"`{request}`: no sharded database {database!r} is declared and applied",
                        "declared and applied: " + (", ".join(applied) if applied else "none yet (apply first)"))
    if recorded.state != "active" or any(p.database == database for p in observation.catalog.pending_moves):
        raise UserError(f"`{request}`: {database} has an unfinished create, split or merge",
                        "finish it first (`shardctl apply`, or `shardctl abort`), then ask again")
    shard = next((s for s in recorded.shards if s.name == name and s.state == "active"), None)
    if shard is None:
        raise UserError(f"`{request}`: {address} is not a shard of {database}",
                        f"its shards: {', '.join(s.address for s in _active(recorded))}")
    return db, recorded, shard
