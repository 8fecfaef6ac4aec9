"""A verification slot read as a stream, over PostgreSQL's replication protocol: each change is
decoded once, as its transaction commits, and arrives within milliseconds.

Why: the slot was read with `pg_logical_slot_get_changes` over and over, and every call decodes
again from the slot's restart point (the last running-transactions record) up to the WAL flushed
when it begins; a change that just missed one call waited for the next whole one. Under 32
pgbench writers, behind the fence, the verification's work ahead took 140-250 ms from the drain
to its sources' side read (bench/split.py's pause marks, 1M rows); streamed, it had the changes
up to the drain 1-15 ms after it in most moves, and its read was done 60-110 ms after the drain.

Why psycopg2 here: psycopg 3 has no replication protocol (COPY BOTH) yet; psycopg2's
LogicalReplicationConnection is the well-kept client for it, and it is installed already as
Barman's dependency. Nothing else in shardctl uses it.

How far a stream has read (`covered`): test_decoding's messages carry an LSN (a change: its
record's start; a commit: its record's end; a BEGIN: the transaction's first record, or 0 when
skip-empty-xacts defers it), and the server's keepalives carry how far it has decoded. A
transaction is sent whole when its commit record is decoded, in commit order, so once a
message or a keepalive at LSN L has been read, every transaction that committed before L has
been read: `covered` is the largest such L. That holds only while transactions are sent at
their commit: the slot must not stream in-progress transactions (test_decoding's
`stream-changes`) nor decode two-phase ones. A walsender that has caught up with the WAL
flushed sends a keepalive before it waits, as long as the position we confirmed is behind what
it sent; an LSN inside a record the server has flushed only in part is reached once the rest is
flushed (engine/actions/move/decoding.py nudges an idle source).
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
    """What one read of a stream brought: test_decoding's lines, and how far it has read."""

    lines: list[str]
    covered: int  # every transaction that committed before this LSN has been read


class SlotStream:
    """One source's verification slot, streamed. Not thread-safe: one thread reads it."""

    def __init__(self, params: dict[str, Any], slot: str, server: str):
        import psycopg2
        import psycopg2.extensions
        import psycopg2.extras

        self._psycopg2 = psycopg2
        self._where = (server, params.get("dbname", ""))
        self._conn = psycopg2.connect(**{"connect_timeout": "10", **params, "application_name": "shardctl-verify"},
                                      connection_factory=psycopg2.extras.LogicalReplicationConnection)
        try:
            # the walsender sends the server's encoding as it is, whatever the client's: decoded here
            self._encoding = psycopg2.extensions.encodings[self._conn.get_parameter_status("server_encoding")]
            self._cursor = self._conn.cursor()
            self._cursor.start_replication(slot_name=slot, decode=False, status_interval=1,
                                           options={"skip-empty-xacts": "1", "include-xids": "0"})
        except BaseException:
            self._conn.close()
            raise
        self._covered = 0

    def read(self, wait_s: float) -> Read:
        """What has arrived; when nothing has, waits up to WAIT_S for something (a change or a
        keepalive that says the stream has read further)."""
        try:
            return self._read(wait_s)
        except self._psycopg2.Error as exc:
            raise self._as_psycopg(exc) from None
        except OSError as exc:
            raise self._as_psycopg(exc) from None
        except UnicodeDecodeError as exc:  # not text in the server's encoding (SQL_ASCII)
            error = psycopg.DataError(f"the verification slot's stream sent text that is not {self._encoding}: {exc}")
            blame(error, *self._where, certain=False)
            raise error from None

    def _read(self, wait_s: float) -> Read:
        lines: list[str] = []
        before = self._covered
        for waited in (False, True):
            while len(lines) < READ_AT_MOST:
                message = self._cursor.read_message()
                if message is None:
                    break
                lines.append(message.payload.decode(self._encoding))
                self._covered = max(self._covered, message.data_start)
            # a keepalive is taken in by read_message without a message: its LSN is wal_end
            self._covered = max(self._covered, self._cursor.wal_end)
            if lines or waited or self._covered > before:
                break
            select.select([self._cursor], [], [], wait_s)
        return Read(lines, self._covered)

    def _as_psycopg(self, exc: Exception) -> psycopg.Error:
        """The error psycopg's own connections would raise, so that it is told (and handled) as
        theirs are: a server's refusal keeps its SQLSTATE; a connection lost has none, and
        names the server."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        code = getattr(exc, "pgcode", None)
        try:
            kind = psycopg.errors.lookup(code) if code else psycopg.OperationalError
        except KeyError:
            kind = psycopg.OperationalError
        error = kind(f"the verification slot's stream: {first}")
        blame(error, *self._where, certain=not code or code.startswith("08"))
        return error

    def confirm(self, upto: int) -> None:
        """The slot may let go of what comes before UPTO (sent at the next status interval:
        nothing is sent here)."""
        self._cursor.send_feedback(flush_lsn=upto)

    def close(self) -> None:
        self._conn.close()


def opened(params: dict[str, Any], slot: str, server: str) -> tuple[SlotStream | None, str]:
    """The stream, or None and why not (`max_wal_senders` reached, a connection pooler that
    does not pass replication connections, psycopg2 absent): the caller then reads the slot
    with SQL as before. Both need the REPLICATION attribute."""
    try:
        import psycopg2
    except ImportError as exc:
        return None, f"psycopg2 is not installed ({exc})"
    try:
        return SlotStream(params, slot, server), ""
    except (psycopg2.Error, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, first
