"""Record changed database settings (policy, thresholds, protection, placement) in the catalog;
changed reference tables are published, copied or let go on every active shard
(engine/actions/reference.py)."""

from __future__ import annotations

from engine.actions import reference
from engine.actions.base import ApplyContext
from engine.actions.move.spec import database_steps
from engine.catalog import store
from engine.plan.models import ShardSpec, UpdateDatabase
from engine.rows import one


def execute(action: UpdateDatabase, ctx: ApplyContext) -> None:
    ctx.say(f"{action.address}: Modifying...")
    op = ctx.begin(action.kind, action.address)
    with op.step(f"settings {action.database}"), ctx.catalog.transaction():
        row = one(ctx.catalog.execute("SELECT key_column, key_type FROM shardctl.databases WHERE name = %s",
                                      (action.database,)))
        store.upsert_database(
            ctx.catalog, name=action.database, key_column=row[0], key_type=row[1],
            protect=action.settings.protect, policy_name=action.settings.policy_name,
            policy=action.settings.policy, declared_shards=action.settings.shards,
            placement=list(action.settings.placement), state="active",
        )
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "update_database", action.address,
                          {"changes": [c.model_dump(mode="json") for c in action.changes]})
    if any(c.path == "reference_tables" for c in action.changes):
        shards = [ShardSpec(name=r[0], lo=r[1], hi=r[2], server=r[3], dbname=r[4]) for r in ctx.catalog.execute(
            "SELECT name, lo, hi, server, dbname FROM shardctl.shards WHERE database = %s AND state = 'active'"
            " ORDER BY lo NULLS FIRST", (action.database,)).fetchall()]
        reference.reconcile(ctx, op, action.database, action.settings.reference_tables,
                            database_steps(ctx, action.database), shards)
    op.finish()
    ctx.counts["changed"] += 1
    ctx.say(f"{action.address}: Modifications complete")
