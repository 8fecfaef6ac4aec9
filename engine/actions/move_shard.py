"""Move a shard to another server online: one source, one unfiltered link, the move machinery."""

from __future__ import annotations

from engine.actions.base import ApplyContext, Timer
from engine.actions.move import stages, start
from engine.plan.models import MoveShard


def execute(action: MoveShard, ctx: ApplyContext) -> None:
    timer = Timer()
    op = start.begin(ctx, action, f"Moving from {action.source.server} to {action.target.server}")
    stages.run(start.live_for(ctx, action, op), lambda: {
        "event": "move_shard", "address": action.address, "operation": op.id,
        "source": action.source.model_dump(), "target": action.target.model_dump(), "reason": action.reason.text,
    })
    op.finish()
    ctx.counts["changed"] += 1
    ctx.say(f"{action.address}: Move to {action.target.server} complete after {timer};"
            f" {start.retired_note(ctx, action, 'the copy on ' + action.source.server)}")
