"""Load forecasts from the hourly history: a small method of our own, and the lead time of a split.

Method (pure Python, no numpy): a robust decomposition of the hourly means (the newest four
weeks), seasonal-naive in spirit and Holt-Winters in shape, fitted in logs because load grows
and swings in proportion (trend and season multiply):

- trend: with two weeks or more, the median over days of (day mean - the mean of the same
  weekday a week before) / 7, which a weekly cycle cannot bias; with less, the Theil-Sen slope
  (median of pairwise slopes) of the daily means. Either is robust to a spike;
- seasonality: the detrended values are grouped by hour of the week (two weeks or more) or hour
  of the day, and each group's median is the level + season of that hour: a weekly cycle holds
  the daily one, and a median ignores the odd spike; between one and two weeks, the daily shape
  is raised or lowered per weekday (a weekend);
- band: the 90th percentile of the absolute in-sample residuals, so spikes widen the band
  instead of moving the forecast.

Why not a library: statsmodels' Holt-Winters would pull in numpy, scipy and pandas (well over
100 MB) for what `fit` does in sixty lines; prophet is heavier still. The method is tested on
generated traces (tests/test_forecast.py) and its error is reported by `shardctl forecast
--backtest` on real history, so an operator sees how far to trust it.

`lead_time` turns the catalog's measured moves into the time a split needs ahead of a crossing.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from statistics import median

from pydantic import BaseModel, ConfigDict

from engine.config.models import Policy, span
from engine.observe.metrics import METRICS, UNITS
from engine.observe.models import HourlySeries, MoveRecord

History = HourlySeries | tuple | list  # Observation.hourly: columns from the catalog, or hourly Samples
HOUR = 3600.0
DAY_HOURS, WEEK_HOURS = 24, 168
MAX_FIT_HOURS = 28 * DAY_HOURS  # the newest four weeks: enough for weekly seasons, recent enough to adapt
BAND_QUANTILE = 0.9


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoadForecast(Frozen):
    """One metric of one shard, forecast hour by hour from `start` (the end of the first
    forecast hour); `band` is the half-width of the error band."""

    shard: str
    metric: str
    fitted_from: datetime  # the history it was fitted on: from the start of its first hour to the end of
    fitted_to: datetime  # its last, and how many hours
    fitted_hours: int
    seasonality: str  # "weekly" or "daily"
    trend_per_day: float  # percent a day
    band: float
    in_sample_error: float  # mean absolute in-sample residual
    start: datetime
    values: tuple[float, ...]
    # set when a plan acts on it: the hot threshold judged and the instant it was judged at
    threshold: float | None = None
    judged_at: datetime | None = None

    def at(self, i: int) -> datetime:
        return self.start + timedelta(hours=i)

    def crossing(self, threshold: float, upper: bool = False) -> datetime | None:
        """The start of the first forecast hour whose mean is over `threshold` (by the band's
        upper edge when `upper`), or None within the horizon: the hour's peak comes within it."""
        extra = self.band if upper else 0.0
        for i, value in enumerate(self.values):
            if value + extra > threshold:
                return self.at(i) - timedelta(hours=1)
        return None

    def describe(self, threshold: float, unit: str, now: datetime) -> str:
        peak = max(self.values)
        crossing, upper = self.crossing(threshold), self.crossing(threshold, upper=True)
        if crossing:
            when = (f"crosses {_num(threshold)}{unit} in the hour from {_time(crossing)}"
                    f" (in about {about(crossing - now)})")
        elif upper:
            when = (f"crosses {_num(threshold)}{unit} at the upper edge of its band in the hour from {_time(upper)}"
                    f" (in about {about(upper - now)})")
        else:
            when = f"stays under {_num(threshold)}{unit} for the next {span(len(self.values) * HOUR)}"
        return (f"{self.metric} forecast {when}; peak {_num(peak)}{unit} +- {_num(self.band)}{unit}"
                f" (90% band of in-sample residuals), trend {_signed(self.trend_per_day)}% a day,"
                f" {self.seasonality} seasonality,"
                f" fitted on {self.fitted_hours} hourly means from {_time(self.fitted_from)}"
                f" to {_time(self.fitted_to)}")


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "-") + _num(abs(x))


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%MZ")


def about(delta: timedelta) -> str:
    """A person's rounding of a time ahead: '40 minutes', '5 hours', '3 days'."""
    seconds = max(0.0, delta.total_seconds())
    if seconds < 5400:
        return f"{max(1, round(seconds / 60))} minutes"
    if seconds < 2 * 86400:
        return f"{round(seconds / 3600)} hours"
    return f"{round(seconds / 86400)} days"


def _hour_index(at: datetime) -> int:
    return math.floor(at.timestamp() / HOUR)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _trend(points: dict[int, float]) -> float:
    """Slope per hour, robust to spikes and (with two weeks) to a weekly cycle."""
    days: dict[int, list[float]] = {}
    for h, v in points.items():
        days.setdefault(h // DAY_HOURS, []).append(v)
    means = {d: sum(v) / len(v) for d, v in days.items() if len(v) >= DAY_HOURS * 3 // 4}
    if len(means) < 2:
        return 0.0
    weekly = [(means[d] - means[d - 7]) / 7 for d in means if d - 7 in means]
    if len(weekly) >= 3:
        return median(weekly) / DAY_HOURS
    ordered = sorted(means)
    slopes = [(means[b] - means[a]) / (b - a) for i, a in enumerate(ordered) for b in ordered[i + 1:]]
    return median(slopes) / DAY_HOURS


def fit(shard: str, metric: str, history: list[tuple[datetime, float]], now: datetime, horizon_seconds: float,
        min_history_seconds: float) -> LoadForecast | None:
    """Forecast `metric` from hourly (bucket end, mean) points, for the hours after `now`. None
    before `min_history_seconds` of history (or with too few hours known in it)."""
    known = [(at, v) for at, v in history if at <= now]
    if not known:
        return None
    newest = _hour_index(max(at for at, _ in known))
    points = {h: v for at, v in known if (h := _hour_index(at)) > newest - MAX_FIT_HOURS}
    first = min(points)
    span_hours = newest - first  # from the end of the first hour measured to the end of the last
    if span_hours * HOUR < min_history_seconds or len(points) < 0.75 * (span_hours + 1):
        return None
    # load grows and swings in proportion (a busy day is busier at its peak): fitted in logs,
    # trend and season multiply
    logs = {h: math.log1p(max(0.0, v)) for h, v in points.items()}
    slope = _trend(logs)
    period = WEEK_HOURS if span_hours >= 2 * WEEK_HOURS else DAY_HOURS
    groups: dict[int, list[float]] = {}
    for h, v in logs.items():
        groups.setdefault(h % period, []).append(v - slope * (h - newest))
    season = {p: median(v) for p, v in groups.items()}
    overall = median(v for vs in groups.values() for v in vs)
    # between one and two weeks: the daily shape, raised or lowered per weekday (a weekend)
    weekday: dict[int, float] = {}
    if period == DAY_HOURS and span_hours >= WEEK_HOURS:
        by_day: dict[int, list[float]] = {}
        for h, v in logs.items():
            by_day.setdefault((h // DAY_HOURS) % 7, []).append(v - slope * (h - newest) - season[h % period])
        weekday = {d: median(v) for d, v in by_day.items()}

    def fitted(h: int) -> float:
        return math.expm1(slope * (h - newest) + season.get(h % period, overall)
                          + weekday.get((h // DAY_HOURS) % 7, 0.0))

    residuals = [abs(v - fitted(h)) for h, v in points.items()]
    start = _hour_index(now) + 1
    steps = max(1, int(horizon_seconds // HOUR))
    values = tuple(round(max(0.0, fitted(start + i)), 3) for i in range(steps))
    return LoadForecast(
        shard=shard, metric=metric, fitted_from=datetime.fromtimestamp((first - 1) * HOUR, now.tzinfo),
        fitted_to=datetime.fromtimestamp(newest * HOUR, now.tzinfo), fitted_hours=len(points),
        seasonality="weekly" if period == WEEK_HOURS else "daily",
        trend_per_day=round(100 * math.expm1(slope * DAY_HOURS), 2),
        band=round(_quantile(residuals, BAND_QUANTILE), 3), in_sample_error=round(sum(residuals) / len(residuals), 3),
        start=datetime.fromtimestamp(start * HOUR, now.tzinfo), values=values)


class LeadTime(Frozen):
    seconds: float
    why: str


def lead_time(moves: list[MoveRecord] | tuple[MoveRecord, ...], size_bytes: float | None, margin: float,
              default_move: float) -> LeadTime:
    """How long before a crossing a split must start: the slowest past move of similar size
    (half to twice this shard's size; every move when sizes are unknown), plus the margin."""
    if not moves:
        return LeadTime(seconds=default_move + margin,
                        why=f"no move measured yet: forecast.default_move {span(default_move)} + margin {span(margin)}")
    similar = [m for m in moves if size_bytes is None or m.size_bytes is None
               or 0.5 * size_bytes <= m.size_bytes <= 2 * size_bytes]
    if similar:
        slowest = max(m.seconds for m in similar)
        what = f"the slowest of {len(similar)} past moves of similar size took {span(round(slowest))}"
    else:  # none alike: scale the nearest in size by the size ratio
        assert size_bytes is not None
        nearest = min(moves, key=lambda m: abs(math.log((m.size_bytes or 1.0) / max(size_bytes, 1.0))))
        slowest = nearest.seconds * size_bytes / max(nearest.size_bytes or 1.0, 1.0)
        what = (f"the nearest past move in size took {span(round(nearest.seconds))},"
                f" scaled by size to {span(round(slowest))}")
    return LeadTime(seconds=slowest + margin, why=f"{what}, + margin {span(margin)}")


def series(hourly, metric: str) -> list[tuple[datetime, float]]:
    """(bucket end, mean) of one metric, known values only, from an HourlySeries or hourly
    Samples (Observation.hourly holds either)."""
    if isinstance(hourly, HourlySeries):
        return hourly.known(metric)
    return [(s.at, v) for s in hourly if (v := s.value(metric)) is not None]


def peak(hourly: History, metric: str) -> float:
    """The greatest known hourly mean, without building the series (a plan asks it of every shard)."""
    if isinstance(hourly, HourlySeries):
        return hourly.peaks.get(metric, 0.0)
    return max((v for _, v in series(hourly, metric)), default=0.0)


def outlook(shard: str, metric: str, hourly: History, threshold: float, now: datetime, policy: Policy,
            horizon: float | None = None) -> tuple[LoadForecast, datetime | None] | None:
    """A shard's forecast of one metric and when it would cross `threshold` (by its band's upper
    edge), or None before the policy's minimum history, or when its busiest hour is under
    QUIET_SHARE of the threshold (it would have to double within the horizon: a plan over
    10,000 shards fits only those that could cross)."""
    if peak(hourly, metric) < QUIET_SHARE * threshold:
        return None
    f = fit(shard, metric, series(hourly, metric), now, horizon or policy.forecast.horizon,
            policy.forecast.min_history)
    return None if f is None else (f, f.crossing(threshold, upper=True))


QUIET_SHARE = 0.5
STORAGE_HORIZON = 30 * 86400.0  # storage grows slowly: say when it fills up to a month ahead


def storage_note(shard: str, hourly: History, policy: Policy, now: datetime) -> str | None:
    """'storage reaches 80% in about 3 days', for status, plan notes and the dashboard."""
    threshold = policy.hot.storage_percent
    if threshold is None:
        return None
    found = outlook(shard, "storage_percent", hourly, threshold, now, policy, STORAGE_HORIZON)
    if found is None:
        return None
    f, crossing = found
    if crossing is None:
        return None
    return (f"storage reaches {_num(threshold)}% in about {about(crossing - now)} (forecast"
            f" {_num(f.values[0])}% now, trend {_signed(f.trend_per_day)}% a day, fitted on {f.fitted_hours} hours)")


def merged_forecast_hot(hourly: list[History], policy: Policy, now: datetime) -> str | None:
    """Would shards merged from these (their hourly histories) be forecast hot within the
    horizon? Additive metrics only; None when no forecast can tell (before min_history)."""
    for metric in ("queries_per_second", "connections", "cpu_percent", "memory_percent", "storage_percent"):
        threshold = getattr(policy.hot, metric)
        if threshold is None:
            continue
        totals: dict[datetime, float] = {}
        counts: dict[datetime, int] = {}
        for history in hourly:
            for at, v in series(history, metric):
                totals[at] = totals.get(at, 0.0) + v
                counts[at] = counts.get(at, 0) + 1
        joint = [(at, v) for at, v in sorted(totals.items()) if counts[at] == len(hourly)]
        f = fit("merged", metric, joint, now, policy.forecast.horizon, policy.forecast.min_history)
        crossing = f.crossing(threshold, upper=True) if f else None
        if f and crossing:
            return (f"together their {metric} is forecast over the hot threshold {_num(threshold)} in the hour"
                    f" from {_time(crossing)} (in about {about(crossing - now)}), so the merged shard would be split"
                    " again")
    return None


def shard_outlook(shard: str, hourly: History, policy: Policy,
                  now: datetime) -> tuple[list[str], list[LoadForecast]]:
    """What a shard's forecasts say, for status and the dashboard: a line for storage's fill
    date and for each hot threshold crossed within the horizon, and every metric's forecast
    (threshold set) for the charts' band. Nothing before the minimum history, or when off."""
    if not hourly or policy.forecast.mode == "off":
        return [], []
    lines = [note] if (note := storage_note(shard, hourly, policy, now)) else []
    forecasts = []
    for metric in METRICS:
        threshold = getattr(policy.hot, metric)
        if threshold is None:
            continue
        found = outlook(shard, metric, hourly, threshold, now, policy)
        if found is None:
            continue
        forecasts.append(found[0].model_copy(update={"threshold": threshold, "judged_at": now}))
        if found[1] and metric != "storage_percent":
            lines.append(found[0].describe(threshold, UNITS.get(metric, ""), now))
    return lines, forecasts
