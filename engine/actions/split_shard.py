"""Split a shard: one source, N targets, each fed by a row-filtered publication of its range."""

from __future__ import annotations

from engine.actions import move
from engine.actions.base import ApplyContext, Timer
from engine.catalog.journal import Operation
from engine.plan.models import SplitShard


def execute(action: SplitShard, ctx: ApplyContext) -> None:
    timer = Timer()
    label = f"split {action.database}/{action.source.name}"
    ctx.say(f"{action.address}: Splitting into {', '.join(t.name for t in action.targets)}...")
    op = (Operation(ctx.catalog, action.operation) if action.operation is not None
          else ctx.begin(action.kind, action.address, action=action.model_dump(mode="json")))
    key_column, key_type = move.key_of(ctx, action.database)
    plan = move.Move(
        ctx=ctx, op=op, database=action.database, key_column=key_column, key_type=key_type,
        sources=(action.source,), targets=action.targets,
        links=tuple(move.Link(i, action.source, t, filtered=True) for i, t in enumerate(action.targets)),
        steps=move.database_steps(ctx, action.database), label=label,
    )
    result = move.run(plan, lambda: {
        "event": "split_shard", "address": action.address, "operation": op.id,
        "source": action.source.model_dump(), "targets": [t.model_dump() for t in action.targets],
        "evidence": [e.model_dump(mode="json") for e in action.evidence], "reason": action.reason.text,
    }, flipped=move.resumed_flipped(ctx, op.id))
    op.finish()
    ctx.counts["added"] += len(action.targets)
    ctx.counts["destroyed"] += 1
    ctx.say(f"{action.address}: Split complete after {timer} (fence {result['timings'].get('fence', 0) * 1000:.0f} ms"
            f" incl. locking; source retired, read-only)")
