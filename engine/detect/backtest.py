"""Replaying a load trace under the reactive and the predictive policy: what each would have done.

Pure and deterministic: a trace (one metric of one shard, at a fixed interval), a policy, the
measured duration of a move, in; per policy the time spent over the hot threshold, every split
and merge with its cause, flapping pairs; and the forecast's error against what followed, out.

The model: a shard whose load is spread evenly over its keys. A split halves the load each
shard carries (a merge doubles it) once the move is done, `move_seconds` after it is decided;
a new shard's window starts empty, as on a real split. Both policies judge with the real
detector (engine.detect.detector.assess) every `autosplit.check_every`, honour the cooldown and
merge only cold shards whose summed peak stays out of the hot tolerance. The predictive policy
adds the forecast (engine.detect.forecast.fit, refreshed every hour on the hourly means so far,
scaled to the shard's share): a split when the forecast crosses the hot threshold within the
lead time, and no merge while the merged load is forecast to cross within the horizon. It never
merges on a forecast, and no forecast exists before `forecast.min_history`.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from engine.config.models import ColdThresholds, HotThresholds, Policy, span
from engine.detect.detector import assess
from engine.detect.forecast import LeadTime, LoadForecast, fit, lead_time, series
from engine.observe import rollup
from engine.observe.metrics import METRICS, UNITS, MetricValue, Sample
from engine.observe.models import HourlySeries

FLAP_WITHIN = timedelta(hours=24)  # a split and a merge of the same keys closer than this is flapping
COMPARE_SHARDS = 20  # plan --compare-policy replays the shards nearest their hot threshold


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Trace(Frozen):
    name: str
    metric: str
    start: datetime  # the time of the first value
    interval: float  # seconds between values
    values: tuple[float | None, ...]

    def at(self, i: int) -> datetime:
        return self.start + timedelta(seconds=self.interval * i)

    def samples(self) -> list[Sample]:
        return [_sample(self.name, self.metric, self.at(i), self.interval, v) for i, v in enumerate(self.values)]


class Decision(Frozen):
    at: datetime
    kind: Literal["split", "merge"]
    cause: Literal["load", "forecast"]
    shards_after: int
    why: str


class PolicyRun(Frozen):
    policy: Literal["reactive", "predictive"]
    over_seconds: float  # time a shard of the trace spent hot: over the threshold for the sustain or longer
    decisions: tuple[Decision, ...]
    flapping_pairs: int


class TraceResult(Frozen):
    trace: str
    metric: str
    threshold: float
    days: float
    reactive: PolicyRun
    predictive: PolicyRun
    forecasts: int  # hourly refreshes that produced a forecast
    forecast_error_percent: float | None  # absolute error of the next 24 h, as % of the actual load (WAPE)

    @property
    def reduction_percent(self) -> float | None:
        base = self.reactive.over_seconds
        return None if base == 0 else 100.0 * (base - self.predictive.over_seconds) / base


def _sample(shard: str, metric: str, at: datetime, interval: float, value: float | None) -> Sample:
    metrics: dict[str, MetricValue | None] = dict.fromkeys(METRICS)
    metrics[metric] = None if value is None else MetricValue(value=value, source="replayed")
    return Sample(shard=shard, server="", at=at, interval_s=interval, metrics=metrics)


def as_replayed(policy: Policy, metric: str, interval: float) -> Policy:
    """The policy judging only the traced metric (the others are not in the trace), at the
    trace's interval: its windows are in time, so a 5-minute sustain stays 5 minutes."""
    hot = HotThresholds.model_validate({m: getattr(policy.hot, m) if m == metric else None for m in METRICS})
    cold = ColdThresholds.model_validate({m: getattr(policy.cold, m) if m == metric else None for m in METRICS})
    detection = policy.detection.model_copy(update={
        "sustain": max(policy.sustain_seconds, 2 * interval), "cold_for": max(policy.cold_for_seconds, 2 * interval),
        "hot_samples": None, "window": None, "cold_window": None, "max_age": max(policy.max_age_seconds, 3 * interval)})
    return policy.model_copy(update={"hot": hot, "cold": cold, "detection": detection,
                                     "metrics": policy.metrics.model_copy(update={"interval": interval,
                                                                                  "history": None})})


def replay(trace: Trace, policy: Policy, move_seconds: float, lead: LeadTime, error: bool = True) -> TraceResult:
    policy = as_replayed(policy, trace.metric, trace.interval)
    threshold = getattr(policy.hot, trace.metric)
    if threshold is None:
        raise ValueError(f"the policy has no hot threshold for {trace.metric}")
    hourly = [(s.at, s.value(trace.metric)) for s in rollup.means(trace.samples(), 3600).get(trace.name, ())]
    reactive = _run(trace, policy, threshold, move_seconds, lead, hourly, predictive=False)
    predictive = _run(trace, policy, threshold, move_seconds, lead, hourly, predictive=True)
    made, wape = _forecast_error(trace, policy, hourly) if error else (0, None)
    return TraceResult(trace=trace.name, metric=trace.metric, threshold=threshold,
                       days=round(len(trace.values) * trace.interval / 86400, 2), reactive=reactive,
                       predictive=predictive, forecasts=made, forecast_error_percent=wape)


def _fit(trace: Trace, policy: Policy, hourly: list, now: datetime, share: float) -> LoadForecast | None:
    points = [(at, v * share) for at, v in hourly if v is not None and at <= now]
    return fit(trace.name, trace.metric, points, now, policy.forecast.horizon, policy.forecast.min_history)


def _run(trace: Trace, policy: Policy, threshold: float, move_seconds: float, lead: LeadTime, hourly: list,
         predictive: bool) -> PolicyRun:
    tol = policy.detection.tolerance_percent / 100.0
    check = timedelta(seconds=policy.autosplit.check_every)
    cooldown = timedelta(seconds=policy.autosplit.cooldown)
    shards = 1
    window: deque[Sample] = deque(maxlen=policy.history_samples)
    pending: tuple[str, datetime] | None = None
    last_event: datetime | None = None
    next_check = trace.start
    forecast: LoadForecast | None = None
    refreshed: datetime | None = None
    over = run = 0.0  # hot time: runs over the threshold as long as the sustain (a spike is not hot)
    decisions: list[Decision] = []
    for i, value in enumerate(trace.values):
        at = trace.at(i)
        if pending and at >= pending[1]:
            shards = shards * 2 if pending[0] == "split" else shards // 2
            pending, last_event = None, at
            window.clear()  # the new shards' addresses have no samples yet
            forecast = refreshed = None
        load = None if value is None else value / shards
        if load is not None and load > threshold:
            run += trace.interval
        else:
            over += run if run >= policy.sustain_seconds else 0.0
            run = 0.0
        window.append(_sample(trace.name, trace.metric, at, trace.interval, load))
        if at < next_check:
            continue
        next_check = at + check
        if predictive and (refreshed is None or at - refreshed >= timedelta(hours=1)):
            forecast, refreshed = _fit(trace, policy, hourly, at, 1.0 / shards), at
        if pending or (last_event is not None and at < last_event + cooldown):
            continue
        verdict = assess(trace.name, tuple(window), policy, at=at)
        if verdict.state == "hot":
            pending = ("split", at + timedelta(seconds=move_seconds))
            decisions.append(Decision(at=at, kind="split", cause="load", shards_after=shards * 2,
                                      why=verdict.evidence[0].describe()))
            continue
        crossing = forecast.crossing(threshold, upper=True) if forecast else None
        if forecast and crossing and crossing - at <= timedelta(seconds=lead.seconds):
            pending = ("split", at + timedelta(seconds=move_seconds))
            decisions.append(Decision(at=at, kind="split", cause="forecast", shards_after=shards * 2,
                                      why=forecast.describe(threshold, "", at)))
            continue
        if verdict.state == "cold" and shards > 1 and policy.automerge.enabled:
            merged_peak = 2 * max(e.high for e in verdict.evidence)
            if merged_peak >= threshold * (1 - tol):
                continue
            if predictive and forecast and any(2 * v > threshold for v in forecast.values):
                continue  # the merged shard is forecast to be hot again within the horizon
            pending = ("merge", at + timedelta(seconds=move_seconds))
            decisions.append(Decision(at=at, kind="merge", cause="load", shards_after=shards // 2,
                                      why=verdict.evidence[0].describe()))
    over += run if run >= policy.sustain_seconds else 0.0
    return PolicyRun(policy="predictive" if predictive else "reactive", over_seconds=over,
                     decisions=tuple(decisions), flapping_pairs=flapping(decisions))


def flapping(decisions: list[Decision]) -> int:
    """Pairs of a split and a merge (either order) closer than FLAP_WITHIN."""
    return sum(1 for i, a in enumerate(decisions) for b in decisions[i + 1:]
               if a.kind != b.kind and b.at - a.at < FLAP_WITHIN)


def _forecast_error(trace: Trace, policy: Policy, hourly: list) -> tuple[int, float | None]:
    """Refit every hour once there is enough history; compare the next 24 forecast hours with
    the hourly means that followed."""
    actual = {at: v for at, v in hourly if v is not None}
    made = 0
    error = total = 0.0
    for now, _ in hourly:
        forecast = _fit(trace, policy, hourly, now, 1.0)
        if forecast is None:
            continue
        made += 1
        for i, value in enumerate(forecast.values[:24]):
            seen = actual.get(forecast.at(i))
            if seen is not None:
                error += abs(value - seen)
                total += abs(seen)
    return made, (round(100.0 * error / total, 1) if total else None)


def trace_of(shard: str, metric: str, samples: list[Sample] | tuple[Sample, ...],
             interval: float = 60.0) -> Trace | None:
    """A trace on a regular grid from samples (raw or 1-minute means): rolled up to `interval`
    means, a missing bucket left unknown. None when nothing is known."""
    buckets = rollup.means(samples, int(interval)).get(shard, ())
    known = {s.at: s.value(metric) for s in buckets}
    if not any(v is not None for v in known.values()):
        return None
    first, last = min(known), max(known)
    count = int((last - first).total_seconds() // interval) + 1
    step = timedelta(seconds=interval)
    return Trace(name=shard, metric=metric, start=first, interval=interval,
                 values=tuple(known.get(first + step * i) for i in range(count)))


def backtest(histories: dict[str, tuple[Sample, ...]], policies: dict[str, Policy], metric: str,
             move_seconds: float, lead: LeadTime) -> list[TraceResult]:
    """Every shard's history replayed under its database's policy (by address prefix)."""
    out = []
    for shard, history in sorted(histories.items()):
        policy = policies.get(shard.split("/")[0])
        trace = trace_of(shard, metric, history)
        if policy is None or trace is None or getattr(policy.hot, metric) is None:
            continue
        out.append(replay(trace, policy, move_seconds, lead))
    return out


def render_text(results: list[TraceResult], source: str, move_seconds: float, lead: LeadTime) -> str:
    """The backtest as a person reads it: one block per shard, then the totals."""
    lines = [f"Backtest of {source}: each move takes {span(round(move_seconds))}; the predictive policy splits"
             f" {span(round(lead.seconds))} ahead ({lead.why}).", ""]
    if not results:
        return "\n".join([*lines, "No shard has history for this metric and a hot threshold for it."]) + "\n"
    for r in results:
        error = "no forecast (less history than forecast.min_history)" if r.forecast_error_percent is None \
            else f"{r.forecast_error_percent:g}% absolute error over the next 24 h ({r.forecasts} hourly forecasts)"
        lines.append(f"{r.trace}: {r.metric} over {r.days:g} days, hot threshold {r.threshold:g}; forecast: {error}")
        for run in (r.reactive, r.predictive):
            splits = sum(1 for d in run.decisions if d.kind == "split")
            merges = len(run.decisions) - splits
            ahead = sum(1 for d in run.decisions if d.cause == "forecast")
            lines.append(f"  {run.policy:<10}  hot for {span(round(run.over_seconds))}; {splits} splits"
                         f" ({ahead} on a forecast), {merges} merges, {run.flapping_pairs} flapping pairs")
            lines += [f"      {d.at.strftime('%Y-%m-%dT%H:%MZ')} {d.kind} ({d.cause}) -> {d.shards_after} shards"
                      for d in run.decisions]
    reactive = sum(r.reactive.over_seconds for r in results)
    predictive = sum(r.predictive.over_seconds for r in results)
    change = f"{100 * (reactive - predictive) / reactive:.0f}% less" if reactive else "no hot time either way"
    lines += ["", f"Hot time: reactive {span(round(reactive))}, predictive {span(round(predictive))} ({change})."]
    return "\n".join(lines) + "\n"


def current_forecasts(hourlies: dict[str, HourlySeries], policies: dict[str, Policy],
                      metric: str) -> list[dict]:
    """The forecast of every shard with hourly history, as of its newest hour (`shardctl forecast`)."""
    out: list[dict] = []
    for shard, hourly in sorted(hourlies.items()):
        policy = policies.get(shard.split("/")[0])
        if policy is None or not hourly:
            continue
        now = hourly.at[-1]
        f = fit(shard, metric, series(hourly, metric), now, policy.forecast.horizon, policy.forecast.min_history)
        threshold = getattr(policy.hot, metric)
        if f is None:
            out.append({"shard": shard, "forecast": None,
                        "summary": f"no forecast yet: {len(hourly)} hours of history, forecast.min_history is"
                                   f" {span(policy.forecast.min_history)}"})
        else:
            out.append({"shard": shard, "forecast": f.model_dump(mode="json"),
                        "summary": f.describe(threshold, UNITS.get(metric, ""), now) if threshold is not None
                        else f.describe(float("inf"), UNITS.get(metric, ""), now)})
    return out


def compare_policies(hourly: dict[str, HourlySeries | tuple[Sample, ...]], baseline: dict[str, Policy],
                     proposed: dict[str, Policy], moves: tuple = (), metric: str = "queries_per_second") -> list[str]:
    """`plan --compare-policy`: each shard's stored hourly history replayed under the baseline
    and the proposed policy, reactive and predictive. Hourly means are all a plan reads, so a
    shard is judged hot here when over the threshold for at least two hours (use `shardctl
    forecast --backtest` for the 1-minute replay)."""
    lines = []
    measured = sorted(m.seconds for m in moves)

    def nearness(item: tuple[str, HourlySeries | tuple[Sample, ...]]) -> float:
        policy = proposed.get(item[0].split("/")[0])
        threshold = getattr(policy.hot, metric) if policy else None
        peak = max((v for _, v in series(item[1], metric)), default=0.0)
        return peak / threshold if threshold else 0.0

    # the shards nearest their threshold: a replay costs a forecast an hour, so not all 10,000
    nearest = sorted(sorted(hourly.items(), key=nearness, reverse=True)[:COMPARE_SHARDS])
    for shard, history in nearest:
        database = shard.split("/")[0]
        trace = _hourly_trace(shard, metric, history)
        runs: list[str] = []
        acted = False  # a shard nothing happens to under either policy is left out
        for label, policies in (("baseline", baseline), ("proposed", proposed)):
            policy = policies.get(database)
            if policy is None or trace is None or getattr(policy.hot, metric) is None:
                break
            move = measured[len(measured) // 2] if measured else policy.forecast.default_move
            lead = lead_time(moves, None, policy.forecast.lead_margin, policy.forecast.default_move)
            result = replay(trace, policy, move, lead, error=False)
            acted |= any(run.decisions or run.over_seconds for run in (result.reactive, result.predictive))
            runs.append(f"{label}: " + ", ".join(
                f"{run.policy} hot {span(round(run.over_seconds))}"
                f" ({sum(d.kind == 'split' for d in run.decisions)} splits,"
                f" {sum(d.kind == 'merge' for d in run.decisions)} merges, {run.flapping_pairs} flapping)"
                for run in (result.reactive, result.predictive)))
        if len(runs) == 2 and trace is not None and acted:
            lines.append(f"{shard} ({len(trace.values)} hours of {metric}): " + "; ".join(runs))
    return lines


def _hourly_trace(shard: str, metric: str, history: HourlySeries | tuple[Sample, ...]) -> Trace | None:
    """An hourly trace on a regular grid (a missing hour unknown), from either form of history."""
    known = dict(series(history, metric))
    if not known:
        return None
    first, last = min(known), max(known)
    hours = int((last - first).total_seconds() // 3600) + 1
    return Trace(name=shard, metric=metric, start=first, interval=3600.0,
                 values=tuple(known.get(first + timedelta(hours=i)) for i in range(hours)))
