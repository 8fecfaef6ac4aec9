"""Recorded metric traces for detector and planner tests: made here, deterministic, in the same
shape the catalog stores and `plan --metrics FILE` reads."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from engine.observe.metrics import METRICS, MetricValue, Sample

START = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
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


# ---------------------------------------------------------------------------- the shapes of issue 31
# Eighteen shapes that production traffic has, one value a minute, written from the issue's
# description (not fitted to a seed: every shape takes a seed for its noise, and the tests and
# bench/forecast.py replay several). Each says what an experienced SRE would do: split ahead
# (the load will really cross the hot threshold) or nothing.


class Shape:
    """A scenario: the traces of one database's shards replayed together (minute values from
    `start`), what an SRE would decide, and for a young shard the history of its ancestors."""

    def __init__(self, name: str, decision: str, traces: dict[str, list[float | None]], *,
                 start: datetime = START, metric: str = "queries_per_second", threshold: float = 10000.0,
                 time_zone: str = "UTC", ancestors: dict[str, tuple[str, dict[str, list[float | None]],
                                                                   datetime]] | None = None,
                 why: str = "") -> None:
        self.name, self.decision, self.traces, self.start = name, decision, traces, start
        self.metric, self.threshold, self.time_zone, self.why = metric, threshold, time_zone, why
        # address -> (label, {ancestor address: minute values}, their start)
        self.ancestors = ancestors or {}

    def crossing(self, address: str, sustain_minutes: int = 5) -> datetime | None:
        """When the shard's load (unsplit) is first over the threshold for the sustain: the hot
        time a split ahead must beat."""
        run = 0
        for i, v in enumerate(self.traces[address]):
            run = run + 1 if v is not None and v > self.threshold else 0
            if run >= sustain_minutes:
                return self.start + timedelta(minutes=i - sustain_minutes + 1)
        return None


def _rng(name: str, seed: int):
    import random

    return random.Random(f"{name}:{seed}")


def _day_curve(minute: int, start: datetime, peak_hour: float = 14.0, zone: str = "UTC") -> float:
    """0 at night, 1 at the daily peak, in local time (DST-aware)."""
    from zoneinfo import ZoneInfo

    local = (start + timedelta(minutes=minute)).astimezone(ZoneInfo(zone))
    hour = local.hour + local.minute / 60
    return (1 + math.cos(2 * math.pi * (hour - peak_hour) / 24)) / 2


def _weekend(minute: int, start: datetime, zone: str = "UTC") -> bool:
    from zoneinfo import ZoneInfo

    return (start + timedelta(minutes=minute)).astimezone(ZoneInfo(zone)).weekday() >= 5


def _cycle(name: str, seed: int, days: float, peak, *, start: datetime = START, night: float = 0.3,
           weekend: float = 1.0, noise: float = 0.02, zone: str = "UTC", factor=None) -> list[float]:
    """A daily cycle whose peak is `peak(day)`, nights at `night` of it, weekends scaled."""
    rng = _rng(name, seed)
    out = []
    for minute in range(int(days * DAY)):
        day = minute / DAY
        top = peak(day) * (weekend if _weekend(minute, start, zone) else 1.0)
        value = top * (night + (1 - night) * _day_curve(minute, start, zone=zone))
        if factor is not None:
            value *= factor(minute, day)
        out.append(round(max(0.0, value * (1 + rng.gauss(0, noise))), 1))
    return out


def shape(name: str, seed: int = 1) -> Shape:  # noqa: C901 - one branch per shape, read side by side
    """One of SHAPES, its noise drawn from `seed`."""
    rng = _rng(name + ":shape", seed)
    jitter = 1 + rng.uniform(-0.03, 0.03)  # each seed moves the levels a little too
    a = "orders/-40"
    if name == "daily_growth":
        return Shape(name, "split", {a: _cycle(name, seed, 9, lambda d: 7500 * jitter * 1.04 ** d, night=0.33)},
                     why="a daily cycle growing 4% a day crosses on its eighth day")
    if name == "weekly_growth":
        return Shape(name, "split", {a: _cycle(name, seed, 12, lambda d: 7500 * jitter * 1.035 ** d, night=0.2,
                                               weekend=0.4)},
                     why="busy weekdays, quiet weekends, growing 3.5% a day: crosses on a Monday")
    if name in ("sale_three_weeks", "sale_short_history"):
        days, sale = (22, 14) if name == "sale_three_weeks" else (16, 9)
        def sale_day(minute: int, day: float) -> float:
            return 1.6 if int(day + 10 / 24) == sale else 1.0  # a whole calendar day (trace starts at 10:00)
        return Shape(name, "none", {a: _cycle(name, seed, days, lambda d: 5600 * jitter * 1.003 ** d, weekend=0.7,
                                              factor=sale_day)},
                     why=f"a sale day at 1.6 times the load, {days - sale} days before the end: a one-off")
    if name == "level_shift":
        def doubled(minute: int, day: float) -> float:
            return 1.8 if day >= 12.4 else 1.0
        return Shape(name, "split", {a: _cycle(name, seed, 16, lambda d: 3070 * jitter * 1.04 ** d, factor=doubled)},
                     why="a permanent step to 1.8 times the load (a new customer) on day 12, growing on: crosses"
                         " about 2.7 days later")
    if name == "plateau":
        return Shape(name, "none", {a: _cycle(name, seed, 21, lambda d: 5300 * jitter * 1.04 ** min(d, 12.0))},
                     why="grew 4% a day, stopped nine days ago at 85% of the threshold")
    if name == "reversal":
        return Shape(name, "none", {a: _cycle(name, seed, 21, lambda d: 5000 * jitter * (
            1.04 ** d if d < 14 else 1.04 ** 14 * 0.97 ** (d - 14)))},
            why="grew 4% a day for two weeks, falling 3% a day for the last week")
    if name == "holiday":
        def holiday(minute: int, day: float) -> float:
            return 0.35 if int(day + 10 / 24) == 12 else 1.0
        return Shape(name, "split", {a: _cycle(name, seed, 20, lambda d: 6020 * jitter * 1.03 ** d, factor=holiday)},
                     why="growth crossing on day 18, with a holiday at a third of the load on day 12")
    if name == "short_history_growth":
        return Shape(name, "split", {a: _cycle(name, seed, 6.5, lambda d: 8000 * jitter * 1.05 ** d, night=0.3,
                                               weekend=0.5)},
                     why="a new database with 4-6 days of history, a weekend inside, growing 5% a day: crosses"
                         " the Tuesday after")
    if name == "short_history_weekend":
        start = START + timedelta(days=2)  # a Saturday
        return Shape(name, "none", {a: _cycle(name, seed, 5, lambda d: 7000 * jitter, start=start, weekend=0.45)},
                     start=start, why="flat, history from a Saturday: the weekdays after the weekend are no growth")
    if name == "fresh_child":
        def parent(d: float) -> float:
            return 3800 * jitter * 1.08 ** d
        whole = _cycle(name, seed, 20, parent)
        split_at = 13 * DAY
        share = 0.62
        return Shape(name, "split", {a: [round(v * share, 1) for v in whole[split_at:]]},
                     start=START + timedelta(days=13),
                     ancestors={a: ("orders/-80", {"orders/-80": whole[:split_at]}, START)},
                     why="split 13 days in (its parent was hot), taking 62% of the load, growing 8% a day: crosses"
                         " six days after the split")
    if name == "merge_target":
        sources = {"orders/-20": _cycle(name + "l", seed, 18, lambda d: 4515 * jitter * 1.06 ** (d - 15)),
                   "orders/20-40": _cycle(name + "r", seed, 18, lambda d: 4515 * jitter * 1.06 ** (d - 15))}
        merged_at = 15 * DAY
        target = [round(x + y, 1) for x, y in zip(sources["orders/-20"], sources["orders/20-40"], strict=True)]
        return Shape(name, "split", {a: target[merged_at:]}, start=START + timedelta(days=15),
                     ancestors={a: ("orders/-20 + orders/20-40",
                                    {k: v[:merged_at] for k, v in sources.items()}, START)},
                     why="merged by hand on day 15 at 90% of the threshold, growing 6% a day: crosses 2.2 days"
                         " after the merge, before its own history reaches forecast.min_history")
    if name == "gaps":
        values: list[float | None] = list(_cycle(name, seed, 28, lambda d: 3560 * jitter * 1.04 ** d))
        for minute in range(3 * DAY, 11 * DAY):
            values[minute] = None  # eight days of no history (collection was down)
        return Shape(name, "split", {a: values}, why="eight missing days in four weeks, the newest 16 whole, growing"
                                                     " 4% a day: crosses on day 27")
    if name == "nightly_batch":
        def batch(minute: int, day: float) -> float:
            at = START + timedelta(minutes=minute)
            if at.hour == 2 and 10 <= at.minute < 32:
                return 7000 * jitter * 1.04 ** day / (800 + 2200 * _day_curve(minute, START))
            return 1.0
        return Shape(name, "split", {a: _cycle(name, seed, 11, lambda d: 3000.0, night=0.27, factor=batch)},
                     why="a nightly batch holds 22 minutes at 7,000/s, growing 4% a night: crosses on the"
                         " tenth night, invisible in hourly means (about 4,500/s)")
    if name == "flat_noisy":
        noise_rng = _rng(name + ":hourly", seed)
        hourly = [1 + noise_rng.gauss(0, 0.12) for _ in range(21 * 24 + 1)]
        return Shape(name, "none", {a: _cycle(name, seed, 21, lambda d: 6500 * jitter, night=1.0,
                                              factor=lambda m, d: hourly[m // 60])},
                     why="flat at 6,500/s with 12% hourly noise: never hot")
    if name == "storage_leak":
        leak_rng = _rng(name, seed)
        values = [round(55 * jitter + 1.9 * (m / DAY) + leak_rng.gauss(0, 0.05), 3) for m in range(14 * DAY)]
        return Shape(name, "split", {a: values}, metric="storage_percent", threshold=80.0,
                     why="a leak of 1.9 points a day from 55%: storage reaches 80% on day 13")
    if name == "queue":
        return Shape(name, "split", {f"orders/{r}": _cycle(name + r, seed, 9, lambda d: 7500 * jitter * 1.04 ** d,
                                                           night=0.33)
                                     for r in ("-40", "40-80", "80-c0", "c0-")},
                     why="four shards crossing within the same hour; one move at a time (max_concurrent 1)")
    if name == "dst":
        start = datetime(2026, 10, 20, 4, 0, tzinfo=START.tzinfo)  # New York leaves DST on 1 November
        return Shape(name, "split", {a: _cycle(name, seed, 17, lambda d: 6300 * jitter * 1.03 ** d, start=start,
                                               weekend=0.6, zone="America/New_York")},
                     start=start, time_zone="America/New_York",
                     why="a New York day and weekend across the end of daylight saving time, growing 3% a day:"
                         " crosses on day 16")
    raise ValueError(name)


SHAPES = ("daily_growth", "weekly_growth", "sale_three_weeks", "level_shift", "plateau", "reversal",
          "sale_short_history", "holiday", "short_history_growth", "short_history_weekend", "fresh_child",
          "merge_target", "gaps", "nightly_batch", "flat_noisy", "storage_leak", "queue", "dst")
