"""Delete a branch: drop its database. An expired branch stays in the catalog as 'expired', so
a declaration left in the YAML is not silently created again. A branch whose creation or reset
never finished is deleted the same way, and the interrupted operation is closed with it."""

from __future__ import annotations

from engine.actions import replica
from engine.actions.base import ApplyContext, drop_database
from engine.catalog import store
from engine.catalog.journal import Operation
from engine.plan.models import DeleteBranch, ShardSpec
from engine.servers import scratch


def execute(action: DeleteBranch, ctx: ApplyContext) -> None:
    ctx.say(f"{action.address}: Destroying...")
    op = ctx.begin(action.kind, action.address, expired=action.expired, closes=action.operation)
    target = ShardSpec(name=action.branch, lo=None, hi=None, server=action.server, dbname=action.dbname)
    with op.step(f"drop {action.branch}", dbname=action.dbname):
        # a creation killed before it recorded the branch made no links yet (they come after)
        recorded = ctx.catalog.execute("SELECT data FROM shardctl.branches WHERE name = %s",
                                       (action.branch,)).fetchone()
        replica.detach_recorded(ctx, action.branch, target, action.database, recorded[0] if recorded else None)
        if action.resume_replica is not None:  # a clone interrupted while its replica was paused
            replica.resume(ctx, action.resume_replica)
        if action.operation is not None:  # a build from backups interrupted with servers restored
            scratch.remove_for_operation(ctx.fleet.desired.directory, action.operation)
        drop_database(ctx, target)
    with ctx.catalog.transaction():
        if action.expired:
            ctx.catalog.execute("UPDATE shardctl.branches SET state = 'expired' WHERE name = %s", (action.branch,))
        else:
            ctx.catalog.execute("DELETE FROM shardctl.branches WHERE name = %s", (action.branch,))
        if action.operation is not None:
            Operation(ctx.catalog, action.operation).finish("aborted")
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "delete_branch", action.address, {"expired": action.expired, "actor": ctx.actor})
        op.finish()
    ctx.counts["destroyed"] += 1
    ctx.say(f"{action.address}: Destruction complete")
