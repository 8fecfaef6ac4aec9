"""Split a shard: one source, N targets, each fed by a row-filtered publication of its range."""

from __future__ import annotations

from engine.actions.base import ApplyContext, Timer
from engine.actions.move import stages, start
from engine.plan.models import SplitShard


def execute(action: SplitShard, ctx: ApplyContext) -> None:
    timer = Timer()
    op = start.begin(ctx, action, f"Splitting into {', '.join(t.name for t in action.targets)}")
    stages.run(start.live_for(ctx, action, op), lambda: {
        "event": "split_shard", "address": action.address, "operation": op.id,
        "source": action.source.model_dump(), "targets": [t.model_dump() for t in action.targets],
        "evidence": [e.model_dump(mode="json") for e in action.evidence], "reason": action.reason.text,
    })
    op.finish()
    ctx.counts["added"] += len(action.targets)
    ctx.counts["retired"] += 1
    ctx.say(f"{action.address}: Split complete after {timer}; {start.retired_note(ctx, action, 'source')}")
