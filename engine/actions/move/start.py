"""Starting or resuming a split, merge or relocation: its operation, the checks before anything
is created, its live move, and what its end says of the sources.
"""

from __future__ import annotations

from engine.actions.base import ApplyContext
from engine.actions.move.errors import MoveFailed
from engine.actions.move.live import Live
from engine.actions.move.spec import for_action, settings_for
from engine.catalog.journal import Operation
from engine.durations import span
from engine.observe import strays


def begin(ctx: ApplyContext, action, starting: str) -> Operation:
    """A move's operation: a resumed one says what it resumes and from where (not the original
    plan again); a new one first checks its sources for stray rows, before anything is created."""
    if action.operation is not None:
        ctx.say(f"{action.address}: Resuming {action.reason.text}...")
    else:
        ctx.say(f"{action.address}: {starting}...")
        refuse_strays(ctx, action)
    return operation_for(ctx, action)


def operation_for(ctx: ApplyContext, action) -> Operation:
    """The action's operation: the interrupted one it resumes, or a new one."""
    if action.operation is not None:
        return Operation(ctx.catalog, action.operation)
    return ctx.begin(action.kind, action.address, action=action.model_dump(mode="json"))


def live_for(ctx: ApplyContext, action, op: Operation, label: str | None = None) -> Live:
    """The live move a SplitShard, MergeShards or MoveShard action describes (also to abort one)."""
    return Live(ctx=ctx, op=op, spec=for_action(ctx, action, op.id, label))


def refuse_strays(ctx: ApplyContext, action) -> None:
    """Before a move starts: its sources must hold no row whose key hashes outside their range
    (a split would leave such rows in the retired source, to be dropped with it)."""
    settings = settings_for(ctx, action)
    sources = list(action.sources) if action.kind == "merge_shards" else [action.source]
    for source in sources:
        with ctx.fleet.servers[source.server].connect(source.dbname) as conn:
            counts = strays.count(conn, settings.key_column, settings.key_type, source.lo, source.hi)
        if counts:
            raise MoveFailed(
                f"{action.address}: shard {action.database}/{source.name} holds {strays.describe(counts)}: they were"
                " written straight into its database, past routing, and no move would put them where they belong",
                f"nothing was changed. `shardctl strays {action.database}/{source.name}` lists them; move each to the"
                " shard that owns its key (shardctl.route() names it) or delete it, then apply again")


def retired_note(ctx: ApplyContext, action, what: str) -> str:
    """What happened to a move's sources, and when they go: they are not destroyed by the move."""
    grace = settings_for(ctx, action).retire_after
    return (f"{what} retired: read-only, kept for autosplit.retire_after ({span(grace)}), then dropped by a"
            " later plan")
