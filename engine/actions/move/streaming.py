"""A verification slot read as a stream, over PostgreSQL's replication protocol: each change is
decoded once, as its transaction commits, and arrives within milliseconds.

Why: the slot was read with `pg_logical_slot_get_changes` over and over, and every call decodes
again from the slot's restart point (the last running-transactions record) up to the WAL flushed
when it begins. Under 32 pgbench writers a call took tens of milliseconds of a busy source's CPU,
and a change that just missed one call waited for the next whole one: behind the fence, the
verification's work ahead waited for the decoder 100-200 ms (bench/split.py's pause marks).

Why psycopg2 here: psycopg 3 has no replication protocol (COPY BOTH) yet; psycopg2's
LogicalReplicationConnection is the well-kept client for it, and it is installed already as
Barman's dependency. Nothing else in shardctl uses it.

How far a stream has read: every message carries an LSN (for test_decoding: a transaction's
first record, a change's, or its commit's end), and the server's keepalives carry how far it
has decoded. Transactions are sent in commit order, each at its commit, so once a message or a
keepalive at LSN L has been read, every transaction that committed before L has been read:
`covered` is the largest such L. A walsender that has caught up with the WAL flushed sends a
keepalive before it waits, as long as the position we confirmed is behind what it sent.
"""

from __future__ import annotations

import select
from dataclasses import dataclass
from typing import Any

import psycopg

from engine.servers.connect import blame

READ_AT_MOST = 20_000  # messages read before handing them on (a stream that never pauses)


@dataclass
class Read:
    lines: list[str]
    covered: int  # every transaction that committed before this LSN has been read


class SlotStream:
    """One source's verification slot, streamed. Not thread-safe: one thread reads it."""

    def __init__(self, params: dict[str, Any], slot: str, server: str):
        import psycopg2
        import psycopg2.extras

        self._lost = (psycopg2.Error, OSError)
        self._where = (server, params.get("dbname", ""))
        self._conn = psycopg2.connect(**{"connect_timeout": "10", **params, "application_name": "shardctl-verify"},
                                      connection_factory=psycopg2.extras.LogicalReplicationConnection)
        try:
            self._cursor = self._conn.cursor()
            self._cursor.start_replication(slot_name=slot, decode=True, status_interval=1,
                                           options={"skip-empty-xacts": "1", "include-xids": "0"})
        except BaseException:
            self._conn.close()
            raise
        self._covered = 0

    def read(self, wait_s: float) -> Read:
        """What has arrived; when nothing has, waits up to WAIT_S for something (a change or a
        keepalive)."""
        try:
            return self._read(wait_s)
        except self._lost as exc:
            # the error psycopg's own connections raise when a server stops answering, so that it
            # is told (and handled) as they are: the server named, no traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            lost = psycopg.OperationalError(f"the verification slot's stream broke: {first}")
            blame(lost, *self._where, certain=True)
            raise lost from None

    def _read(self, wait_s: float) -> Read:
        lines: list[str] = []
        for waited in (False, True):
            while len(lines) < READ_AT_MOST:
                message = self._cursor.read_message()
                if message is None:
                    break
                lines.append(message.payload)
                self._covered = max(self._covered, message.data_start)
            # a keepalive is taken in by read_message without a message: its LSN is wal_end
            self._covered = max(self._covered, self._cursor.wal_end)
            if lines or waited:
                break
            select.select([self._cursor], [], [], wait_s)
        return Read(lines, self._covered)

    def confirm(self, upto: int) -> None:
        """The slot may let go of what comes before UPTO (sent at the next status interval:
        nothing is sent here)."""
        self._cursor.send_feedback(flush_lsn=upto)

    def close(self) -> None:
        self._conn.close()


def opened(params: dict[str, Any], slot: str, server: str) -> tuple[SlotStream | None, str]:
    """The stream, or None and why not (a role without REPLICATION, a pg_hba.conf without
    replication lines, max_wal_senders reached, psycopg2 absent): the caller then reads the slot
    with SQL as before."""
    try:
        return SlotStream(params, slot, server), ""
    except ImportError as exc:
        return None, f"psycopg2 is not installed ({exc})"
    except Exception as exc:  # psycopg2.Error and its kin: any refusal to stream
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, first
