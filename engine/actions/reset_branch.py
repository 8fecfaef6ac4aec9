"""Reset a branch: make it again from its parent's current data, under the same name, server and
database (so its connection string does not change) and with the same expiry.

The branch is marked 'resetting' first (plan and drift show it until the reset is done), then
the same journaled build steps as a creation run from an empty database; a kill at any step is
redone from the top by the next apply, or `shardctl abort` leaves the branch half-built for a
later reset or deletion. The parent is only read.
"""

from __future__ import annotations

from psycopg.types.json import Jsonb

from engine.actions.base import ApplyContext, Timer
from engine.actions.create_branch import build
from engine.catalog import store
from engine.plan.models import ResetBranch


def execute(action: ResetBranch, ctx: ApplyContext) -> None:
    timer = Timer()
    ctx.say(f"{action.address}: {'Resuming the reset' if action.operation is not None else 'Resetting'}...")
    op = ctx.resume_or_begin(action)
    with op.step(f"reset {action.branch}"):
        ctx.catalog.execute("UPDATE shardctl.branches SET state = 'resetting' WHERE name = %s", (action.branch,))
    rows, size, base = build(ctx, op, action)
    with op.step(f"activate {action.branch}"), ctx.catalog.transaction():
        ctx.catalog.execute(
            "UPDATE shardctl.branches SET state = 'active', base_schema = %s, size_bytes = %s, reset_token = %s,"
            " reset_at = %s WHERE name = %s", (Jsonb(base), size, action.reset_token, ctx.now(), action.branch))
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "reset_branch", action.address,
                          {"rows": rows, "data": action.data, "reset": action.reset_token, "actor": ctx.actor})
        op.finish()
    ctx.counts["changed"] += 1
    ctx.say(f"{action.address}: Reset complete after {timer} (same name, server, connection string and expiry)")
