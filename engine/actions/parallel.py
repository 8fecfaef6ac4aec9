"""Running a plan's actions in order, with moves on disjoint servers at the same time.

Splits, merges and relocations whose servers (sources and targets) do not overlap run in one
batch, up to `moves.parallel` of the databases involved; every other action runs alone, in plan
order. Each move of a batch has its own catalog connection (its journal and catalog writes are
its own transactions) and its own operation, so a rerun after a crash resumes each from its
journal as if they had run one after another. A move that fails does not stop the ones running
beside it; the first failure is raised once they are all done.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from engine.actions import dispatch
from engine.actions.base import ApplyContext
from engine.plan.models import MOVE_KINDS


def servers_of(action) -> set[str]:
    """The servers a move reads or writes: its sources' and its targets'."""
    shards = [*(getattr(action, "sources", None) or ()), *(getattr(action, "targets", None) or ())]
    for attr in ("source", "target"):
        if getattr(action, attr, None) is not None:
            shards.append(getattr(action, attr))
    return {s.server for s in shards}


def batches(actions, limit_of: Callable[[object], int]) -> list[list]:
    """Consecutive moves on disjoint servers, at most `limit_of` each one's database, form a
    batch; anything else is a batch of its own. Plan order is kept between batches."""
    out: list[list] = []
    batch: list = []
    busy: set[str] = set()
    limit = 1
    for action in actions:
        if action.kind not in MOVE_KINDS:
            if batch:
                out.append(batch)
            out.append([action])
            batch, busy = [], set()
            continue
        servers = servers_of(action)
        if batch and (servers & busy or len(batch) >= min(limit, limit_of(action))):
            out.append(batch)
            batch, busy = [], set()
        if not batch:
            limit = limit_of(action)
        limit = min(limit, limit_of(action))
        batch.append(action)
        busy |= servers
    if batch:
        out.append(batch)
    return out


def execute_all(actions, ctx: ApplyContext) -> None:
    def limit_of(action) -> int:  # moves.parallel as planned (engine.actions.move.spec.settings_for)
        from engine.actions.move.spec import settings_for

        return settings_for(ctx, action).parallel

    for batch in batches(actions, limit_of):
        if len(batch) == 1:
            dispatch.execute(batch[0], ctx)
        else:
            _at_once(batch, ctx)


def _at_once(batch: list, ctx: ApplyContext) -> None:
    ctx.say(f"Running {len(batch)} moves at once (their servers do not overlap; moves.parallel): "
            + ", ".join(a.address for a in batch))
    merged = threading.Lock()
    failures: list[BaseException] = []

    def run(action) -> None:
        with ctx.fleet.catalog() as conn:
            assert conn is not None
            own = dataclasses.replace(ctx, catalog=conn, counts=dict.fromkeys(ctx.counts, 0))
            try:
                dispatch.execute(action, own)
            finally:
                with merged:
                    for key, n in own.counts.items():
                        ctx.counts[key] = ctx.counts.get(key, 0) + n

    with ThreadPoolExecutor(max_workers=len(batch), thread_name_prefix="move") as pool:
        futures = [pool.submit(run, action) for action in batch]
        for future in futures:
            error = future.exception()
            if error is not None:
                failures.append(error)
    for other in failures[1:]:
        ctx.say(f"Error: another move of the batch failed too: {other}")
    if failures:
        raise failures[0]
