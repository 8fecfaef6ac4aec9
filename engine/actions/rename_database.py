"""Rename a database (a declared `moved:`): change its name in the catalog, touch no data.

The shard databases keep their physical names (e.g. orders_min_80); the catalog maps the new
name to them, so routing by the new name finds the same rows.
"""

from __future__ import annotations

from engine.actions.base import ApplyContext, Timer
from engine.catalog import store
from engine.plan.models import RenameDatabase


def execute(action: RenameDatabase, ctx: ApplyContext) -> None:
    timer = Timer()
    ctx.say(f"{action.address}: Renaming from {action.from_name}...")
    op = ctx.begin(action.kind, action.address, renamed_from=action.from_name)
    with op.step(f"rename {action.from_name} to {action.database}"), ctx.catalog.transaction():
        store.rename_database(ctx.catalog, action.from_name, action.database)
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "rename_database", action.address,
                          {"from": action.from_name, "reason": action.reason.text})
    op.finish()
    ctx.counts["changed"] += 1
    ctx.say(f"{action.address}: Rename complete after {timer}")
