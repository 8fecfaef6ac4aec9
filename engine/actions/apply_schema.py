"""Apply new schema steps to every active shard, one transaction per shard and step, then to the
database's reference source (the shards first: a column added to a reference table must be on
every copy before the source replicates rows that carry it)."""

from __future__ import annotations

from engine.actions import reference
from engine.actions.base import ApplyContext, Timer, apply_steps, record_schema
from engine.catalog import store
from engine.plan.models import ApplySchema


def execute(action: ApplySchema, ctx: ApplyContext) -> None:
    timer = Timer()
    ctx.say(f"{action.address}: Modifying...")
    op = ctx.begin(action.kind, action.address, steps=[s.name for s in action.steps])
    for shard in action.shards:
        with op.step(f"schema {action.database}/{shard.name}", server=shard.server):
            apply_steps(ctx, shard, action.steps)
            record_schema(ctx, action.database, shard)
    tables = reference.tables_of(ctx, action.database)
    if tables:
        with op.step(f"schema {action.database} reference source"):
            reference.ensure_source(ctx, action.database, tables, action.steps)
    with op.step(f"record {action.database}"), ctx.catalog.transaction():
        store.record_steps(ctx.catalog, action.database, [(s.seq, s.name, s.sha256, s.sql) for s in action.steps])
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "apply_schema", action.address,
                          {"steps": [s.name for s in action.steps], "shards": len(action.shards)})
    op.finish()
    ctx.counts["changed"] += 1
    ctx.say(f"{action.address}: Modifications complete after {timer} [{len(action.shards)} shards]")
