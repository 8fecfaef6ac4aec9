"""Record a branch's changed settings in the catalog, in place: its ttl (its expiry moves)."""

from __future__ import annotations

from engine.actions.base import ApplyContext
from engine.catalog import store
from engine.plan.models import UpdateBranch


def execute(action: UpdateBranch, ctx: ApplyContext) -> None:
    ctx.say(f"{action.address}: Modifying...")
    op = ctx.begin(action.kind, action.address)
    with op.step(f"settings {action.branch}"), ctx.catalog.transaction():
        ctx.catalog.execute("UPDATE shardctl.branches SET expires_at = %s WHERE name = %s AND state = 'active'",
                            (action.expires_at, action.branch))
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "update_branch", action.address,
                          {"changes": [c.model_dump(mode="json") for c in action.changes]})
    op.finish()
    ctx.counts["changed"] += 1
    ctx.say(f"{action.address}: Modifications complete")
