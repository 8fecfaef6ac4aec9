"""Create a sharded database: catalog rows first (state 'creating'), then each shard database
and its schema, then its reference source and every shard's copy of the reference tables (when
it declares any: engine/actions/reference.py), then the database turns 'active' and starts to
route."""

from __future__ import annotations

from engine.actions import reference
from engine.actions.base import ApplyContext, Timer, apply_steps, ensure_database, record_schema
from engine.catalog import store
from engine.plan.models import CreateDatabase


def execute(action: CreateDatabase, ctx: ApplyContext) -> None:
    timer = Timer()
    ctx.say(f"{action.address}: Creating...")
    op = ctx.begin(action.kind, action.address, shards=len(action.shards))
    with op.step(f"record {action.database}"), ctx.catalog.transaction():
        store.upsert_database(
            ctx.catalog, name=action.database, key_column=action.key_column, key_type=action.key_type,
            protect=action.settings.protect, policy_name=action.settings.policy_name,
            policy=action.settings.policy, declared_shards=action.settings.shards,
            placement=list(action.settings.placement), state="creating",
        )
        for shard in action.shards:
            store.upsert_shard(ctx.catalog, database=action.database, name=shard.name, lo=shard.lo, hi=shard.hi,
                               server=shard.server, dbname=shard.dbname, state="creating")
        store.bump_serial(ctx.catalog)
    for shard in action.shards:
        with op.step(f"create {action.database}/{shard.name}", server=shard.server, dbname=shard.dbname):
            ensure_database(ctx, shard)
        with op.step(f"schema {action.database}/{shard.name}"):
            apply_steps(ctx, shard, action.steps)
            record_schema(ctx, action.database, shard)
        ctx.say(f"{action.address}: shard {shard.name} ready on {shard.server} [{timer} elapsed]")
    reference.reconcile(ctx, op, action.database, action.settings.reference_tables, action.steps, action.shards)
    with op.step(f"activate {action.database}"), ctx.catalog.transaction():
        store.record_steps(ctx.catalog, action.database, [(s.seq, s.name, s.sha256, s.sql) for s in action.steps])
        store.set_database_state(ctx.catalog, action.database, "active")
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "create_database", action.address,
                          {"shards": [s.model_dump() for s in action.shards], "reason": action.reason.text})
    op.finish()
    ctx.counts["added"] += 1
    ctx.say(f"{action.address}: Creation complete after {timer} [{len(action.shards)} shards]")
