"""Resharding a person asked for: the declared `shards:` count, and `plan -split/-merge` by hand. No I/O.

The rule for `shards: N`, as README "Changing the shard count" tells it:

- N is the count the operator wants. While a database has fewer active shards than N, the plan
  splits the widest ranges evenly until it has N (cause `config`).
- Lowering N below the count recorded at the last apply merges adjacent shards, the narrowest
  pair first, until the database has N (cause `config`).
- Shards that load split beyond N (up to autosplit.max_shards) are kept: an unchanged N never
  merges them; only cold-load merges do, and never below N.

A split or merge asked for by hand (`-split orders/40-80`, `-merge orders/-40,40-80`) is planned
with cause `manual`; a bad address is refused, naming the shards that exist.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from engine.config.loader import Desired, DesiredDatabase
from engine.errors import UserError
from engine.keyspace import KeyRange
from engine.observe.models import CatalogDatabase, CatalogShard, Observation
from engine.plan.load import capable_targets, merge_action, name_taken, preconditions, split_action, storage_by_server
from engine.plan.models import MergeShards, Reason, SplitShard


@dataclass(frozen=True)
class Requests:
    """Splits and merges asked for on the command line (addresses as the user typed them)."""

    splits: tuple[str, ...] = ()
    merges: tuple[str, ...] = ()  # each "orders/-40,orders/40-80" (later items may omit "orders/")

    def __bool__(self) -> bool:
        return bool(self.splits or self.merges)


def _active(recorded: CatalogDatabase) -> list[CatalogShard]:
    return sorted((s for s in recorded.shards if s.state == "active"), key=lambda s: KeyRange(s.lo, s.hi).lo_unsigned)


def _width(shards: list[CatalogShard]) -> int:
    return KeyRange(shards[-1].lo, shards[-1].hi).hi_unsigned - KeyRange(shards[0].lo, shards[0].hi).lo_unsigned


def recorded_count(recorded: CatalogDatabase, declared: int) -> int:
    """The `shards:` recorded at the last apply. A catalog from before it was recorded: the
    active count, capped at the declaration (so that load splits beyond it read as unchanged)."""
    if recorded.declared_shards is not None:
        return recorded.declared_shards
    return min(len(_active(recorded)), declared)


def declared_actions(db: DesiredDatabase, recorded: CatalogDatabase, observation: Observation,
                     where: str) -> tuple[list[SplitShard | MergeShards], list[str]]:
    """Splits up to `shards:`, or merges down to it when it was lowered."""
    shards, target = _active(recorded), db.spec.shards
    if recorded.state != "active" or any(p.database == db.name for p in observation.catalog.pending_moves):
        return [], []  # an unfinished create, split or merge comes first
    if len(shards) < target:
        return _splits_to(db, shards, target, observation, where)
    before = recorded_count(recorded, target)
    if len(shards) > target and before > target:
        return _merges_to(db, shards, target, before, observation, where)
    return [], []


def _splits_to(db: DesiredDatabase, shards: list[CatalogShard], target: int, observation: Observation,
               where: str) -> tuple[list[SplitShard | MergeShards], list[str]]:
    """Give a shard one more part at a time, always the one whose parts are widest (then the
    lowest range): from equal shards this is even over the keyspace."""
    parts = {s.address: 1 for s in shards}
    widths = {s.address: _width([s]) for s in shards}
    for _ in range(target - len(shards)):
        widest = max(shards, key=lambda s: (widths[s.address] / parts[s.address], -KeyRange(s.lo, s.hi).lo_unsigned))
        parts[widest.address] += 1
    storage = storage_by_server(observation)
    recorded_names = {s.name: s.state for s in observation.catalog.databases[db.name].shards}
    actions: list[SplitShard | MergeShards] = []
    notes: list[str] = []
    for shard in shards:
        k = parts[shard.address]
        if k == 1:
            continue
        able, none_able = capable_targets(db.spec.placement, observation)
        blocked = (preconditions(db, [shard], observation) or none_able
                   or name_taken(recorded_names, KeyRange(shard.lo, shard.hi).split(k)))
        if blocked:
            notes.append(f"shard.{shard.address}: `shards: {target}` needs it split, but it cannot be: {blocked}")
            continue
        actions.append(split_action(db, shard, k, storage, able, Reason(
            cause="config", text=f"`shards: {target}` at {where}; {db.name} has {len(shards)} shards, so the"
            f" widest ranges are split evenly: {shard.name} into {k}")))
    return actions, notes


def _merges_to(db: DesiredDatabase, shards: list[CatalogShard], target: int, before: int,
               observation: Observation, where: str) -> tuple[list[SplitShard | MergeShards], list[str]]:
    """Merge the adjacent pair of groups that is narrowest together (then the lowest) until
    `target` groups are left; each group of two or more shards is one merge."""
    groups = [[s] for s in shards]
    while len(groups) > target:
        i = min(range(len(groups) - 1), key=lambda j: (_width(groups[j] + groups[j + 1]), j))
        groups[i:i + 2] = [groups[i] + groups[i + 1]]
    storage = storage_by_server(observation)
    held = _held(shards)
    recorded_names = {s.name: s.state for s in observation.catalog.databases[db.name].shards}
    actions: list[SplitShard | MergeShards] = []
    notes: list[str] = []
    for group in groups:
        if len(group) == 1:
            continue
        blocked = (preconditions(db, group, observation)
                   or capable_targets(db.spec.placement, observation)[1]
                   or name_taken(recorded_names, [KeyRange(group[0].lo, group[-1].hi)]))
        names = " + ".join(s.name for s in group)
        if blocked:
            notes.append(f"database.{db.name}: `shards: {target}` needs {names} merged, but they cannot be: {blocked}")
            continue
        merge = merge_action(db, group, observation, storage, Reason(
            cause="config", text=f"`shards:` lowered from {before} to {target} at {where}; {db.name} has"
            f" {len(shards)} shards, so adjacent ones are merged, the narrowest first: {names}"), held=held)
        actions.append(merge)
        held = _after(held, merge)
    return actions, notes


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
        recorded_names = {s.name: s.state for s in recorded.shards}
        blocked = (preconditions(db, [shard], observation) or none_able
                   or name_taken(recorded_names, KeyRange(shard.lo, shard.hi).split(parts)))
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
        recorded_names = {s.name: s.state for s in recorded.shards}
        blocked = (preconditions(db, group, observation)
                   or capable_targets(db.spec.placement, observation)[1]
                   or name_taken(recorded_names, [KeyRange(group[0].lo, group[-1].hi)]))
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
