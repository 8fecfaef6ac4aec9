"""The stages behind the fence, after it: catch up, verify, flip; and what the flip needs read
before the fence (the targets' schemas) and records after it (the pause).

Each takes the live move and what the stage before handed on, and returns a new value with
the pause as it stands (engine/actions/move/spec.py Pause): nothing is kept on an object.
Every wait here is bounded by `moves.fence_timeout` (Live.behind, Live.within); an overrun
fails the stage, and the evaluator lifts the fence.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass

from psycopg import sql
from psycopg.types.json import Jsonb

from engine.actions.move.compare import Ahead, Comparison, VerifyRestart
from engine.actions.move.confirm import wait_confirmed
from engine.actions.move.decoding import Changes
from engine.actions.move.errors import MoveFailed
from engine.actions.move.fencing import Fenced
from engine.actions.move.live import Live, background
from engine.actions.move.spec import Pause
from engine.catalog import journal, store
from engine.client import ROUTING_CHANNEL
from engine.observe import introspect
from engine.plan.models import transit_name

# per target: its schema (fingerprint, snapshot) as the flip records it, read before the fence
TargetSchemas = dict[str, tuple[str, dict]]


@dataclass(frozen=True)
class CaughtUp:
    """What catch-up hands on to verify: the sources' changes since the last key round (decoding
    while the targets caught up; a future, read by its deadline), and the targets' sequences being
    set (a future, waited for once the keys are compared)."""

    changes: Future
    deadline: float  # monotonic
    sequences: Future
    pause: Pause
    ahead: Ahead  # the sources' side of the keys left, read while the fence drained


@dataclass(frozen=True)
class Verified:
    figures: dict[str, dict[str, int]]  # per target table: its rows and the sources'
    keys: int  # keys rechecked behind the fence
    sequences_s: float  # how long setting the targets' sequences took
    pause: Pause


@dataclass(frozen=True)
class Flipped:
    history_id: int
    pause: Pause
    committed: float  # monotonic: the routing flip committed, where the pause ends


def target_schemas(live: Live) -> TargetSchemas:
    """Each target's schema as the flip records it, read on the held connections before the
    fence: inside it, a new connection and four catalog queries per target lengthened the
    pause. The same as at the flip: no DDL runs while a move is unfinished, and setting the
    sequences behind the fence changes values, not the snapshot (names only)."""
    schemas: TargetSchemas = {}
    for target in live.spec.targets:
        with live.session(target) as conn:
            snap = introspect.snapshot(conn)
        schemas[target.name] = (introspect.fingerprint(snap), snap)
    return schemas


def catch_up(live: Live, fenced: Fenced, comparison: Comparison) -> CaughtUp:
    """Behind the fence, three things at once, each on its own servers' connections: the
    targets apply up to the fence's mark; the sequences are set on the targets (begun when the
    fence drained: engine/actions/move/sequences.py; verify waits for them); the sources'
    changes since the last key round are decoded. Each within `moves.fence_timeout`. The
    decoded changes are verify's to read (a stray row found there fails the move as
    verification does)."""
    marks, label = fenced.marks, live.spec.label
    fence_timeout = live.spec.settings.fence_timeout
    with live.step("catch up", durable=False, lsn=" ".join(f"{k}={v}" for k, v in sorted(marks.items()))):
        pause = fenced.pause.marked("catch up begun", time.monotonic())

        def decode() -> Changes:
            journal.points(f"{label}: changes")
            return comparison.changes_upto(marks, max(0.0, deadline - time.monotonic()))

        deadline = time.monotonic() + fence_timeout
        changes = background(decode)
        with live.behind("the targets did not confirm the fence's mark"):
            wait_confirmed(live, marks, fence_timeout, "the fence's mark", stamps=fenced.stamps, fenced=True)
        pause = pause.marked("confirmed", time.monotonic())
        return CaughtUp(changes=changes, deadline=deadline, sequences=fenced.sequences, pause=pause,
                        ahead=fenced.ahead)


def verify(live: Live, comparison: Comparison, caught_up: CaughtUp) -> Verified:
    """Behind the fence: the keys left by the comparison and those changed since; the
    decoding (by its deadline) and the comparison each within `moves.fence_timeout`. Then the
    targets' sequences, by the catch-up's deadline: they need only be set before the flip lets
    the targets take writes, and waiting for them before the targets' side of the keys was read
    held that read back (up to 61 ms of a 194 ms merge at 8M rows and 32 writers)."""
    with live.step("verify", durable=False):
        pause = caught_up.pause.marked("verify begun", time.monotonic())
        try:
            new = live.within(caught_up.changes, caught_up.deadline, "the sources' last changes were not decoded")
        except VerifyRestart as truncated:
            raise MoveFailed(f"{live.spec.label}: {truncated} was truncated just before the fence",
                             "the fence is lifted: the source takes writes again; apply again to compare anew"
                             ) from None
        pause = pause.marked("decoded", time.monotonic())
        with live.behind("the last keys were not compared"):
            keys = comparison.final(new, caught_up.ahead, timeout=live.spec.settings.fence_timeout)
        if caught_up.ahead.taken_at is not None:
            pause = pause.marked("changes taken ahead", caught_up.ahead.taken_at)
        if caught_up.ahead.done_at is not None:
            pause = pause.marked("sources read ahead", caught_up.ahead.done_at)
        pause = pause.marked("compared", time.monotonic())
        sequences_s = live.within(caught_up.sequences, caught_up.deadline, "the targets' sequences were not set")
        pause = pause.marked("sequences set", time.monotonic())
        return Verified(figures=comparison.figures, keys=keys, sequences_s=sequences_s, pause=pause)


def flip(live: Live, schemas: TargetSchemas, pause: Pause, history: dict) -> Flipped:
    """Catalog: targets active, sources retired, new routing epoch. One transaction holds the
    routing change and the journal's record of it; behind the fence, bounded like every wait
    there (a catalog table someone keeps locked)."""
    with live.step("flip", atomic=True, durable=False), live.behind("the routing flip did not commit"):
        pause = pause.marked("flip begun", time.monotonic())
        history_id = _flip_statements(live, schemas, history)
        pause = pause.marked("flip written", time.monotonic())
    committed = time.monotonic()
    return Flipped(history_id=history_id, pause=pause.marked("flip committed", committed), committed=committed)


def _flip_statements(live: Live, schemas: TargetSchemas, history: dict) -> int:
    """The flip's statements, pipelined: sent together, not one round trip each (about ten,
    3-14 ms of the pause under load). Returns the flip's history row."""
    spec, catalog = live.spec, live.ctx.catalog
    with catalog.pipeline():
        catalog.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
            sql.Literal(f"{round(spec.settings.fence_timeout * 1000)}ms")))
        if spec.relocation:
            _flip_names(live, schemas)
        else:
            for target in spec.targets:
                _record_target_schema(live, schemas, target.name, target.name)
        for source in spec.sources:
            catalog.execute(
                "UPDATE shardctl.shards SET state = 'retired', retired_at = now() WHERE database = %s AND name = %s",
                (spec.database, transit_name(source.name, source.server) if spec.relocation else source.name))
        catalog.execute("UPDATE shardctl.state SET epoch = epoch + 1")
        # clients waiting at the fence re-read the routing on this instead of polling
        catalog.execute("SELECT pg_notify(%s, %s)", (ROUTING_CHANNEL, spec.database))
        store.bump_serial(catalog)
        ranges = [[s.lo, s.hi] for s in spec.sources] + [[t.lo, t.hi] for t in spec.targets]
        return store.add_history(catalog, history["event"], history["address"],
                                 {**history, "database": spec.database, "ranges": ranges})


def _flip_names(live: Live, schemas: TargetSchemas) -> None:
    """A relocation keeps the shard's name: the source's row becomes the retired copy
    NAME@SERVER, the target's row (NAME@TARGET while it moved) takes NAME."""
    spec, catalog = live.spec, live.ctx.catalog
    for source, target in zip(spec.sources, spec.targets, strict=True):
        catalog.execute("UPDATE shardctl.shards SET name = %s WHERE database = %s AND name = %s",
                        (transit_name(source.name, source.server), spec.database, source.name))
        catalog.execute("UPDATE shardctl.shards SET name = %s WHERE database = %s AND name = %s",
                        (source.name, spec.database, target.name))
        _record_target_schema(live, schemas, target.name, source.name)


def _record_target_schema(live: Live, schemas: TargetSchemas, target: str, name: str) -> None:
    """The target's row (NAME in the catalog) active, with the schema read before the fence."""
    fingerprint, snap = schemas[target]
    store.set_shard_schema(live.ctx.catalog, live.spec.database, name, fingerprint, snap, "active")


def record_pause(live: Live, flipped: Flipped, flip_s: float) -> float:
    """Once the flip has committed: the pause, fence to flip committed, into the flip's history
    row (which could only hold the figure as of its own writing). The one figure: printed,
    stored, and shown by status, the dashboard and /metrics from the history. With it, where
    the pause went (`pause_marks`) and the flip's own duration (`timings.flip`, seconds)."""
    pause = flipped.pause.ms(flipped.committed)
    live.ctx.catalog.execute(
        "UPDATE shardctl.history SET detail = jsonb_set(detail, '{timings,flip}', to_jsonb(%s::float8))"
        " || jsonb_build_object('pause_ms', %s, 'pause_marks', %s::jsonb) WHERE id = %s",
        (flip_s, pause, Jsonb(dict(flipped.pause.marks)), flipped.history_id))
    return pause
