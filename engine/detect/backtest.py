"""Replaying load traces under the reactive and the predictive policy: what each would have done.

Pure and deterministic: traces (one metric of one shard each, at a fixed interval), a policy,
the measured duration of a move, in; per trace and policy the time spent over the hot threshold,
every split and merge with its cause, flapping pairs; and the forecast's error against what
followed, out.

The model: a shard whose load is spread evenly over its keys. A split halves the load each
shard carries (a merge doubles it) once its moves are done; a new shard's window starts empty,
as on a real split. Moves queue as the planner queues them: at most `autosplit.max_concurrent`
run at once over all the traces replayed together (a database's shards), and a trace's split
moves each of its shards in turn, `move_seconds` each. Both policies judge with the real
detector (engine.detect.detector.assess) every `autosplit.check_every`, honour the cooldown
(judged at each replayed instant, the replay's present) and merge only cold shards whose summed
peak stays out of the hot tolerance. The predictive policy adds the forecast
(engine.detect.forecast.fit, refreshed every hour on the hourly history so far, scaled to the
shard's share, with a lineage's history before the trace's own): a split when the forecast
crosses the hot threshold within the lead time, the lead time of the n-th split of a batch
counting the n moves before it is done; and no merge while the merged load is forecast to cross
within the horizon. It never merges on a forecast, and no forecast exists before
`forecast.min_history`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from engine.config.models import ColdThresholds, HotThresholds, Policy
from engine.detect.detector import Assessment, assess
from engine.detect.forecast import QUIET_SHARE, LeadTime, Lineage, LoadForecast, counted, fit, highs, lead_time, series
from engine.durations import span
from engine.frozen import Frozen
from engine.observe import rollup
from engine.observe.metrics import METRICS, UNITS, MetricValue, Sample
from engine.observe.models import HourlySeries

FLAP_WITHIN = timedelta(hours=24)  # a split and a merge of the same keys closer than this is flapping
COMPARE_SHARDS = 20  # plan --compare-policy replays the shards nearest their hot threshold
ERROR_HOURS = 48  # the forecast's error is judged over the next 48 hours (WAPE)
ERROR_EVERY = 6  # ... of a forecast made every sixth hour




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
    done_at: datetime | None = None  # when its moves finished (None: still running at the end)


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
    forecasts: int  # forecasts whose next 48 h were compared with what followed
    forecast_error_percent: float | None  # absolute error of the next 48 h, as % of the actual load (WAPE)

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


def replay(trace: Trace, policy: Policy, move_seconds: float, lead: LeadTime, error: bool = True,
           lineage: Lineage | None = None) -> TraceResult:
    return replay_together([trace], policy, move_seconds, lead, error, {trace.name: lineage} if lineage else None)[0]


def replay_together(traces: list[Trace], policy: Policy, move_seconds: float, lead: LeadTime, error: bool = True,
                    lineages: dict[str, Lineage] | None = None) -> list[TraceResult]:
    """Traces of one database's shards (one metric, one interval), replayed together: their
    moves share the queue (`autosplit.max_concurrent`)."""
    if not traces:
        return []
    metric, interval = traces[0].metric, traces[0].interval
    if any(t.metric != metric or t.interval != interval for t in traces):
        raise ValueError("traces replayed together share one metric and one interval")
    policy = as_replayed(policy, metric, interval)
    threshold = getattr(policy.hot, metric)
    if threshold is None:
        raise ValueError(f"the policy has no hot threshold for {metric}")
    lineages = lineages or {}
    hourly = {t.name: rollup.series_of(t.samples(), 3600, policy.sustain_seconds).get(t.name) for t in traces}
    runs = {}
    for predictive in (False, True):
        states = [_State(t, hourly[t.name], lineages.get(t.name)) for t in traces]
        _run(states, policy, threshold, move_seconds, lead, predictive)
        runs[predictive] = {s.trace.name: s.result(policy, predictive) for s in states}
    out = []
    for t in traces:
        made, wape = _forecast_error(t, policy, hourly[t.name], lineages.get(t.name)) if error else (0, None)
        out.append(TraceResult(trace=t.name, metric=metric, threshold=threshold,
                               days=round(len(t.values) * t.interval / 86400, 2), reactive=runs[False][t.name],
                               predictive=runs[True][t.name], forecasts=made, forecast_error_percent=wape))
    return out


def _fit(trace: Trace, policy: Policy, hourly: HourlySeries | None, now: datetime, share: float,
         lineage: Lineage | None = None, threshold: float | None = None) -> LoadForecast | None:
    if hourly is None:
        return None
    points = [(at, v * share) for at, v in hourly.known(trace.metric) if at <= now]
    high = [(at, v * share) for at, v in hourly.known(trace.metric, highs=True) if at <= now]
    if threshold is not None and lineage is None and max((v for _, v in high or points), default=0.0) < (
            QUIET_SHARE * threshold):
        return None  # it would have to double within the horizon: not fitted, as in a plan
    # a lineage needs no scaling here: the fit scales it by the share its own first hours took
    return fit(trace.name, trace.metric, points, now, policy.forecast.horizon, policy.forecast.min_history,
               time_zone=policy.forecast.time_zone, highs=high or None, lineage=lineage)


@dataclass
class _State:
    trace: Trace
    hourly: HourlySeries | None
    lineage: Lineage | None
    shards: int = 1
    window: deque = field(default_factory=deque)
    pending: tuple[str, datetime] | None = None
    last_event: datetime | None = None
    forecast: LoadForecast | None = None
    refreshed: datetime | None = None
    over: float = 0.0
    run: float = 0.0
    decisions: list[Decision] = field(default_factory=list)

    def result(self, policy: Policy, predictive: bool) -> PolicyRun:
        over = self.over + (self.run if self.run >= policy.sustain_seconds else 0.0)
        return PolicyRun(policy="predictive" if predictive else "reactive", over_seconds=over,
                         decisions=tuple(self.decisions), flapping_pairs=flapping(self.decisions))

    def start(self, kind: Literal["split", "merge"], cause: Literal["load", "forecast"], at: datetime,
              move_seconds: float, why: str) -> None:
        moves = self.shards if kind == "split" else max(1, self.shards // 2)
        self.pending = (kind, at + timedelta(seconds=move_seconds * moves))
        self.decisions.append(Decision(at=at, kind=kind, cause=cause,
                                       shards_after=self.shards * 2 if kind == "split" else self.shards // 2, why=why))


def _run(states: list[_State], policy: Policy, threshold: float, move_seconds: float, lead: LeadTime,
         predictive: bool) -> None:
    interval = states[0].trace.interval
    tol = policy.detection.tolerance_percent / 100.0
    cold_threshold = getattr(policy.cold, states[0].trace.metric)
    check = timedelta(seconds=policy.autosplit.check_every)
    cooldown = timedelta(seconds=policy.autosplit.cooldown)
    slots = policy.autosplit.max_concurrent
    first = min(s.trace.start for s in states)
    last = max(s.trace.at(len(s.trace.values) - 1) for s in states)
    steps = int((last - first).total_seconds() // interval) + 1
    offsets = [int((s.trace.start - first).total_seconds() // interval) for s in states]
    for s in states:
        s.window = deque(maxlen=policy.history_samples)
    next_check = first
    for step in range(steps):
        at = first + timedelta(seconds=interval * step)
        for s, offset in zip(states, offsets, strict=True):
            i = step - offset
            if not 0 <= i < len(s.trace.values):
                continue
            if s.pending and at >= s.pending[1]:
                s.shards = s.shards * 2 if s.pending[0] == "split" else s.shards // 2
                s.decisions[-1] = s.decisions[-1].model_copy(update={"done_at": at})
                s.pending, s.last_event = None, at
                s.window.clear()  # the new shards' addresses have no samples yet
                s.forecast = s.refreshed = None
            value = s.trace.values[i]
            load = None if value is None else value / s.shards
            if load is not None and load > threshold:
                s.run += interval
            else:
                s.over += s.run if s.run >= policy.sustain_seconds else 0.0
                s.run = 0.0
            s.window.append((at, load))
        if at < next_check:
            continue
        next_check = at + check
        _decide(states, offsets, step, at, policy, threshold, cold_threshold, tol, cooldown, slots, move_seconds,
                lead, predictive)


def _decide(states: list[_State], offsets: list[int], step: int, at: datetime, policy: Policy, threshold: float,
            cold_threshold: float | None, tol: float, cooldown: timedelta, slots: int, move_seconds: float,
            lead: LeadTime, predictive: bool) -> None:
    live = [s for s, offset in zip(states, offsets, strict=True) if 0 <= step - offset < len(s.trace.values)]
    if predictive:
        _refresh_forecasts(live, at, policy, threshold)
    busy = sum(1 for s in states if s.pending)
    ready = [s for s in live if not s.pending and not (s.last_event is not None and at < s.last_event + cooldown)]
    verdicts = _verdicts(ready, at, policy, threshold, cold_threshold)
    for s in ready:  # the load first, as in a plan
        verdict = verdicts.get(s.trace.name)
        if verdict is not None and verdict.state == "hot" and busy < slots:
            s.start("split", "load", at, move_seconds, verdict.evidence[0].describe())
            busy += 1
    if predictive:
        busy = _split_ahead(live, ready, busy, at, threshold, slots, move_seconds, lead)
    for s in ready:
        verdict = verdicts.get(s.trace.name)
        if verdict is not None and busy < slots and _merges(s, verdict, at, policy, threshold, tol, predictive):
            s.start("merge", "load", at, move_seconds, verdict.evidence[0].describe())
            busy += 1


def _refresh_forecasts(live: list[_State], at: datetime, policy: Policy, threshold: float) -> None:
    """Each live trace's forecast, refitted hourly."""
    for s in live:
        if s.refreshed is None or at - s.refreshed >= timedelta(hours=1):
            s.forecast = _fit(s.trace, policy, s.hourly, at, 1.0 / s.shards, s.lineage, threshold)
            s.refreshed = at


def _verdicts(ready: list[_State], at: datetime, policy: Policy, threshold: float,
              cold_threshold: float | None) -> dict[str, Assessment]:
    """The detector's verdict on each ready trace whose newest load is hot or cold."""
    verdicts = {}
    for s in ready:
        newest = s.window[-1][1] if s.window else None
        if newest is None or (newest <= threshold and (cold_threshold is None or newest >= cold_threshold)):
            continue  # neither hot nor cold can be judged on a window whose newest load is between them
        samples = tuple(_sample(s.trace.name, s.trace.metric, t, s.trace.interval, v) for t, v in s.window)
        verdicts[s.trace.name] = assess(s.trace.name, samples, policy, at=at)
    return verdicts


def _merges(s: _State, verdict: Assessment, at: datetime, policy: Policy, threshold: float, tol: float,
            predictive: bool) -> bool:
    """A cold trace's shards merge: automerge is on, the merged load stays clear of the threshold,
    and (predicting) the merged shard is not forecast to be hot again within the horizon."""
    if s.pending or verdict.state != "cold" or s.shards <= 1 or not policy.automerge.enabled:
        return False
    if 2 * max(e.high for e in verdict.evidence) >= threshold * (1 - tol):
        return False
    merged = _fit(s.trace, policy, s.hourly, at, 2.0 / s.shards, s.lineage, threshold) if predictive else None
    return merged is None or merged.crossing(threshold) is None


def _split_ahead(live: list[_State], ready: list[_State], busy: int, at: datetime, threshold: float, slots: int,
                 move_seconds: float, lead: LeadTime) -> int:
    """The shards forecast to cross, in the order of their crossings, are a batch: the n-th waits
    for the moves before it, so the batch starts when any of them is within its lead time."""
    ahead = sorted(((c, s) for s in live if s.forecast and (c := s.forecast.crossing(threshold))),
                   key=lambda pair: (pair[0], pair[1].trace.name))
    position, due = busy, False
    for crossing, s in ahead:
        position += 1 if s.pending else s.shards
        due |= crossing - at <= timedelta(seconds=lead.queued(position, slots).seconds)
    for _, s in ahead if due else ():
        if s in ready and not s.pending and busy < slots and s.forecast is not None:
            s.start("split", "forecast", at, move_seconds, s.forecast.describe(threshold, "", at))
            busy += 1
    return busy


def flapping(decisions: list[Decision]) -> int:
    """Pairs of a split and a merge (either order) closer than FLAP_WITHIN."""
    return sum(1 for i, a in enumerate(decisions) for b in decisions[i + 1:]
               if a.kind != b.kind and b.at - a.at < FLAP_WITHIN)


def _forecast_error(trace: Trace, policy: Policy, hourly: HourlySeries | None,
                    lineage: Lineage | None = None) -> tuple[int, float | None]:
    """Refit every ERROR_EVERY hours once there is enough history; compare the next 48 forecast
    hours with the hourly means that followed (WAPE: the summed absolute error over the summed load)."""
    if hourly is None:
        return 0, None
    actual = dict(hourly.known(trace.metric))
    made = 0
    error = total = 0.0
    for now in hourly.at[::ERROR_EVERY]:
        forecast = _fit(trace, policy, hourly, now, 1.0, lineage)
        if forecast is None:
            continue
        made += 1
        for i, value in enumerate(forecast.values[:ERROR_HOURS]):
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
    """Every shard's history replayed under its database's policy (by address prefix), a
    database's shards together (their moves share the queue)."""
    by_database: dict[str, list[Trace]] = {}
    for shard, history in sorted(histories.items()):
        policy = policies.get(shard.split("/")[0])
        trace = trace_of(shard, metric, history)
        if policy is None or trace is None or getattr(policy.hot, metric) is None:
            continue
        by_database.setdefault(shard.split("/")[0], []).append(trace)
    out = []
    for database, traces in sorted(by_database.items()):
        out += replay_together(traces, policies[database], move_seconds, lead)
    return sorted(out, key=lambda r: r.trace)


def render_text(results: list[TraceResult], source: str, move_seconds: float, lead: LeadTime) -> str:
    """The backtest as a person reads it: one block per shard, then the totals."""
    lines = [f"Backtest of {source}: each move takes {span(round(move_seconds))}; the predictive policy splits"
             f" {span(round(lead.seconds))} ahead ({lead.why}), the n-th split of a batch n moves ahead with"
             " autosplit.max_concurrent at a time; a database's shards share the queue.", ""]
    if not results:
        return "\n".join([*lines, "No shard has history for this metric and a hot threshold for it."]) + "\n"
    for r in results:
        error = "no forecast (less history than forecast.min_history)" if r.forecast_error_percent is None \
            else (f"{r.forecast_error_percent:g}% absolute error over the next {ERROR_HOURS} h (WAPE of {r.forecasts}"
                  f" forecasts, one every {ERROR_EVERY} hours)")
        lines.append(f"{r.trace}: {r.metric} over {r.days:g} days, hot threshold {r.threshold:g}; forecast: {error}")
        for run in (r.reactive, r.predictive):
            splits = sum(1 for d in run.decisions if d.kind == "split")
            merges = len(run.decisions) - splits
            ahead = sum(1 for d in run.decisions if d.cause == "forecast")
            lines.append(f"  {run.policy:<10}  hot for {span(round(run.over_seconds))}; {splits} splits"
                         f" ({ahead} on a forecast), {merges} merges, {run.flapping_pairs} flapping pairs")
            lines += [f"      {d.at.strftime('%Y-%m-%dT%H:%MZ')} {d.kind} ({d.cause}) -> {d.shards_after} shards"
                      + (f", done {d.done_at.strftime('%Y-%m-%dT%H:%MZ')}" if d.done_at else ", still moving")
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
        f = fit(shard, metric, series(hourly, metric), now, policy.forecast.horizon, policy.forecast.min_history,
                time_zone=policy.forecast.time_zone, highs=highs(hourly, metric))
        threshold = getattr(policy.hot, metric)
        if f is None:
            out.append({"shard": shard, "forecast": None,
                        "summary": f"no forecast yet: {counted(len(hourly), 'hour')} of history,"
                                   f" forecast.min_history is {span(policy.forecast.min_history)}"})
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
            lines.append(f"{shard} ({counted(len(trace.values), 'hour')} of {metric}): " + "; ".join(runs))
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
