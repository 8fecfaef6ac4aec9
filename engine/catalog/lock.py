"""The apply lock: a session advisory lock on the control database, held for a whole apply.

The advisory lock is what excludes; `shardctl.lock_info` only tells a waiting user who holds it.
Because the lock belongs to the session, a crashed holder releases it with its connection.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg

import engine
from engine.errors import LockHeldError, LockInfo
from engine.rows import one

APPLY_LOCK_KEY = 0x5348_4152_4443  # "SHARDC"


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


def read_info(conn: psycopg.Connection) -> LockInfo | None:
    try:
        row = conn.execute(
            "SELECT lock_id, operation, who, version,"
            " to_char(created AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
            " FROM shardctl.lock_info"
        ).fetchone()
    except psycopg.Error:
        return None
    return LockInfo(*row) if row else None


@contextmanager
def apply_lock(conn: psycopg.Connection, operation: str, timeout: float = 0.0,
               on_wait: Callable[[], None] | None = None) -> Iterator[str]:
    """Hold the apply lock on `conn` (autocommit) for the duration of the block."""
    deadline = time.monotonic() + timeout
    told = False
    while not one(conn.execute("SELECT pg_try_advisory_lock(%s)", (APPLY_LOCK_KEY,)))[0]:
        if time.monotonic() >= deadline:
            raise LockHeldError(read_info(conn))
        if on_wait and not told:
            on_wait()
            told = True
        time.sleep(0.2)
    lock_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO shardctl.lock_info (lock_id, operation, who, version) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET lock_id = excluded.lock_id, operation = excluded.operation,"
        " who = excluded.who, version = excluded.version, created = now()",
        (lock_id, operation, _who(), engine.__version__),
    )
    try:
        yield lock_id
    finally:
        if not conn.closed:
            conn.execute("DELETE FROM shardctl.lock_info WHERE lock_id = %s", (lock_id,))
            conn.execute("SELECT pg_advisory_unlock(%s)", (APPLY_LOCK_KEY,))


def who() -> str:
    return _who()


def held_elsewhere(conn: psycopg.Connection) -> str | None:
    """Who holds the apply lock from another session right now (None when nobody does), so an
    operation in flight is not mistaken for an interrupted one."""
    held = one(
        conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = ("
            " SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = %s AND objid = %s AND objsubid = 1 AND pid <> pg_backend_pid())",
            (APPLY_LOCK_KEY >> 32, APPLY_LOCK_KEY & 0xFFFF_FFFF),
        )
    )[0]
    if not held:
        return None
    info = read_info(conn)
    return info.who if info else "another shardctl process"
