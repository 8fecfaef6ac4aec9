"""What each kind of action needs of the servers it touches, declared per kind: (server, purpose)
pairs, each purpose naming the preflight checks it takes (engine/plan/checks.py). The planner
refuses an action whose server fails one of them before anything is made, naming the check and
the GRANT or setting that fixes it; `shardctl doctor` says, for each failed check, which
purposes need it. Pure: reads the action and the observation.

A kind that needs nothing here still needs its server reachable (refused elsewhere) and works
on databases shardctl created, so owns: dropping, renaming and altering them takes no attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from engine.observe.models import CatalogBranch, Observation
from engine.plan.models import ShardSpec

Need = tuple[str, str]  # (server, purpose)


def _shards(action, observation, leaving) -> list[Need]:
    """create_database: each new shard's database."""
    return [(s.server, "shard") for s in action.shards]


def _recreate(action, observation, leaving) -> list[Need]:
    return [(action.shard.server, "shard")]


def _branch(action, observation, leaving) -> list[Need]:
    """A branch's database; a replica's also takes a publication and a slot on each of its
    parent's shards' servers and a subscription per shard on its own. An instant branch clones
    its replica on the replica's server (pausing the replica's own subscriptions)."""
    out = [(action.server, "shard")]
    if action.data == "replica" and action.clone_of is None:
        out += [(action.server, "replica_target")] + [(s.server, "replica_source") for s in action.shards]
    return out


def _delete_branch(action, observation, leaving) -> list[Need]:
    """A replica's deletion drops its slots on the parent's shards (REPLICATION)."""
    recorded = observation.catalog.branches.get(action.branch)
    parent = observation.catalog.databases.get(recorded.parent) if recorded is not None else None
    if recorded is None or recorded.data != "replica" or parent is None:
        return []
    return [(s.server, "replica_unlink") for s in parent.shards]


def _moving(database: str, sources: Iterable[ShardSpec], targets: Iterable[ShardSpec], observation,
            leaving: frozenset[str]) -> list[Need]:
    """Rows leave SOURCES for TARGETS by logical replication. Each active replica of the database
    follows: a link from each target (publication and slot there, a subscription with `origin`
    on the replica's server), and the hand-over drops the sources' links."""
    targets = list(targets)
    out = [(s.server, "move_source") for s in sources]
    out += [(t.server, purpose) for t in targets for purpose in ("shard", "move_target")]
    for branch in active_replicas(observation, database):
        if branch.name not in leaving:
            out += [(branch.server, "replica_target"), (branch.server, "replica_follow")]
            out += [(t.server, purpose) for t in targets for purpose in ("replica_source", "replica_follow")]
    return out


def active_replicas(observation: Observation, database: str) -> list[CatalogBranch]:
    """The replicas that follow DATABASE's moves, by name."""
    return sorted((b for b in observation.catalog.branches.values()
                   if b.parent == database and b.data == "replica" and b.state == "active"), key=lambda b: b.name)


def _split(action, observation, leaving) -> list[Need]:
    return _moving(action.database, [action.source], action.targets, observation, leaving)


def _merge(action, observation, leaving) -> list[Need]:
    return _moving(action.database, action.sources, [action.target], observation, leaving)


def _move(action, observation, leaving) -> list[Need]:
    return _moving(action.database, [action.source], [action.target], observation, leaving)


def _nothing(action, observation, leaving) -> list[Need]:
    return []


NEEDS: dict[str, Callable[[Any, Observation, frozenset[str]], list[Need]]] = {
    "create_database": _shards,
    "destroy_database": _nothing,  # DROP DATABASE of databases it owns
    "rename_database": _nothing,  # the catalog only
    "apply_schema": _nothing,  # statements in databases it owns
    "update_database": _nothing,  # the catalog only
    "recreate_shard": _recreate,
    "split_shard": _split,
    "merge_shards": _merge,
    "move_shard": _move,
    "drop_retired_shard": _nothing,
    "create_branch": _branch,
    "reset_branch": _branch,
    "delete_branch": _delete_branch,
    "update_branch": _nothing,  # the catalog only
    "merge_branch_schema": _nothing,  # statements in databases it owns
}


def needs(action, observation: Observation, leaving: frozenset[str] = frozenset()) -> list[Need]:
    """The (server, purpose) pairs ACTION needs, in order, each once. LEAVING: replicas this plan
    deletes (a move does not link them)."""
    try:
        declared = NEEDS[action.kind]
    except KeyError:
        raise ValueError(f"unknown action kind {action.kind!r}: declare what it needs in engine/plan/needs.py")\
            from None
    return list(dict.fromkeys(declared(action, observation, leaving)))
