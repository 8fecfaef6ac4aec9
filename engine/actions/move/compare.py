"""The compare stage, and the verification behind the fence: every row compared while writes
go on, and inside the fence only the rows that changed since. It receives what it needs (the
move's spec, its live connections) and hands on the Comparison: the keys left to recheck, and
the changes read so far, for the fence's key rounds, the catch-up's decoding and verify.

Why this shape: verifying every row inside the write pause made the pause grow with the shard
(about 0.45 s per million rows). Here the pause costs what changed, not what exists:

1. A `test_decoding` slot per source is created first. Every change committed after its
   consistent point is in it, with the shard key of the row it touched; a row absent from it
   has not changed since.
2. Full round: per table, rows are hashed by value into 4,096 buckets of the keyspace, on the
   sources (restricted to the target's range for a split) and on the target, once the target has
   applied the source's WAL up to the round's start. A bucket that differs and holds no key
   changed meanwhile is a real difference; the rows of the others are compared one by one.
3. Key rounds: the keys changed since are compared by key (an index lookup when the shard key
   leads the primary key), again and again while writes go on. A key that compares equal and has
   not changed during its round is settled; the set left shrinks to what the last round saw
   change.
4. Inside the fence, after catch-up: the keys left and every key changed since the last round
   are compared once more. Nothing can change any longer, so any difference fails the move.
   Each side of a table's keys is summed as one (rows, checksum), compared key by key only to
   name a difference; the sources' side of the keys known when the fence drained is read then
   (Ahead), beside the mark and the catch-up, so that behind the fence only the targets wait.

What makes the pause: the keys left at the fence, about what the writers change during the
last round and until the drain. So from the last rounds on the slots are decoded as they are
written (engine/actions/move/decoding.py), and nothing but the check for long writers stands
between the last round and the arm (fencing.Ready is read before the rounds).

The reasoning behind "a row absent from the changes is equal on both sides": its value on the
source has not changed during the round; the target had applied everything up to the round's
start before it was read, and replication writes to a row of the target only what the source
changed. So both reads saw the same value, or there is a real difference.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import psycopg
from psycopg import errors, sql

from engine.actions import replica
from engine.actions.move import streaming
from engine.actions.move.confirm import wait_confirmed
from engine.actions.move.decoding import Changes, Decoder, parse_changes
from engine.actions.move.errors import MoveFailed
from engine.actions.move.live import Live, background
from engine.actions.move.spec import MoveSpec
from engine.actions.move.streaming import SlotStream
from engine.catalog import journal
from engine.durations import span
from engine.errors import redact
from engine.observe.strays import key_array, key_hash, key_param, key_positions, outside, within
from engine.plan.models import ShardSpec
from engine.rows import one

BUCKET_SHIFT = 52  # a 64-bit hash >> 52: 4,096 buckets
# the rows of the buckets that differ are compared key by key in batches of about this many rows
# (by the buckets' counts): a fixed cap on all of them failed a merge of 8M rows under 32 writers,
# whose 27 buckets busy with writes held 210,000 rows; more differing rows than this, unexplained
# by any change, is a real difference
ROWS_AT_ONCE = 200_000
KEY_ROUNDS = 12
SETTLED_ENOUGH = 500  # keys left to recheck in the fence: stop the key rounds once at or below this
SUSPECT_ROUNDS = 3
FENCE_KEYS = 100  # the last rounds stop once at most this many keys are left for the fence
SPIKE = 1.25  # a last round that left more than this times the fewest before it: one more round
# the held connections of every shard that a comparison by key reads on at once: both of a
# target's, and lanes 1 and 2 of a source (the decoder holds lane 3, the work ahead lane 4, the
# sequences' values their own). Two backends per shard instead of one:
# under 32 pgbench writers on 2 cores a round's share of the CPU doubled
BOTH_LANES = (1, 2)
# the work ahead behind the fence: lanes 4 and 2; lane 1 is the catch-up's, which asks the sources'
# slots while the targets catch up
AHEAD_LANES = (4, 2)
PART_KEYS_AT_LEAST = 200


class VerifyRestart(Exception):
    """A TRUNCATE during the comparison: start it over."""


@dataclass
class Comparison:
    """The compare stage's state, from the full round to the fence: what it has read of the
    sources' changes and the keys still to recheck. It receives what it needs (the move's spec
    and its live connections) and hands on itself, to the fence (its key rounds between tries)
    and to catch-up and verify (the changes up to the mark, the final comparison)."""

    spec: MoveSpec
    live: Live
    started: dict[str, str] = field(default_factory=dict)  # per source: the slot's consistent point
    changes: Changes = field(default_factory=Changes)
    left: dict[tuple[str, tuple[str, str]], set] = field(default_factory=dict)  # (target, table) -> keys
    figures: dict[str, dict[str, int]] = field(default_factory=dict)
    rounds: int = 0
    log: list[dict] = field(default_factory=list)  # per key round: keys compared, keys left, ms
    no_snapshot_log: set[str] = field(default_factory=set)  # sources where pg_log_standby_snapshot() is not ours
    decoder: Decoder | None = None  # reading the slots continuously (from the last rounds to the flip)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ the slot

    def slot(self, source: ShardSpec) -> str:
        return self.spec.verify_slot(source)

    def begin(self) -> None:
        """A fresh verification slot per source (a resumed operation compares from scratch)."""
        self.drop_slots()
        for source in self.spec.sources:
            with self.live.connect(source) as conn:
                self.started[source.name] = one(conn.execute(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'test_decoding')",
                    (self.slot(source),)))[0]
        self.changes = Changes()

    def drop_slots(self) -> None:
        """Each source's slot, dropped; a stream an interrupted run left lets go of it first."""
        for source in self.spec.sources:
            with self.live.connect(source) as conn:
                replica.drop_slot(conn, self.slot(source))

    def read_changes(self, upto: dict[str, str] | None = None, lane: int = 1) -> Changes:
        """Consume the changes since the last read (up to `upto` per source, else all), remember
        them, and return them."""
        def read(source: ShardSpec) -> Changes:
            with self.live.session(source, lane) as conn:
                return self.read_slot(conn, source, (upto or {}).get(source.name))

        new = Changes()
        if len(self.spec.sources) == 1:
            new.merge(read(self.spec.sources[0]))
        else:  # a merge's sources are decoded at once, each on its own server
            for job in [background(partial(read, source)) for source in self.spec.sources]:
                new.merge(job.result())
        return self._took(new)

    def read_slot(self, conn: psycopg.Connection, source: ShardSpec, upto: str | None = None) -> Changes:
        """One read of SOURCE's slot on CONN, up to UPTO (else all); rows written out of its
        range refused."""
        self._log_snapshot(conn, source)
        rows = conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, %s::pg_lsn, NULL,"
                            " 'skip-empty-xacts', '1', 'include-xids', '0')", (self.slot(source), upto)).fetchall()
        return self._parsed(conn, source, [r[0] for r in rows])

    def read_flushed(self, conn: psycopg.Connection, source: ShardSpec, log_snapshot: bool) -> tuple[Changes, str]:
        """One read of SOURCE's slot on CONN up to the WAL flushed when it begins, in one round
        trip (the decoder's, over and over): the changes, and that LSN (every transaction that
        committed before it has been read). LOG_SNAPSHOT: let the restart point follow first."""
        if log_snapshot:
            self._log_snapshot(conn, source)
        # the lateral reference makes the flush position be read first, and the decoding stop there
        rows = conn.execute(
            "SELECT f.at::text, c.data FROM (SELECT pg_current_wal_flush_lsn() AS at OFFSET 0) f"
            " LEFT JOIN LATERAL pg_logical_slot_get_changes(%s, f.at, NULL, 'skip-empty-xacts', '1',"
            " 'include-xids', '0') c ON true", (self.slot(source),)).fetchall()
        return self._parsed(conn, source, [r[1] for r in rows if r[1] is not None]), rows[0][0]

    def _took(self, new: Changes) -> Changes:
        """NEW, read from the slots, remembered; a TRUNCATE among them starts the comparison over."""
        # a reference table's copy is truncated by its source's replication, not the move's concern
        new.truncated &= {table for source in self.spec.sources for table in self.live.tables(source)}
        if new.truncated:
            raise VerifyRestart(", ".join(f"{s}.{t}" for s, t in sorted(new.truncated)))
        with self._lock:  # behind the fence, Ahead and the catch-up take at once
            self.changes.merge(new)
        return new

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """The slots read continuously (engine/actions/move/decoding.py says why) until the
        block ends or the move lets its connections go."""
        decoder = Decoder(self.live, self.read_flushed, stream=self._stream, parse=self._parsed).start()
        self.decoder = decoder
        self.live.on_release(decoder.stop)
        try:
            yield
        finally:
            decoder.stop()
            self.decoder = None

    def _stream(self, source: ShardSpec) -> SlotStream | None:
        """SOURCE's slot as a stream (engine/actions/move/streaming.py), or None, said why."""
        stream, why = streaming.opened(self.live.ctx.fleet.servers[source.server].params(source.dbname),
                                       self.slot(source), source.server)
        if stream is None:
            self.live.say(f"the verification slot on {source.dbname} is read with SQL, not streamed: {redact(why)}")
        return stream

    def _parsed(self, conn: psycopg.Connection, source: ShardSpec, lines: list[str]) -> Changes:
        """test_decoding's lines (streamed or read with SQL) as changes; rows written out of
        SOURCE's range refused (on CONN)."""
        changed = parse_changes(lines, self.spec.key_column, self.spec.key_type)
        self._refuse_strays(conn, source, changed)
        return changed

    def changes_now(self) -> Changes:
        """The changes since the last read, up to now (a key round's end): from the decoder when
        it runs (once it has read past the sources' WAL as of now), else read here."""
        if self.decoder is None:
            return self.read_changes()
        timeout = self.spec.settings.converge_timeout
        try:
            return self.changes_upto(self._flushed(lane=1), timeout)
        except FutureTimeout:
            raise MoveFailed(f"{self.spec.label}: the sources' changes were not decoded within {span(timeout)}",
                             "the source takes writes as before; apply again to compare anew") from None

    def changes_upto(self, upto: dict[str, str], timeout: float, lane: int = 1) -> Changes:
        """The changes up to UPTO per source (the fence's marks, or now): from the decoder when it
        runs, else read here on LANE. Behind the fence its FutureTimeout after TIMEOUT is the
        fence's overrun."""
        if self.decoder is None:
            return self.read_changes(upto, lane)
        return self._took(self.decoder.take(upto, timeout))

    def _flushed(self, lane: int) -> dict[str, str]:
        """Each source's WAL flushed as of now."""
        now: dict[str, str] = {}
        for source in self.spec.sources:
            with self.live.session(source, lane) as conn:
                now[source.name] = one(conn.execute("SELECT pg_current_wal_flush_lsn()::text"))[0]
        return now

    def _log_snapshot(self, conn, source: ShardSpec) -> None:
        """Let the slot's restart point follow its reads. A logical slot restarts decoding from
        the last running-transactions record before what it confirmed, and the server writes one
        only every 15 s: each read decoded up to 15 s of a busy source's WAL again (20-70 ms a
        round under pgbench, and once more inside the fence). Writing that record now (16+;
        skipped where the role may not) keeps the next read to what is new."""
        if source.name in self.no_snapshot_log:
            return
        if conn.info.server_version < 160000:
            self.no_snapshot_log.add(source.name)
            return
        try:
            conn.execute("SELECT pg_log_standby_snapshot()")
        except errors.InsufficientPrivilege:
            self.no_snapshot_log.add(source.name)

    def _refuse_strays(self, conn, source: ShardSpec, changed: Changes) -> None:
        """A row written into the source during the move with a key outside its range (past
        routing) would stay behind in the retired source: the move fails instead. A split or a
        merge also learns here each key's position, so that each shard compares only its own
        keys (`placed`)."""
        keys = set().union(*changed.keys.values()) if changed.keys else set()
        if not keys:
            return
        column = self.spec.key_column
        if len(self.spec.targets) > 1 or len(self.spec.sources) > 1:  # a split or a merge: `placed`
            changed.positions = key_positions(conn, column, self.spec.key_type, keys)
            stray = sum(1 for at in changed.positions.values() if not within(source.lo, source.hi, at))
        else:
            stray = one(conn.execute(sql.SQL("SELECT count(*) FROM unnest({}) AS u({}) WHERE {}").format(
                key_array(self.spec.key_type), sql.Identifier(column),
                outside(column, self.spec.key_type, source.lo, source.hi)), (key_param(self.spec.key_type, keys),)))[0]
        if stray:
            raise self.live.failure(
                f"{stray} rows were written into {source.dbname} during the move with a {column} outside its range"
                f" (straight into the database, past routing); `shardctl strays {self.spec.database}/{source.name}"
                " --move` puts them where they belong, then apply again")

    # ------------------------------------------------------------------ reading both sides

    def _hash(self) -> sql.Composable:
        return key_hash(self.spec.key_column, self.spec.key_type)

    def _sides(self, target: ShardSpec) -> list[tuple[ShardSpec, sql.Composable]]:
        """The target (every row it holds) and the sources that feed it (their rows for it)."""
        sides: list[tuple[ShardSpec, sql.Composable]] = [(target, sql.SQL("true"))]
        for link in self.spec.links:
            if link.target == target:
                sides.append((link.source, self.spec.range_filter(target) if link.filtered else sql.SQL("true")))
        return sides

    def _run(self, jobs: list[tuple[ShardSpec, sql.Composed, tuple]],
             timeout: float | None = None, lanes: tuple[int, ...] = (1,)) -> list[list[tuple]]:
        """Every job's rows, in order. One thread per shard and lane runs its jobs one after the
        other on the move's held connection of that lane, a shard's jobs dealt out over LANES:
        shards live on different servers and cores, and no connection's setup is paid in a round
        or in the fence. TIMEOUT (behind the fence): the seconds they may take together, else
        FutureTimeout."""
        by_session: dict[tuple[str, int], list[int]] = {}
        dealt: dict[str, int] = {}
        for i, (shard, _, _) in enumerate(jobs):
            turn = dealt[shard.name] = dealt.get(shard.name, -1) + 1
            by_session.setdefault((shard.name, lanes[turn % len(lanes)]), []).append(i)
        results: list[list[tuple]] = [[] for _ in jobs]

        def run_session(lane: int, indexes: list[int]) -> None:
            with self.live.session(jobs[indexes[0]][0], lane) as conn:
                for i in indexes:
                    _, query, params = jobs[i]
                    try:
                        results[i] = conn.execute(query, params).fetchall()
                    except errors.FeatureNotSupported:  # a column type without a hash function (json, point...)
                        text = query.as_string(conn).replace("hash_record_extended(t, 0)",
                                                             "hashtextextended(t::text, 0)")
                        results[i] = conn.execute(text, params).fetchall()

        running = [background(partial(run_session, lane, group)) for (_, lane), group in by_session.items()]
        _, late = wait(running, timeout=timeout)
        if late:
            raise FutureTimeout(f"{len(late)} of {len(running)} shards did not answer within {timeout}s")
        for job in running:
            job.result()  # their errors
        return results

    def _grouped_jobs(self, target: ShardSpec, table: tuple[str, str], group: sql.Composable,
                      where: sql.Composable, params: tuple) -> list[tuple[ShardSpec, sql.Composed, tuple]]:
        """The queries for one table of one target: the target first, then its sources."""
        qualified = sql.SQL("{}.{}").format(sql.Identifier(table[0]), sql.Identifier(table[1]))
        return [(shard, sql.SQL(
            "SELECT {group} AS g, count(*), coalesce(sum(hash_record_extended(t, 0)), 0)::text"
            " FROM {table} t WHERE ({side}) AND ({where}) GROUP BY 1").format(
                group=group, table=qualified, side=side_filter, where=where), params)
            for shard, side_filter in self._sides(target)]

    @staticmethod
    def _sum_sides(results: list[list[tuple]]) -> tuple[dict, dict]:
        """(target's groups, the sources' groups summed): group -> (rows, checksum)."""
        return _summed(results[:1]), _summed(results[1:])

    def _grouped(self, target: ShardSpec, table: tuple[str, str], group: sql.Composable,
                 where: sql.Composable, params: tuple) -> tuple[dict, dict]:
        return self._sum_sides(self._run(self._grouped_jobs(target, table, group, where, params)))

    def _key_sums(self, checks: list[tuple[ShardSpec, tuple[str, str], set, set]], timeout: float | None = None,
                  lanes: tuple[int, ...] = BOTH_LANES, by_key: bool = True) -> list[tuple[dict, dict]]:
        """For each (target, table, keys read on the target, keys read on its sources): per key
        (BY_KEY), else for all those keys together (group 0), (rows, checksum) on the target and
        summed over its sources. Each of a merge's sources is asked only for the keys in its range
        (`placed`). A side's keys are cut into one part per lane, read at once on each shard's
        connections of LANES (sums add up over disjoint parts). Every check in one parallel
        batch, within TIMEOUT."""
        key = sql.Identifier(self.spec.key_column)
        group = key if by_key else sql.SQL("0")
        key_type = self.spec.key_type
        where = sql.SQL("{} = ANY({})").format(key, key_array(key_type))
        positions = self.changes.positions
        batches = []
        for target, table, on_target, on_sources in checks:
            jobs = self._grouped_jobs(target, table, group, where, ())
            ours = [(shard, query, (key_param(key_type, part),)) for shard, query, _ in jobs[:1]
                    for part in _parts(on_target, len(lanes))]
            theirs = [(shard, query, (key_param(key_type, part),)) for shard, query, _ in jobs[1:]
                      for part in _parts(placed(shard, on_sources, positions), len(lanes))]
            batches.append((ours, theirs))
        results = self._run([job for ours, theirs in batches for job in (*ours, *theirs)], timeout, lanes)
        out: list[tuple[dict, dict]] = []
        for ours, theirs in batches:
            read_ours, results = results[:len(ours)], results[len(ours):]
            read_theirs, results = results[:len(theirs)], results[len(theirs):]
            out.append((_summed(read_ours), _summed(read_theirs)))
        return out

    def _differing(self, checks: list[tuple[ShardSpec, tuple[str, str], set]],
                   timeout: float | None = None) -> list[set]:
        """For each (target, table, keys): the keys whose rows differ between the target and its
        sources. Every check in one parallel batch (one thread per shard), within TIMEOUT."""
        sums = self._key_sums([(target, table, keys, keys) for target, table, keys in checks], timeout)
        return [_differ(keys, ours, theirs) for (_, _, keys), (ours, theirs) in zip(checks, sums, strict=True)]

    def _by_key(self, target: ShardSpec, table: tuple[str, str], keys: set) -> set:
        """Keys whose rows differ between the target and its sources."""
        return self._differing([(target, table, keys)])[0]

    def wait_applied(self) -> None:
        """Until every target has applied (and made durable) its sources' WAL as of now."""
        marks = {}
        for source in self.spec.sources:
            with self.live.session(source) as conn:
                marks[source.name] = one(conn.execute("SELECT pg_current_wal_lsn()::text"))[0]
        wait_confirmed(self.live, marks, timeout=self.spec.settings.converge_timeout, what="the comparison")

    # ------------------------------------------------------------------ the rounds

    def full_round(self) -> None:
        """Every row of every table, by buckets; the keys to recheck are what changed meanwhile."""
        self.read_changes()
        self.wait_applied()
        mismatched: dict[tuple[str, tuple[str, str]], tuple[ShardSpec, dict[int, int]]] = {}
        for target in self.spec.targets:
            for table in self.live.tables(target):
                bucket = sql.SQL("({}) >> {}").format(self._hash(), sql.Literal(BUCKET_SHIFT))
                ours, theirs = self._grouped(target, table, bucket, sql.SQL("true"), ())
                self.figures[f"{target.name}:{table[0]}.{table[1]}"] = {
                    "rows": sum(c for c, _ in ours.values()), "expected_rows": sum(c for c, _ in theirs.values())}
                differing = {b: max(ours.get(b, (0, 0))[0], theirs.get(b, (0, 0))[0])
                             for b in set(ours) | set(theirs) if ours.get(b, (0, 0)) != theirs.get(b, (0, 0))}
                if differing:
                    mismatched[(target.name, table)] = (target, differing)
        self.read_changes()
        for target in self.spec.targets:
            for table in self.live.tables(target):
                self.left[(target.name, table)] = placed(target, set(self.changes.of(table)), self.changes.positions)
        for (_name, table), (target, buckets) in mismatched.items():
            suspects: set = set()
            for batch in _batches(buckets, ROWS_AT_ONCE):
                suspects |= self._rows_in_buckets(target, table, batch) - self.changes.of(table)
                if len(suspects) > ROWS_AT_ONCE:
                    raise self.live.failure(
                        f"more than {ROWS_AT_ONCE:,} rows of {table[0]}.{table[1]} on {target.dbname} differ from"
                        " the source without a change during the comparison to explain them")
            self._settle_suspects(target, table, suspects)

    def _rows_in_buckets(self, target: ShardSpec, table: tuple[str, str], buckets: list[int]) -> set:
        """Keys whose rows differ within the given buckets (compared row by row, by key)."""
        bucket = sql.SQL("({}) >> {}").format(self._hash(), sql.Literal(BUCKET_SHIFT))
        key = sql.Identifier(self.spec.key_column)
        where = sql.SQL("{} = ANY(%s::bigint[])").format(bucket)
        ours, theirs = self._grouped(target, table, key, where, (buckets,))
        return {k for k in set(ours) | set(theirs) if ours.get(k, (0, 0)) != theirs.get(k, (0, 0))}

    def _settle_suspects(self, target: ShardSpec, table: tuple[str, str], suspects: set) -> None:
        """Keys that differed without a change to explain it: look again after the target caught
        up. A key that keeps differing and never changed is a real difference."""
        for _ in range(SUSPECT_ROUNDS):
            if not suspects:
                return
            self.wait_applied()
            suspects = self._by_key(target, table, suspects)
            self.read_changes()
            changed = self.changes.of(table)
            self.left[(target.name, table)] |= suspects & changed
            suspects -= changed
        if suspects:
            sample = ", ".join(str(k) for k in sorted(suspects, key=str)[:5])
            raise self.live.failure(f"{len(suspects)} rows of {table[0]}.{table[1]} on {target.dbname} differ from"
                                    f" the source and were not changed meanwhile ({self.spec.key_column} {sample})")

    def key_rounds(self, final: bool = False) -> None:
        """Recheck the changed keys while writes go on, until what is left is small. `final`:
        one last round just before the fence, whatever is left."""
        for _ in range(1 if final else KEY_ROUNDS):
            self.rounds += 1
            if not final and sum(len(v) for v in self.left.values()) <= SETTLED_ENOUGH:
                return
            started = time.monotonic()
            self.wait_applied()
            applied = time.monotonic()
            before = {k: set(v) for k, v in self.left.items()}
            found = self._differing([(self._target(k[0]), k[1], keys) for k, keys in before.items()])
            differing = dict(zip(before, found, strict=True))
            compared = time.monotonic()
            new = self.changes_now()
            for k in before:
                # settled: equal in this round and unchanged during it; the rest goes round again
                self.left[k] = differing[k] | placed(self._target(k[0]), new.of(k[1]), new.positions)
            self.log.append({"keys": sum(len(v) for v in before.values()),
                             "left": sum(len(v) for v in self.left.values()),
                             "wait_ms": round((applied - started) * 1000, 1),
                             "compare_ms": round((compared - applied) * 1000, 1),
                             "changes_ms": round((time.monotonic() - compared) * 1000, 1)})

    def last_rounds(self, limit: int = 6) -> None:
        """Just before the fence: rounds until one leaves few keys, or they stop improving
        (`fence_now`), at most LIMIT."""
        counts: list[int] = []
        for _ in range(limit):
            self.key_rounds(final=True)
            counts.append(sum(len(v) for v in self.left.values()))
            if fence_now(counts):
                return

    def _target(self, name: str) -> ShardSpec:
        return next(t for t in self.spec.targets if t.name == name)

    def read_ahead(self, upto: dict[str, str]) -> Changes:
        """Once the fence has its marks (Ahead): the changes up to them (nothing can change a
        source after its mark), their keys joining those left to recheck."""
        new = self.changes_upto(upto, self.spec.settings.fence_timeout, lane=4)
        for name, table in self.left:
            self.left[(name, table)] |= placed(self._target(name), new.of(table), new.positions)
        return new

    def sources_side(self) -> dict[tuple[str, tuple[str, str]], tuple[set, dict]]:
        """Once the fence has its marks (the sources can change no longer): the sources' side of
        every key left to recheck, all keys of a table together, on their lanes 4 and 2
        (AHEAD_LANES).
        (target, table) -> (keys, their sums)."""
        journal.points(f"{self.spec.label}: ahead")  # a test point: slow the read ahead right here
        checks: list[tuple[ShardSpec, tuple[str, str], set, set]] = [
            (self._target(name), table, set(), set(keys)) for (name, table), keys in self.left.items()]
        sums = self._key_sums(checks, timeout=self.spec.settings.fence_timeout, lanes=AHEAD_LANES, by_key=False)
        return {(target.name, table): (keys, theirs)
                for (target, table, _, keys), (_, theirs) in zip(checks, sums, strict=True)}

    def final(self, new: Changes, ahead: Ahead | None = None, timeout: float | None = None) -> int:
        """Inside the fence, after catch-up: the keys left and `new`, those changed since (read
        up to the fence with `read_changes`), every table and target in one parallel batch,
        within TIMEOUT (else FutureTimeout). All keys of a table are summed together (one row
        per side, not one per key): only where the sums differ are they compared key by key, to
        name the rows. The sources' side of the keys AHEAD took is read by it, beside the
        targets' side read here (they are caught up only now): once AHEAD has taken its changes,
        both sides are read at once, on different servers. Returns how many keys were compared;
        raises on any difference."""
        if ahead is not None:
            ahead.taken(timeout)  # the keys it took from the decoder are among those left from here
        checks: list[tuple[ShardSpec, tuple[str, str], set]] = []
        for target in self.spec.targets:
            for table in self.live.tables(target):
                keys = self.left.get((target.name, table), set()) | placed(target, new.of(table), new.positions)
                checks.append((target, table, keys))
        on_targets: list[tuple[ShardSpec, tuple[str, str], set, set]] = [
            (target, table, keys, set()) for target, table, keys in checks]
        targets_side = background(partial(self._key_sums, on_targets, timeout, by_key=False))
        known = ahead.sums(timeout) if ahead is not None else {}
        unread: list[tuple[ShardSpec, tuple[str, str], set, set]] = [
            (target, table, set(), keys - known.get((target.name, table), (set(), {}))[0])
            for target, table, keys in checks]
        sources_side = self._key_sums(unread, timeout, by_key=False)
        ours_side = targets_side.result(timeout=timeout)
        for (target, table, keys), (ours, _), (_, theirs) in zip(checks, ours_side, sources_side, strict=True):
            if ours != _summed([list(_rows(theirs)), list(_rows(known.get((target.name, table), (set(), {}))[1]))]):
                self._fail_final(target, table, keys, timeout)
        return sum(len(keys) for _, _, keys in checks)

    def _fail_final(self, target: ShardSpec, table: tuple[str, str], keys: set, timeout: float | None) -> None:
        differing = self._differing([(target, table, keys)], timeout)[0]
        sample = ", ".join(str(k) for k in sorted(differing, key=str)[:5])
        raise self.live.failure(f"{len(differing) or 'some'} rows of {table[0]}.{table[1]} on {target.dbname}"
                                f" differ from the fenced source"
                                + (f" ({self.spec.key_column} {sample})" if sample else ""))


class Ahead:
    """The verification's work ahead of the catch-up, begun once the fence has its marks, on the
    sources' lanes 4 and 2 (AHEAD_LANES: the catch-up holds lane 1, the decoder lane 3): take
    the changes decoded up to the marks into the keys left to recheck (`taken`), then read the
    sources' side of every one of them (`sources_side`). Nothing can change a
    source any longer (engine/actions/fence.py says why), so what is read now is what a read
    after the catch-up would read: the final comparison reads the targets' side of those keys,
    once they have caught up, while this runs beside the catch-up. Its errors (a TRUNCATE, rows
    out of range) are raised to whoever waits for it."""

    def __init__(self, comparison: Comparison, upto: dict[str, str]):
        self.done_at: float | None = None  # when its sums were read (monotonic), for the pause's marks
        self.taken_at: float | None = None  # when it had the changes up to the marks (monotonic), likewise
        self._taken: Future = Future()

        def work() -> dict:
            try:
                comparison.read_ahead(upto)
            except BaseException as exc:
                self._taken.set_exception(exc)
                raise
            self.taken_at = time.monotonic()
            self._taken.set_result(None)
            sums = comparison.sources_side()
            self.done_at = time.monotonic()
            return sums

        self._summed = background(work)

    def taken(self, timeout: float | None) -> None:
        """Until the changes up to the marks have been taken into the keys left."""
        self._taken.result(timeout=timeout)

    def sums(self, timeout: float | None) -> dict[tuple[str, tuple[str, str]], tuple[set, dict]]:
        return self._summed.result(timeout=timeout)


def _summed(results: list[list[tuple]]) -> dict:
    """Groups summed over every side in RESULTS: group -> (rows, checksum)."""
    out: dict = {}
    for rows in results:
        for g, count, total in rows:
            c, t = out.get(g, (0, 0))
            out[g] = (c + count, t + int(total))
    return out


def _batches(rows_by_bucket: dict[int, int], at_most: int) -> list[list[int]]:
    """The buckets in order, cut into batches of at most AT_MOST rows (a bucket larger than that
    is a batch of its own)."""
    batches: list[list[int]] = []
    rows = 0
    for b in sorted(rows_by_bucket):
        if not batches or (rows + rows_by_bucket[b] > at_most and batches[-1]):
            batches.append([])
            rows = 0
        batches[-1].append(b)
        rows += rows_by_bucket[b]
    return batches


def _parts(keys: set, count: int) -> list[list]:
    """KEYS sorted and cut into COUNT parts of about the same size (fewer when there are few
    keys: a part's round trip is not worth less than PART_KEYS_AT_LEAST keys); none for none."""
    ordered = sorted(keys)
    count = max(1, min(count, len(ordered) // PART_KEYS_AT_LEAST))
    size = -(-len(ordered) // count) if ordered else 0
    return [ordered[i:i + size] for i in range(0, len(ordered), size)] if ordered else []


def fence_now(counts: list[int]) -> bool:
    """Whether the fence goes now, after last rounds that left COUNTS keys to recheck (the last
    is this round's): when few are left (FENCE_KEYS), or when the rounds have stopped improving
    (this one left at least 80% of the fewest before it, and at most SPIKE times as many). Each
    round is shorter than the one before while they improve, so fewer keys change during it;
    once they stop, the count only swings.

    A round that left far more than the fewest before it (the targets' apply lagged, a
    checkpoint) is followed by one more round, once: fencing right after such a round left
    6,944 keys behind a merge's fence where the round before had left 2,753 (a pause of 307 ms;
    bench/split.py, 1M rows, 32 writers). Two such rounds in a row are not a blip but rounds
    that fall behind (an apply short of CPU): the fence goes then, as it did before this rule,
    one round later. The first round's count includes what changed while the lag converged: it
    is only compared against. `last_rounds` fences at its limit in any case."""
    after = counts[-1]
    if after <= FENCE_KEYS:
        return True
    if len(counts) < 2:
        return False
    if after < min(counts[:-1]) * 0.8:
        return False  # still improving
    return not _spike(counts) or _spike(counts[:-1])


def _spike(counts: list[int]) -> bool:
    """Whether the last of COUNTS is more than SPIKE times the fewest before it."""
    return len(counts) >= 2 and counts[-1] > min(counts[:-1]) * SPIKE


def placed(shard: ShardSpec, keys: set, positions: dict) -> set:
    """Of KEYS (changed on the sources), those SHARD holds: in a split, a target holds only the
    keys whose position falls in its range, and in a merge so does each source. The others have
    no rows on it (a split's source is read for a target through that target's range), so
    comparing them there costs a lookup and proves nothing. Under 32 writers a split's rounds
    then compared half the keys on each side and converged further: 700-1,300 keys were left
    behind the fence instead of 1,800-2,600 (bench/split.py, 200,000 rows). A key without a
    known position is kept (a plain move learns none: its one source and one target hold every
    key)."""
    if not positions:
        return keys
    # the range test inline, not `within`: a function call per key doubled what this costs
    lo = -(2**63) if shard.lo is None else shard.lo
    hi = 2**64 if shard.hi is None else shard.hi
    return {k for k in keys if (at := positions.get(k)) is None or lo <= at < hi}


def _rows(sums: dict) -> Iterable[tuple]:
    """A sums dict back as rows (group, rows, checksum), to be summed with others."""
    return ((g, count, total) for g, (count, total) in sums.items())


def _differ(keys: set, ours: dict, theirs: dict) -> set:
    """The keys whose (rows, checksum) differ between the two sides (absent: no rows)."""
    return {k for k in keys | set(ours) | set(theirs) if ours.get(k, (0, 0)) != theirs.get(k, (0, 0))}


ANALYZE_LOCK_TIMEOUT = "2s"


def analyze_targets(live: Live) -> None:
    """Statistics for the targets' tables, once the copy has filled them. A table the copy made
    has none, and without them the planner takes `key = ANY(...)` of more than 200 keys for the
    whole table (each key at the default 1/200): on a table whose shard key is not unique
    (an order's lines, a customer's history) every key round and the comparison behind the fence
    read the target's whole table. auto_explain showed it behind the fence: a sequential scan of a
    target's history for 800 keys, where the sources used the index. Skipped where
    autovacuum holds the table (its statistics are on their way)."""
    for target in live.spec.targets:
        with live.session(target) as conn:
            for schema, name in live.tables(target):
                try:
                    with conn.transaction():
                        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(ANALYZE_LOCK_TIMEOUT)))
                        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, name)))
                except errors.LockNotAvailable:
                    continue


def compare(live: Live) -> Comparison:
    """The compare stage: every row compared while writes go on; a TRUNCATE meanwhile starts it
    over (three times at most). Hands on the comparison, with the keys left to recheck."""
    spec = live.spec
    with live.step("compare"):
        analyze_targets(live)
        for _attempt in range(3):
            comparison = Comparison(spec, live)
            try:
                comparison.begin()
                comparison.full_round()
                comparison.key_rounds()
                left = sum(len(v) for v in comparison.left.values())
                live.progress(phase="compared", keys_left=left, rounds=comparison.rounds,
                              text=f"compared every row while writes went on; {left} changed keys left to"
                                   " recheck behind the fence")
                return comparison
            except VerifyRestart as truncated:
                live.say(f"a TRUNCATE of {truncated} during the comparison: comparing again")
        raise MoveFailed(f"{spec.label}: tables were truncated during every comparison",
                         f"apply again when the TRUNCATEs are over; {live.source_state()}")
