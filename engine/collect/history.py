"""The sample window a plan judges: the history stored in the catalog plus one fresh sample,
or a recorded file instead of both (what-if planning, CI without database access)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import psycopg
from pydantic import ValidationError

from engine.catalog import store
from engine.clock import system_clock
from engine.collect.sampling import FIRST_GAP, Begun, LiveSampler, SampleRound
from engine.config.loader import Desired
from engine.config.models import Policy, Retention
from engine.detect.forecast import MAX_FIT_HOURS, QUIET_SHARE
from engine.observe import cleaning, recorded, rollup
from engine.observe.metrics import METRICS, Reading, Sample
from engine.observe.models import CatalogShard, HourlySeries, Observation
from engine.observe.series import Series
from engine.servers.fleet import Fleet

DEFAULT_HISTORY = Policy().history_samples


def stored_history(conn: psycopg.Connection | None,
                   per_shard: int = 1000) -> tuple[dict[str, Series], dict[str, Reading]]:
    """The newest `per_shard` stored samples per shard (oldest first, in columns) and the newest
    stored reading per shard. Hours of raw samples may be kept; a window needs only its own."""
    samples: dict[str, Series] = {}
    last: dict[str, Reading] = {}
    if conn is None:
        return samples, last
    n = len(METRICS)
    for row in store.load_windows(conn, per_shard):
        shard, servers, at, interval = row[0], row[1], row[2], row[3]
        metric_columns = row[4:4 + 3 * n]
        samples[shard] = Series.columns(
            shard, servers, at, interval,
            values={m: metric_columns[3 * i] for i, m in enumerate(METRICS)},
            sources={m: list(zip(metric_columns[3 * i + 1] or (), metric_columns[3 * i + 2] or (), strict=True))
                     for i, m in enumerate(METRICS)})
        try:
            last[shard] = Reading.model_validate(row[4 + 3 * n])
        except ValidationError:
            continue  # a row written by another version: no previous reading rather than a guess
    return samples, last


def monitored_shards(observation: Observation) -> list[CatalogShard]:
    return [s for d in observation.catalog.databases.values() if d.state == "active"
            for s in d.shards if s.state == "active"
            and observation.servers.get(s.server) is not None and observation.servers[s.server].reachable]


def deepest_window(desired: Desired) -> int:
    """The most samples any declared database's window needs: what a plan reads per shard."""
    return max((db.effective_policy.history_samples for db in desired.databases.values()), default=DEFAULT_HISTORY)


def history_limits(desired: Desired, shards: list[CatalogShard]) -> dict[str, int]:
    limits = {}
    for s in shards:
        db = desired.databases.get(s.database)
        limits[s.address] = db.effective_policy.history_samples if db else DEFAULT_HISTORY
    return limits


def deadline(desired: Desired) -> float:
    """One server's reading deadline for the fleet's rounds: the shortest any database's policy
    asks for (a round serves every database)."""
    values = [db.effective_policy.metrics.deadline_seconds for db in desired.databases.values()]
    return min(values, default=Policy().metrics.deadline_seconds)


def retention_of(desired: Desired, shards: list[CatalogShard]) -> dict[str, Retention]:
    out = {}
    for s in shards:
        db = desired.databases.get(s.database)
        out[s.address] = db.effective_policy.metrics.retention if db else Retention()
    return out


def rolled_up(conn: psycopg.Connection | None, resolution: int, since: datetime,
              shards: list[str] | None = None) -> dict[str, tuple[Sample, ...]]:
    """The stored long history at one resolution (60 or 3600 s) from `since`: one Sample of
    metric means per bucket (engine.observe.rollup.bucket_sample)."""
    out: dict[str, list[Sample]] = {}
    if conn is None:
        return {}
    for row in store.load_rollups(conn, resolution, since, shards):
        means = [row[3 + 2 * i] for i in range(len(METRICS))]
        out.setdefault(row[0], []).append(rollup.bucket_sample(row[0], row[1], resolution, means))
    return {a: tuple(v) for a, v in out.items()}


def _moves(conn: psycopg.Connection | None) -> tuple:
    if conn is None or conn.closed or store.schema.installed_version(conn) < 1:
        return ()
    return tuple(store.finished_moves(conn))


def long_history(conn: psycopg.Connection | None, shards: list[CatalogShard], now: datetime,
                 desired: Desired | None = None) -> dict:
    """What forecasts are fitted on: the hourly means over the forecast's window of every
    address that has them, the monitored shards' and those of shards split or merged since (a
    young shard's forecast inherits its ancestors' history), with the peaks of the shards that
    could cross (`held_peaks`), and the finished moves (Observation.hourly and .moves)."""
    if conn is None or not shards:
        return {"moves": _moves(conn)}
    hourly = hourly_series(conn, now - timedelta(seconds=MAX_FIT_HOURS * 3600))
    if desired is not None:
        hourly = held_peaks(conn, hourly, desired, now)
    return {"hourly": hourly, "moves": _moves(conn)}


def hourly_series(conn: psycopg.Connection, since: datetime,
                  shards: list[str] | None = None) -> dict[str, HourlySeries]:
    """The stored hourly means from `since`, per shard, as columns (Observation.hourly)."""
    hour = timedelta(seconds=3600)
    n = len(METRICS)
    return {row[0]: HourlySeries(at=tuple(start + hour for start in row[1]),
                                 values={m: tuple(row[2 + i]) for i, m in enumerate(METRICS)},
                                 peaks={m: row[2 + n + i] for i, m in enumerate(METRICS) if row[2 + n + i] is not None},
                                 high_peaks={m: row[2 + 2 * n + i] for i, m in enumerate(METRICS)
                                             if row[2 + 2 * n + i] is not None})
            for row in store.load_hourly_columns(conn, since, shards)}


def held_peaks(conn: psycopg.Connection, hourly: dict[str, HourlySeries], desired: Desired,
               now: datetime) -> dict[str, HourlySeries]:
    """Each hour's level held for the sustain (HourlySeries.highs), from the 1-minute history
    (kept metrics.retention.minute), for the shards whose greatest sample reached QUIET_SHARE of
    a hot threshold: the others could not cross within the horizon, and reading minutes costs."""
    wanted: dict[tuple[str, int, float], list[str]] = {}
    for address, series in hourly.items():
        db = desired.databases.get(address.split("/")[0])
        if db is None:
            continue
        policy = db.effective_policy
        for metric in METRICS:
            threshold = getattr(policy.hot, metric)
            if threshold is not None and series.high_peaks.get(metric, 0.0) >= QUIET_SHARE * threshold:
                key = (metric, max(1, math.ceil(policy.sustain_seconds / 60)), policy.metrics.retention.minute)
                wanted.setdefault(key, []).append(address)
    held: dict[str, dict[str, dict[datetime, float]]] = {}
    for (metric, minutes, kept), addresses in sorted(wanted.items()):
        for shard, start, level in store.load_held(conn, metric, minutes, now - timedelta(seconds=kept), addresses):
            held.setdefault(shard, {}).setdefault(metric, {})[start + timedelta(hours=1)] = level
    out = dict(hourly)
    for shard, metrics in held.items():
        series = hourly[shard]
        out[shard] = series.model_copy(update={
            "highs": {m: tuple(levels.get(at) for at in series.at) for m, levels in metrics.items()},
            "high_peaks": {**series.high_peaks, **{m: max(v.values()) for m, v in metrics.items()}}})
    return out


def seed_recent(sampler: LiveSampler, desired: Desired, last: dict[str, Reading]) -> None:
    """Reuse a stored reading as the 'previous' one only while it is recent enough to make a
    meaningful rate (five intervals, at least a minute)."""
    now = system_clock()
    fresh = {}
    for address, reading in last.items():
        db = desired.databases.get(address.split("/")[0])
        interval = db.effective_policy.metrics.interval if db else 10.0
        if now - reading.at <= timedelta(seconds=max(5 * interval, 60.0)):
            fresh[address] = reading
    sampler.seed(fresh)


def with_metrics(desired: Desired, fleet: Fleet, conn: psycopg.Connection | None, observation: Observation,
                 metrics_file: str | recorded.Recording | None = None,
                 sampler: LiveSampler | None = None) -> Observation:
    """`metrics_file`: a recording to judge instead of live metrics, as a path or read already.
    The stored window plus a fresh sample (LiveMetrics), with nothing of the caller's between
    its readings."""
    live = LiveMetrics(desired, fleet, conn, observation, metrics_file, sampler)
    try:
        live.settle()
        return live.finish(observation)
    finally:
        live.close()


class LiveMetrics:
    """The load a plan judges, read around the plan's other work instead of around a sleep.

    Made right after the inventory: it reads the stored window from the catalog and, where it
    is fresh (every monitored shard has a sample newer than one `metrics.interval`: the daemon or
    `metrics collect` runs), uses it as it is. Otherwise a stored reading of the last few
    intervals is the previous one, and the shards without one get a first reading now. The
    caller then does its work (a plan inspects every shard), `settle()` takes the second reading of
    the servers whose rates come from pg_stat_database (flushed at most once a second: they wait
    out the second, before that work could count), and `finish(observation, spent)` the others',
    leaving out of each shard's statement counts what the inspection ran there (`spent`)."""

    def __init__(self, desired: Desired, fleet: Fleet, conn: psycopg.Connection | None, observation: Observation,
                 metrics_file: str | recorded.Recording | None = None, sampler: LiveSampler | None = None):
        self.desired, self.conn, self.now = desired, conn, observation.now()
        self.recording = (metrics_file if isinstance(metrics_file, recorded.Recording) or not metrics_file
                          else recorded.read(metrics_file))
        self.shards = monitored_shards(observation)
        self.sampler: LiveSampler | None = None
        self.owned = False
        self.begun: Begun | None = None
        self.rounds: list[SampleRound] = []
        self.history: dict[str, Series] = {}
        self.fresh_from_store = False
        if self.recording:
            return
        self.history, last = stored_history(conn, deepest_window(desired))
        self.fresh_from_store = bool(self.shards) and all(
            _newer_than_interval(desired, s.address, self.history.get(s.address), self.now) for s in self.shards)
        if self.shards and not self.fresh_from_store:
            self.owned = sampler is None
            self.sampler = sampler or LiveSampler(fleet, deadline=deadline(desired))
            seed_recent(self.sampler, desired, last)
            self.begun = self.sampler.begin(self.shards)
        self.long = long_history(conn, self.shards, self.now, desired)

    def settle(self) -> None:
        """The second reading of the shards whose rates come from pg_stat_database and had no
        previous one: taken before the caller's work on the shards, once their gap has passed."""
        if self.sampler is None or self.begun is None:
            return
        slow = [s for s in self.shards if self.begun.gaps.get(s.server, 0.0) >= FIRST_GAP]
        if slow:
            self.rounds.append(self.sampler.sample_round(slow, self.begun))

    def finish(self, observation: Observation, spent: dict[str, tuple[int, float]] | None = None) -> Observation:
        """The observation with its metrics: the stored window and this plan's fresh sample."""
        if self.recording:
            return _recorded(self.recording, observation, self.now, self.conn)
        metrics_at = self.now
        if self.sampler is not None:
            done = {a for r in self.rounds for a in (*r.pairs, *r.unknown)}
            rest = [s for s in self.shards if s.address not in done]
            if rest:
                sizes = {a: live.size_bytes for a, live in observation.shards.items() if live.size_bytes is not None}
                self.rounds.append(self.sampler.sample_round(rest, self.begun, own=_counted(observation, spent),
                                                             sizes=sizes))
        late: list[str] = []
        history = dict(self.history)
        for fresh in self.rounds:
            for address, (_, sample) in fresh.pairs.items():
                history[address] = _with(history.get(address), sample)
                metrics_at = max(metrics_at, sample.at)  # the fresh round is what the load is judged at
            # a server that did not answer in time: its shards' newest sample is unknown, so no
            # verdict rests on their older history, and the notes say which server and why
            for address, sample in fresh.unknown.items():
                history[address] = _with(history.get(address), sample)
            late.extend(fresh.notes())
        limits = history_limits(self.desired, self.shards)
        cleaned, notes = cleaning.clean(history)
        window = {a: v[-limits.get(a, DEFAULT_HISTORY):] for a, v in cleaned.items()}
        return observation.model_copy(update={
            "metrics": window, "metrics_source": "live", "metrics_notes": (*sorted(set(late)), *notes),
            "taken_at": self.now, "metrics_at": metrics_at, **self.long})

    def close(self) -> None:
        if self.owned and self.sampler is not None:
            self.sampler.close()


def _recorded(recording: recorded.Recording, observation: Observation, now: datetime,
              conn: psycopg.Connection | None) -> Observation:
    """A what-if on a recording: the load is judged as of the recording's newest sample, while
    the catalog's own events (cooldowns, expiry, grace periods) stay judged at the present."""
    samples = recording.samples
    latest = max((s.at(len(s) - 1) for s in samples.values() if len(s)), default=now)
    # a recording long enough for a forecast is rolled up as the catalog would have
    hourly = rollup.series_of(s for window in samples.values() for s in window)
    return observation.model_copy(update={"metrics": samples, "metrics_source": f"recorded {recording.path}",
                                          "metrics_notes": recording.notes, "taken_at": now, "metrics_at": latest,
                                          "hourly": hourly, "moves": _moves(conn)})


def _newer_than_interval(desired: Desired, address: str, window: Series | None, now: datetime) -> bool:
    if not window:
        return False
    db = desired.databases.get(address.split("/")[0])
    interval = db.effective_policy.metrics.interval if db else Policy().metrics.interval
    return (now - window.at(len(window) - 1)).total_seconds() <= interval


def _with(window: Series | None, sample: Sample) -> Series:
    return Series.of([sample]) if window is None else window.appended(sample)


def _counted(observation: Observation, spent: dict[str, tuple[int, float]] | None) -> dict[str, tuple[int, float]]:
    """What the plan's inspection ran on each shard, where pg_stat_statements counts it (its
    `track` is not `none`)."""
    if not spent:
        return {}
    counting = {name for name, live in observation.servers.items()
                if live.capabilities is None or live.capabilities.stat_statements_track != "none"}
    by_address = {s.address: s.server for db in observation.catalog.databases.values() for s in db.shards}
    return {a: cost for a, cost in spent.items() if by_address.get(a) in counting}


def collect(desired: Desired, conn: psycopg.Connection, observation: Observation,
            sampler: LiveSampler) -> SampleRound:
    """One recorded round: sample every monitored shard and store what was read in the catalog
    (a late server's unknown samples are returned, not stored)."""
    shards = monitored_shards(observation)
    fresh = sampler.sample_round(shards)
    store.save_samples(conn, list(fresh.pairs.values()), history_limits(desired, shards),
                       retention_of(desired, shards))
    return fresh


def stored_window(desired: Desired, conn: psycopg.Connection, observation: Observation,
                  now: datetime | None = None) -> Observation:
    """The stored window alone, as a daemon plans between its own collection rounds. A shard
    whose newest sample is older than the policy's detection.max_age (collection stalled) is
    judged `stale` by the detector, and one on a server that does not answer has no window here
    (unknown): nothing acts on an old picture."""
    now = now or system_clock()
    stored, notes = cleaning.clean(stored_history(conn, deepest_window(desired))[0])
    shards = monitored_shards(observation)
    limits = history_limits(desired, shards)
    window: dict[str, Series] = {}
    for shard in sorted(shards, key=lambda s: s.address):
        window[shard.address] = stored.get(shard.address, Series.of((), shard.address))[-limits[shard.address]:]
    return observation.model_copy(update={"metrics": window, "metrics_source": "live (daemon history)",
                                          "metrics_notes": notes, "taken_at": now, "metrics_at": now,
                                          **long_history(conn, shards, now, desired)})

