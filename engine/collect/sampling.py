"""Live sampling: one round of readings over the fleet, turned into samples with the previous
readings (from the catalog, or from a first reading taken a moment earlier).

Servers are read at once, each within a deadline (engine.observe.fanout): a server that hangs
costs its own shards' samples, never the others'. `LiveSampler` keeps the last reading per shard
behind a lock, so a daemon's threads can share it. Tier 3 (sizes, buffer shares) is read on
full rounds only, at most every TIER3_EVERY seconds; in between, its last values are carried forward with their age.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from engine.clock import system_clock
from engine.collect.collectors import Collector, default_collectors
from engine.config.models import DEFAULT_DEADLINE
from engine.observe import cleaning, fanout, replication
from engine.observe.metrics import METRICS, Capacity, Reading, Sample, derive
from engine.observe.models import CatalogShard, ReplicationObject
from engine.servers.connect import ServerHandle, ServerUnreachable
from engine.servers.fleet import Fleet

TIER3_EVERY = 60.0
# Seconds the two readings of a first sample are at least apart. Rates from pg_stat_statements
# count every statement as it finishes, so any gap measures them; a short one only averages over
# less, hence a small floor. pg_stat_database's counters are flushed by busy backends at most once
# a second, so a rate from them over less is noise.
MIN_GAP = 0.25
FIRST_GAP = 1.0
CLOCK_TICKS = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def capacity_for(handle: ServerHandle, reading: Reading | None) -> Capacity:
    """Percentages use the declared capacity; otherwise what this host or the server reports."""
    declared = handle.spec.capacity
    cap: dict = {}
    if declared.cpus:
        cap.update(cpus=declared.cpus, cpus_source=f"{declared.cpus:g} declared cpus")
    elif handle.embedded is not None:
        cap.update(cpus=float(os.cpu_count() or 1), cpus_source=f"{os.cpu_count()} host cpus")
    if declared.memory:
        cap.update(memory_bytes=float(declared.memory), memory_source="declared memory")
    elif reading is not None and "shared_buffers_bytes" in reading.notes:
        cap.update(memory_bytes=float(reading.notes["shared_buffers_bytes"]), memory_source="shared_buffers")
    if declared.storage:
        cap.update(storage_bytes=float(declared.storage), storage_source="declared storage")
    elif handle.embedded is not None and handle.embedded.data_dir.exists():
        cap.update(storage_bytes=float(shutil.disk_usage(handle.embedded.data_dir).total),
                   storage_source="size of the data directory's filesystem")
    return Capacity(**cap)


REPLICATION_QUERY = """
SELECT coalesce(nullif(r.application_name, ''), host(r.client_addr), r.pid::text) AS name,
       CASE WHEN pg_is_in_recovery() OR r.replay_lsn IS NULL THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::float8 END AS lag_bytes,
       extract(epoch FROM r.replay_lag)::float8 AS lag_seconds
FROM pg_stat_replication r
WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.active_pid = r.pid AND s.slot_type = 'logical')
ORDER BY 1
"""




@dataclass(frozen=True)
class Begun:
    """The first readings of a sample whose shards had no previous one (LiveSampler.begin): when
    they were taken, the least gap the second must keep (per server: FIRST_GAP where its rates
    come from pg_stat_database, MIN_GAP where from pg_stat_statements) and the servers that
    did not answer (not asked again)."""

    started: float
    gaps: dict[str, float]
    missing: dict[str, str]

    def wait(self, servers: set[str] | None = None) -> None:
        """Until the least gap of these servers (all by default) has passed since the readings."""
        gap = max((g for s, g in self.gaps.items() if servers is None or s in servers), default=0.0)
        remaining = self.started + gap - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)


@dataclass(frozen=True)
class SampleRound:
    """One round's result: a fresh (reading, sample) per shard that answered, an unknown sample
    (every metric None) per shard of a server that did not, and why each such server did not."""

    pairs: dict[str, tuple[Reading, Sample]]
    unknown: dict[str, Sample]
    missing: dict[str, str]  # server -> why its shards have no reading this round

    def notes(self) -> tuple[str, ...]:
        """One line per server that gave no reading, for the plan's notes and the daemon's log."""
        counts: dict[str, int] = {}
        for sample in self.unknown.values():
            counts[sample.server] = counts.get(sample.server, 0) + 1
        return tuple(f"server {server}: {why}; its {counts.get(server, 0)} shard(s) are unknown this round"
                     f" (the other servers' samples are unaffected)" for server, why in sorted(self.missing.items()))


class _Slot:
    """The one connection kept to a server between rounds, and the lock of whoever uses it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: psycopg.Connection | None = None

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


class LiveSampler:
    """Samples the fleet. Servers are read at once (engine.observe.fanout), each within
    `deadline` seconds, connecting included; a server that is late or fails gives no reading,
    and only its own shards are unknown. One connection per server is kept between rounds, so a
    daemon's round is a few milliseconds; close() when done."""

    def __init__(self, fleet: Fleet, collectors: list[Collector] | None = None, deadline: float = DEFAULT_DEADLINE,
                 workers: int = fanout.MAX_WORKERS):
        self.fleet = fleet
        self.collectors = collectors if collectors is not None else default_collectors()
        self.deadline = deadline
        self.workers = workers
        self._lock = threading.Lock()
        self._last: dict[str, Reading] = {}
        self._slots: dict[str, _Slot] = {}

    def __enter__(self) -> LiveSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            slots, self._slots = self._slots, {}
        for slot in slots.values():
            # a slot still in use belongs to a late job: it closes its connection when it ends
            if slot.lock.acquire(timeout=0):
                try:
                    slot.close()
                finally:
                    slot.lock.release()

    def _slot(self, name: str) -> _Slot:
        with self._lock:
            return self._slots.setdefault(name, _Slot())

    def on_server(self, handle: ServerHandle, watch: fanout.Watch, work):
        """Run `work(conn)` on the server's kept connection (made when there is none, within the
        deadline); the connection is cut if the deadline passes. A kept connection that fails at
        once (the server restarted since) is replaced and the work tried once more."""
        slot = self._slot(handle.name)
        if not slot.lock.acquire(timeout=watch.remaining()):
            raise TimeoutError(f"server {handle.name} is still busy with an earlier reading")
        try:
            for attempt in (1, 2):
                reused = slot.conn is not None and not slot.conn.closed
                if not reused:
                    slot.close()
                    params = {"application_name": "shardctl-metrics", **handle.params(),
                              "connect_timeout": watch.connect_timeout()}
                    try:
                        slot.conn = psycopg.connect(**params, autocommit=True)
                    except psycopg.OperationalError as exc:
                        raise ServerUnreachable(handle.name, "postgres", exc, handle.how_to_reach()) from None
                assert slot.conn is not None
                try:
                    with watch.connection(slot.conn) as conn:
                        return work(conn)
                except psycopg.OperationalError:
                    slot.close()  # broken or cut: never reused
                    if not reused or watch.cut or attempt == 2:
                        raise
                except BaseException:
                    slot.close()
                    raise
            raise AssertionError("unreachable")
        finally:
            slot.lock.release()

    def seed(self, readings: dict[str, Reading]) -> None:
        with self._lock:
            for address, reading in readings.items():
                current = self._last.get(address)
                if current is None or reading.at > current.at:
                    self._last[address] = reading

    def read(self, shards: list[CatalogShard], full: bool) -> dict[str, Reading]:
        """One round's readings (see read_round)."""
        return self.read_round(shards, full)[0]

    def read_round(self, shards: list[CatalogShard], full: bool,
                   sizes: dict[str, int] | None = None) -> tuple[dict[str, Reading], dict[str, str]]:
        """One round: every server at once, each collector once per server, each server within
        the deadline. Returns the readings and, per server that gave none, why (unknown, never
        zero). `sizes`: shards' database sizes read a moment ago (a plan's inspection): a full
        round does not read them again."""
        by_server: dict[str, list[CatalogShard]] = {}
        for shard in shards:
            by_server.setdefault(shard.server, []).append(shard)
        jobs = {}
        for server_name, server_shards in by_server.items():
            handle = self.fleet.servers.get(server_name)
            if handle is not None:
                jobs[server_name] = self._reader(handle, server_shards, full, sizes if full else None)
        outcomes = fanout.fan_out(jobs, self.deadline, workers=self.workers)
        readings: dict[str, Reading] = {}
        missing: dict[str, str] = {}
        for name, outcome in sorted(outcomes.items()):
            if outcome.ok and outcome.value is not None:
                readings.update(outcome.value)
            else:
                missing[name] = outcome.error or "no reading"
        return readings, missing

    def _reader(self, handle: ServerHandle, server_shards: list[CatalogShard], full: bool,
                sizes: dict[str, int] | None = None):
        def work(conn: psycopg.Connection) -> dict[str, Reading]:
            # the sizes known already, as the readings the collectors enrich (engine.collect.collectors)
            at = system_clock()
            round_readings: dict[str, Reading] = {
                s.address: Reading(shard=s.address, server=handle.name, dbname=s.dbname, at=at,
                                   gauges={"size_bytes": float(sizes[s.address])})
                for s in server_shards if sizes and s.address in sizes}
            for collector in self.collectors:
                if collector.applies_to(handle):
                    round_readings = collector.collect(handle, conn, server_shards, round_readings, full)
            return round_readings

        return lambda watch: self.on_server(handle, watch, work)

    def replication(self, servers: list[str]) -> dict[str, list[tuple[str, float | None, float | None]]]:
        """Physical standbys of each server and how far behind they replay: (name, lag in bytes,
        lag in seconds). Logical walsenders (a split's or merge's subscriptions) are left out.
        A server that does not answer in time, or does not let this role see the figures, gives
        none."""
        def reader(handle: ServerHandle):
            return lambda watch: self.on_server(handle, watch, lambda conn: conn.execute(REPLICATION_QUERY).fetchall())

        jobs = {name: reader(self.fleet.servers[name]) for name in servers if name in self.fleet.servers}
        found: dict[str, list[tuple[str, float | None, float | None]]] = {}
        for name, outcome in sorted(fanout.fan_out(jobs, self.deadline, workers=self.workers).items()):
            rows = outcome.value if outcome.ok else None
            if rows:
                found[name] = [(str(r[0]), None if r[1] is None else float(r[1]),
                                None if r[2] is None else float(r[2])) for r in rows]
        return found

    def replication_objects(self, servers: list[str]) -> dict[str, tuple[ReplicationObject, ...]]:
        """Each server's slots and subscriptions of shardctl's naming (engine/observe/replication.py),
        read each round so that a link that breaks shows within one interval. A server that does
        not answer in time, or does not let this role read them, gives none (unknown)."""
        def reader(handle: ServerHandle):
            log_file = handle.embedded.log_file if handle.embedded is not None else None
            return lambda watch: self.on_server(handle, watch, lambda conn: replication.read(conn, log_file))

        jobs = {name: reader(self.fleet.servers[name]) for name in servers if name in self.fleet.servers}
        return {name: outcome.value for name, outcome in sorted(fanout.fan_out(jobs, self.deadline,
                                                                                 workers=self.workers).items())
                if outcome.ok and outcome.value is not None}

    def sample(self, shards: list[CatalogShard]) -> dict[str, tuple[Reading, Sample]]:
        return self.sample_round(shards).pairs

    def begin(self, shards: list[CatalogShard]) -> Begun:
        """First readings of the shards that have no previous one (kept as their previous), so
        that the next round makes rates; the caller does its other work in between (a plan
        inspects the shards) and hands the result to sample_round."""
        with self._lock:
            need = [s for s in shards if s.address not in self._last]
        if not need:
            return Begun(started=time.monotonic(), gaps={}, missing={})
        first, missing = self.read_round(need, full=False)
        started = time.monotonic()
        self.seed(first)
        gaps: dict[str, float] = {}
        for reading in first.values():
            gap = MIN_GAP if "calls" in reading.counters else FIRST_GAP
            gaps[reading.server] = max(gaps.get(reading.server, 0.0), gap)
        return Begun(started=started, gaps=gaps, missing=missing)

    def sample_round(self, shards: list[CatalogShard], begun: Begun | None = None,
                     own: dict[str, tuple[int, float]] | None = None,
                     sizes: dict[str, int] | None = None) -> SampleRound:
        """A fresh sample per shard. Without a previous reading, one is taken first (`begin`, or
        `begun` when the caller took it before other work) and the second keeps the least gap
        after it. `own`: per shard address, the statements shardctl itself ran on it since the
        first reading and their time in ms (a plan's inspection), left out of its rates; `sizes`
        what it read of their sizes (see read_round). Shards of a server that did not answer in
        time get an unknown sample, with the reason."""
        begun = begun if begun is not None else self.begin(shards)
        begun.wait({s.server for s in shards})
        with self._lock:
            previous = dict(self._last)
        # a server that was late on the first reading is not asked again: it would cost the
        # round its deadline a second time
        asked = [s for s in shards if s.server not in begun.missing]
        full = any(_tier3_due(previous.get(s.address)) for s in asked)
        current, missing = self.read_round(asked, full=full, sizes=sizes) if asked else ({}, {})
        missing = {**begun.missing, **missing}
        out: dict[str, tuple[Reading, Sample]] = {}
        # one server's capacity is the same for all its shards in a round (it reads the disk)
        capacities: dict[tuple[str, str | None], Capacity] = {}
        for address, reading in current.items():
            prev = previous.get(address)
            reading = _carry_tier3(prev, reading, full)
            key = (reading.server, reading.notes.get("shared_buffers_bytes"))
            if key not in capacities:
                capacities[key] = capacity_for(self.fleet.servers[reading.server], reading)
            judged = _without_own(reading, prev, (own or {}).get(address))
            derived = derive(prev, judged, capacities[key], CLOCK_TICKS)
            # nothing impossible is stored: a NaN, infinite or negative value becomes unknown
            out[address] = (reading, cleaning.clean_sample(derived))
        self.seed({a: r for a, (r, _) in out.items()})
        at = system_clock()
        unknown = {s.address: Sample(shard=s.address, server=s.server, at=at, metrics=dict.fromkeys(METRICS))
                   for s in shards if s.address not in out and s.server in missing}
        return SampleRound(pairs=out, unknown=unknown, missing=missing)


def _without_own(reading: Reading, prev: Reading | None, own: tuple[int, float] | None) -> Reading:
    """The reading less the statements shardctl ran on the shard since `prev` (its own
    inspection), so that they are not counted as the shard's load. Only pg_stat_statements'
    counts are corrected: they are exact per statement; pg_stat_database's are read around no
    such work (engine.collect.history)."""
    if own is None or prev is None or "calls" not in reading.counters or "calls" not in prev.counters:
        return reading
    calls, ms = own
    counters = {**reading.counters, "calls": reading.counters["calls"] - calls}
    if "exec_ms" in counters:
        counters["exec_ms"] = max(prev.counters.get("exec_ms", 0.0), counters["exec_ms"] - ms)
    return reading.model_copy(update={"counters": counters})


def _tier3_due(prev: Reading | None) -> bool:
    if prev is None or "tier3_at" not in prev.notes:
        return True
    age = system_clock() - datetime.fromisoformat(prev.notes["tier3_at"])
    return age >= timedelta(seconds=TIER3_EVERY)


def _carry_tier3(prev: Reading | None, cur: Reading, full: bool) -> Reading:
    if full:
        return cur.model_copy(update={"notes": {**cur.notes, "tier3_at": cur.at.isoformat()}})
    if prev is None:
        return cur
    carried = {k: v for k, v in prev.gauges.items() if k in ("size_bytes", "buffer_bytes")}
    notes = {**cur.notes}
    if "tier3_at" in prev.notes:
        notes["tier3_at"] = prev.notes["tier3_at"]
    return cur.model_copy(update={"gauges": {**carried, **cur.gauges}, "notes": notes})
