"""Merge adjacent shards: N sources, one target subscribed to each source's whole table set."""

from __future__ import annotations

from engine.actions import move
from engine.actions.base import ApplyContext, Timer
from engine.catalog.journal import Operation
from engine.plan.models import MergeShards


def execute(action: MergeShards, ctx: ApplyContext) -> None:
    timer = Timer()
    label = f"merge {action.database}/{action.target.name}"
    ctx.say(f"{action.address}: Merging {' + '.join(s.name for s in action.sources)}...")
    op = (Operation(ctx.catalog, action.operation) if action.operation is not None
          else ctx.begin(action.kind, action.address, action=action.model_dump(mode="json")))
    key_column, key_type = move.key_of(ctx, action.database)
    plan = move.Move(
        ctx=ctx, op=op, database=action.database, key_column=key_column, key_type=key_type,
        sources=action.sources, targets=(action.target,),
        links=tuple(move.Link(i, s, action.target, filtered=False) for i, s in enumerate(action.sources)),
        steps=move.database_steps(ctx, action.database), label=label,
    )
    move.run(plan, lambda: {
        "event": "merge_shards", "address": action.address, "operation": op.id,
        "sources": [s.model_dump() for s in action.sources], "target": action.target.model_dump(),
        "evidence": [e.model_dump(mode="json") for e in action.evidence], "reason": action.reason.text,
    }, flipped=move.resumed_flipped(ctx, op.id))
    op.finish()
    ctx.counts["added"] += 1
    ctx.counts["destroyed"] += len(action.sources)
    ctx.say(f"{action.address}: Merge complete after {timer} (sources retired, read-only)")
