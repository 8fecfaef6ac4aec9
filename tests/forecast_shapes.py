"""Judging the forecast on the shapes of tests/traces.py (issue 31) as an SRE would: the backtest
(engine.detect.backtest) and a plan replay in `forecast.mode: act` (engine.plan.planner), each
compared with the shape's decision. Shared by tests/test_forecast.py and bench/forecast.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from traces import Shape, shape

from engine.config.models import Policy
from engine.detect.backtest import Trace, TraceResult, replay_together
from engine.detect.forecast import LeadTime, Lineage, lead_time
from engine.observe import rollup
from engine.observe.models import MoveRecord

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
        return False, f"{address}: the split ahead at {first.at:%m-%d %H:%M} finished after the crossing {crossing:%m-%d %H:%M}"
    if first.at < crossing - timedelta(seconds=LEAD.queued(position, slots).seconds) - EARLY:
        return False, f"{address}: split at {first.at:%m-%d %H:%M}, days before the crossing {crossing:%m-%d %H:%M}"
    return True, f"{address}: split at {first.at:%m-%d %H:%M}, done {first.done_at:%m-%d %H:%M}, crossing {crossing:%m-%d %H:%M}"


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
