"""Moving rows online with PostgreSQL's logical replication: what splits and merges share.

A move is a set of links, each from a source shard to a target shard with an optional hash
range filter (a split: one source, N filtered links; a merge: N sources, one target, unfiltered).
The steps, each journaled and each safe to run again after a crash:

  record     targets enter the catalog as 'moving' (not routed)
  targets    target databases created with the database's schema steps, and given their copy
             of the reference tables (engine/actions/reference.py; the move itself leaves
             reference tables out of its publications, comparison and fence)
  publish    per link: a row-filtered publication and an explicit logical slot on the source
  subscribe  per link: a subscription on the target (create_slot = false, binary, sync commit)
  guard      per source table: a statement trigger that refuses writes once the fence is armed
             (one table per short transaction, while the copy runs; disarmed, it lets all pass)
  follow     per replica of the database (data: replica): a link to each target, disabled
  sync       wait until every table is copied and the slots' lag is small
  fence      arm the guard (a flag: no table lock), wait for the transactions that wrote
             before it to end, then write the mark (engine/actions/fence.py: why it is sound)
  catch up   wait until every target has applied its sources' WAL up to the mark
  sequences  targets' sequences set past the sources', in disjoint blocks per target
  verify     per table: count and an order-independent checksum, frozen sources vs targets
  flip       catalog: targets active, sources retired, new routing epoch (one transaction)
  hand over  per replica: once it has all of the sources, its links to the targets enabled,
             those to the sources removed (engine/actions/replica.py says why it is exact)
  cleanup    subscriptions, slots and publications removed

Names of everything created derive from the operation id (shardctl_op<id>_<n>), so a resumed
or aborted operation finds exactly what it made. Identifiers go through psycopg.sql.

What a crash of any PostgreSQL server cannot break: the flip and its journal row commit in one
catalog transaction, and whether a move is past its cutover is read from the routing itself
(journal.CUT_OVER), so a resume finishes it and an abort refuses it. A server that does not
answer during cleanup or abort is "not done yet": what it still holds is listed and the
operation stays open (never "already gone"). A fence outlives the process that made it: a
resumed run keeps it, and the pause it reports runs from that first fence to the flip.
Subscription errors count from the moment the current step began, not since the link was made.

Behind the fence every wait is bounded by `moves.fence_timeout`: each statement on the move's
connections (statement_timeout), each wait for a thread's result, the catch-up and the flip's
transaction. An overrun lifts the fence (the source takes writes again), the journal's step
says what did not finish, and the operation stays open for `apply` to resume.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial

import psycopg
from psycopg import errors, sql
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from engine.actions import fence, reference, replica
from engine.actions.base import (
    ApplyContext,
    apply_steps,
    drop_database,
    ensure_database,
)
from engine.actions.compare import Changes, Comparison, VerifyRestart, background
from engine.actions.fence import DRAIN_LIMIT
from engine.actions.locking import Blocker, LockContention, with_lock_retries, write_holders
from engine.actions.subscription import create_subscription, resolved_conninfo
from engine.catalog import journal, store
from engine.catalog.journal import Operation
from engine.client import ROUTING_CHANNEL
from engine.config.models import Moves, Policy
from engine.errors import UserError
from engine.observe import introspect, strays
from engine.plan.models import MoveSettings, ShardSpec, StepSpec, transit_name
from engine.rows import one
from engine.servers.connect import ServerUnreachable

LIFT_TIMEOUT_S = 10  # a statement that disarms the fence takes no lock: this is for a server that stalls
LAG_FLOOR = 64 << 10  # a lag this small is applied in milliseconds whatever the measured rate
# errors of one link since its step began before the move calls it failing: a server that
# restarts costs a link one or two (the connection it lost, a first reconnect too early); the
# workers retry every wal_retrieve_retry_interval (5 s), so a lasting cause reaches this in ~10 s
FAILING_ERRORS = 3
SYNC_LOST_AFTER = 10.0  # seconds a finished table copy may go without its sync slot before the move says so


class MoveFailed(UserError):
    pass


class VerificationFailed(MoveFailed):
    """The copy differs from the source: the move is undone, never resumed."""


class CopyLost(VerificationFailed):
    """The source removed WAL the copy still needed: the copy can never complete; undone."""


class Leftovers(MoveFailed):
    """Cleanup (or abort) could not remove everything: a server did not answer. The operation
    stays open; what is left is listed."""


@dataclass(frozen=True)
class Progress:
    at: float  # monotonic seconds
    ready: int  # tables whose initial copy is done
    tables: int
    copied_rows: int
    copied_bytes: int
    lag: int  # bytes: the worst slot's distance from its source's WAL position
    positions: dict[str, tuple[int, int]]  # per source: (WAL position, slowest slot's confirmed position)


@dataclass
class RateMeter:
    """Rates over the last few seconds of readings: the sources' WAL rate, the apply rate (how
    fast the slots' confirmed positions advance) and the copy rate in rows."""

    window_s: float = 5.0
    readings: list[Progress] = field(default_factory=list)

    def add(self, reading: Progress) -> None:
        self.readings.append(reading)
        while len(self.readings) > 2 and reading.at - self.readings[1].at >= self.window_s:
            self.readings.pop(0)

    def _rate(self, value: Callable[[Progress], float]) -> float:
        if len(self.readings) < 2:
            return 0.0
        first, last = self.readings[0], self.readings[-1]
        elapsed = last.at - first.at
        return max(0.0, (value(last) - value(first)) / elapsed) if elapsed > 0 else 0.0

    @property
    def known(self) -> bool:
        return len(self.readings) >= 2

    @property
    def wal_rate(self) -> float:
        return self._rate(lambda r: sum(w for w, _ in r.positions.values()))

    @property
    def apply_rate(self) -> float:
        return self._rate(lambda r: sum(c for _, c in r.positions.values()))

    @property
    def copy_rate(self) -> float:
        return self._rate(lambda r: r.copied_rows)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@dataclass(frozen=True)
class Link:
    index: int
    source: ShardSpec
    target: ShardSpec
    filtered: bool  # split links carry the target's range as a row filter

    def name(self, operation: int) -> str:
        return f"shardctl_op{operation}_{self.index}"


@dataclass
class Move:
    ctx: ApplyContext
    op: Operation
    database: str
    key_column: str
    key_type: str
    sources: tuple[ShardSpec, ...]
    targets: tuple[ShardSpec, ...]
    links: tuple[Link, ...]
    label: str  # e.g. "split orders/40-80"
    settings: Moves = field(default_factory=Moves)
    steps: tuple[StepSpec, ...] = ()  # every schema step the shards ran: a target runs the same
    fenced_since: float | None = None  # monotonic: since when the range is unwritable (the fence armed)
    fence_figures: dict[str, float] = field(default_factory=dict)  # how the fence was taken, for the history
    history_id: int | None = None  # the flip's history row
    verified_keys: int = 0  # keys rechecked behind the fence
    table_cache: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    held: dict[str, psycopg.Connection] = field(default_factory=dict)  # shard name -> connection, through the fence
    slots_checked_at: float = float("-inf")
    syncs_seen_lost: dict[str, float] = field(default_factory=dict)  # table-sync slot prefix -> first seen gone
    origins: dict[str, bool] = field(default_factory=dict)  # per target: may this role read origin progress
    fence_stamps: dict[str, int] = field(default_factory=dict)  # per source: its fence mark's time, in microseconds
    op_kind: str = ""  # the action's kind: a relocation flips names as well as routing
    error_baseline: dict[str, tuple[int, int]] = field(default_factory=dict)  # per link: errors when the step began
    step_began: float = 0.0  # monotonic: when the current sync or converge step began
    inherited_pause: bool = False  # the pause began with an interrupted run's fence
    # where the pause goes: ms since the fence armed at which each point inside it was reached
    # (each step's journal row written, each wait over), kept in the flip's history row
    pause_marks: dict[str, float] = field(default_factory=dict)
    # per target: its schema (fingerprint, snapshot) as the flip records it, read before the fence
    target_schemas: dict[str, tuple[str, dict]] = field(default_factory=dict)

    def pause_ms(self) -> float:
        """The one pause figure: from the fence armed (writes to the range fail) to now; taken
        once the routing flip has committed (the targets own the range), it is what is printed,
        kept in the history and shown. A resumed run whose sources an interrupted run had
        fenced counts from that first fence."""
        return round((time.monotonic() - self.fenced_since) * 1000, 1) if self.fenced_since is not None else 0.0

    def mark(self, point: str) -> None:
        """Note when a point inside the pause was reached (nothing before the fence is armed)."""
        if self.fenced_since is not None:
            self.pause_marks[point] = self.pause_ms()

    def fenced_for(self) -> float | None:
        """How long this operation's fence has held the sources (the longest, in seconds, on each
        source's own clock), from the moment it was armed; None when no source is fenced. A fence
        outlives the process that made it: an apply killed behind it leaves the range unwritable
        until a rerun flips it or an abort lifts it."""
        longest = None
        for source in self.sources:
            with self.connect(source) as conn:
                held = fence.armed_for(conn, self.op.id)
            if held is not None:
                longest = max(longest or 0.0, held)
        return longest

    def source_state(self) -> str:
        """What is true of the sources now, said in a failure's way forward: fenced (an
        interrupted run's fence holds: writes to the range fail) or taking writes."""
        names = ", ".join(f"{s.dbname} on server {s.server}" for s in self.sources)
        try:
            fenced = self.fenced_for()
        except (UserError, psycopg.OperationalError):
            return (f"whether the source ({names}) is still fenced is unknown: its server does not answer;"
                    f" `shardctl apply` resumes the move once it does, `shardctl abort {self.op.id}` undoes it")
        if fenced is None:
            return (f"the source ({names}) takes writes as before; `shardctl apply` resumes the move,"
                    f" `shardctl abort {self.op.id}` removes what it created")
        return (f"the source ({names}) is still fenced by an interrupted run, for {_duration(fenced)} now: writes"
                f" to the range fail until `shardctl apply` finishes the move, or `shardctl abort {self.op.id}`"
                " lifts the fence and removes the copy")

    # ------------------------------------------------------------------ helpers

    def step(self, name: str, **detail):
        return self.op.step(f"{self.label}: {name}", **detail)

    def connect(self, shard: ShardSpec, **kw):
        return self.ctx.fleet.servers[shard.server].connect(shard.dbname, **kw)

    def session(self, shard: ShardSpec, second: bool = False):
        """The connection held open from the copy to the flip when there is one, else a new one.
        Held because the steps poll every few milliseconds: a new connection each time forked a
        backend on the source's server per poll (tens per second during the copy), and setting
        one up inside the fence lengthened the pause."""
        held = self.held.get(shard.name + "#2" if second else shard.name)
        return nullcontext(held) if held is not None else self.connect(shard)

    @contextmanager
    def holding(self):
        """Two connections per source and target, for the steps from the copy to the flip (the
        second for what runs beside the first behind the fence)."""
        with ExitStack() as stack:
            for shard in (*self.sources, *self.targets):
                for name in (shard.name, shard.name + "#2"):
                    if name not in self.held:
                        self.held[name] = stack.enter_context(self.connect(shard))
            try:
                yield
            finally:
                self.held.clear()

    def release(self) -> None:
        """Close the held connections now (a target's database is about to be dropped)."""
        for conn in self.held.values():
            conn.close()
        self.held.clear()

    def tables(self, shard: ShardSpec) -> list[tuple[str, str]]:
        """The shard's tables, read once per run (DDL waits while a move is unfinished, and the
        fence must not spend a connection on this)."""
        if shard.name not in self.table_cache:
            self.table_cache[shard.name] = self._read_tables(shard)
        return self.table_cache[shard.name]

    def _read_tables(self, shard: ShardSpec) -> list[tuple[str, str]]:
        """The sharded tables: a reference table's copy is the reference source's to keep."""
        with self.connect(shard) as conn:
            return [(r[0], r[1]) for r in conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
                " AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl')"
                f" AND n.nspname NOT LIKE 'pg_toast%%' AND NOT {reference.GUARDED} ORDER BY 1, 2")]

    def range_filter(self, target: ShardSpec) -> sql.Composable:
        h = strays.key_hash(self.key_column, self.key_type)
        parts = []
        if target.lo is not None:
            parts.append(sql.SQL("{} >= {}").format(h, sql.Literal(target.lo)))
        if target.hi is not None:
            parts.append(sql.SQL("{} < {}").format(h, sql.Literal(target.hi)))
        return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")

    def source_conninfo(self, source: ShardSpec) -> str:
        """How the target's subscription reaches the source: what libpq resolved here (service
        file, PG* variables, passfile and sslmode included), spelled out for the subscriber."""
        with self.connect(source) as conn:
            return resolved_conninfo(conn)

    def say(self, text: str) -> None:
        self.ctx.say(f"{self.label}: {text}")

    # ------------------------------------------------------------------ the steps

    @property
    def relocation(self) -> bool:
        """A whole shard to another server: its target carries the transit name NAME@SERVER."""
        return self.op_kind == "move_shard"

    def record(self) -> None:
        with self.step("record"), self.ctx.catalog.transaction():
            for target in self.targets:
                row = self.ctx.catalog.execute(
                    "SELECT state FROM shardctl.shards WHERE database = %s AND name = %s",
                    (self.database, target.name)).fetchone()
                if row and row[0] != "moving":
                    raise MoveFailed(f"{self.label}: shard {target.name} exists already ({row[0]})",
                                     "a retired shard of the same range is dropped after autosplit.retire_after")
                store.upsert_shard(self.ctx.catalog, database=self.database, name=target.name, lo=target.lo,
                                   hi=target.hi, server=target.server, dbname=target.dbname, state="moving")
            store.bump_serial(self.ctx.catalog)

    def create_targets(self) -> None:
        with self.step("targets"):
            steps = self.steps  # what every shard ran: same schema as the source
            unknown = [s.name for s in steps if not s.sql]
            if unknown:
                raise UserError(f"schema step {unknown[0]} of {self.database} is no longer in the configuration",
                                "a new shard needs every step the others ran; restore it")
            for target in self.targets:
                ensure_database(self.ctx, target)
                apply_steps(self.ctx, target, steps)
                with self.connect(target) as conn:
                    conn.execute(fence.MARKS)
            self.attach_reference()

    def attach_reference(self) -> None:
        """Each target subscribes to the reference source and has its copy before the move's own
        links exist (its reference tables are guarded by then: they are not the move's)."""
        source = reference.source_of(self.ctx, self.database)
        if source is None:
            return
        tables = reference.tables_of(self.ctx, self.database)
        for target in self.targets:
            reference.attach(self.ctx, source, target, tables)
        reference.wait_synced(self.ctx, self.targets, self.say)

    def check_replica_identity(self) -> None:
        """A row filter on a column outside the replica identity breaks UPDATE and DELETE on the
        source the moment the publication exists: refuse before creating anything."""
        for source in self.sources:
            with self.connect(source) as conn:
                bad = [f"{r[0]}.{r[1]}" for r in conn.execute(
                    f"""SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                         AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl')
                         AND n.nspname NOT LIKE 'pg_toast%%' AND c.relreplident <> 'f' AND NOT {reference.GUARDED}
                         AND NOT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a
                                         ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                                         WHERE i.indrelid = c.oid AND i.indisprimary AND a.attname = %s)
                       ORDER BY 1, 2""", (self.key_column,))]
            if bad:
                raise MoveFailed(f"{self.label}: table {bad[0]} has no primary key containing {self.key_column}",
                                 "rows can move only when the shard key is in every table's primary key")

    def publish(self) -> None:
        with self.step("publish"):
            self.check_replica_identity()
            for link in self.links:
                name = link.name(self.op.id)
                tables = self.tables(link.source)
                with self.connect(link.source) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
                    if not exists:
                        members = [
                            sql.SQL("{}.{}{}").format(
                                sql.Identifier(schema), sql.Identifier(table),
                                sql.SQL(" WHERE ({})").format(self.range_filter(link.target)) if link.filtered
                                else sql.SQL(""))
                            for schema, table in tables
                        ]
                        # the fence's mark travels with the rows: its arrival is the exact catch-up
                        conn.execute(fence.MARKS)
                        # only this operation's marks: earlier moves left theirs in every shard they made
                        members.append(sql.SQL("_shardctl.fence_marks WHERE (operation = {})").format(
                            sql.Literal(self.op.id)))
                        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                            sql.Identifier(name), sql.SQL(", ").join(members)))
                    slot = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
                    if not slot:
                        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))

    def subscribe(self) -> None:
        with self.step("subscribe"):
            for link in self.links:
                name = link.name(self.op.id)
                with self.connect(link.target) as conn:
                    if conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)).fetchone():
                        continue
                    # synchronous_commit off: the apply worker stops waiting on a WAL flush per
                    # transaction (it spent 84-88% of its time there, and never caught up with a busy
                    # source). Safe: it reports to the source only positions already durable here,
                    # so the slot replays anything a crash of this server would lose.
                    # streaming: large transactions are applied while they run instead of spooled
                    # to disk first; in parallel by a second worker where the server has it (16+).
                    # the source's connection string (its password) never appears in a statement's
                    # text: engine/actions/subscription.py says how and why
                    streaming = "parallel" if conn.info.server_version >= 160000 else "on"
                    # with a copy throttle, the links past it wait disabled; sync enables them in turn
                    enabled = self.settings.copy_streams is None or link.index < self.settings.copy_streams
                    try:
                        create_subscription(conn, name, self.source_conninfo(link.source), publication=name,
                                            slot=name, streaming=streaming, enabled=enabled)
                    except psycopg.Error as exc:
                        raise subscription_failed(self.label, self.op.id, link, exc, self.source_state()) from None

    def guard(self) -> None:
        """While the copy runs: the fence's guard triggers on every table of every source, one
        table per short transaction with a lock timeout and retries (engine/actions/fence.py).
        They refuse nothing until the fence arms them; a table guarded already is skipped."""
        with self.step("guard"):
            for source in self.sources:
                with self.connect(source) as conn:
                    missing = fence.unguarded(conn)
                if not missing:
                    continue
                with self.connect(source, autocommit=False) as conn:
                    for schema, table in missing:
                        relation = sql.Identifier(schema, table)
                        with_lock_retries(conn, fence.install(relation), relations=[relation.as_string(conn)],
                                          what=f"fence writes on {source.dbname} (installing its guard on"
                                               f" {schema}.{table})",
                                          say=self.say, budget_s=self.settings.fence_timeout)

    def pace_copies(self) -> None:
        """The copy throttle (`moves.copy_streams`): enable waiting links while fewer than that
        many are still copying. PostgreSQL copies a link's tables itself (up to
        max_sync_workers_per_subscription at once); what we pace is how many links copy at once."""
        limit = self.settings.copy_streams
        if limit is None:
            return
        copying, waiting = 0, []
        for link in self.links:
            with self.session(link.target) as conn:
                row = conn.execute(
                    "SELECT s.subenabled, count(sr.srrelid) FILTER (WHERE sr.srsubstate NOT IN ('r', 's'))"
                    " FROM pg_subscription s LEFT JOIN pg_subscription_rel sr ON sr.srsubid = s.oid"
                    " WHERE s.subname = %s GROUP BY s.subenabled", (link.name(self.op.id),)).fetchone()
            if row is None:
                continue
            if not row[0]:
                waiting.append(link)
            elif row[1]:
                copying += 1
        for link in waiting[:max(0, limit - copying)]:
            with self.session(link.target) as conn:
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(link.name(self.op.id))))
            self.say(f"copy throttle ({limit} at a time): copying {link.source.dbname} into {link.target.dbname}"
                     f" ({link.index + 1} of {len(self.links)})")

    def _progress(self) -> Progress:
        """One reading of the copy and the replication: tables ready, rows copied so far, and per
        source its WAL position and the slowest of its slots' confirmed positions."""
        waiting = total = copied_rows = copied_bytes = 0
        for link in self.links:
            name = link.name(self.op.id)
            with self.session(link.target) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE sr.srsubstate <> 'r'), count(*) FROM pg_subscription_rel sr"
                    " JOIN pg_subscription s ON s.oid = sr.srsubid WHERE s.subname = %s", (name,)).fetchone()
                waiting += row[0]
                total += row[1]
        for target in self.targets:  # once per target database, whatever number of links feed it
            with self.session(target) as conn:
                # rows in the tables now plus the COPYs running (their rows are not counted yet)
                copying = conn.execute(
                    "SELECT (SELECT coalesce(sum(n_live_tup), 0) FROM pg_stat_user_tables"
                    "        WHERE schemaname <> '_shardctl')::bigint"
                    " + (SELECT coalesce(sum(tuples_processed), 0) FROM pg_stat_progress_copy"
                    "    WHERE datname = current_database())::bigint,"
                    " (SELECT coalesce(sum(bytes_processed), 0) FROM pg_stat_progress_copy"
                    "  WHERE datname = current_database())::bigint").fetchone()
                copied_rows += int(copying[0])
                copied_bytes += int(copying[1])
        lag = 0
        positions: dict[str, tuple[int, int]] = {}
        for link in self.links:
            with self.session(link.source) as conn:
                row = conn.execute(
                    "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, coalesce(confirmed_flush_lsn, '0/0') - '0/0'::pg_lsn"
                    " FROM pg_replication_slots WHERE slot_name = %s", (link.name(self.op.id),)).fetchone()
            if row:
                wal, confirmed = int(row[0]), int(row[1])
                prev = positions.get(link.source.name)
                positions[link.source.name] = (wal, min(confirmed, prev[1]) if prev else confirmed)
                lag = max(lag, wal - confirmed)
        return Progress(time.monotonic(), total - waiting, total, copied_rows, copied_bytes, lag, positions)

    def _lost_slots(self) -> None:
        """A slot of this move that the source invalidated (it removed WAL the slot still
        needed: `max_slot_wal_keep_size` exceeded while the copy ran, under heavy writes) makes
        the copy impossible to finish; the workers would retry forever. Checked once a second."""
        now = time.monotonic()
        if now - self.slots_checked_at < 1.0:
            return
        self.slots_checked_at = now
        prefixes = [link.name(self.op.id) for link in self.links]
        for link in self.links:  # a table's copy runs on its own slot, pg_<subscription oid>_sync_...
            with self.session(link.target) as conn:
                row = conn.execute("SELECT oid FROM pg_subscription WHERE subname = %s",
                                   (link.name(self.op.id),)).fetchone()
            if row:
                prefixes.append(f"pg_{row[0]}_sync_")
        for source in self.sources:
            with self.session(source) as conn:
                lost = conn.execute(
                    "SELECT slot_name, current_setting('max_slot_wal_keep_size') FROM pg_replication_slots"
                    " WHERE wal_status = 'lost' AND EXISTS (SELECT 1 FROM unnest(%s::text[]) p"
                    " WHERE starts_with(slot_name, p)) LIMIT 1", (prefixes,)).fetchone()
            if lost:
                raise CopyLost(
                    f"{self.label}: {source.dbname} on server {source.server} removed WAL the move still needed:"
                    f" its replication slot {lost[0]} was invalidated (the server keeps at most"
                    f" max_slot_wal_keep_size = {lost[1]} of WAL for a slot, and more was written before the"
                    " copy could use it)",
                    f"the source keeps its rows and takes writes; what was created is removed. Raise"
                    f" max_slot_wal_keep_size on server {source.server}, copy one link at a time"
                    " (moves.copy_streams: 1) or move when the source writes less, then apply again")
        self._lost_table_syncs(now)

    def _lost_table_syncs(self, now: float) -> None:
        """A table whose copy finished on the target (state 'f') while its table-sync slot is gone
        from the source: PostgreSQL drops that slot just before it records the sync as done, so a
        crash of the target's server in between leaves a sync that retries forever. Seen for
        SYNC_LOST_AFTER seconds (the worker itself passes through that state for milliseconds),
        it makes the copy impossible to finish; undone like a lost slot."""
        for link in self.links:
            with self.session(link.target) as conn:
                waiting = conn.execute(
                    "SELECT s.oid, sr.srrelid, sr.srrelid::regclass::text FROM pg_subscription_rel sr"
                    " JOIN pg_subscription s ON s.oid = sr.srsubid WHERE s.subname = %s AND sr.srsubstate = 'f'",
                    (link.name(self.op.id),)).fetchall()
            if not waiting:
                continue
            with self.session(link.source) as conn:
                slots = {r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE"
                                                    " starts_with(slot_name, %s)", (f"pg_{waiting[0][0]}_sync_",))}
            for subid, relid, table in waiting:
                prefix = f"pg_{subid}_sync_{relid}_"
                if any(slot.startswith(prefix) for slot in slots):
                    self.syncs_seen_lost.pop(prefix, None)
                    continue
                since = self.syncs_seen_lost.setdefault(prefix, now)
                if now - since >= SYNC_LOST_AFTER:
                    raise CopyLost(
                        f"{self.label}: the copy of {table} into {link.target.dbname} on server {link.target.server}"
                        f" can never finish: its table-sync slot ({prefix}...) on server {link.source.server} is"
                        " gone (PostgreSQL drops it just before recording the copy as done there, and server"
                        f" {link.target.server} stopped in between)",
                        "what the move created is removed and the source takes writes; apply again to start the"
                        " move afresh (with the same -split or -merge, for a move asked for by hand)")

    def _error_counts(self) -> dict[str, tuple[int, int]]:
        """Per link, its subscription's apply and table-sync errors so far (cumulative counters)."""
        counts = {}
        for link in self.links:
            with self.session(link.target) as conn:
                row = conn.execute("SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats"
                                   " WHERE subname = %s", (link.name(self.op.id),)).fetchone()
            counts[link.name(self.op.id)] = (int(row[0]), int(row[1])) if row else (0, 0)
        return counts

    def _subscription_errors(self) -> tuple[Link, int, int] | None:
        """The first link that has failed FAILING_ERRORS times since the current step began, with
        its apply and table-sync errors since then."""
        self._lost_slots()
        now = self._error_counts()
        for link in self.links:
            name = link.name(self.op.id)
            before = self.error_baseline.get(name, (0, 0))
            apply_errors, sync_errors = now[name][0] - before[0], now[name][1] - before[1]
            if apply_errors + sync_errors >= FAILING_ERRORS:
                return link, apply_errors, sync_errors
        return None

    def _expected_rows(self) -> int:
        """An estimate of the rows to copy, for the ETA: the sources' planner statistics (a split's
        target gets its share of its source's rows)."""
        total = 0
        for link in self.links:
            with self.connect(link.source) as conn:
                # the larger of the planner's estimate and the statistics' live count: a table
                # never analysed has no estimate, one never vacuumed a stale live count
                rows = conn.execute(
                    "SELECT coalesce(sum(greatest(c.reltuples, s.n_live_tup, 0)), 0)::bigint FROM pg_class c"
                    " JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE s.schemaname <> '_shardctl'").fetchone()[0]
            total += int(rows) // (len(self.links) if link.filtered else 1)
        return total

    def sync(self, final: bool = False) -> None:
        """Wait for the initial copy, then until the lag is small enough that catch-up behind the
        fence fits the pause budget (by the measured apply rate). Reports rows, rate, lag and ETA
        as it goes; gives up after `moves.converge_timeout` saying what it measured."""
        with self.step("sync" if not final else "converge"):
            limit = self.settings.converge_timeout
            budget = self.settings.pause_budget
            started = self.step_began = time.monotonic()
            # what the links failed before (the crash this run resumes from, earlier runs) is not
            # held against them: their counters are cumulative
            self.error_baseline = self._error_counts()
            expected_tables = sum(len(self.tables(link.source)) + 1 for link in self.links)  # + fence_marks
            expected_rows = self._expected_rows() if not final else 0
            rates = RateMeter()
            told = float("-inf")
            while True:
                self.pace_copies()
                now = self._progress()
                rates.add(now)
                copied = now.ready >= expected_tables
                if copied and (now.lag <= LAG_FLOOR or (rates.apply_rate > 0 and now.lag <= rates.apply_rate * budget)):
                    self.progress(phase="caught up", lag_bytes=now.lag, wal_rate=rates.wal_rate,
                                  apply_rate=rates.apply_rate,
                                  text=None if final else f"caught up: lag {now.lag / 1e3:,.0f} kB (source writes"
                                  f" {rates.wal_rate / 1e6:.1f} MB/s of WAL, targets apply {rates.apply_rate / 1e6:.1f}"
                                  " MB/s)")
                    return
                failing = self._subscription_errors()
                if failing:
                    link, apply_errors, sync_errors = failing
                    raise MoveFailed(
                        f"{self.label}: replication into {link.target.dbname} on server {link.target.server} is"
                        f" failing: {apply_errors} apply errors and {sync_errors} table-sync errors in the"
                        f" {_duration(time.monotonic() - self.step_began)} since this step began",
                        f"server {link.target.server}'s log says why (look for subscription {link.name(self.op.id)})."
                        f" Fix the cause; {self.source_state()}")
                if rates.known and time.monotonic() - told > 2:
                    if not copied:
                        rows_rate = rates.copy_rate
                        remaining = max(0, expected_rows - now.copied_rows)
                        eta = (f", ETA {_duration(remaining / rows_rate)}" if rows_rate > 0 and expected_rows
                               else ", ETA unknown")
                        of = f" of ~{expected_rows:,}" if expected_rows else ""
                        self.progress(phase="copy", tables_ready=now.ready, tables=expected_tables,
                                      rows_copied=now.copied_rows, rows_expected=expected_rows,
                                      bytes_copied=now.copied_bytes, rows_per_s=round(rows_rate),
                                      text=f"copying: {now.ready}/{expected_tables} tables done, {now.copied_rows:,}"
                                           f"{of} rows ({now.copied_bytes / 1e6:.1f} MB in flight) at"
                                           f" {rows_rate:,.0f} rows/s{eta}")
                    else:
                        gain = rates.apply_rate - rates.wal_rate
                        eta = f", ETA {_duration(now.lag / gain)}" if gain > 0 else ", not converging yet"
                        self.progress(phase="catch-up", lag_bytes=now.lag, wal_rate=rates.wal_rate,
                                      apply_rate=rates.apply_rate,
                                      text=f"catching up: lag {now.lag / 1e6:.1f} MB, source writes"
                                           f" {rates.wal_rate / 1e6:.1f} MB/s, targets apply"
                                           f" {rates.apply_rate / 1e6:.1f} MB/s{eta}")
                    told = time.monotonic()
                if time.monotonic() - started > limit:
                    if not copied:
                        raise MoveFailed(
                            f"{self.label}: the initial copy is not finished after {_duration(limit)}:"
                            f" {now.ready} of {expected_tables} tables ready, {now.copied_rows:,} rows in flight",
                            f"raise moves.converge_timeout or move a smaller shard; {self.source_state()}")
                    raise MoveFailed(
                        f"{self.label}: replication did not catch up within {_duration(limit)}: lag"
                        f" {now.lag / 1e6:.1f} MB, the source writes {rates.wal_rate / 1e6:.2f} MB/s of WAL and the"
                        f" targets apply {rates.apply_rate / 1e6:.2f} MB/s",
                        f"retry when its write rate is lower, or raise moves.converge_timeout; {self.source_state()}")
                time.sleep(0.1)

    def progress(self, text: str | None = None, **figures) -> None:
        """A progress report: printed (when there is text), and kept for `status` and the daemon."""
        if text:
            self.say(text)
        report = {"step": self.label, **figures, **({"text": text} if text else {})}
        self.op.progress(report)
        self.ctx.progress(report)

    def fence(self, between: Callable[[], None] | None = None) -> dict[str, str]:
        """Stop writes on every source; returns each source's fence LSN (its mark row's).

        No table lock (engine/actions/fence.py says why this is sound): while a transaction has
        held a write lock on a source longer than DRAIN_LIMIT, wait with the source writable;
        then arm every source's guard, and wait (at most DRAIN_LIMIT) for the transactions that
        wrote before it to end; then the marks. A drain that overruns disarms every source and
        tries again; after `moves.fence_timeout` the fence gives up naming who was in the way,
        and the sources take writes as before. A merge arms its sources only when none of them
        has such a writer, so one source is never held read-only while another waits."""
        with self.step("fence", durable=False) as record:
            began = time.monotonic()
            # an interrupted run's fence still holds: the range has been unwritable since then
            held = self.fenced_for()
            if held is not None:
                self.fenced_since = time.monotonic() - held
                self.inherited_pause = True
            with ExitStack() as stack:
                conns = {s.name: stack.enter_context(self.session(s)) for s in self.sources}
                oids = {name: [oid for _, _, oid in fence.tables(conn)] for name, conn in conns.items()}
                with self.behind("the fence was not taken"):
                    tries, drain_ms = self._take_fence(conns, oids, between)
                self.fence_figures = {"tries": tries, "acquired_ms": round((time.monotonic() - began) * 1000, 1),
                                      "drain_ms": drain_ms}
                with self.behind("the fence's mark was not written"):
                    marks = self._marks(conns)
                self.mark("marked")
            record.update(self.fence_figures)
            record["fenced_at"] = round(time.time() - (time.monotonic() - (self.fenced_since or began)), 3)
            return marks

    def _take_fence(self, conns: dict[str, psycopg.Connection], oids: dict[str, list[int]],
                    between: Callable[[], None] | None) -> tuple[int, float]:
        """Arm and drain, trying again until it holds or `moves.fence_timeout` has passed. Returns
        the tries and the last drain's milliseconds."""
        budget = self.settings.fence_timeout
        started = time.monotonic()
        first_seen: dict[str, float] = {}  # a writer's virtual transaction -> when we first saw it
        in_the_way: list[Blocker] = []
        rng = random.Random()
        attempt = 0
        while True:
            attempt += 1
            now = time.monotonic()
            holders = [h for name in conns for h in write_holders(conns[name], oids[name])]
            for h in holders:
                first_seen.setdefault(h.vxid, now)
            # a writer's age from its transaction's start, or (another role's, without
            # pg_read_all_stats) since we first saw it
            old = [h for h in holders
                   if h.pid is None or max(h.xact_age_s or 0.0, now - first_seen[h.vxid]) > DRAIN_LIMIT]
            if old:
                in_the_way = old
                if self.fenced_since is not None:  # an interrupted run's fence: writable while we wait
                    self._disarm(conns)
            else:
                journal.points(f"{self.label}: arm")  # a test point: kill, hold or slow the fence right here
                if self.fenced_since is None:
                    self.fenced_since = time.monotonic()  # before the flag: the pause is never understated
                for source in self.sources:
                    fence.arm(conns[source.name], self.op.id)
                armed = time.monotonic()
                self.mark("armed")
                left = self._drain(conns, oids, first_seen)
                if not left:
                    self.mark("drained")
                    return attempt, round((time.monotonic() - armed) * 1000, 1)
                in_the_way = left
                self._disarm(conns)
                self.say(f"the fence waited {DRAIN_LIMIT * 1000:.0f} ms for transactions that wrote before it"
                         f" ({', '.join(b.describe() for b in left[:3])}); lifted, trying again")
            elapsed = time.monotonic() - started
            if elapsed >= budget:
                names = ", ".join(s.dbname for s in self.sources)
                who = "; ".join(b.describe() for b in in_the_way[:5])
                first = next((b.pid for b in in_the_way if b.pid is not None), None)
                raise LockContention(
                    f"could not fence writes on {names}: {attempt} tries over {elapsed:.1f}s; blocked by {who}",
                    "nothing changed: the shard takes writes as before. A transaction that keeps writing to these"
                    " tables for long (idle in transaction?) must end first"
                    + (f" (SELECT pg_terminate_backend({first}) ends it)" if first else "") + "; then apply again")
            if attempt == 1 or attempt % 10 == 0:
                self.say(f"waiting to fence writes: try {attempt} gave way to "
                         + ", ".join(f"pid {b.pid} ({b.application_name or 'no application_name'}, {b.state})"
                                     for b in in_the_way[:5]))
            time.sleep(min(0.5, 0.02 * attempt) * (0.5 + rng.random()))
            if between is not None:
                between()

    def _drain(self, conns: dict[str, psycopg.Connection], oids: dict[str, list[int]],
               first_seen: dict[str, float]) -> list[Blocker]:
        """After the arm: until every transaction holding a write lock on a source has ended, at
        most DRAIN_LIMIT; those still running then (empty: drained)."""
        holders = {name: {h.vxid: h for h in write_holders(conns[name], oids[name])} for name in conns}
        now = time.monotonic()
        for found in holders.values():
            for vxid in found:
                first_seen.setdefault(vxid, now)
        waiting = {name: set(found) for name, found in holders.items()}
        until = time.monotonic() + DRAIN_LIMIT
        while True:
            waiting = {name: fence.drained(conns[name], vxids) for name, vxids in waiting.items()}
            if not any(waiting.values()):
                return []
            if time.monotonic() > until:
                return [holders[name][v] for name, vxids in waiting.items() for v in sorted(vxids)]
            time.sleep(0.002)

    def _disarm(self, conns: dict[str, psycopg.Connection]) -> None:
        for source in self.sources:
            fence.disarm(conns[source.name], self.op.id)
        self.fenced_since = None
        self.inherited_pause = False
        self.pause_marks.clear()

    def _marks(self, conns: dict[str, psycopg.Connection]) -> dict[str, str]:
        """The mark on each source, after the drain: every write that got past the guard committed
        before it, so a target that has applied the mark has applied all of them."""
        def mark(source: ShardSpec) -> tuple[str, int]:
            row = one(conns[source.name].execute(
                "INSERT INTO _shardctl.fence_marks (operation, source) VALUES (%s, %s)"
                " ON CONFLICT (operation, source) DO UPDATE SET at = now()"
                " RETURNING pg_current_wal_insert_lsn()::text, (extract(epoch FROM at) * 1000000)::bigint",
                (self.op.id, source.name)))
            return row[0], row[1]

        # a merge's marks at once, each on its own connection: each commit waits for its server's
        # WAL flush (the targets' subscriptions only receive flushed WAL), one after the other
        # those waits added up inside the pause
        rows = ([mark(self.sources[0])] if len(self.sources) == 1
                else [job.result() for job in [background(partial(mark, source)) for source in self.sources]])
        marks: dict[str, str] = {}  # per source: LSNs of different servers do not compare
        for source, (lsn, stamp) in zip(self.sources, rows, strict=True):
            marks[source.name], self.fence_stamps[source.name] = lsn, stamp
        return marks

    def lift_fence(self) -> None:
        """Disarm every source's guard: they take writes again. No table lock: nothing can hold it
        back but a source that does not answer (then ServerUnreachable)."""
        for source in self.sources:
            with self.connect(source) as conn:
                conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(f"{LIFT_TIMEOUT_S}s")))
                fence.disarm(conn, self.op.id)
        self.fenced_since = None

    def lift_fence_after_failure(self) -> None:
        """Whatever went wrong behind the fence, the source takes writes again; a source that does
        not answer keeps its fence (source_state says so, and a rerun or abort lifts it)."""
        try:
            self.lift_fence()
        except (UserError, psycopg.Error) as exc:
            self.say(f"the fence could not be lifted ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__});"
                     f" writes to the range fail until `shardctl apply` finishes the move or"
                     f" `shardctl abort {self.op.id}` undoes it")

    def remove_guard(self) -> None:
        """Drop the guard triggers (an abort): one table per short transaction, as they were made."""
        for source in self.sources:
            with self.connect(source) as conn:
                tables = fence.guarded(conn)
            if not tables:
                continue
            with self.connect(source, autocommit=False) as conn:
                for schema, table in tables:
                    relation = sql.Identifier(schema, table)
                    with_lock_retries(conn, fence.uninstall(relation), relations=[relation.as_string(conn)],
                                      what=f"remove the fence's guard from {schema}.{table} of {source.dbname}",
                                      say=self.say, budget_s=self.settings.fence_timeout)

    @contextmanager
    def bounded(self):
        """From the fence to the flip: every statement on the held connections ends within
        `moves.fence_timeout` (a lock wait, a hung query), and then raises."""
        limit = sql.SQL("SET statement_timeout = {}").format(
            sql.Literal(f"{round(self.settings.fence_timeout * 1000)}ms"))
        for conn in self.held.values():
            conn.execute(limit)
        try:
            yield
        finally:
            for conn in self.held.values():
                if not conn.closed and not conn.broken:
                    with suppress(psycopg.Error):
                        conn.execute("RESET statement_timeout")

    @contextmanager
    def behind(self, what: str):
        """A wait behind the fence: a statement its statement_timeout cancelled, or a thread's
        result not there by its deadline, is the fence's overrun; what still runs on the held
        connections is cancelled, and MoveFailed says WHAT did not finish."""
        try:
            yield
        except (FutureTimeout, errors.QueryCanceled):
            for conn in self.held.values():
                with suppress(psycopg.Error):
                    conn.cancel_safe(timeout=1.0)
            raise self.overrun(what) from None

    def within(self, future: Future, deadline: float, what: str):
        """The future's result by the deadline (monotonic), else the fence's overrun."""
        with self.behind(what):
            return future.result(timeout=max(0.0, deadline - time.monotonic()))

    def overrun(self, what: str) -> MoveFailed:
        return MoveFailed(f"{self.label}: {what} within {_duration(self.settings.fence_timeout)} behind the fence"
                          " (moves.fence_timeout)",
                          "the fence is lifted: the source takes writes again. Apply again to retry the move;"
                          f" `shardctl abort {self.op.id}` undoes it")

    def failure(self, text: str) -> VerificationFailed:
        return VerificationFailed(f"{self.label}: verification failed: {text}",
                          "the source keeps its rows and takes writes; what was created is removed")

    def wait_confirmed(self, marks: dict[str, str], timeout: float, what: str, poll: float = 0.002,
                       stamps: dict[str, int] | None = None, fenced: bool = False) -> None:
        """Until every target has applied its sources' WAL up to their marks, durably. Two ways
        to know, whichever comes first: the target's replication origin has reached the mark
        (asked with flush, which makes it durable at once: the apply worker commits
        asynchronously), or the source's slot has had it confirmed (the subscriber confirms only
        flushed positions; this is how an idle source's position is reached). FENCED: behind the
        fence, where giving up is the fence's overrun."""
        deadline = time.monotonic() + timeout
        with ExitStack() as stack:
            targets = {t.name: stack.enter_context(self.session(t)) for t in self.targets}
            sources = {s.name: stack.enter_context(self.session(s)) for s in self.sources}
            waiting = list(self.links)
            if not self.origins:  # asked once per move: not inside the fence each time
                self.origins = {t: origin_readable(conn) for t, conn in targets.items()}
            origins = self.origins
            while True:
                behind = []
                for link in waiting:
                    name, mark = link.name(self.op.id), marks[link.source.name]
                    applied = targets[link.target.name].execute(
                        "SELECT pg_replication_origin_progress('pg_' || oid, true) >= %s::pg_lsn"
                        " FROM pg_subscription WHERE subname = %s", (mark, name)).fetchone() \
                        if origins[link.target.name] else None
                    if applied and applied[0]:
                        continue
                    if stamps and not origins[link.target.name] and self._mark_applied(
                            targets[link.target.name], link.source.name, stamps[link.source.name]):
                        continue
                    confirmed = sources[link.source.name].execute(
                        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                        (mark, name)).fetchone()
                    if not confirmed or not confirmed[0]:
                        behind.append(link)
                waiting = behind
                if not waiting:
                    return
                if time.monotonic() > deadline:
                    if fenced:
                        raise self.overrun(f"the targets did not confirm {what}")
                    raise MoveFailed(f"{self.label}: the targets did not confirm {what} within {_duration(timeout)}",
                                     "the source takes writes as before; apply again to retry")
                time.sleep(poll)

    def _mark_applied(self, target: psycopg.Connection, source: str, stamp: int) -> bool:
        """For a role that may not read replication origins: the fence's mark row is visible on
        the target, so the apply worker committed the fence's transaction and, in commit order,
        everything the source committed before it. Those commits are asynchronous; a commit of
        ours with synchronous_commit on flushes the target's WAL past them, so they are durable
        too. Faster than waiting for the subscriber to report its flush to the source's slot
        (which it does on its own schedule: 275-704 ms measured for a non-superuser's split)."""
        seen = target.execute("SELECT (extract(epoch FROM at) * 1000000)::bigint = %s FROM _shardctl.fence_marks"
                              " WHERE operation = %s AND source = %s", (stamp, self.op.id, source)).fetchone()
        if not seen or not seen[0]:
            return False
        with target.transaction():
            target.execute("SET LOCAL synchronous_commit = on")
            target.execute("SELECT pg_current_xact_id()")
        return True

    def catch_up(self, fence_lsns: dict[str, str], comparison: Comparison,
                 timings: dict[str, float]) -> tuple[Future, float]:
        """Behind the fence, three things at once, each on its own servers' connections: the
        targets apply up to the fence's mark; the sequences are set on the targets (on the
        second held connections); the sources' changes since the last key round are decoded.
        Each within `moves.fence_timeout`. Returns the decoded changes (a future: verify reads
        it, and a stray row found there fails the move as verification does) and its deadline."""
        with self.step("catch up", durable=False, lsn=" ".join(f"{k}={v}" for k, v in sorted(fence_lsns.items()))):
            self.mark("catch up begun")
            def sequences() -> None:
                started = time.monotonic()
                journal.points(f"{self.label}: sequences")
                self.set_sequences()
                timings["sequences"] = round(time.monotonic() - started, 3)

            def decode() -> Changes:
                journal.points(f"{self.label}: changes")
                return comparison.read_changes(fence_lsns)

            deadline = time.monotonic() + self.settings.fence_timeout
            setting = background(sequences)
            changes = background(decode)
            with self.behind("the targets did not confirm the fence's mark"):
                self.wait_confirmed(fence_lsns, self.settings.fence_timeout, "the fence's mark",
                                    stamps=self.fence_stamps, fenced=True)
            self.mark("confirmed")
            self.within(setting, deadline, "the targets' sequences were not set")
            self.mark("sequences set")
            return changes, deadline

    def compare(self) -> Comparison:
        """Every row compared while writes go on (see engine.actions.compare)."""
        with self.step("compare"):
            for _attempt in range(3):
                comparison = Comparison(self)
                try:
                    comparison.begin()
                    comparison.full_round()
                    comparison.key_rounds()
                    left = sum(len(v) for v in comparison.left.values())
                    self.progress(phase="compared", keys_left=left, rounds=comparison.rounds,
                                  text=f"compared every row while writes went on; {left} changed keys left to"
                                       " recheck behind the fence")
                    return comparison
                except VerifyRestart as truncated:
                    self.say(f"a TRUNCATE of {truncated} during the comparison: comparing again")
            raise MoveFailed(f"{self.label}: tables were truncated during every comparison",
                             f"apply again when the TRUNCATEs are over; {self.source_state()}")

    def verify(self, comparison: Comparison, changes: tuple[Future, float]) -> dict[str, dict[str, int]]:
        """Behind the fence: the keys left by the comparison and those changed since; the
        decoding (by its deadline) and the comparison each within `moves.fence_timeout`."""
        with self.step("verify", durable=False):
            self.mark("verify begun")
            try:
                new = self.within(*changes, "the sources' last changes were not decoded")
            except VerifyRestart as truncated:
                raise MoveFailed(f"{self.label}: {truncated} was truncated just before the fence",
                                 "the fence is lifted: the source takes writes again; apply again to compare anew"
                                 ) from None
            self.mark("decoded")
            with self.behind("the last keys were not compared"):
                self.verified_keys = comparison.final(new, timeout=self.settings.fence_timeout)
            self.mark("compared")
            return comparison.figures

    def set_sequences(self) -> None:
        """Past the sources' values, in disjoint blocks per target; on the second held
        connections, so that it runs beside the catch-up and the decoding."""
        last: dict[tuple[str, str], tuple[int, int]] = {}
        for source in self.sources:
            with self.session(source, second=True) as conn:
                for schema, name, value, maximum in conn.execute(
                        "SELECT schemaname, sequencename, coalesce(last_value, start_value), max_value"
                        " FROM pg_sequences WHERE schemaname <> '_shardctl'"):
                    prev = last.get((schema, name), (value, maximum))
                    last[(schema, name)] = (max(prev[0], value), maximum)
        for i, target in enumerate(self.targets):
            with self.session(target, second=True) as conn:
                for (schema, name), (value, maximum) in last.items():
                    # disjoint blocks: each target continues in its own range past the source
                    gap = min(10**9, max(1, (maximum - value) // (len(self.targets) + 1)))
                    conn.execute("SELECT setval(%s, %s, true)",
                                 (sql.Identifier(schema, name).as_string(conn), value + i * gap + 1))

    def follow_replicas(self) -> None:
        """Each active replica of the database gets its (disabled) links to the targets before the
        flip, so that no write to a target after it is missed."""
        for branch, copy in replica.followers(self.ctx, self.database):
            with self.step(f"follow {branch}", replica=copy.dbname):
                for target in self.targets:
                    replica.follow(self.ctx, branch, copy, target, self.key_column, self.database)

    def hand_over(self) -> None:
        """After the flip: each replica leaves the retired sources for the targets."""
        for branch, copy in replica.followers(self.ctx, self.database):
            with self.step(f"hand over {branch}", replica=copy.dbname):
                replica.hand_over(self.ctx, branch, copy, self.sources, self.targets, self.say)

    def cleanup(self) -> None:
        with self.step("cleanup"):
            self.remove_replication(after_cutover=True)

    def remove_replication(self, after_cutover: bool = False) -> None:
        """Subscriptions, slots and publications of this operation, wherever they are. A slot
        left behind would retain WAL; a target with a live subscription could not be dropped.
        A database that is gone holds none of them; a server that does not answer may: what it
        still holds is listed (Leftovers) and the operation stays open, to finish when it answers."""
        left: list[str] = []
        silent: dict[str, str] = {}

        def on(shard: ShardSpec, objects: list[str], work: Callable[[psycopg.Connection], None]) -> None:
            try:
                with self._database(shard) as conn:
                    if conn is not None:
                        work(conn)
            except (ServerUnreachable, psycopg.OperationalError) as exc:
                silent.setdefault(shard.server, exc.summary if isinstance(exc, ServerUnreachable)
                                  else str(exc).strip().splitlines()[0])
                left.extend(f"{what} on server {shard.server} (database {shard.dbname})" for what in objects)

        syncs: dict[str, list[str]] = {}  # per source: the prefixes of its links' table-sync slots

        def unsubscribe(conn: psycopg.Connection, link: Link) -> None:
            name = link.name(self.op.id)
            row = conn.execute("SELECT oid FROM pg_subscription WHERE subname = %s", (name,)).fetchone()
            if row:  # dropped cut from its slot, it leaves a copy's unfinished table-sync slots to us
                syncs.setdefault(link.source.name, []).append(f"pg_{row[0]}_sync_")
            replica.drop_subscription(conn, name)

        for link in self.links:  # subscriptions first: their walsenders then let go of the slots
            on(link.target, [f"subscription {link.name(self.op.id)}"], partial(unsubscribe, link=link))
        for source in self.sources:
            names = [link.name(self.op.id) for link in self.links if link.source == source]
            slots = [*names, Comparison(self).slot(source)]  # and the verification's
            on(source, [f"slot {n}" for n in slots] + [f"publication {n}" for n in names],
               partial(_unpublish, slots=slots, publications=names, sync_prefixes=syncs.get(source.name, [])))
        if not left:
            return
        servers = ", ".join(f"server {name} did not answer ({why})" for name, why in sorted(silent.items()))
        listed = "\n".join(f"  - {item}" for item in left)
        if after_cutover:
            raise Leftovers(
                f"{self.label}: the cutover is done ({', '.join(t.name for t in self.targets)} own the range and take"
                f" writes), but its cleanup is not: {servers}",
                f"Left behind (a slot keeps its server's WAL until it is dropped):\n{listed}\n"
                "No row is lost and no writer waits on them. The operation stays open: once the server answers"
                " again (`shardctl up` starts an embedded one), `shardctl apply` finishes the cleanup;"
                " `shardctl status` lists what is left.")
        raise Leftovers(
            f"{self.label}: not finished: {servers}",
            f"Left behind:\n{listed}\nThe operation stays open; once the server answers again (`shardctl up`"
            f" starts an embedded one), run `shardctl abort {self.op.id}` again.")

    @contextmanager
    def _database(self, shard: ShardSpec):
        """A connection to the shard's database, or None when its server answers and the database
        does not exist (dropped already). A server that does not answer raises ServerUnreachable."""
        handle = self.ctx.fleet.servers.get(shard.server)
        if handle is None:
            raise MoveFailed(f"{self.label}: server {shard.server!r} of {shard.dbname} is no longer declared",
                             "declare it again so shardctl can remove what the move made there")
        with handle.connect() as conn:
            exists = store.database_exists(conn, shard.dbname)
        if not exists:
            yield None
            return
        with handle.connect(shard.dbname) as conn:
            yield conn

    def flip(self, history: dict) -> None:
        # one transaction holds the routing change and the journal's record of it; behind the
        # fence, bounded like every wait there (a catalog table someone keeps locked)
        with self.step("flip", atomic=True, durable=False), self.behind("the routing flip did not commit"):
            self.mark("flip begun")
            self.ctx.catalog.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                sql.Literal(f"{round(self.settings.fence_timeout * 1000)}ms")))
            if self.relocation:
                self._flip_names()
            else:
                for target in self.targets:
                    self._record_target_schema(target.name, target.name)
            for source in self.sources:
                self.ctx.catalog.execute(
                    "UPDATE shardctl.shards SET state = 'retired', retired_at = now()"
                    " WHERE database = %s AND name = %s",
                    (self.database, transit_name(source.name, source.server) if self.relocation else source.name))
            self.ctx.catalog.execute("UPDATE shardctl.state SET epoch = epoch + 1")
            # clients waiting at the fence re-read the routing on this instead of polling
            self.ctx.catalog.execute("SELECT pg_notify(%s, %s)", (ROUTING_CHANNEL, self.database))
            store.bump_serial(self.ctx.catalog)
            ranges = [[s.lo, s.hi] for s in self.sources] + [[t.lo, t.hi] for t in self.targets]
            self.history_id = store.add_history(self.ctx.catalog, history["event"], history["address"],
                                                {**history, "database": self.database, "ranges": ranges})
            self.mark("flip written")
        self.mark("flip committed")

    def read_target_schemas(self) -> None:
        """Each target's schema as the flip records it, read on the held connections before the
        fence: inside it, a new connection and four catalog queries per target lengthened the
        pause. The same as at the flip: no DDL runs while a move is unfinished, and setting the
        sequences behind the fence changes values, not the snapshot (names only)."""
        for target in self.targets:
            with self.session(target) as conn:
                snap = introspect.snapshot(conn)
            self.target_schemas[target.name] = (introspect.fingerprint(snap), snap)

    def _record_target_schema(self, target: str, name: str) -> None:
        """The target's row (NAME in the catalog) active, with the schema read before the fence."""
        fingerprint, snap = self.target_schemas[target]
        store.set_shard_schema(self.ctx.catalog, self.database, name, fingerprint, snap, "active")

    def record_pause(self, flip_s: float) -> float:
        """Once the flip has committed: the pause, fence to flip committed, into the flip's history
        row (which could only hold the figure as of its own writing). The one figure: printed,
        stored, and shown by status, the dashboard and /metrics from the history. With it, where
        the pause went (`pause_marks`) and the flip's own duration (`timings.flip`, seconds)."""
        pause = self.pause_ms()
        if self.history_id is not None:
            self.ctx.catalog.execute(
                "UPDATE shardctl.history SET detail = jsonb_set(detail, '{timings,flip}', to_jsonb(%s::float8))"
                " || jsonb_build_object('pause_ms', %s, 'pause_marks', %s::jsonb) WHERE id = %s",
                (flip_s, pause, Jsonb(self.pause_marks), self.history_id))
        return pause

    def _flip_names(self) -> None:
        """A relocation keeps the shard's name: the source's row becomes the retired copy
        NAME@SERVER, the target's row (NAME@TARGET while it moved) takes NAME."""
        for source, target in zip(self.sources, self.targets, strict=True):
            self.ctx.catalog.execute("UPDATE shardctl.shards SET name = %s WHERE database = %s AND name = %s",
                                     (transit_name(source.name, source.server), self.database, source.name))
            self.ctx.catalog.execute("UPDATE shardctl.shards SET name = %s WHERE database = %s AND name = %s",
                                     (source.name, self.database, target.name))
            self._record_target_schema(target.name, source.name)

    def abort(self, state: str = "aborted") -> None:
        """Undo an operation that has not flipped: replication objects, fence, targets. After the
        cutover the targets own the range and hold writes nobody else has: refused."""
        if journal.cut_over(self.ctx.catalog, self.op.id):
            raise MoveFailed(f"{self.label}: operation {self.op.id} has passed its cutover and cannot be undone",
                             "its targets own the range and hold the writes made since; `shardctl apply` finishes it")
        self.remove_replication()
        replica.unfollow(self.ctx, self.database, self.targets)
        self.lift_fence()
        self.remove_guard()
        for target in self.targets:
            reference.detach(self.ctx, target)
            drop_database(self.ctx, target)
        with self.ctx.catalog.transaction():
            for target in self.targets:
                self.ctx.catalog.execute("DELETE FROM shardctl.shards WHERE database = %s AND name = %s"
                                         " AND state = 'moving'", (self.database, target.name))
            store.bump_serial(self.ctx.catalog)
        self.op.finish(state)


def _unpublish(conn: psycopg.Connection, slots: list[str], publications: list[str], sync_prefixes: list[str]) -> None:
    for prefix in sync_prefixes:
        slots = slots + [r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE"
                                                    " starts_with(slot_name, %s) ORDER BY 1", (prefix,))]
    for name in slots:
        replica.drop_slot(conn, name)
    for name in publications:
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


def subscription_failed(label: str, operation: int, link: Link, exc: psycopg.Error, source: str) -> MoveFailed:
    """A subscription the target's server refused: a database condition, named with its server,
    step and operation, and the ways forward (never a bug report). SOURCE: what is true of the
    source now (Move.source_state)."""
    diag = exc.diag
    why = " ".join(p for p in (diag.message_primary, diag.message_detail, diag.message_hint) if p) or str(exc)
    return MoveFailed(f"{label}: server {link.target.server} refused the subscription of {link.target.dbname}"
                      f" (step subscribe, operation {operation}): {why}",
                      f"`shardctl doctor` checks what moves need on every server. Fix the cause; {source}")


def origin_readable(conn: psycopg.Connection) -> bool:
    """Whether this role may ask a replication origin's progress: superusers may; others only
    where someone granted EXECUTE on pg_replication_origin_progress in that very database (a
    grant in one database does not reach a new one). Without it, catch-up waits for the source's
    slot to have the mark confirmed, which the subscriber reports only once it is durable."""
    return bool(one(conn.execute("SELECT has_function_privilege('pg_replication_origin_progress(text, boolean)',"
                                 " 'EXECUTE')"))[0])


def for_action(ctx: ApplyContext, action, op: Operation, label: str | None = None) -> Move:
    """The move a SplitShard or MergeShards action describes (also used to abort one)."""
    if action.kind == "split_shard":
        sources, targets = (action.source,), action.targets
        links = tuple(Link(i, action.source, t, filtered=True) for i, t in enumerate(targets))
        label = label or f"split {action.database}/{action.source.name}"
    elif action.kind == "move_shard":
        # the target goes by its transit name until the flip: both copies are in the catalog meanwhile
        sources = (action.source,)
        targets = (action.target.model_copy(update={"name": transit_name(action.target.name, action.target.server)}),)
        links = (Link(0, action.source, targets[0], filtered=False),)
        label = label or f"move {action.database}/{action.source.name}"
    else:
        sources, targets = action.sources, (action.target,)
        links = tuple(Link(i, s, action.target, filtered=False) for i, s in enumerate(sources))
        label = label or f"merge {action.database}/{action.target.name}"
    settings = settings_for(ctx, action)
    moves = Moves(converge_timeout=settings.converge_timeout, pause_budget=settings.pause_budget,
                  fence_timeout=settings.fence_timeout, copy_streams=settings.copy_streams, parallel=settings.parallel)
    return Move(ctx=ctx, op=op, database=action.database, key_column=settings.key_column, key_type=settings.key_type,
                sources=sources, targets=targets, links=links, label=label, settings=moves, steps=settings.steps,
                op_kind=action.kind)


def settings_for(ctx: ApplyContext, action) -> MoveSettings:
    """What a split, merge or move runs with: its plan's, recorded with its operation, so that a
    resumed or aborted one runs with what it started with; never the YAML's. An operation begun
    by a shardctl whose plans did not carry them reads the catalog: the shard key and policy
    recorded at the database's last apply, and the schema steps every shard ran."""
    if action.settings is not None:
        return action.settings
    key_column, key_type, recorded = one(ctx.catalog.execute(
        "SELECT key_column, key_type, policy FROM shardctl.databases WHERE name = %s", (action.database,)))
    try:
        policy = Policy.model_validate(recorded)
    except ValidationError:
        policy = Policy()
    moves = policy.moves
    return MoveSettings(key_column=key_column, key_type=key_type, steps=database_steps(ctx, action.database),
                        converge_timeout=moves.converge_timeout, pause_budget=moves.pause_budget,
                        fence_timeout=moves.fence_timeout, copy_streams=moves.copy_streams, parallel=moves.parallel,
                        retire_after=policy.autosplit.retire_after)


def operation_for(ctx: ApplyContext, action) -> Operation:
    """The action's operation: the interrupted one it resumes, or a new one."""
    if action.operation is not None:
        return Operation(ctx.catalog, action.operation)
    return ctx.begin(action.kind, action.address, action=action.model_dump(mode="json"))


def database_steps(ctx: ApplyContext, database: str) -> tuple[StepSpec, ...]:
    """The schema steps every shard of the database has run, as the catalog records them (for an
    operation whose action does not carry them); a step without its SQL there is taken from the
    YAML by its hash, or left without SQL (creating a target then fails, naming it)."""
    recorded = ctx.catalog.execute("SELECT seq, name, sha256, sql FROM shardctl.schema_steps WHERE database = %s"
                                   " ORDER BY seq", (database,)).fetchall()
    desired = ctx.fleet.desired.databases.get(database)
    by_hash = {s.sha256: s.sql for s in desired.schema_steps} if desired else {}
    return tuple(StepSpec(seq=seq, name=name, sha256=sha, sql=text or by_hash.get(sha, ""))
                 for seq, name, sha, text in recorded)


def begin(ctx: ApplyContext, action, starting: str) -> Operation:
    """A split's or merge's operation: a resumed one says what it resumes and from where (not the
    original plan again); a new one first checks its sources for stray rows, before anything
    is created."""
    if action.operation is not None:
        ctx.say(f"{action.address}: Resuming {action.reason.text}...")
    else:
        ctx.say(f"{action.address}: {starting}...")
        refuse_strays(ctx, action)
    return operation_for(ctx, action)


def refuse_strays(ctx: ApplyContext, action) -> None:
    """Before a move starts: its sources must hold no row whose key hashes outside their range
    (a split would leave such rows in the retired source, to be dropped with it)."""
    settings = settings_for(ctx, action)
    sources = list(action.sources) if action.kind == "merge_shards" else [action.source]
    for source in sources:
        with ctx.fleet.servers[source.server].connect(source.dbname) as conn:
            counts = strays.count(conn, settings.key_column, settings.key_type, source.lo, source.hi)
        if counts:
            raise MoveFailed(
                f"{action.address}: shard {action.database}/{source.name} holds {strays.describe(counts)}: they were"
                " written straight into its database, past routing, and no move would put them where they belong",
                f"nothing was changed. `shardctl strays {action.database}/{source.name}` lists them; move each to the"
                " shard that owns its key (shardctl.route() names it) or delete it, then apply again")


def retired_note(ctx: ApplyContext, action, what: str) -> str:
    """What happened to a move's sources, and when they go: they are not destroyed by the move."""
    grace = settings_for(ctx, action).retire_after
    return (f"{what} retired: read-only, kept for autosplit.retire_after ({_duration(grace)}), then dropped by a"
            " later plan")


def resumed_flipped(ctx: ApplyContext, operation: int) -> bool:
    """Whether the operation is past its cutover, read from the routing (journal.CUT_OVER)."""
    return journal.cut_over(ctx.catalog, operation)


def run(move: Move, on_flip: Callable[[], dict], flipped: bool = False) -> dict:
    """The whole sequence. Every step is safe to repeat, so a resumed operation runs it again
    from the top, except that an operation past its flip only finishes its cleanup: after the
    flip the targets take writes, and the source is no longer the truth."""
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        started = time.monotonic()
        result = fn()
        timings[name] = round(time.monotonic() - started, 3)
        return result

    if flipped:
        timed("hand_over", move.hand_over)
        timed("cleanup", move.cleanup)
        return {"timings": timings, "verification": {}}
    timed("record", move.record)
    timed("targets", move.create_targets)
    timed("publish", move.publish)
    timed("subscribe", move.subscribe)
    timed("guard", move.guard)
    timed("follow", move.follow_replicas)
    with move.holding():
        figures = _copy_compare_cutover(move, on_flip, timed, timings)
    timed("hand_over", move.hand_over)
    timed("cleanup", move.cleanup)
    return {"timings": timings, "verification": figures}


def _copy_compare_cutover(move: Move, on_flip: Callable[[], dict], timed: Callable, timings: dict) -> dict:
    """From the copy to the flip, on the move's held connections."""
    comparison = None
    try:
        timed("sync", move.sync)  # a copy that can never finish (CopyLost) is undone like a wrong one
        comparison = timed("compare", move.compare)
        timed("converge", lambda: move.sync(final=True))  # the comparison took time: lag small again
        comparison.last_rounds()  # what changed while it converged: fewer keys behind the fence
    except VerificationFailed:
        move.release()
        move.abort(state="failed")  # the copy is wrong: remove it all; the source never stopped
        raise
    # from the fence to the flip the source refuses writes: a stop request (Ctrl-C, SIGTERM)
    # waits for the flip instead of parking the range read-only; before the fence, it parks
    if journal.stop_requested():
        raise journal.Interrupted("stopped before the fence; apply again to continue")
    move.read_target_schemas()  # what the flip records, read before the fence
    with journal.until_done(), move.bounded():
        try:
            # between tries, a key round: what changed while the fence waited is not left for
            # behind it (a fence that waited 7 s once left 35,000 keys to recheck in the pause)
            fence_lsn = timed("fence", lambda: move.fence(between=lambda: comparison.key_rounds(final=True)))
            move.mark("fence recorded")
            changes = timed("catch_up", lambda: move.catch_up(fence_lsn, comparison, timings))
            move.mark("catch up recorded")
            figures = timed("verify", lambda: move.verify(comparison, changes))
            move.mark("verify recorded")
        except VerificationFailed:
            move.release()
            move.abort(state="failed")  # the copy is wrong: remove it all, the source as it was
            raise
        except BaseException:
            # whatever went wrong behind the fence (an overrun, a database condition, or a bug:
            # never leave a range read-only), the source takes writes again; apply resumes later
            move.lift_fence_after_failure()
            raise
        try:
            timed("flip", lambda: move.flip({**on_flip(), "timings": timings, "verification": figures,
                                             "verified_changed_keys": move.verified_keys,
                                             "key_rounds": comparison.log[-6:], "fence": move.fence_figures,
                                             "pause_ms": move.pause_ms(), "actor": move.ctx.actor}))
        except BaseException:
            # a flip that did not commit (its transaction rolled back: a statement timeout, a
            # catalog lock) lifts the fence; one whose outcome the catalog cannot tell keeps it
            if not _cut_over_or_unknown(move):
                move.lift_fence_after_failure()
            raise
    pause = move.record_pause(timings["flip"])
    move.say(f"writes to the range paused for {pause:.1f} ms (fence to flip committed"
             + (", from the fence an interrupted run left)" if move.inherited_pause else ")"))
    return figures


def _cut_over_or_unknown(move: Move) -> bool:
    try:
        return journal.cut_over(move.ctx.catalog, move.op.id)
    except psycopg.Error:
        return True
