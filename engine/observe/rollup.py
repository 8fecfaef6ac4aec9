"""Rolling samples up into time buckets: the arithmetic of the long history, with no I/O.

The catalog stores, per shard and bucket (1 minute, 1 hour), each metric's sum, count of known
values and maximum (engine/catalog/store.py upserts what `rollup_rows` returns); recorded files
and the backtest roll their samples up here the same way, so a forecast fitted on a recording
sees what it would have seen in the catalog.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from engine.observe.metrics import METRICS, MetricValue, Sample
from engine.observe.models import HourlySeries

ROLLUPS = (60, 3600)  # seconds per bucket of the long history (metric_rollups.resolution)


def bucket_of(at: datetime, resolution: int) -> datetime:
    seconds = int(at.timestamp())
    return datetime.fromtimestamp(seconds - seconds % resolution, UTC)


def _accumulate(samples: Iterable[Sample], resolutions: tuple[int, ...]) -> dict[tuple[str, int, datetime], list]:
    acc: dict[tuple[str, int, datetime], list] = {}
    for sample in samples:
        for resolution in resolutions:
            # a sample stamped exactly on a boundary measured the interval before it
            key = (sample.shard, resolution, bucket_of(sample.at - timedelta(microseconds=1), resolution))
            row = acc.setdefault(key, [0] + [0.0, 0, None] * len(METRICS))
            row[0] += 1
            for i, metric in enumerate(METRICS):
                value = sample.value(metric)
                if value is None:
                    continue  # unknown is not counted: never a zero in a mean
                row[1 + 3 * i] += value
                row[2 + 3 * i] += 1
                high = row[3 + 3 * i]
                row[3 + 3 * i] = value if high is None else max(high, value)
    return acc


def rollup_rows(samples: Iterable[Sample]) -> list[tuple]:
    """Each sample's contribution to its 1-minute and 1-hour buckets, summed per bucket:
    (shard, resolution, bucket, samples, then sum, n, max of each metric)."""
    return [(*key, *row) for key, row in sorted(_accumulate(samples, ROLLUPS).items())]


def bucket_sample(shard: str, bucket: datetime, resolution: int, means: list[float | None]) -> Sample:
    """A bucket as a Sample of metric means, stamped at its end (as a raw sample is stamped at
    the end of the interval it measured)."""
    label = f"{resolution // 60} min mean" if resolution < 3600 else f"{resolution // 3600} h mean"
    metrics = {m: None if v is None else MetricValue(value=round(v, 3), source=label) for m, v in zip(METRICS, means,
                                                                                                     strict=True)}
    return Sample(shard=shard, server="", at=bucket + timedelta(seconds=resolution), interval_s=float(resolution),
                  metrics=metrics)


def means(samples: Iterable[Sample], resolution: int) -> dict[str, tuple[Sample, ...]]:
    """Samples rolled up to one resolution, per shard, oldest first."""
    out: dict[str, list[Sample]] = {}
    for (shard, _, bucket), row in sorted(_accumulate(samples, (resolution,)).items()):
        values = [row[1 + 3 * i] / row[2 + 3 * i] if row[2 + 3 * i] else None for i in range(len(METRICS))]
        out.setdefault(shard, []).append(bucket_sample(shard, bucket, resolution, values))
    return {a: tuple(v) for a, v in out.items()}


def series_of(samples: Iterable[Sample], resolution: int = 3600, sustain: float = 300.0) -> dict[str, HourlySeries]:
    """Samples rolled up to one resolution, per shard, as columns (Observation.hourly), with each
    bucket's highs where the samples are finer than 15 minutes: the level held for `sustain`
    (k minutes in a row of 1-minute means, k = sustain in minutes), what a hot verdict is judged on."""
    samples = list(samples)
    out: dict[str, tuple[list, list[list]]] = {}
    for (shard, _, bucket), row in sorted(_accumulate(samples, (resolution,)).items()):
        at, columns = out.setdefault(shard, ([], [[] for _ in METRICS]))
        at.append(bucket + timedelta(seconds=resolution))
        for i in range(len(METRICS)):
            columns[i].append(row[1 + 3 * i] / row[2 + 3 * i] if row[2 + 3 * i] else None)
    fine = [s for s in samples if s.interval_s is not None and s.interval_s < 900]
    highs = _highs(fine, resolution, max(1, math.ceil(sustain / 60))) if fine else {}
    series = {}
    for shard, (at, columns) in out.items():
        held = highs.get(shard)
        series[shard] = HourlySeries(
            at=tuple(at), values={m: tuple(c) for m, c in zip(METRICS, columns, strict=True)},
            highs={m: tuple(held.get((b, m)) for b in at) for m in METRICS
                   if any(held.get((b, m)) is not None for b in at)} if held else {})
    return series


def _highs(samples: list[Sample], resolution: int, k: int) -> dict[str, dict[tuple[datetime, str], float]]:
    """Per shard, (bucket end, metric) -> the level held for k minutes in a row inside the bucket:
    the greatest, over runs of k consecutive 1-minute means, of the run's least (a hot verdict's
    rule: over the threshold without a break for the sustain). With fewer minutes, their least."""
    per_bucket: dict[tuple[str, datetime, str], dict[datetime, float]] = {}
    for (shard, _, minute), row in _accumulate(samples, (60,)).items():
        end = bucket_of(minute, resolution) + timedelta(seconds=resolution)
        for i, metric in enumerate(METRICS):
            if row[2 + 3 * i]:
                per_bucket.setdefault((shard, end, metric), {})[minute] = row[1 + 3 * i] / row[2 + 3 * i]
    step = timedelta(seconds=60)
    out: dict[str, dict[tuple[datetime, str], float]] = {}
    for (shard, end, metric), minutes in per_bucket.items():
        held: float | None = None
        for first in minutes:
            run = [v for j in range(k) if (v := minutes.get(first + step * j)) is not None]
            if len(run) == k:
                held = min(run) if held is None else max(held, min(run))
        out.setdefault(shard, {})[(end, metric)] = held if held is not None else min(minutes.values())
    return out
