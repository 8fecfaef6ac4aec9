"""Replay recorded load traces through the daemon's decision round, on a simulated layout.

Each tick, every active shard gets a sample from the traces (keys spread evenly, so a shard
carries the load of the trace ranges it overlaps, in proportion); the daemon's own
`decide_round` plans and decides; what automation may apply changes the simulated layout
(children replace a split source, a merge target its sources) and starts a cooldown, as the
real apply does. No rows move here: this is the decision loop; the tests in test_watch_daemon
apply for real.

Samples may be made dirty on the way (`dirty`: repeated, contradicting or impossible values) or
stop arriving (`silent`: ticks a trace's shards get no sample at all, as when collection stalls);
the window is cleaned as the daemon's own stored window is (engine.observe.cleaning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from engine.keyspace import KeyRange, even_ranges, physical_name
from engine.observe import cleaning
from engine.observe.metrics import METRICS, MetricValue, Sample
from engine.observe.models import (
    AppliedStep,
    CatalogDatabase,
    CatalogShard,
    CatalogState,
    LiveServer,
    Observation,
    ReshardEvent,
)
from engine.plan import planner
from engine.watch.daemon import decide_round
from traces import QUIET, START

SPACE = 2 ** 64
Traces = dict[str, list[float | None]]  # initial range name -> a value per tick (None: no sample)


def _span(lo: int | None, hi: int | None) -> tuple[int, int]:
    r = KeyRange(lo, hi)
    return r.lo_unsigned, r.hi_unsigned


@dataclass
class Taken:
    tick: int
    at: datetime
    kind: str
    address: str
    ranges: tuple[tuple[int, int], ...]  # unsigned spans of the sources
    latest_unknown: bool  # was the newest sample of a source unknown when it was decided?


@dataclass
class Replay:
    desired: object
    traces: Traces  # queries per second
    gauges: dict[str, Traces] = field(default_factory=dict)  # metric -> its traces
    interval: float = 10.0
    servers_down: dict[str, range] = field(default_factory=dict)  # server -> ticks it does not answer
    paused: bool = False
    cooling_until: int = 0  # a split of the whole key space that ends its cooldown at this tick
    silent: dict[str, range] = field(default_factory=dict)  # server -> ticks its shards get no sample
    dirty: Callable[[Sample, int], list[Sample]] | None = None  # a clean sample and its tick -> what arrives
    on_round: Callable | None = None  # called with (tick, observation, plan, decision) after every round

    def __post_init__(self) -> None:
        db = self.desired.databases["orders"]
        self.db = db
        self.steps = tuple(AppliedStep(seq=i + 1, name=s.name, sha256=s.sha256) for i, s in enumerate(db.schema_steps))
        self.shards = [CatalogShard(database="orders", name=r.name, lo=r.lo, hi=r.hi, server="ab"[i % 2],
                                    dbname=physical_name("orders", r), state="active")
                       for i, r in enumerate(even_ranges(db.spec.shards))]
        self.trace_spans = {r.name: _span(r.lo, r.hi) for r in even_ranges(db.spec.shards)}
        self.windows: dict[str, list[Sample]] = {}
        self.events: list[ReshardEvent] = []
        if self.cooling_until:
            cooldown = timedelta(seconds=self.db.effective_policy.autosplit.cooldown)
            self.events.append(ReshardEvent(at=START + timedelta(seconds=self.interval * self.cooling_until) - cooldown,
                                            database="orders", ranges=((None, None),)))
        self.taken: list[Taken] = []

    def _load(self, shard: CatalogShard, tick: int, traces: Traces | None = None) -> float | None:
        """The shard's share of the traces of the ranges it overlaps (additive metrics)."""
        traces = self.traces if traces is None else traces
        lo, hi = _span(shard.lo, shard.hi)
        total = 0.0
        for name, (t_lo, t_hi) in self.trace_spans.items():
            overlap = max(0, min(hi, t_hi) - max(lo, t_lo))
            if overlap:
                value = traces[name][tick]
                if value is None:
                    return None
                total += value * overlap / (t_hi - t_lo)
        return total

    def _sample(self, shard: CatalogShard, tick: int, at: datetime) -> Sample:
        down = tick in self.servers_down.get(shard.server, ())
        qps = None if down else self._load(shard, tick)
        metrics = {m: None if down else MetricValue(value=QUIET[m], source="recorded") for m in METRICS}
        metrics["queries_per_second"] = None if qps is None else MetricValue(value=qps, source="recorded")
        for metric, traces in self.gauges.items():
            value = None if down else self._load(shard, tick, traces)
            metrics[metric] = None if value is None else MetricValue(value=value, source="recorded")
        return Sample(shard=shard.address, server=shard.server, at=at, interval_s=self.interval, metrics=metrics)

    def run(self) -> list[Taken]:
        ticks = len(next(iter(self.traces.values())))
        history = self.db.effective_policy.history_samples
        for tick in range(ticks):
            at = START + timedelta(seconds=self.interval * tick)
            for shard in self.shards:
                window = self.windows.setdefault(shard.address, [])
                if tick not in self.silent.get(shard.server, ()):
                    sample = self._sample(shard, tick, at)
                    window.extend(self.dirty(sample, tick) if self.dirty else [sample])
                del window[:-history]
            observation = self._observation(at, tick)
            plan, decision = decide_round(self.desired, observation, self.paused)
            if self.on_round:
                self.on_round(tick, observation, plan, decision)
            for action in decision.autonomous:
                self._take(action, tick, at)
        return self.taken

    def _observation(self, at: datetime, tick: int) -> Observation:
        settings = planner.settings_of(self.db)
        recorded = CatalogDatabase(
            name="orders", key_column="customer_id", key_type="bigint", protect=False,
            policy_name=self.db.policy_name, policy=settings.policy, placement=settings.placement, state="active",
            schema_steps=self.steps, shards=tuple(self.shards))
        servers = {n: LiveServer(name=n, reachable=tick not in self.servers_down.get(n, ()), version="18.6",
                                 wal_level="logical", databases=()) for n in ("a", "b")}
        active = {s.address for s in self.shards}
        windows, notes = cleaning.clean({a: w for a, w in self.windows.items() if a in active})
        return Observation(
            catalog=CatalogState(exists=True, schema_version=4, serial=7, epoch=1, databases={"orders": recorded},
                                 reshard_events=tuple(self.events)),
            servers=servers, shards={},
            metrics=windows, metrics_notes=notes, metrics_source="recorded replay", taken_at=at, metrics_at=at)

    def _take(self, action, tick: int, at: datetime) -> None:
        sources = [action.source] if action.kind == "split_shard" else list(action.sources)
        targets = list(action.targets) if action.kind == "split_shard" else [action.target]
        latest_unknown = any(all(self.windows[f"orders/{s.name}"][-1].value(m) is None for m in METRICS)
                             for s in sources)
        self.taken.append(Taken(tick, at, action.kind, action.address,
                                tuple(_span(s.lo, s.hi) for s in sources), latest_unknown))
        names = {s.name for s in sources}
        self.shards = sorted([s for s in self.shards if s.name not in names] + [
            CatalogShard(database="orders", name=t.name, lo=t.lo, hi=t.hi, server=t.server, dbname=t.dbname,
                         state="active") for t in targets], key=lambda s: _span(s.lo, s.hi))
        for t in targets:
            # a new shard's history starts empty, as on a real split (its address is new)
            self.windows.pop(f"orders/{t.name}", None)
        self.events.append(ReshardEvent(at=at, database="orders",
                                        ranges=tuple((s.lo, s.hi) for s in [*sources, *targets])))


def flapping_pairs(taken: list[Taken], within: timedelta) -> list[tuple[Taken, Taken]]:
    """A split and a merge (either order) of overlapping key ranges less than `within` apart."""
    pairs = []
    for i, first in enumerate(taken):
        for second in taken[i + 1:]:
            if first.kind == second.kind or second.at - first.at >= within:
                continue
            if any(max(a_lo, b_lo) < min(a_hi, b_hi) for a_lo, a_hi in first.ranges for b_lo, b_hi in second.ranges):
                pairs.append((first, second))
    return pairs
