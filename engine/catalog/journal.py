"""The operation journal: every step of an action recorded before and after it runs.

Executors are written so that each step can run again after a crash (they check what already
exists); the journal tells a person, `status` and a resuming apply what was in flight.
A failpoint (SHARDCTL_FAILPOINT=<step prefix>) kills the process right after a step's 'begin'
is recorded, so the crash tests can stop an apply at every step for real; a slowpoint
(SHARDCTL_SLOWPOINT=<step prefix>=<seconds>) holds a step there, so a test can signal it mid-way;
a holdpoint (SHARDCTL_HOLDPOINT=<step prefix>=<file>) writes <file>.held there and waits until
<file> exists, so a test can kill a PostgreSQL server while the apply stands at that very point.
An atomic step (the cutover) records 'done' in its own catalog transaction, and its points are
also offered right after that commit under the name "<step>, committed".

Whether a move is past its cutover is read from the routing state (`CUT_OVER`), not only from
the journal: the flip's journal row commits with the flip, and a catalog that recorded a flip
some other way (an older shardctl) is judged by what routes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
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
HOLDPOINT_ENV = "SHARDCTL_HOLDPOINT"  # "<step prefix>=<file>": a step that waits for FILE to exist
HOLD_LIMIT = 300.0  # seconds a holdpoint waits at most (a test that died never releases it)
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


ASIDE_WAIT_S = 5.0  # a catalog that stalls: the rows left are non-durable ones
LAZY_INSERT = ("INSERT INTO shardctl.journal (operation, step, status, detail)"
               " SELECT %s, %s, %s, %s FROM (SELECT set_config('synchronous_commit', 'off', true)) AS lazily")


class _RowsAside:
    """Journal rows written by a thread of their own, on a catalog connection of their own, in
    the order they were put (Operation.rows_aside)."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self.rows: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._write, daemon=True, name="shardctl-journal")
        self.thread.start()

    def _write(self) -> None:
        while True:
            values = self.rows.get()
            try:
                if values is None:
                    return
                # a row lost with the catalog only means its step runs again (Operation.step):
                # the durable row that comes next on the operation's own connection says if it is gone
                with contextlib.suppress(psycopg.Error):
                    self.conn.execute(LAZY_INSERT, values)
            finally:
                self.rows.task_done()

    def put(self, values: tuple) -> None:
        self.rows.put(values)

    def written(self) -> None:
        """Until every row put so far has been written, or ASIDE_WAIT_S: a catalog that does not
        answer holds up the statement that comes next on the operation's own connection, which
        is bounded where it needs to be (a move's flip by its statement_timeout)."""
        deadline = time.monotonic() + ASIDE_WAIT_S
        with self.rows.all_tasks_done:
            while self.rows.unfinished_tasks and (left := deadline - time.monotonic()) > 0:
                self.rows.all_tasks_done.wait(left)

    def close(self) -> None:
        self.rows.put(None)
        self.thread.join(timeout=ASIDE_WAIT_S)



class Operation:
    def __init__(self, conn: psycopg.Connection, op_id: int):
        self.conn = conn
        self.id = op_id
        self._aside: _RowsAside | None = None

    @contextmanager
    def rows_aside(self, conn: psycopg.Connection) -> Iterator[None]:
        """Within the block, the non-durable rows (durable=False) are written in the background
        on CONN, in order, and the step goes on without waiting for them: behind a move's
        fence, under 32 pgbench writers, the round trips of its four or five journal rows took
        40-70 ms of the pause (the catalog's server stalls on its WAL like the others). A durable
        row, a test point, and the block's end wait for the rows before them, so the journal's
        order is kept; a process killed in between loses the rows not yet written, as a catalog
        lost before their asynchronous commit would."""
        aside = _RowsAside(conn)
        self._aside = aside
        try:
            yield
        finally:
            self._aside = None
            aside.written()
            aside.close()

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
    def step(self, name: str, atomic: bool = False, durable: bool = True,
             **detail: Any) -> Iterator[dict[str, Any]]:
        """Record the step's 'begin', run it, record 'done' (or 'failed'). The block may add
        figures to the dict it is given; they are kept in the 'done' row. ATOMIC: the block runs
        in a catalog transaction that also holds the 'done' row, so no crash separates what the
        step changed in the catalog from the journal's record of it. DURABLE=False: the 'begin'
        and (non-atomic) 'done' rows commit without waiting for the catalog's WAL flush, for a
        step whose rows, lost with the catalog server, only mean the step is run again (the
        steps behind the fence: each flush there lengthened the pause). The next durable commit
        (the flip's) flushes them too; an atomic step's own transaction and 'failed' rows are
        always durable."""
        if _stop_requested and not getattr(_unstoppable, "depth", 0):
            raise Interrupted(f"stopped before step {name!r}; apply again to continue")
        self._record(name, "begin", detail, durable)
        if self._aside is not None and _points_set():
            self._aside.written()  # a test point acts once the rows before it are there
        points(name)
        outcome: dict[str, Any] = {}
        try:
            if atomic:
                with self.conn.transaction():
                    yield outcome
                    self._record(name, "done", {**detail, **outcome})
                points(f"{name}, committed")
            else:
                yield outcome
        except BaseException as exc:
            with contextlib.suppress(psycopg.OperationalError):  # a catalog gone keeps the first error
                self._record(name, "failed", {**detail, "error": str(exc).splitlines()[0] if str(exc)
                                              else type(exc).__name__})
            raise
        if not atomic:
            self._record(name, "done", {**detail, **outcome}, durable)

    def progress(self, figures: dict[str, Any]) -> None:
        """The latest progress of a long step (rows, rates, lag, ETA), for `status` and the daemon.
        Kept beside the journal, not in it: it is overwritten, not appended."""
        if self.conn.closed:
            return
        self.conn.execute(
            "UPDATE shardctl.operations SET detail = detail || jsonb_build_object('progress', %s::jsonb"
            " || jsonb_build_object('at', clock_timestamp())) WHERE id = %s",  # when: a reader sees it is fresh
            (Jsonb(figures), self.id),
        )

    def finish(self, state: str = "done") -> None:
        self.conn.execute("UPDATE shardctl.operations SET state = %s, finished_at = now() WHERE id = %s",
                          (state, self.id))

    def _record(self, step: str, status: str, detail: dict[str, Any], durable: bool = True) -> None:
        if self.conn.closed:
            return
        values = (self.id, step, status, Jsonb({k: str(v) for k, v in detail.items()}))
        idle = self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if self._aside is not None:
            if not durable and idle:
                self._aside.put(values)
                return
            self._aside.written()
        if durable or not idle:
            self.conn.execute(
                "INSERT INTO shardctl.journal (operation, step, status, detail) VALUES (%s, %s, %s, %s)", values)
            return
        # one round trip: synchronous_commit off for this statement's own (implicit) transaction
        # only, read when it commits; the connection's setting is untouched
        self.conn.execute(LAZY_INSERT, values)


def _points_set() -> bool:
    return any(os.environ.get(name) for name in (FAILPOINT_ENV, SLOWPOINT_ENV, HOLDPOINT_ENV))


def points(name: str) -> None:
    """The test points of a step (module docstring): kill here, hold a while, or hold until told."""
    failpoint = os.environ.get(FAILPOINT_ENV)
    if failpoint and name.startswith(failpoint):
        os.kill(os.getpid(), signal.SIGKILL)
    slowpoint = os.environ.get(SLOWPOINT_ENV, "")
    if "=" in slowpoint and name.startswith(slowpoint.rsplit("=", 1)[0]):
        time.sleep(float(slowpoint.rsplit("=", 1)[1]))
    holdpoint = os.environ.get(HOLDPOINT_ENV, "")
    if "=" in holdpoint and name.startswith(holdpoint.rsplit("=", 1)[0]):
        release = Path(holdpoint.rsplit("=", 1)[1])
        # written whole, then renamed: a test that sees the file reads the point's name, never ''
        staged = Path(f"{release}.held.{os.getpid()}")
        staged.write_text(name)
        staged.replace(Path(f"{release}.held"))
        deadline = time.monotonic() + HOLD_LIMIT
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


# Is operation o (in a query over shardctl.operations o) past its cutover? Its flip's journal row
# says so, and so does the routing itself: one of its targets (server and database) is an
# active shard, which only the flip makes it.
CUT_OVER = """(EXISTS (SELECT 1 FROM shardctl.journal j WHERE j.operation = o.id AND j.step LIKE '%%: flip'
                  AND j.status = 'done')
       OR EXISTS (SELECT 1 FROM shardctl.shards s,
                         jsonb_path_query(o.detail -> 'action', 'lax $.targets[*]') t
                  WHERE s.database = o.detail -> 'action' ->> 'database' AND s.state = 'active'
                    AND s.server = t ->> 'server' AND s.dbname = t ->> 'dbname')
       OR EXISTS (SELECT 1 FROM shardctl.shards s
                  WHERE s.database = o.detail -> 'action' ->> 'database' AND s.state = 'active'
                    AND s.server = o.detail -> 'action' -> 'target' ->> 'server'
                    AND s.dbname = o.detail -> 'action' -> 'target' ->> 'dbname'))"""


def cut_over(conn: psycopg.Connection, operation: int) -> bool:
    """Whether this move has passed its cutover: its targets own the range (see CUT_OVER)."""
    return bool(one(conn.execute(f"SELECT {CUT_OVER} FROM shardctl.operations o WHERE o.id = %s",
                                 (operation,)))[0])


def interrupted(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Operations left 'running': interrupted when their process died, or in progress when the
    apply lock is held. With the last step, whether a move is past its cutover (its targets
    own the range: only cleanup is left, it can no longer be aborted), its latest progress, and
    the error its last step failed with (None when it did not fail: the process died)."""
    rows = conn.execute(
        "SELECT o.id, o.kind, o.address, o.started_at,"
        " (SELECT step FROM shardctl.journal j WHERE j.operation = o.id ORDER BY seq DESC LIMIT 1),"
        f" {CUT_OVER}, o.detail -> 'progress',"
        " (SELECT detail ->> 'error' FROM shardctl.journal j WHERE j.operation = o.id ORDER BY seq DESC LIMIT 1)"
        " FROM shardctl.operations o WHERE o.state = 'running' ORDER BY o.id"
    ).fetchall()
    return [dict(id=r[0], kind=r[1], address=r[2], started_at=r[3], last_step=r[4], past_cutover=r[5],
                 progress=r[6], error=r[7]) for r in rows]


def close_interrupted(conn: psycopg.Connection) -> None:
    """Mark operations left 'running' by a dead process as failed; the new plan redoes their
    (idempotent) work. Splits, merges and a branch's creation, reset or schema merge stay
    'running': they resume under their own operation, or `shardctl abort` undoes them; so does
    `backups create` (the next one resumes it)."""
    conn.execute("UPDATE shardctl.operations SET state = 'failed', finished_at = now(),"
                 " detail = detail || '{\"interrupted\": true}'"
                 " WHERE state = 'running' AND kind <> ALL(%s)", (list(MOVE_KINDS + BRANCH_KINDS + BACKUP_KINDS),))
