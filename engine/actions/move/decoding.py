"""Reading the verification slots: the keys a move's sources changed, from test_decoding's
lines (`Changes`, `parse_changes`), and the `Decoder` that reads them continuously from the
last key rounds to the verification behind the fence.

Why a decoder that never stops: reading a slot decodes everything the sources wrote since the
last read, and under 32 pgbench writers that took 80-130 ms a key round (about as long as the
round's comparison) and again inside the fence. Every key written during a round is one more to
compare in the next, and at the end behind the fence, so the rounds did not shrink what was left.
Decoded as it is written, a round's changes are there when its comparison ends (the wait is the
decoder's lag), and the fence's decoding is the last few milliseconds of it.

Each slot is streamed where it can be (engine/actions/move/streaming.py: every change decoded
once); else it is read with SQL over and over, each read decoding again from the slot's restart
point, which the decoder lets follow every SNAPSHOT_EVERY_S.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import psycopg

from engine.actions.move.live import Live
from engine.actions.move.streaming import SlotStream
from engine.plan.models import ShardSpec

IDLE_S = 0.005  # a decoder that found nothing reads again after this
STREAM_WAIT_S = 0.05  # a stream with nothing new: how long a read waits (and so how soon it sees a stop)
NUDGE_AFTER_S = 0.1  # a take waiting this long on an idle stream: one commit flushes the WAL (_streamed)
SNAPSHOT_EVERY_S = 0.05  # how often the decoder lets its slot's restart point follow


@dataclass
class Changes:
    """Keys changed per table since the verification slot's start, parsed from test_decoding."""

    keys: dict[tuple[str, str], set] = field(default_factory=dict)
    truncated: set[tuple[str, str]] = field(default_factory=set)
    # a split's or a merge's keys: key -> its keyspace position (the hash its target's range is cut by), read
    # on the source with the check for rows out of range
    positions: dict = field(default_factory=dict)

    def merge(self, other: Changes) -> None:
        for table, keys in other.keys.items():
            self.keys.setdefault(table, set()).update(keys)
        self.truncated |= other.truncated
        self.positions.update(other.positions)

    def of(self, table: tuple[str, str]) -> set:
        return self.keys.get(table, set())

    def count(self) -> int:
        return sum(len(v) for v in self.keys.values())


_IDENT = r'(?:"(?:[^"]|"")*"|[^."\s:]+)'
_HEAD = re.compile(rf'table ({_IDENT})\.({_IDENT}): (INSERT|UPDATE|DELETE|TRUNCATE):')
# a key's value as test_decoding writes it: a bigint bare, a text quoted; NULL never a key
_VALUE = {"bigint": r"(null|-?\d+)", "text": r"('(?:[^']|'')*'|null)"}


def _unquote_ident(text: str) -> str:
    return text[1:-1].replace('""', '"') if text.startswith('"') else text


def parse_changes(lines: Iterable[str], key_column: str, key_type: str) -> Changes:
    """Changed shard keys from test_decoding's lines, e.g.
    `table public.orders: UPDATE: customer_id[bigint]:42 order_id[bigint]:7 ...`.

    Each line's head (table and operation) is parsed once per distinct head, and the key is
    searched from where the head ends: thousands of lines are parsed behind the fence, where
    the per-line work was about 4 us a line under load."""
    quoted = key_column if re.fullmatch(r"[a-z_][a-z0-9_]*", key_column) else '"' + key_column.replace('"', '""') + '"'
    key = re.compile(rf"\s{re.escape(quoted)}\[[^\]]*\]:{_VALUE[key_type]}")
    as_key = int if key_type == "bigint" else str
    out = Changes()
    heads: dict[str, tuple[tuple[str, str], bool]] = {}
    for line in lines:
        if not line.startswith("table "):
            continue  # BEGIN, COMMIT, messages
        match = _HEAD.match(line)
        if not match:
            continue
        head = heads.get(match.group(0))
        if head is None:
            head = heads[match.group(0)] = ((_unquote_ident(match.group(1)), _unquote_ident(match.group(2))),
                                            match.group(3) == "TRUNCATE")
        table, truncate = head
        if truncate:
            out.truncated.add(table)
            continue
        found = key.findall(line, match.end())
        if not found:
            continue
        keys = out.keys.setdefault(table, set())
        for value in found:
            if value == "null":
                continue
            if value.startswith("'"):
                value = value[1:-1].replace("''", "'")
            keys.add(as_key(value))
    return out


def lsn(text: str) -> int:
    """A pg_lsn's text (16/B374D848) as a number, to compare."""
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class Decoder:
    """Follows each source's verification slot, in one thread per source (with its lane 3 for
    the check for rows out of range), keeping what it read until it is taken. `take(upto)` waits
    until every source has been read past its LSN in UPTO (the decoder's lag), and hands over
    everything read so far.

    STREAM opens a source's slot as a stream (or None, having said why it cannot), and PARSE
    turns what it sent into changes, checked for rows out of range. Where there is no stream,
    READ decodes one source on a connection up to the WAL flushed when it begins, and says that
    LSN (engine/actions/move/compare.py read_flushed: one round trip, with that check), over and
    over. An error (rows out of range, a server gone) ends the decoder and is raised to whoever
    takes next."""

    def __init__(self, live: Live, read: Callable[[psycopg.Connection, ShardSpec, bool], tuple[Changes, str]],
                 stream: Callable[[ShardSpec], SlotStream | None] | None = None,
                 parse: Callable[[psycopg.Connection, ShardSpec, list[str]], Changes] | None = None):
        if stream is not None and parse is None:
            raise ValueError("a decoder that streams needs PARSE")
        self.live = live
        self.read = read
        self.stream = stream
        self.parse = parse
        self._changed = threading.Condition()
        self._pending = Changes()
        # per source: every transaction that committed before this LSN has been read
        self._covered: dict[str, int] = {}
        self._wanted: dict[str, int] = {}  # per source: the furthest LSN a take waits for
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[psycopg.Connection] = []

    def start(self) -> Decoder:
        for source in self.live.spec.sources:
            thread = threading.Thread(target=self._follow, args=(source,), daemon=True, name="shardctl-decoder")
            self._threads.append(thread)
            thread.start()
        return self

    def _follow(self, source: ShardSpec) -> None:
        try:
            with self.live.session(source, 3) as conn:
                self._conns.append(conn)
                stream = self.stream(source) if self.stream is not None else None
                if stream is None:
                    self._poll(conn, source)
                    return
                try:
                    self._streamed(stream, conn, source)
                finally:
                    stream.close()
        except BaseException as exc:  # raised to the next take
            with self._changed:
                if not self._stopping.is_set():
                    self._error = exc
                self._changed.notify_all()

    def _poll(self, conn: psycopg.Connection, source: ShardSpec) -> None:
        """The slot read with SQL over and over (where it cannot be streamed)."""
        logged = 0.0
        while not self._stopping.is_set():
            # the restart point follows every SNAPSHOT_EVERY_S, not at every read (each is a WAL record)
            log_snapshot = time.monotonic() - logged > SNAPSHOT_EVERY_S
            logged = time.monotonic() if log_snapshot else logged
            changed, flushed = self.read(conn, source, log_snapshot)
            self._publish(source, changed, lsn(flushed))
            if not changed.keys and not changed.truncated:
                self._stopping.wait(IDLE_S)

    def _streamed(self, stream: SlotStream, conn: psycopg.Connection, source: ShardSpec) -> None:
        """The slot streamed (engine/actions/move/streaming.py): what arrives is parsed (and
        checked for rows out of range on CONN) and handed on with how far it covers.

        A take can wait for an LSN inside a record the server has flushed only in part (the WAL
        writer flushes whole pages): the walsender decodes whole records, so on a source with
        nothing more to flush the stream would not reach it until something commits. After
        NUDGE_AFTER_S without getting nearer, one commit of ours (an xid, no row) flushes it."""
        parse = self.parse
        assert parse is not None  # checked in __init__
        nearer = time.monotonic()
        while not self._stopping.is_set():
            got = stream.read(STREAM_WAIT_S)
            changed = parse(conn, source, got.lines) if got.lines else Changes()
            before = self._covered.get(source.name, 0)
            self._publish(source, changed, got.covered)
            stream.confirm(got.covered)
            if got.covered > before or got.covered >= self._wanted.get(source.name, 0):
                nearer = time.monotonic()
            elif time.monotonic() - nearer > NUDGE_AFTER_S:
                conn.execute("SELECT pg_current_xact_id()")
                nearer = time.monotonic()

    def _publish(self, source: ShardSpec, changed: Changes, covered: int) -> None:
        with self._changed:
            self._pending.merge(changed)
            self._covered[source.name] = max(covered, self._covered.get(source.name, 0))
            self._changed.notify_all()

    def take(self, upto: dict[str, str], timeout: float) -> Changes:
        """Everything read so far, once every source has been read past its LSN in UPTO; within
        TIMEOUT, else FutureTimeout."""
        deadline = time.monotonic() + timeout
        wanted = {name: lsn(at) for name, at in upto.items()}
        with self._changed:
            for name, at in wanted.items():
                self._wanted[name] = max(at, self._wanted.get(name, 0))
            while True:
                if self._error is not None:
                    raise self._error
                if all(self._covered.get(name, -1) >= at for name, at in wanted.items()):
                    taken, self._pending = self._pending, Changes()
                    return taken
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    raise FutureTimeout(f"the sources' changes were not decoded within {timeout:g}s")
                self._changed.wait(left)

    def stop(self) -> None:
        """Stop reading: a read under way is cancelled (the slot must be free to be read or
        dropped next)."""
        self._stopping.set()
        with self._changed:  # a take waiting is told at once
            self._changed.notify_all()
        for conn in self._conns:
            if not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    conn.cancel_safe(timeout=1.0)
        for thread in self._threads:
            thread.join(timeout=5.0)
