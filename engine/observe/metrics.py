"""Load metrics: raw readings, derived samples, and the arithmetic between them.

A `Reading` is what a collector saw at one instant for one shard: monotonically growing
counters (transactions, busy time, statement calls, CPU ticks) and gauges (connections, bytes).
A `Sample` is what the detector judges: the six metrics the product promises, each a value
with its source, or None when unknown. Rates need two readings; a missing counter, a counter
that went backwards (a stats reset, a restart) or a missing capacity gives None: unknown is
never zero, and unknown never triggers an action.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

from pydantic import ConfigDict, field_validator
from pydantic.dataclasses import dataclass

from engine.frozen import Frozen

METRICS = ("queries_per_second", "cpu_percent", "memory_percent", "storage_percent", "connections", "latency_ms")
UNITS = {"queries_per_second": "/s", "cpu_percent": "%", "memory_percent": "%", "storage_percent": "%",
         "connections": "", "latency_ms": " ms"}




@dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class MetricValue:
    """A slotted dataclass, not a model: a plan over 10,000 shards holds hundreds of thousands
    of these, and a model instance costs several times the memory."""

    value: float
    source: str

    @field_validator("source")
    @classmethod
    def _shared(cls, source: str) -> str:
        return sys.intern(source)  # a few distinct sources over hundreds of thousands of values


class Reading(Frozen):
    shard: str  # address, e.g. orders/-40
    server: str
    dbname: str
    at: datetime
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    per_pid_ticks: dict[str, float] = {}  # /proc CPU ticks of the backends seen, by pid
    notes: dict[str, str] = {}  # capacity sources and the like, for labels


class Sample(Frozen):
    shard: str
    server: str
    at: datetime
    interval_s: float | None = None
    metrics: dict[str, MetricValue | None]

    @field_validator("shard", "server")
    @classmethod
    def _shared(cls, name: str) -> str:
        return sys.intern(name)  # one string per shard and server, not one per sample

    def value(self, metric: str) -> float | None:
        mv = self.metrics.get(metric)
        return None if mv is None else mv.value


class Capacity(Frozen):
    """What percentages are taken against, and where each figure came from."""

    cpus: float | None = None
    cpus_source: str = ""
    memory_bytes: float | None = None
    memory_source: str = ""
    storage_bytes: float | None = None
    storage_source: str = ""


def _delta(prev: Reading, cur: Reading, key: str) -> float | None:
    if key not in prev.counters or key not in cur.counters:
        return None
    d = cur.counters[key] - prev.counters[key]
    return d if d >= 0 else None  # a reset or restart: unknown, not negative


def derive(prev: Reading | None, cur: Reading, capacity: Capacity, clock_ticks: float = 100.0) -> Sample:
    metrics: dict[str, MetricValue | None] = dict.fromkeys(METRICS)
    interval = (cur.at - prev.at).total_seconds() if prev is not None else None
    if interval is not None and interval <= 0:
        interval = None

    if "connections" in cur.gauges:
        metrics["connections"] = MetricValue(value=cur.gauges["connections"], source="pg_stat_activity client backends")
    if "size_bytes" in cur.gauges and capacity.storage_bytes:
        metrics["storage_percent"] = MetricValue(
            value=round(100.0 * cur.gauges["size_bytes"] / capacity.storage_bytes, 3),
            source=f"pg_database_size / {capacity.storage_source}")
    if "buffer_bytes" in cur.gauges and capacity.memory_bytes:
        metrics["memory_percent"] = MetricValue(
            value=round(100.0 * cur.gauges["buffer_bytes"] / capacity.memory_bytes, 3),
            source=f"pg_buffercache / {capacity.memory_source}")

    if prev is not None and interval:
        xacts = _delta(prev, cur, "xacts")
        calls = _delta(prev, cur, "calls")
        # pg_stat_statements counts each statement as it finishes; pg_stat_database's
        # transaction counters are flushed by busy backends only now and then (a flush that
        # meets a lock is deferred, up to 60 s), so under load they lag and jump. Prefer calls.
        if calls is not None:
            metrics["queries_per_second"] = MetricValue(value=round(calls / interval, 3),
                                                        source="pg_stat_statements calls")
        elif xacts is not None:
            metrics["queries_per_second"] = MetricValue(value=round(xacts / interval, 3),
                                                        source="pg_stat_database xact_commit+xact_rollback")
        cpu = _proc_cpu(prev, cur, interval, capacity, clock_ticks)
        if cpu is None:
            active = _delta(prev, cur, "active_ms")
            if active is not None and capacity.cpus:
                cpu = MetricValue(value=round(100.0 * active / (interval * 1000.0 * capacity.cpus), 3),
                                  source=f"pg_stat_database active_time busy share of {capacity.cpus_source}"
                                         " (includes lock waits)")
        metrics["cpu_percent"] = cpu
        exec_ms = _delta(prev, cur, "exec_ms")
        active = _delta(prev, cur, "active_ms")
        if calls and exec_ms is not None:
            metrics["latency_ms"] = MetricValue(value=round(exec_ms / calls, 3),
                                                source="pg_stat_statements mean exec time")
        elif calls is None and xacts and active is not None:  # no statement counts to go by
            metrics["latency_ms"] = MetricValue(value=round(active / xacts, 3),
                                                source="active_time per transaction (no pg_stat_statements)")
        # nothing ran in the interval: latency stays unknown rather than zero
    return Sample(shard=cur.shard, server=cur.server, at=cur.at, interval_s=interval, metrics=metrics)


def _proc_cpu(prev: Reading, cur: Reading, interval: float, capacity: Capacity, hz: float) -> MetricValue | None:
    if not cur.per_pid_ticks or "proc" not in cur.notes or not capacity.cpus:
        return None
    common = set(prev.per_pid_ticks) & set(cur.per_pid_ticks)
    ticks = sum(max(0.0, cur.per_pid_ticks[p] - prev.per_pid_ticks[p]) for p in common)
    return MetricValue(value=round(100.0 * ticks / hz / (interval * capacity.cpus), 3),
                       source=f"host /proc CPU of backends, of {capacity.cpus_source}")


def sample_to_json(sample: Sample) -> dict[str, Any]:
    return sample.model_dump(mode="json")
