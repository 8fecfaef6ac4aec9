"""Recorded metric traces for detector and planner tests: made here, deterministic, in the same
shape the catalog stores and `plan --metrics FILE` reads."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

from engine.observe.metrics import METRICS, MetricValue, Sample

START = datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc)
QUIET = {"queries_per_second": 5.0, "cpu_percent": 1.0, "memory_percent": 2.0, "storage_percent": 1.0,
         "connections": 1.0, "latency_ms": 0.5}


def samples(shard: str, series: dict[str, list[float | None]], *, server: str = "a", interval: float = 10.0,
            start: datetime = START, base: dict[str, float] | None = None) -> tuple[Sample, ...]:
    """Samples whose metrics follow `series` (one value per sample); others stay at `base`."""
    base = QUIET if base is None else base
    length = max(len(v) for v in series.values())
    out = []
    for i in range(length):
        metrics = {}
        for m in METRICS:
            value = series[m][i] if m in series else base.get(m)
            metrics[m] = None if value is None else MetricValue(value=float(value), source="recorded")
        out.append(Sample(shard=shard, server=server, at=start + timedelta(seconds=interval * i),
                          interval_s=interval, metrics=metrics))
    return tuple(out)


def unknown(shard: str, count: int, server: str = "a", start: datetime = START) -> tuple[Sample, ...]:
    """A server that is down: every metric unknown."""
    return samples(shard, {m: [None] * count for m in METRICS}, server=server, start=start)


def spike(peak: float, length: int = 10, at: int = 5, width: int = 2) -> list[float]:
    return [peak if at <= i < at + width else 100.0 for i in range(length)]


def hovering(threshold: float, length: int = 20, wobble: float = 0.04) -> list[float]:
    """Hovers within +-4% of the threshold: inside the default 10% tolerance band."""
    return [threshold * (1 + wobble * math.sin(i * 1.7)) for i in range(length)]


def diurnal(low: float, high: float, length: int = 144) -> list[float]:
    """One day at 10-minute resolution: busy through the day with a midday peak, flat at night."""
    return [low + (high - low) * max(0.0, math.sin(2 * math.pi * i / length)) ** 2 for i in range(length)]


def to_file(windows: dict[str, tuple[Sample, ...]]) -> dict:
    return {"samples": [s.model_dump(mode="json") for w in windows.values() for s in w]}


# ---------------------------------------------------------------------------- multi-day traces
# One value a minute for two weeks, deterministic (seeded noise): the load of one shard as the
# backtest and the forecast tests replay it. Hot threshold in mind: 10,000 queries/s.

DAY = 1440  # minutes


def _daily(minute: int, peak_hour: float = 14.0) -> float:
    """0 at night, 1 at the daily peak: a smooth busy day."""
    phase = 2 * math.pi * ((minute % DAY) / 60.0 - peak_hour) / 24.0
    return (1 + math.cos(phase)) / 2


def multi_day(kind: str, days: int = 21, seed: int = 7) -> list[float]:
    """daily: a daily cycle growing 4% a day, crossing 10,000/s on day 8; weekly: weekdays busy,
    weekends at a third, growing, crossing on a weekday of the second week; spikes: quiet with
    two-minute bursts to 15,000/s three times a day; quiet: a flat 400/s; nights: like daily but
    near zero at night, so split shards turn cold overnight (merge bait); growth_spikes: daily
    with the bursts on top."""
    import random

    rng = random.Random(f"{kind}:{seed}")
    out = []
    for minute in range(days * DAY):
        day = minute / DAY
        noise = 1 + rng.gauss(0, 0.02)
        if kind in ("daily", "growth_spikes"):
            value = (2500 + 5000 * _daily(minute)) * 1.04 ** day
        elif kind == "weekly":
            weekday = int(day) % 7 < 5
            value = (1500 + (6000 if weekday else 1500) * _daily(minute, 11.0)) * 1.035 ** day
        elif kind == "spikes":
            value = 2000.0
        elif kind == "quiet":
            value = 400.0
        elif kind == "nights":
            value = (40 + 7500 * _daily(minute) ** 3) * 1.04 ** day
        else:
            raise ValueError(kind)
        if kind in ("spikes", "growth_spikes") and (minute % (DAY // 3)) in (311, 312):
            value = 15000.0
        out.append(round(value * noise, 1))
    return out
