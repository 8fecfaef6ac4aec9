"""The daemon's records in the catalog: the kill switch (pause / resume) and who leads.

The pause flag lives in the catalog, not in a daemon's memory, so `shardctl pause` works from
any machine, survives restarts and stops every daemon of the fleet within one interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg


@dataclass(frozen=True)
class Control:
    paused: bool
    reason: str
    changed_by: str
    changed_at: datetime | None


@dataclass(frozen=True)
class Leader:
    who: str
    listen: str
    since: datetime
    heartbeat: datetime


def read_control(conn: psycopg.Connection) -> Control:
    row = conn.execute("SELECT paused, reason, changed_by, changed_at FROM shardctl.daemon_control").fetchone()
    return Control(*row) if row else Control(False, "", "", None)


def set_paused(conn: psycopg.Connection, paused: bool, reason: str, by: str) -> Control:
    conn.execute(
        "INSERT INTO shardctl.daemon_control (paused, reason, changed_by) VALUES (%s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET paused = excluded.paused, reason = excluded.reason,"
        " changed_by = excluded.changed_by, changed_at = now()",
        (paused, reason, by),
    )
    return read_control(conn)


def record_leader(conn: psycopg.Connection, who: str, listen: str) -> None:
    conn.execute(
        "INSERT INTO shardctl.daemon_leader (who, listen) VALUES (%s, %s)"
        " ON CONFLICT (id) DO UPDATE SET who = excluded.who, listen = excluded.listen, since = now(),"
        " heartbeat = now()", (who, listen))


def heartbeat(conn: psycopg.Connection) -> None:
    conn.execute("UPDATE shardctl.daemon_leader SET heartbeat = now()")


def read_leader(conn: psycopg.Connection) -> Leader | None:
    row = conn.execute("SELECT who, listen, since, heartbeat FROM shardctl.daemon_leader").fetchone()
    return Leader(*row) if row else None
