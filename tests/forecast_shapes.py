"""Judging the forecast on the shapes of tests/traces.py (issue 31) as an SRE would: the backtest
(engine.detect.backtest) and a plan replay in `forecast.mode: act` (engine.plan.planner), each
compared with the shape's decision. Shared by tests/test_forecast.py and bench/forecast.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from engine.config.models import Policy
from engine.detect.backtest import Trace, TraceResult, replay_together
from engine.detect.forecast import Lineage, lead_time
from engine.observe import rollup
from engine.observe.models import MoveRecord
from traces import Shape, shape

MOVE = 2700.0  # the replayed moves take 45 minutes
LEAD = lead_time([MoveRecord(kind="split_shard", seconds=MOVE, size_bytes=5e9)], 5e9, 3600, 3600)
EARLY = timedelta(days=1)  # a split more than a day before it is needed is early


def policy_for(s: Shape) -> Policy:
    cold = 10.0 if s.metric == "storage_percent" else 100.0
    return Policy.model_validate({
        "hot": {s.metric: s.threshold}, "cold": {s.metric: cold},
        "detection": {"sustain": "5m", "cold_for": "30m"}, "metrics": {"interval": "1m"},
        "automerge": {"enabled": True}, "forecast": {"mode": "act", "time_zone": s.time_zone}})


def traces_of(s: Shape) -> list[Trace]:
    return [Trace(name=a, metric=s.metric, start=s.start, interval=60.0, values=tuple(v))
            for a, v in sorted(s.traces.items())]


def lineages_of(s: Shape) -> dict[str, Lineage]:
    out = {}
    for address, (label, ancestors, start) in s.ancestors.items():
        histories = []
        for name, values in sorted(ancestors.items()):
            trace = Trace(name=name, metric=s.metric, start=start, interval=60.0, values=tuple(values))
            histories.append(rollup.series_of(trace.samples())[name])
        out[address] = Lineage(label, tuple(histories))
    return out


@dataclass
class Judged:
    shape: str
    seed: int
    decision: str  # what an SRE would do: "split" or "none"
    agrees: bool
    why: str
    lead_hours: float | None = None  # how long before the crossing the first forecast split started
    false_splits: int = 0
    missed: int = 0
    reactive_hot: float = 0.0
    predictive_hot: float = 0.0
    wape: float | None = None


def judge_split(s: Shape, address: str, decisions, crossing: datetime, position: int, slots: int) -> tuple[bool, str]:
    """A split ahead is right when it is on a forecast, finished before the crossing, and not more
    than a day earlier than its lead time (the queue's included) asked."""
    ahead = [d for d in decisions if d.cause == "forecast" and d.kind == "split"]
    if not ahead or decisions[0] is not ahead[0]:
        return False, f"{address}: no split ahead (first decision: {decisions[0].cause if decisions else 'none'})"
    first = ahead[0]
    if first.done_at is None or first.done_at > crossing:
        return False, (f"{address}: the split ahead at {first.at:%m-%d %H:%M} finished after the crossing"
                       f" {crossing:%m-%d %H:%M}")
    if first.at < crossing - timedelta(seconds=LEAD.queued(position, slots).seconds) - EARLY:
        return False, f"{address}: split at {first.at:%m-%d %H:%M}, days before the crossing {crossing:%m-%d %H:%M}"
    return True, (f"{address}: split at {first.at:%m-%d %H:%M}, done {first.done_at:%m-%d %H:%M},"
                  f" crossing {crossing:%m-%d %H:%M}")


def backtest(name: str, seed: int = 1) -> tuple[Judged, list[TraceResult]]:
    s = shape(name, seed)
    policy = policy_for(s)
    results = replay_together(traces_of(s), policy, MOVE, LEAD, lineages=lineages_of(s))
    crossings = {a: s.crossing(a) for a in s.traces}
    order = sorted((c, a) for a, c in crossings.items() if c)
    judged = Judged(name, seed, s.decision, True, "")
    reasons = []
    for r in results:
        judged.reactive_hot += r.reactive.over_seconds
        judged.predictive_hot += r.predictive.over_seconds
        forecast_splits = [d for d in r.predictive.decisions if d.cause == "forecast"]
        crossing = crossings[r.trace]
        if s.decision == "none":
            ok = not forecast_splits
            reasons.append(f"{r.trace}: " + ("no split on a forecast" if ok else
                                             f"split on a forecast at {forecast_splits[0].at:%m-%d %H:%M}"))
            judged.false_splits += len(forecast_splits)
        else:
            assert crossing is not None
            position = [a for _, a in order].index(r.trace) + 1
            ok, why = judge_split(s, r.trace, r.predictive.decisions, crossing, position,
                                  policy.autosplit.max_concurrent)
            reasons.append(why)
            judged.missed += 0 if ok or (forecast_splits and forecast_splits[0].at < crossing - EARLY) else 1
            judged.false_splits += 1 if forecast_splits and not ok and forecast_splits[0].at < crossing - EARLY else 0
            if forecast_splits:
                hours = (crossing - forecast_splits[0].at).total_seconds() / 3600
                judged.lead_hours = hours if judged.lead_hours is None else max(judged.lead_hours, hours)
        judged.agrees &= ok
        if r.forecast_error_percent is not None:
            judged.wape = r.forecast_error_percent if judged.wape is None else max(judged.wape,
                                                                                   r.forecast_error_percent)
    judged.why = "; ".join(reasons)
    return judged, results


# ---------------------------------------------------------------------------- the plan replay

PLAN_FLEET = """\
servers:
  a: {{embedded: true}}
  b: {{embedded: true}}
databases:
  orders:
    shard_key: {{column: customer_id, type: bigint}}
    schema: {{name: init, sql: "CREATE TABLE t (customer_id bigint PRIMARY KEY);"}}
    shards: 4
    placement: [a, b]
    policy: ahead
policies:
  ahead:
    hot: {{{metric}: {threshold}}}
    detection: {{sustain: 5m, cold_for: 30m}}
    metrics: {{interval: 1m}}
    forecast: {{mode: act, time_zone: {zone}}}
"""


def _until(series, now: datetime):
    """An HourlySeries cut at `now`: what a plan at `now` would have read."""
    from engine.observe.models import HourlySeries

    n = sum(1 for at in series.at if at <= now)
    return HourlySeries(at=series.at[:n], values={m: c[:n] for m, c in series.values.items()},
                        highs={m: c[:n] for m, c in series.highs.items()})


def plan_replay(name: str, directory, seed: int = 1, every: timedelta = timedelta(hours=1)) -> Judged:
    """Plans in `forecast.mode: act`, one an hour (at a quarter past) from the first hour a
    forecast is possible, on the hourly history so far and the newest half hour of samples,
    until the first split planned on a forecast: when, against the shape's crossing."""
    from engine.config import loader
    from engine.plan import planner
    from test_load_planning import _observation
    from traces import QUIET, samples

    s = shape(name, seed)
    (directory / "fleet.yaml").write_text(PLAN_FLEET.format(metric=s.metric, threshold=s.threshold,
                                                            zone=s.time_zone))
    desired = loader.load(directory, cwd=directory)
    policy = desired.databases["orders"].effective_policy
    full = {t.name: rollup.series_of(t.samples(), 3600, policy.sustain_seconds)[t.name] for t in traces_of(s)}
    for _, ancestors, start in s.ancestors.values():
        for address, values in ancestors.items():
            trace = Trace(name=address, metric=s.metric, start=start, interval=60.0, values=tuple(values))
            full[address] = rollup.series_of(trace.samples(), 3600, policy.sustain_seconds)[address]
    crossings = {a: s.crossing(a) for a in s.traces}
    batch = sum(1 for c in crossings.values() if c)
    first_crossing = min((c for c in crossings.values() if c), default=None)
    names = ["orders/-40", "orders/40-80", "orders/80-c0", "orders/c0-"]
    moves = (MoveRecord(kind="split_shard", seconds=MOVE, size_bytes=5e9),)
    base = {m: v for m, v in QUIET.items() if m != s.metric}
    at = s.start + timedelta(hours=12, minutes=15)
    end = s.start + timedelta(minutes=len(next(iter(s.traces.values()))) - 1)
    while at <= end:
        windows = {}
        for n in names:
            values = s.traces.get(n)
            i = int((at - s.start).total_seconds() // 60)
            recent = values[max(0, i - 30):i + 1] if values else [QUIET.get(s.metric, 1.0)] * 31
            windows[n] = samples(n, {s.metric: recent}, interval=60.0, start=at - timedelta(minutes=len(recent) - 1),
                                 base={**base, s.metric: 0.0})
        observation = _observation(desired, windows, shards=4).model_copy(update={
            "hourly": {a: _until(h, at) for a, h in full.items()}, "moves": moves})
        plan = planner.plan(desired, observation)
        ahead = [a for a in plan.actions if a.kind == "split_shard" and a.reason.cause == "forecast"]
        if ahead:
            return _judge_plan(s, seed, at, ahead[0].source.name, crossings, batch, first_crossing,
                               policy.autosplit.max_concurrent)
        at += every
    if s.decision == "none":
        return Judged(name, seed, "none", True, "no split planned on a forecast")
    return Judged(name, seed, "split", False, "no split planned on a forecast before the crossing", missed=1)


def _judge_plan(s: Shape, seed: int, at: datetime, source: str, crossings: dict, batch: int,
                first_crossing: datetime | None, slots: int) -> Judged:
    what = f"first split planned on a forecast at {at:%m-%d %H:%M} (orders/{source})"
    if s.decision == "none":
        return Judged(s.name, seed, "none", False, what, false_splits=1)
    assert first_crossing is not None
    lead = LEAD.queued(batch, slots)
    # the batch's last move must be done before the first crossing (moves one after another)
    done = at + timedelta(seconds=MOVE * -(-batch // slots))
    hours = (first_crossing - at).total_seconds() / 3600
    if done > first_crossing:
        return Judged(s.name, seed, "split", False, f"{what}: the batch finishes after the crossing"
                      f" {first_crossing:%m-%d %H:%M}", missed=1, lead_hours=hours)
    if at < first_crossing - timedelta(seconds=lead.seconds) - EARLY:
        return Judged(s.name, seed, "split", False, f"{what}: more than a day early for the crossing"
                      f" {first_crossing:%m-%d %H:%M}", false_splits=1, lead_hours=hours)
    return Judged(s.name, seed, "split", True, f"{what}, crossing {first_crossing:%m-%d %H:%M}", lead_hours=hours)
