"""Recreate a shard database that was dropped outside shardctl, empty, with its schema and its
copy of the reference tables."""

from __future__ import annotations

from engine.actions import reference
from engine.actions.base import ApplyContext, Timer, apply_steps, ensure_database, record_schema
from engine.catalog import store
from engine.plan.models import RecreateShard


def execute(action: RecreateShard, ctx: ApplyContext) -> None:
    timer = Timer()
    ctx.say(f"{action.address}: Creating...")
    op = ctx.begin(action.kind, action.address, server=action.shard.server)
    with op.step(f"create {action.database}/{action.shard.name}", dbname=action.shard.dbname):
        ensure_database(ctx, action.shard)
    with op.step(f"schema {action.database}/{action.shard.name}"):
        apply_steps(ctx, action.shard, action.steps)
    source = reference.source_of(ctx, action.database)
    if source is not None:
        with op.step(f"reference link {action.database}/{action.shard.name}"):
            reference.detach(ctx, action.shard)  # the dropped database's slot on the source is stale
            reference.attach(ctx, source, action.shard, reference.tables_of(ctx, action.database))
            reference.wait_synced(ctx, [action.shard], lambda text: ctx.say(f"{action.address}: {text}"))
    with op.step(f"record {action.database}/{action.shard.name}"):
        record_schema(ctx, action.database, action.shard)
    with ctx.catalog.transaction():
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "recreate_shard", action.address, {"reason": action.reason.text})
    op.finish()
    ctx.counts["added"] += 1
    ctx.say(f"{action.address}: Creation complete after {timer}")
