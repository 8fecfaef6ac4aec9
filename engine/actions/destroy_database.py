"""Destroy a database: mark it 'destroying' (it stops routing), drop every shard and its
reference source, forget it."""

from __future__ import annotations

from engine.actions import reference
from engine.actions.base import ApplyContext, Timer, drop_database
from engine.catalog import store
from engine.plan.models import DestroyDatabase


def execute(action: DestroyDatabase, ctx: ApplyContext) -> None:
    timer = Timer()
    ctx.say(f"{action.address}: Destroying...")
    op = ctx.begin(action.kind, action.address, shards=len(action.shards))
    with op.step(f"fence {action.database}"), ctx.catalog.transaction():
        store.set_database_state(ctx.catalog, action.database, "destroying")
        store.bump_serial(ctx.catalog)
    for shard in action.shards:
        with op.step(f"drop {action.database}/{shard.name}", server=shard.server, dbname=shard.dbname):
            reference.unlink_shard(ctx, shard)  # a link left into or out of it would stop the drop
            drop_database(ctx, shard)
    with op.step(f"drop {action.database} reference source"):
        reference.drop_source(ctx, action.database)
    with op.step(f"forget {action.database}"), ctx.catalog.transaction():
        store.delete_database(ctx.catalog, action.database)
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "destroy_database", action.address,
                          {"shards": [s.model_dump() for s in action.shards], "reason": action.reason.text})
    op.finish()
    ctx.counts["destroyed"] += 1
    ctx.say(f"{action.address}: Destruction complete after {timer}")
