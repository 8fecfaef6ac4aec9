"""The sync and converge stages: wait for the initial copy, then until the lag is small enough
that catch-up behind the fence fits the pause budget. Reports rows, rates, lag and ETA as it
goes; fails a copy that can never finish (a slot or a table-sync slot the source lost: undone)
or a link that keeps failing, and gives up after `moves.converge_timeout` saying what it
measured. Hands nothing on: the next stage reads the servers, not this one's figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg import sql

from engine.actions.move.errors import CopyLost, MoveFailed
from engine.actions.move.live import Live
from engine.actions.move.spec import Link
from engine.durations import span
from engine.rows import one

LAG_FLOOR = 64 << 10  # a lag this small is applied in milliseconds whatever the measured rate
# errors of one link since its step began before the move calls it failing: a server that
# restarts costs a link one or two (the connection it lost, a first reconnect too early); the
# workers retry every wal_retrieve_retry_interval (5 s), so a lasting cause reaches this in ~10 s
FAILING_ERRORS = 3
SYNC_LOST_AFTER = 10.0  # seconds a finished table copy may go without its sync slot before the move says so


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


@dataclass
class _Watch:
    """What one sync step watches between its readings: when it began, the links' error counters
    then, and the table copies seen without their sync slot (and since when)."""

    began: float
    error_baseline: dict[str, tuple[int, int]]
    slots_checked_at: float = float("-inf")
    syncs_seen_lost: dict[str, float] = field(default_factory=dict)  # table-sync slot prefix -> first seen gone


def sync(live: Live, final: bool = False) -> None:
    """Journaled as "sync" (final: "converge", after the comparison took time)."""
    settings = live.spec.settings
    with live.step("sync" if not final else "converge"):
        started = time.monotonic()
        # what the links failed before (the crash this run resumes from, earlier runs) is not
        # held against them: their counters are cumulative
        watch = _Watch(began=started, error_baseline=_error_counts(live))
        expected_tables = sum(len(live.tables(link.source)) + 1 for link in live.spec.links)  # + fence_marks
        expected_rows = _expected_rows(live) if not final else 0
        rates = RateMeter()
        told = float("-inf")
        while True:
            _pace_copies(live)
            now = _progress(live)
            rates.add(now)
            copied = now.ready >= expected_tables
            if copied and (now.lag <= LAG_FLOOR or (rates.apply_rate > 0
                                                    and now.lag <= rates.apply_rate * settings.pause_budget)):
                _caught_up(live, now, rates, final)
                return
            _refuse_failing(live, watch)
            if rates.known and time.monotonic() - told > 2:
                if not copied:
                    _tell_copy(live, now, rates, expected_tables, expected_rows)
                else:
                    _tell_catch_up(live, now, rates)
                told = time.monotonic()
            if time.monotonic() - started > settings.converge_timeout:
                raise _timed_out(live, now, rates, copied, expected_tables)
            time.sleep(0.1)


def _caught_up(live: Live, now: Progress, rates: RateMeter, final: bool) -> None:
    live.progress(phase="caught up", lag_bytes=now.lag, wal_rate=rates.wal_rate, apply_rate=rates.apply_rate,
                  text=None if final else f"caught up: lag {now.lag / 1e3:,.0f} kB (source writes"
                  f" {rates.wal_rate / 1e6:.1f} MB/s of WAL, targets apply {rates.apply_rate / 1e6:.1f}"
                  " MB/s)")


def _tell_copy(live: Live, now: Progress, rates: RateMeter, expected_tables: int, expected_rows: int) -> None:
    rows_rate = rates.copy_rate
    remaining = max(0, expected_rows - now.copied_rows)
    eta = f", ETA {span(round(remaining / rows_rate))}" if rows_rate > 0 and expected_rows else ", ETA unknown"
    of = f" of ~{expected_rows:,}" if expected_rows else ""
    live.progress(phase="copy", tables_ready=now.ready, tables=expected_tables, rows_copied=now.copied_rows,
                  rows_expected=expected_rows, bytes_copied=now.copied_bytes, rows_per_s=round(rows_rate),
                  text=f"copying: {now.ready}/{expected_tables} tables done, {now.copied_rows:,}"
                       f"{of} rows ({now.copied_bytes / 1e6:.1f} MB in flight) at"
                       f" {rows_rate:,.0f} rows/s{eta}")


def _tell_catch_up(live: Live, now: Progress, rates: RateMeter) -> None:
    gain = rates.apply_rate - rates.wal_rate
    eta = f", ETA {span(round(now.lag / gain))}" if gain > 0 else ", not converging yet"
    live.progress(phase="catch-up", lag_bytes=now.lag, wal_rate=rates.wal_rate, apply_rate=rates.apply_rate,
                  text=f"catching up: lag {now.lag / 1e6:.1f} MB, source writes"
                       f" {rates.wal_rate / 1e6:.1f} MB/s, targets apply"
                       f" {rates.apply_rate / 1e6:.1f} MB/s{eta}")


def _timed_out(live: Live, now: Progress, rates: RateMeter, copied: bool, expected_tables: int) -> MoveFailed:
    label, limit = live.spec.label, live.spec.settings.converge_timeout
    if not copied:
        return MoveFailed(
            f"{label}: the initial copy is not finished after {span(limit)}:"
            f" {now.ready} of {expected_tables} tables ready, {now.copied_rows:,} rows in flight",
            f"raise moves.converge_timeout or move a smaller shard; {live.source_state()}")
    return MoveFailed(
        f"{label}: replication did not catch up within {span(limit)}: lag"
        f" {now.lag / 1e6:.1f} MB, the source writes {rates.wal_rate / 1e6:.2f} MB/s of WAL and the"
        f" targets apply {rates.apply_rate / 1e6:.2f} MB/s",
        f"retry when its write rate is lower, or raise moves.converge_timeout; {live.source_state()}")


def _refuse_failing(live: Live, watch: _Watch) -> None:
    failing = _subscription_errors(live, watch)
    if not failing:
        return
    link, apply_errors, sync_errors = failing
    raise MoveFailed(
        f"{live.spec.label}: replication into {link.target.dbname} on server {link.target.server} is"
        f" failing: {apply_errors} apply errors and {sync_errors} table-sync errors in the"
        f" {span(round(time.monotonic() - watch.began))} since this step began",
        f"server {link.target.server}'s log says why (look for subscription {live.spec.link_name(link)})."
        f" Fix the cause; {live.source_state()}")


def _pace_copies(live: Live) -> None:
    """The copy throttle (`moves.copy_streams`): enable waiting links while fewer than that
    many are still copying. PostgreSQL copies a link's tables itself (up to
    max_sync_workers_per_subscription at once); what we pace is how many links copy at once."""
    spec = live.spec
    limit = spec.settings.copy_streams
    if limit is None:
        return
    copying, waiting = 0, []
    for link in spec.links:
        with live.session(link.target) as conn:
            row = conn.execute(
                "SELECT s.subenabled, count(sr.srrelid) FILTER (WHERE sr.srsubstate NOT IN ('r', 's'))"
                " FROM pg_subscription s LEFT JOIN pg_subscription_rel sr ON sr.srsubid = s.oid"
                " WHERE s.subname = %s GROUP BY s.subenabled", (spec.link_name(link),)).fetchone()
        if row is None:
            continue
        if not row[0]:
            waiting.append(link)
        elif row[1]:
            copying += 1
    for link in waiting[:max(0, limit - copying)]:
        with live.session(link.target) as conn:
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(spec.link_name(link))))
        live.say(f"copy throttle ({limit} at a time): copying {link.source.dbname} into {link.target.dbname}"
                 f" ({link.index + 1} of {len(spec.links)})")


def _progress(live: Live) -> Progress:
    """One reading of the copy and the replication: tables ready, rows copied so far, and per
    source its WAL position and the slowest of its slots' confirmed positions."""
    spec = live.spec
    waiting = total = copied_rows = copied_bytes = 0
    for link in spec.links:
        with live.session(link.target) as conn:
            row = one(conn.execute(
                "SELECT count(*) FILTER (WHERE sr.srsubstate <> 'r'), count(*) FROM pg_subscription_rel sr"
                " JOIN pg_subscription s ON s.oid = sr.srsubid WHERE s.subname = %s",
                (spec.link_name(link),)))
            waiting += row[0]
            total += row[1]
    for target in spec.targets:  # once per target database, whatever number of links feed it
        with live.session(target) as conn:
            # rows in the tables now plus the COPYs running (their rows are not counted yet)
            copying = one(conn.execute(
                "SELECT (SELECT coalesce(sum(n_live_tup), 0) FROM pg_stat_user_tables"
                "        WHERE schemaname <> '_shardctl')::bigint"
                " + (SELECT coalesce(sum(tuples_processed), 0) FROM pg_stat_progress_copy"
                "    WHERE datname = current_database())::bigint,"
                " (SELECT coalesce(sum(bytes_processed), 0) FROM pg_stat_progress_copy"
                "  WHERE datname = current_database())::bigint"))
            copied_rows += int(copying[0])
            copied_bytes += int(copying[1])
    lag = 0
    positions: dict[str, tuple[int, int]] = {}
    for link in spec.links:
        with live.session(link.source) as conn:
            slot = conn.execute(
                "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, coalesce(confirmed_flush_lsn, '0/0') - '0/0'::pg_lsn"
                " FROM pg_replication_slots WHERE slot_name = %s", (spec.link_name(link),)).fetchone()
        if slot:
            wal, confirmed = int(slot[0]), int(slot[1])
            prev = positions.get(link.source.name)
            positions[link.source.name] = (wal, min(confirmed, prev[1]) if prev else confirmed)
            lag = max(lag, wal - confirmed)
    return Progress(time.monotonic(), total - waiting, total, copied_rows, copied_bytes, lag, positions)


def _lost_slots(live: Live, watch: _Watch) -> None:
    """A slot of this move that the source invalidated (it removed WAL the slot still
    needed: `max_slot_wal_keep_size` exceeded while the copy ran, under heavy writes) makes
    the copy impossible to finish; the workers would retry forever. Checked once a second."""
    now = time.monotonic()
    if now - watch.slots_checked_at < 1.0:
        return
    watch.slots_checked_at = now
    spec = live.spec
    prefixes = [spec.link_name(link) for link in spec.links]
    for link in spec.links:  # a table's copy runs on its own slot, pg_<subscription oid>_sync_...
        with live.session(link.target) as conn:
            row = conn.execute("SELECT oid FROM pg_subscription WHERE subname = %s",
                               (spec.link_name(link),)).fetchone()
        if row:
            prefixes.append(f"pg_{row[0]}_sync_")
    for source in spec.sources:
        with live.session(source) as conn:
            lost = conn.execute(
                "SELECT slot_name, current_setting('max_slot_wal_keep_size') FROM pg_replication_slots"
                " WHERE wal_status = 'lost' AND EXISTS (SELECT 1 FROM unnest(%s::text[]) p"
                " WHERE starts_with(slot_name, p)) LIMIT 1", (prefixes,)).fetchone()
        if lost:
            raise CopyLost(
                f"{spec.label}: {source.dbname} on server {source.server} removed WAL the move still needed:"
                f" its replication slot {lost[0]} was invalidated (the server keeps at most"
                f" max_slot_wal_keep_size = {lost[1]} of WAL for a slot, and more was written before the"
                " copy could use it)",
                f"the source keeps its rows and takes writes; what was created is removed. Raise"
                f" max_slot_wal_keep_size on server {source.server}, copy one link at a time"
                " (moves.copy_streams: 1) or move when the source writes less, then apply again")
    _lost_table_syncs(live, watch, now)


def _lost_table_syncs(live: Live, watch: _Watch, now: float) -> None:
    """A table whose copy finished on the target (state 'f') while its table-sync slot is gone
    from the source: PostgreSQL drops that slot just before it records the sync as done, so a
    crash of the target's server in between leaves a sync that retries forever. Seen for
    SYNC_LOST_AFTER seconds (the worker itself passes through that state for milliseconds),
    it makes the copy impossible to finish; undone like a lost slot."""
    spec = live.spec
    for link in spec.links:
        with live.session(link.target) as conn:
            waiting = conn.execute(
                "SELECT s.oid, sr.srrelid, sr.srrelid::regclass::text FROM pg_subscription_rel sr"
                " JOIN pg_subscription s ON s.oid = sr.srsubid WHERE s.subname = %s AND sr.srsubstate = 'f'",
                (spec.link_name(link),)).fetchall()
        if not waiting:
            continue
        with live.session(link.source) as conn:
            slots = {r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE"
                                                " starts_with(slot_name, %s)", (f"pg_{waiting[0][0]}_sync_",))}
        for subid, relid, table in waiting:
            prefix = f"pg_{subid}_sync_{relid}_"
            if any(slot.startswith(prefix) for slot in slots):
                watch.syncs_seen_lost.pop(prefix, None)
                continue
            since = watch.syncs_seen_lost.setdefault(prefix, now)
            if now - since >= SYNC_LOST_AFTER:
                raise _table_sync_lost(live, link, table, prefix)


def _table_sync_lost(live: Live, link: Link, table: str, prefix: str) -> CopyLost:
    return CopyLost(
        f"{live.spec.label}: the copy of {table} into {link.target.dbname} on server {link.target.server}"
        f" can never finish: its table-sync slot ({prefix}...) on server {link.source.server} is"
        " gone (PostgreSQL drops it just before recording the copy as done there, and server"
        f" {link.target.server} stopped in between)",
        "what the move created is removed and the source takes writes; apply again to start the"
        " move afresh (with the same -split or -merge, for a move asked for by hand)")


def _error_counts(live: Live) -> dict[str, tuple[int, int]]:
    """Per link, its subscription's apply and table-sync errors so far (cumulative counters)."""
    counts = {}
    for link in live.spec.links:
        name = live.spec.link_name(link)
        with live.session(link.target) as conn:
            row = conn.execute("SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats"
                               " WHERE subname = %s", (name,)).fetchone()
        counts[name] = (int(row[0]), int(row[1])) if row else (0, 0)
    return counts


def _subscription_errors(live: Live, watch: _Watch) -> tuple[Link, int, int] | None:
    """The first link that has failed FAILING_ERRORS times since the current step began, with
    its apply and table-sync errors since then."""
    _lost_slots(live, watch)
    now = _error_counts(live)
    for link in live.spec.links:
        name = live.spec.link_name(link)
        before = watch.error_baseline.get(name, (0, 0))
        apply_errors, sync_errors = now[name][0] - before[0], now[name][1] - before[1]
        if apply_errors + sync_errors >= FAILING_ERRORS:
            return link, apply_errors, sync_errors
    return None


def _expected_rows(live: Live) -> int:
    """An estimate of the rows to copy, for the ETA: the sources' planner statistics (a split's
    target gets its share of its source's rows)."""
    total = 0
    links = live.spec.links
    for link in links:
        with live.connect(link.source) as conn:
            # the larger of the planner's estimate and the statistics' live count: a table
            # never analysed has no estimate, one never vacuumed a stale live count
            rows = one(conn.execute(
                "SELECT coalesce(sum(greatest(c.reltuples, s.n_live_tup, 0)), 0)::bigint FROM pg_class c"
                " JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE s.schemaname <> '_shardctl'"))[0]
        total += int(rows) // (len(links) if link.filtered else 1)
    return total
