"""The verification slot streamed over the replication protocol (engine/actions/move/streaming.py),
on a real server: it hands on every change committed, and how far it has read reaches the WAL
flushed, with writers going on and with none (the keepalive a caught-up walsender sends); a
slot it cannot stream says why instead of failing."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from engine.actions.move.decoding import lsn, parse_changes
from engine.actions.move.streaming import opened
from movers import active_shards
from test_fence_contention import fleet_params

SLOT = "shardctl_test_stream"


def read_until(stream, upto: int, timeout: float = 30.0) -> tuple[list[str], int]:
    """Everything the stream hands on until it has covered UPTO."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    covered = 0
    while covered < upto:
        assert time.monotonic() < deadline, f"covered {covered}, not {upto}, after {timeout}s"
        got = stream.read(0.05)
        lines += got.lines
        assert got.covered >= covered  # never goes back
        covered = got.covered
        stream.confirm(covered)
    return lines, covered


def flushed(conn) -> int:
    """An LSN every transaction committed so far is before, and that the stream will reach: the
    WAL inserted so far, then a commit of ours (an xid, no row) flushes it whole. (The flush
    position alone can fall inside a record flushed in part, reached only at the next flush.)"""
    at = lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
    conn.execute("SELECT pg_current_xact_id()")
    return at


@pytest.fixture
def streamed(fleet):
    """The fleet applied, a slot on its first shard streamed: (its connection parameters, an
    autocommit connection to it, the stream). Afterwards the stream is closed and the slot, once
    released, dropped."""
    assert fleet.cli("apply", "--auto-approve").code == 0
    _, _, _, server, dbname = active_shards(fleet)[0]
    params = fleet_params(fleet, server, dbname)
    with psycopg.connect(**params, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
        stream, why = opened(params, SLOT, server)
        assert stream is not None, why
        try:
            yield params, conn, stream
        finally:
            stream.close()
        release_and_drop(conn)


def test_a_streamed_slot_hands_on_every_committed_change_and_covers_the_wal_flushed(streamed):
    params, conn, stream = streamed

    # writers going on: 4 threads, each its own customers, committed one by one
    def write(first: int) -> None:
        with psycopg.connect(**params, autocommit=True) as writer:
            for key in range(first, first + 250):
                writer.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'x')", (key,))

    writers = [threading.Thread(target=write, args=(1_000_000 + i * 1000,)) for i in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    lines, _ = read_until(stream, flushed(conn))
    keys = parse_changes(lines, "customer_id", "bigint").of(("public", "customers"))
    assert keys == {1_000_000 + i * 1000 + k for i in range(4) for k in range(250)}

    # nothing written since: the walsender's keepalive still says how far it has read
    idle_at = flushed(conn)
    lines, covered = read_until(stream, idle_at)
    assert covered >= idle_at and not parse_changes(lines, "customer_id", "bigint").keys

    # an uncommitted change is not handed on; once committed, it is
    with psycopg.connect(**params) as open_tx:
        open_tx.execute("INSERT INTO customers (customer_id, name) VALUES (2000001, 'late')")
        conn.execute("INSERT INTO customers (customer_id, name) VALUES (2000002, 'x')")
        lines, _ = read_until(stream, flushed(conn))
        assert parse_changes(lines, "customer_id", "bigint").of(("public", "customers")) == {2000002}
        open_tx.commit()
    lines, _ = read_until(stream, flushed(conn))
    assert parse_changes(lines, "customer_id", "bigint").of(("public", "customers")) == {2000001}


def test_a_slot_that_cannot_be_streamed_says_why(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    _, _, _, server, dbname = active_shards(fleet)[0]
    stream, why = opened(fleet_params(fleet, server, dbname), "no_such_slot", server)
    assert stream is None and "no_such_slot" in why and "does not exist" in why


def test_an_lsn_inside_a_record_flushed_in_part_is_reached_once_a_commit_flushes_the_rest(streamed):
    """Why the decoder nudges an idle source (decoding.py _streamed): the WAL writer flushes
    whole pages, so the flush position can fall inside the record an open transaction is
    writing; the walsender decodes whole records, and the stream does not reach that position
    until something flushes the rest. One commit of an xid does."""
    params, conn, stream = streamed
    read_until(stream, flushed(conn))
    with psycopg.connect(**params) as open_tx:
        # rows of random text (incompressible), a few pages of WAL, left uncommitted
        open_tx.execute("INSERT INTO customers (customer_id, name)"
                        " SELECT g, string_agg(md5(random()::text), '')"
                        " FROM generate_series(3000001, 3000040) g, generate_series(1, 40) GROUP BY g")
        inserted = lsn(open_tx.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        # the WAL writer flushes the whole pages written so far, not the last partial one
        deadline = time.monotonic() + 10
        while (at := flushed_only(conn)) % 8192 != 0 or at >= inserted:
            assert time.monotonic() < deadline, f"the flush position {at} is not inside the open WAL"
            time.sleep(0.05)
        reached = covered_within(stream, at, 1.0)
        assert reached < at, "reached without a flush: nothing to nudge here"
        conn.execute("SELECT pg_current_xact_id()")
        assert covered_within(stream, at, 10.0) >= at
        open_tx.rollback()


def flushed_only(conn) -> int:
    return lsn(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])


def covered_within(stream, upto: int, seconds: float) -> int:
    """How far the stream has covered once it reaches UPTO, or after SECONDS."""
    deadline = time.monotonic() + seconds
    covered = 0
    while covered < upto and time.monotonic() < deadline:
        got = stream.read(0.05)
        covered = got.covered
        stream.confirm(covered)
    return covered


def release_and_drop(conn) -> None:
    """The walsender lets go of the slot once the stream is closed; then it is dropped."""
    deadline = time.monotonic() + 10
    while conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                       (SLOT,)).fetchone()[0] is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
