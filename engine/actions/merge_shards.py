"""Merge adjacent shards: N sources, one target subscribed to each source's whole table set."""

from __future__ import annotations

from engine.actions.base import ApplyContext, Timer
from engine.actions.move import stages, start
from engine.plan.models import MergeShards


def execute(action: MergeShards, ctx: ApplyContext) -> None:
    timer = Timer()
    op = start.begin(ctx, action, f"Merging {' + '.join(s.name for s in action.sources)}")
    stages.run(start.live_for(ctx, action, op), lambda: {
        "event": "merge_shards", "address": action.address, "operation": op.id,
        "sources": [s.model_dump() for s in action.sources], "target": action.target.model_dump(),
        "evidence": [e.model_dump(mode="json") for e in action.evidence], "reason": action.reason.text,
    })
    op.finish()
    ctx.counts["added"] += 1
    ctx.counts["retired"] += len(action.sources)
    ctx.say(f"{action.address}: Merge complete after {timer}; {start.retired_note(ctx, action, 'sources')}")
