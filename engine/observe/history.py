"""The sample window a plan judges: the history stored in the catalog plus one fresh sample,
or a recorded file instead of both (what-if planning, CI without database access)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import psycopg
from pydantic import ValidationError

from engine.catalog import store
from engine.config.loader import Desired
from engine.config.models import Policy, Retention
from engine.detect.forecast import MAX_FIT_HOURS, QUIET_SHARE
from engine.observe import cleaning, recorded, rollup
from engine.observe.metrics import METRICS, Reading, Sample
from engine.observe.models import CatalogShard, HourlySeries, Observation
from engine.observe.sampling import LiveSampler, SampleRound
from engine.servers.fleet import Fleet

DEFAULT_HISTORY = Policy().history_samples


def stored_history(conn: psycopg.Connection | None,
                   per_shard: int = 1000) -> tuple[dict[str, list[Sample]], dict[str, Reading]]:
    """The newest `per_shard` stored samples per shard (oldest first) and the newest stored
    reading per shard. Hours of raw samples may be kept; a window needs only its own."""
    samples: dict[str, list[Sample]] = {}
    last: dict[str, Reading] = {}
    if conn is None:
        return samples, last
    for reading_json, sample_json in store.load_samples(conn, per_shard):
        try:
            reading, sample = Reading.model_validate(reading_json), Sample.model_validate(sample_json)
        except ValidationError:
            continue  # a row written by another version: skip it rather than guess
        samples.setdefault(sample.shard, []).append(sample)
        last[reading.shard] = reading
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
    now = datetime.now(UTC)
    fresh = {}
    for address, reading in last.items():
        db = desired.databases.get(address.split("/")[0])
        interval = db.effective_policy.metrics.interval if db else 10.0
        if now - reading.at <= timedelta(seconds=max(5 * interval, 60.0)):
            fresh[address] = reading
    sampler.seed(fresh)


def with_metrics(desired: Desired, fleet: Fleet, conn: psycopg.Connection | None, observation: Observation,
                 metrics_file: str | recorded.Recording | None = None) -> Observation:
    """`metrics_file`: a recording to judge instead of live metrics, as a path or read already."""
    now = observation.now()
    if metrics_file:
        # A what-if on a recording: the load is judged as of the recording's newest sample, while
        # the catalog's own events (cooldowns, expiry, grace periods) stay judged at the present.
        recording = metrics_file if isinstance(metrics_file, recorded.Recording) else recorded.read(metrics_file)
        samples, notes, metrics_file = recording.samples, recording.notes, recording.path
        latest = max((s.at for window in samples.values() for s in window), default=now)
        # a recording long enough for a forecast is rolled up as the catalog would have
        hourly = rollup.series_of(s for window in samples.values() for s in window)
        return observation.model_copy(update={"metrics": samples, "metrics_source": f"recorded {metrics_file}",
                                              "metrics_notes": notes, "taken_at": now, "metrics_at": latest,
                                              "hourly": hourly, "moves": _moves(conn)})
    shards = monitored_shards(observation)
    history, last = stored_history(conn, deepest_window(desired))
    metrics_at = now
    late: tuple[str, ...] = ()
    if shards:
        with LiveSampler(fleet, deadline=deadline(desired)) as sampler:
            seed_recent(sampler, desired, last)
            fresh = sampler.sample_round(shards)
            for address, (_, sample) in fresh.pairs.items():
                history.setdefault(address, []).append(sample)
                metrics_at = max(metrics_at, sample.at)  # the fresh round is what the load is judged at
            # a server that did not answer in time: its shards' newest sample is unknown, so no
            # verdict rests on their older history, and the notes say which server and why
            for address, sample in fresh.unknown.items():
                history.setdefault(address, []).append(sample)
            late = fresh.notes()
    limits = history_limits(desired, shards)
    cleaned, notes = cleaning.clean(history)
    notes = (*late, *notes)
    window = {a: v[-limits.get(a, DEFAULT_HISTORY):] for a, v in cleaned.items()}
    return observation.model_copy(update={"metrics": window, "metrics_source": "live", "metrics_notes": notes,
                                          "taken_at": now, "metrics_at": metrics_at,
                                          **long_history(conn, shards, now, desired)})


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
    now = now or datetime.now(UTC)
    stored, notes = cleaning.clean(stored_history(conn, deepest_window(desired))[0])
    shards = monitored_shards(observation)
    limits = history_limits(desired, shards)
    window: dict[str, tuple[Sample, ...]] = {}
    for shard in sorted(shards, key=lambda s: s.address):
        window[shard.address] = stored.get(shard.address, ())[-limits[shard.address]:]
    return observation.model_copy(update={"metrics": window, "metrics_source": "live (daemon history)",
                                          "metrics_notes": notes, "taken_at": now, "metrics_at": now,
                                          **long_history(conn, shards, now, desired)})

