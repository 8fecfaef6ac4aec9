"""What the daemon may do on its own. Pure: a plan and the kill switch in, a decision out.

An action is autonomous when the policy says automation may take it: load-driven splits with
`autosplit.enabled`, load-driven merges with `automerge.enabled`, the resumption of a split or
merge the journal shows interrupted, the deletion of a branch past its ttl and the drop of a
retired shard past `autosplit.retire_after`. Everything else (a config change, a branch a
person removed, drift) waits for a person, with the reason shown. One rule per action kind;
an unknown kind raises, so a new kind must decide here before the daemon can see it.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.frozen import Frozen
from engine.plan.models import (
    LOAD_CAUSES,
    ApplySchema,
    CreateBranch,
    CreateDatabase,
    DeleteBranch,
    DestroyDatabase,
    DropRetiredShard,
    MergeBranchSchema,
    MergeShards,
    MoveShard,
    Plan,
    RecreateShard,
    RenameDatabase,
    ResetBranch,
    SplitShard,
    UpdateBranch,
    UpdateDatabase,
)
from engine.snapshot import Pending

PERSON = "a person applies it (`shardctl apply`)"
# a person's pending change of these kinds holds automation back on the same database
RESHAPING = (DestroyDatabase, ApplySchema, UpdateDatabase, RecreateShard, MergeBranchSchema, RenameDatabase)


class Decision(Frozen):
    autonomous: tuple = ()  # actions, in plan order
    pending: tuple[Pending, ...] = ()
    paused: bool = False


def _move(enabled_flag: str) -> Callable:
    def rule(action) -> str | None:
        if action.operation is not None:
            return None  # an interrupted operation: the journal says how to finish it
        if action.reason.cause not in LOAD_CAUSES:
            return f"not load-driven: {PERSON}"
        if not action.automatic:
            return f"{enabled_flag} is false in the database's policy: {PERSON}"
        return None
    return rule


def _relocation(action: MoveShard) -> str | None:
    # an interrupted move is finished as the journal says; a new one is a person's placement change
    return None if action.operation is not None else _person(action)


def _delete_branch(action: DeleteBranch) -> str | None:
    return None if action.expired else f"the branch was removed from the config: {PERSON}"


def _person(action) -> str:
    return f"{action.kind.replace('_', ' ')}: {PERSON}"


RULES: dict[type, Callable] = {
    SplitShard: _move("autosplit.enabled"),
    MergeShards: _move("automerge.enabled"),
    MoveShard: _relocation,
    DeleteBranch: _delete_branch,
    UpdateBranch: _person,
    DropRetiredShard: lambda action: None,
    CreateDatabase: _person,
    DestroyDatabase: _person,
    ApplySchema: _person,
    UpdateDatabase: _person,
    RecreateShard: _person,
    CreateBranch: _person,
    ResetBranch: _person,
    MergeBranchSchema: _person,
    RenameDatabase: _person,
}


def why_not(action) -> str | None:
    """None when automation may apply the action; otherwise why a person must."""
    rule = RULES.get(type(action))
    if rule is None:
        raise TypeError(f"no autonomy rule for action kind {type(action).__name__}")
    return rule(action)


def decide(plan: Plan, paused: bool) -> Decision:
    reasons = {id(a): why_not(a) for a in plan.actions}
    # a database with a person's change pending is not resharded by automation meanwhile: the
    # daemon would otherwise act on a layout or schema about to change under it
    waiting = {a.database for a in plan.actions if reasons[id(a)] is not None and isinstance(a, RESHAPING)}
    autonomous, pending = [], []
    for action in plan.actions:
        why = reasons[id(action)]
        resuming = getattr(action, "operation", None) is not None
        if (
            why is None
            and not resuming
            and action.database in waiting
            and isinstance(action, (SplitShard, MergeShards))
        ):
            why = f"a person's change to {action.database} is pending; automation waits for it"
        if why is None and paused:
            why = "the daemon is paused (`shardctl resume` lets it act again)"
        if why is None:
            autonomous.append(action)
        else:
            pending.append(Pending(address=action.address, kind=action.kind, why=why))
    return Decision(autonomous=tuple(autonomous), pending=tuple(pending), paused=paused)
