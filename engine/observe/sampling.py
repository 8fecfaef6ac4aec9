"""Live sampling: one round of readings over the fleet, turned into samples with the previous
readings (from the catalog, or from a first reading taken a moment earlier).

`LiveSampler` keeps the last reading per shard behind a lock, so a daemon's threads can share
it. Tier 3 (sizes, buffer shares) is read on full rounds only, at most every TIER3_EVERY
seconds; in between, its last values are carried forward with their age.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from datetime import datetime, timedelta

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from engine.observe import cleaning
from engine.observe.collectors import Collector, default_collectors
from engine.observe.metrics import Capacity, Reading, Sample, derive
from engine.observe.models import CatalogShard
from engine.servers.connect import ServerHandle, ServerUnreachable
from engine.servers.fleet import Fleet

TIER3_EVERY = 60.0
FIRST_GAP = 1.0  # seconds between the two readings when there is no previous one
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


class LiveSampler:
    """Samples the fleet. Keeps one small psycopg pool per server, so that a daemon's rounds
    reuse a warm connection (a round is then a few milliseconds); close() when done."""

    def __init__(self, fleet: Fleet, collectors: list[Collector] | None = None):
        self.fleet = fleet
        self.collectors = collectors if collectors is not None else default_collectors()
        self._lock = threading.Lock()
        self._last: dict[str, Reading] = {}
        self._pools: dict[str, ConnectionPool] = {}

    def __enter__(self) -> LiveSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def _pool(self, handle: ServerHandle) -> ConnectionPool:
        with self._lock:
            pool = self._pools.get(handle.name)
            if pool is None:
                params = {"connect_timeout": "5", "application_name": "shardctl-metrics", **handle.params()}
                pool = ConnectionPool(kwargs={**params, "autocommit": True}, min_size=1, max_size=1,
                                      open=True, timeout=10, name=f"shardctl-{handle.name}")
                self._pools[handle.name] = pool
            return pool

    def seed(self, readings: dict[str, Reading]) -> None:
        with self._lock:
            for address, reading in readings.items():
                current = self._last.get(address)
                if current is None or reading.at > current.at:
                    self._last[address] = reading

    def read(self, shards: list[CatalogShard], full: bool) -> dict[str, Reading]:
        """One round: each server once, each collector once per server. Unreachable servers
        give no reading (unknown)."""
        by_server: dict[str, list[CatalogShard]] = {}
        for shard in shards:
            by_server.setdefault(shard.server, []).append(shard)
        readings: dict[str, Reading] = {}
        for server_name, server_shards in sorted(by_server.items()):
            handle = self.fleet.servers.get(server_name)
            if handle is None:
                continue
            round_readings: dict[str, Reading] = {}
            try:
                with self._pool(handle).connection() as conn:
                    for collector in self.collectors:
                        if collector.applies_to(handle):
                            round_readings = collector.collect(handle, conn, server_shards, round_readings, full)
            except (ServerUnreachable, PoolTimeout, psycopg.Error):
                continue  # unknown, never zero
            readings.update(round_readings)
        return readings

    def replication(self, servers: list[str]) -> dict[str, list[tuple[str, float | None, float | None]]]:
        """Physical standbys of each server and how far behind they replay: (name, lag in bytes,
        lag in seconds). Logical walsenders (a split's or merge's subscriptions) are left out.
        A server that does not answer, or does not let this role see the figures, gives none."""
        found: dict[str, list[tuple[str, float | None, float | None]]] = {}
        for name in servers:
            handle = self.fleet.servers.get(name)
            if handle is None:
                continue
            try:
                with self._pool(handle).connection() as conn:
                    rows = conn.execute(REPLICATION_QUERY).fetchall()
            except (ServerUnreachable, PoolTimeout, psycopg.Error):
                continue
            if rows:
                found[name] = [(str(r[0]), None if r[1] is None else float(r[1]),
                                None if r[2] is None else float(r[2])) for r in rows]
        return found

    def sample(self, shards: list[CatalogShard]) -> dict[str, tuple[Reading, Sample]]:
        """A fresh sample per shard. Without a previous reading, read twice FIRST_GAP apart."""
        with self._lock:
            previous = dict(self._last)
        if any(s.address not in previous for s in shards):
            first = self.read(shards, full=False)
            previous = {**first, **previous}
            time.sleep(FIRST_GAP)
        full = any(_tier3_due(previous.get(s.address)) for s in shards)
        current = self.read(shards, full=full)
        out: dict[str, tuple[Reading, Sample]] = {}
        for address, reading in current.items():
            prev = previous.get(address)
            reading = _carry_tier3(prev, reading, full)
            handle = self.fleet.servers[reading.server]
            derived = derive(prev, reading, capacity_for(handle, reading), CLOCK_TICKS)
            # nothing impossible is stored: a NaN, infinite or negative value becomes unknown
            (derived,), _ = cleaning.clean_window(address, [derived])
            out[address] = (reading, derived)
        self.seed({a: r for a, (r, _) in out.items()})
        return out


def _tier3_due(prev: Reading | None) -> bool:
    if prev is None or "tier3_at" not in prev.notes:
        return True
    age = datetime.now(prev.at.tzinfo) - datetime.fromisoformat(prev.notes["tier3_at"])
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
