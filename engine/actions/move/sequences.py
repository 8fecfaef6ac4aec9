"""The targets' sequences behind the fence: set past the sources' values, in disjoint blocks per
target, begun the moment the fence has drained.

Why then: once drained, no transaction that wrote the range can commit on a source (engine/
actions/fence.py), so every committed row's sequence value is at most what the sources' sequences
show from that moment on, which is all a target needs to continue past them. Reading later
gives larger values, never needed ones. Begun at the drain, the setting runs beside the mark's
WAL flush and the targets' catch-up; begun at the catch-up, as before, it ended 4-31 ms after the
targets confirmed at 8M rows and 16 writers, all of it pause.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from psycopg import sql

from engine.actions.move.live import SEQUENCES_LANE, Live, background
from engine.catalog import journal


def begin(live: Live) -> Future:
    """Set the targets' sequences in the background; the future's result is the seconds it
    took. Verify waits for it, once the keys are compared, by the catch-up's deadline
    (engine/actions/move/cutover.py)."""

    def setting() -> float:
        started = time.monotonic()
        journal.points(f"{live.spec.label}: sequences")  # a test point: hang the setting here
        set_past_sources(live)
        return round(time.monotonic() - started, 3)

    return background(setting)


def set_past_sources(live: Live) -> None:
    """Past the sources' values, in disjoint blocks per target; read on the sources' lane of
    their own and set on the targets' second held connections, so that it runs beside the
    fence's marks, the catch-up, the decoding and the work ahead."""
    last: dict[tuple[str, str], tuple[int, int]] = {}
    for source in live.spec.sources:
        with live.session(source, lane=SEQUENCES_LANE) as conn:
            for schema, name, value, maximum in conn.execute(
                    "SELECT schemaname, sequencename, coalesce(last_value, start_value), max_value"
                    " FROM pg_sequences WHERE schemaname <> '_shardctl'"):
                prev = last.get((schema, name), (value, maximum))
                last[(schema, name)] = (max(prev[0], value), maximum)
    targets = live.spec.targets
    for i, target in enumerate(targets):
        with live.session(target, lane=2) as conn:
            for (schema, name), (value, maximum) in last.items():
                # disjoint blocks: each target continues in its own range past the source
                gap = min(10**9, max(1, (maximum - value) // (len(targets) + 1)))
                conn.execute("SELECT setval(%s, %s, true)",
                             (sql.Identifier(schema, name).as_string(conn), value + i * gap + 1))
