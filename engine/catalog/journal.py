"""The operation journal: every step of an action recorded before and after it runs.

Executors are written so that each step can run again after a crash (they check what already
exists); the journal tells a person, `status` and a resuming apply what was in flight.
A failpoint (SHARDCTL_FAILPOINT=<step prefix>) kills the process right after a step's 'begin'
is recorded, so the crash tests can stop an apply at every step for real; a slowpoint
(SHARDCTL_SLOWPOINT=<step prefix>=<seconds>) holds a step there, so a test can signal it mid-way.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from engine.catalog.lock import who
from engine.errors import UserError
from engine.plan.models import MOVE_KINDS
from engine.rows import one

# operations that resume under their own operation after a crash, or that `abort` undoes
BRANCH_KINDS = ("create_branch", "reset_branch", "merge_branch_schema")
BACKUP_KINDS = ("create_backup",)  # resumed by the next `shardctl backups create` (engine/backups.py)

FAILPOINT_ENV = "SHARDCTL_FAILPOINT"
SLOWPOINT_ENV = "SHARDCTL_SLOWPOINT"  # "<step prefix>=<seconds>": a step that takes that much longer
_stop_requested = False
# depth of `until_done` blocks, per thread: a stop waits for the end of the move's own block
# (moves on disjoint servers run in threads side by side, each past or before its own fence)
_unstoppable = threading.local()


class Interrupted(UserError):
    """Raised at a step boundary after the user asked to stop (Ctrl-C)."""


def request_stop() -> None:
    global _stop_requested
    _stop_requested = True


def clear_stop() -> None:
    global _stop_requested
    _stop_requested = False


def stop_requested() -> bool:
    return _stop_requested


@contextmanager
def until_done() -> Iterator[None]:
    """Steps inside run to the end even after a stop request: stopping there would park the
    fleet in a worse place (a fenced, read-only source) than finishing a few seconds of work."""
    _unstoppable.depth = getattr(_unstoppable, "depth", 0) + 1
    try:
        yield
    finally:
        _unstoppable.depth -= 1


class Operation:
    def __init__(self, conn: psycopg.Connection, op_id: int):
        self.conn = conn
        self.id = op_id

    @classmethod
    def start(cls, conn: psycopg.Connection, kind: str, address: str, plan_serial: int,
              detail: dict[str, Any] | None = None) -> Operation:
        op_id = one(conn.execute(
            "INSERT INTO shardctl.operations (kind, address, state, plan_serial, who, detail)"
            " VALUES (%s, %s, 'running', %s, %s, %s) RETURNING id",
            (kind, address, plan_serial, who(), Jsonb(detail or {})),
        ))[0]
        return cls(conn, op_id)

    @contextmanager
    def step(self, name: str, **detail: Any) -> Iterator[None]:
        if _stop_requested and not getattr(_unstoppable, "depth", 0):
            raise Interrupted(f"stopped before step {name!r}; apply again to continue")
        self._record(name, "begin", detail)
        failpoint = os.environ.get(FAILPOINT_ENV)
        if failpoint and name.startswith(failpoint):
            os.kill(os.getpid(), signal.SIGKILL)
        slowpoint = os.environ.get(SLOWPOINT_ENV, "")
        if "=" in slowpoint and name.startswith(slowpoint.rsplit("=", 1)[0]):
            time.sleep(float(slowpoint.rsplit("=", 1)[1]))
        try:
            yield
        except BaseException as exc:
            self._record(
                name, "failed", {**detail, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
            )
            raise
        self._record(name, "done", detail)

    def progress(self, figures: dict[str, Any]) -> None:
        """The latest progress of a long step (rows, rates, lag, ETA), for `status` and the daemon.
        Kept beside the journal, not in it: it is overwritten, not appended."""
        if self.conn.closed:
            return
        self.conn.execute(
            "UPDATE shardctl.operations SET detail = detail || jsonb_build_object('progress', %s::jsonb) WHERE id = %s",
            (Jsonb(figures), self.id),
        )

    def finish(self, state: str = "done") -> None:
        self.conn.execute("UPDATE shardctl.operations SET state = %s, finished_at = now() WHERE id = %s",
                          (state, self.id))

    def _record(self, step: str, status: str, detail: dict[str, Any]) -> None:
        if self.conn.closed:
            return
        self.conn.execute(
            "INSERT INTO shardctl.journal (operation, step, status, detail) VALUES (%s, %s, %s, %s)",
            (self.id, step, status, Jsonb({k: str(v) for k, v in detail.items()})),
        )


def interrupted(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Operations left 'running': interrupted when their process died, or in progress when the
    apply lock is held. With the last step, whether a move is past its cutover (its flip is
    done: only cleanup is left, it can no longer be aborted), and its latest progress."""
    rows = conn.execute(
        "SELECT o.id, o.kind, o.address, o.started_at,"
        " (SELECT step FROM shardctl.journal j WHERE j.operation = o.id ORDER BY seq DESC LIMIT 1),"
        " EXISTS (SELECT 1 FROM shardctl.journal j WHERE j.operation = o.id AND j.step LIKE '%%: flip'"
        "         AND j.status = 'done'),"
        " o.detail -> 'progress'"
        " FROM shardctl.operations o WHERE o.state = 'running' ORDER BY o.id"
    ).fetchall()
    return [dict(id=r[0], kind=r[1], address=r[2], started_at=r[3], last_step=r[4], past_cutover=r[5],
                 progress=r[6]) for r in rows]


def close_interrupted(conn: psycopg.Connection) -> None:
    """Mark operations left 'running' by a dead process as failed; the new plan redoes their
    (idempotent) work. Splits, merges and a branch's creation, reset or schema merge stay
    'running': they resume under their own operation, or `shardctl abort` undoes them; so does
    `backups create` (the next one resumes it)."""
    conn.execute("UPDATE shardctl.operations SET state = 'failed', finished_at = now(),"
                 " detail = detail || '{\"interrupted\": true}'"
                 " WHERE state = 'running' AND kind <> ALL(%s)", (list(MOVE_KINDS + BRANCH_KINDS + BACKUP_KINDS),))
