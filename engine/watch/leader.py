"""The leader lock: one daemon acts, the others stand by.

A session advisory lock on the catalog, held on a connection of its own for as long as the
daemon leads. A daemon that dies (or loses its connection) releases it with the session, so a
standby polling `pg_try_advisory_lock` takes over within one poll; no lease to expire, no clock
to trust. `shardctl.daemon_leader` only tells people and standbys who holds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import psycopg

from engine.catalog import control
from engine.rows import one

LEADER_LOCK_KEY = 0x5348_4457_4154  # "SHDWAT"


class LeadershipLost(Exception):
    """The leader's catalog session broke: stop acting and stand by again."""


class LeaderLock:
    def __init__(self, connect: Callable[[], psycopg.Connection], who: str, listen: str):
        self._connect = connect
        self.who = who
        self.listen = listen
        self._conn: psycopg.Connection | None = None
        self.held = False

    def try_acquire(self) -> bool:
        """True when this daemon now leads. Raises psycopg.Error when the catalog is unreachable."""
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        if not one(self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)))[0]:
            return False
        control.record_leader(self._conn, self.who, self.listen)
        self.held = True
        return True

    def current(self) -> control.Leader | None:
        if self._conn is None or self._conn.closed:
            return None
        return control.read_leader(self._conn)

    def heartbeat(self) -> None:
        try:
            assert self._conn is not None
            control.heartbeat(self._conn)
        except (psycopg.Error, AssertionError) as exc:
            self.held = False
            raise LeadershipLost(str(exc).splitlines()[0] if str(exc) else "catalog connection lost") from None

    def release(self) -> None:
        conn, self._conn = self._conn, None
        self.held = False
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock_all()")
            conn.close()
