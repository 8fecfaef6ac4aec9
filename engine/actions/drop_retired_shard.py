"""Drop a retired shard (the source of a finished split or merge) after its grace period."""

from __future__ import annotations

from engine.actions import reference
from engine.actions.base import ApplyContext, drop_database
from engine.catalog import store
from engine.plan.models import DropRetiredShard


def execute(action: DropRetiredShard, ctx: ApplyContext) -> None:
    ctx.say(f"{action.address}: Destroying retired shard...")
    op = ctx.begin(action.kind, action.address)
    with op.step(f"drop {action.database}/{action.shard.name}", dbname=action.shard.dbname):
        reference.unlink_shard(ctx, action.shard)  # a link left into or out of it would stop the drop
        drop_database(ctx, action.shard)
    with ctx.catalog.transaction():
        ctx.catalog.execute("DELETE FROM shardctl.shards WHERE database = %s AND name = %s AND state = 'retired'",
                            (action.database, action.shard.name))
        store.bump_serial(ctx.catalog)
        store.add_history(
            ctx.catalog, "drop_retired_shard", action.address, {"dbname": action.shard.dbname, "actor": ctx.actor}
        )
    op.finish()
    ctx.counts["destroyed"] += 1
    ctx.say(f"{action.address}: Destruction complete")
