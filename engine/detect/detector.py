"""Hot/cold detection in time. Pure functions: samples, policy and the instant judged in; a
verdict with evidence out.

Hot: the newest samples of some metric are over its hot threshold, without a break, for the
policy's `sustain` (each sample stands for the interval it measured). Cold: every metric with a
cold threshold is under it, without a break, for `cold_for`. The thresholds mean what they say:
no band raises them. The tolerance is hysteresis that keeps opposite actions apart: a saved
split's premise holds while the load stays above threshold x (1 - tolerance), a merge's while it
stays under cold x (1 + tolerance), and a policy's cold threshold must sit that far under its hot
one (checked in the config models).

A verdict needs fresh data: a shard whose newest sample is older than `max_age` before the
judged instant is `stale`; a shard whose newest sample has no known value is `unknown`. Neither
ever acts. Unknown values, and gaps longer than `max_age`, break a run; a cold run is broken by
any missing round too, and a merge's premise by any unknown sample of its window: unknown never
counts toward cold, nor toward hot without known hot samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Literal

from engine.config.models import Policy
from engine.durations import span
from engine.frozen import Frozen
from engine.observe.metrics import METRICS, UNITS, Sample
from engine.observe.series import Row, as_series

Point = Sample | Row  # a sample as a model, or read in place from a series' columns

State = Literal["hot", "cold", "normal", "unknown", "stale"]
ACTING_STATES = ("hot", "cold")




class Evidence(Frozen):
    """One metric's case, checkable by a person: every judged sample was over (hot) or under
    (cold) the threshold; `low` and `high` are the least and greatest of them, measured from
    `since` to `until`, against the policy's window."""

    shard: str  # address, e.g. orders/40-80
    metric: str
    kind: Literal["hot", "cold"]
    low: float
    high: float
    threshold: float
    samples: int
    since: datetime  # the start of the time the judged samples measured
    until: datetime  # the newest judged sample
    window_seconds: float  # the policy's sustain (hot) or cold_for (cold)
    tolerance_percent: float
    source: str
    policy_location: str

    @property
    def value(self) -> float:
        """The judged value nearest the threshold: the one the verdict rests on."""
        return self.low if self.kind == "hot" else self.high

    @property
    def hysteresis_bound(self) -> float:
        """Where the premise of an action made on this evidence stops holding."""
        tol = self.tolerance_percent / 100.0
        return self.threshold * (1 - tol) if self.kind == "hot" else self.threshold * (1 + tol)

    def describe(self) -> str:
        unit = UNITS.get(self.metric, "")
        values = (f"{_num(self.low)}{unit}" if self.low == self.high
                  else f"{_num(self.low)}{unit} to {_num(self.high)}{unit}")
        if self.kind == "hot":
            rule = (f"over the hot threshold {_num(self.threshold)}{unit} for {span(self._measured())}"
                    f" (sustain {span(self.window_seconds)})")
            keeps = f"a split's premise holds while it stays above {_num(self.hysteresis_bound)}{unit}"
        else:
            rule = (f"under the cold threshold {_num(self.threshold)}{unit} for {span(self._measured())}"
                    f" (cold_for {span(self.window_seconds)})")
            keeps = f"a merge's premise holds while it stays under {_num(self.hysteresis_bound)}{unit}"
        return (f"{self.shard}: {self.metric} {rule}: {values} in {self.samples} samples from {_time(self.since)}"
                f" to {_time(self.until)}; {keeps} (tolerance {_num(self.tolerance_percent)}%);"
                f" source: {self.source}; threshold from {self.policy_location}")

    def _measured(self) -> float:
        return (self.until - self.since).total_seconds()


class Assessment(Frozen):
    shard: str
    state: State
    evidence: tuple[Evidence, ...] = ()
    near: tuple[str, ...] = ()
    samples: int = 0
    why: str = ""  # for stale and unknown: what is missing

    @property
    def severity(self) -> float:
        """How far over its threshold the worst metric is, by its least judged value."""
        return max((e.low / e.threshold for e in self.evidence if e.threshold and e.kind == "hot"), default=0.0)


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _measured_since(sample: Point, cap: float) -> datetime:
    """Where the time a sample measured starts: a sample stands for its interval, at most one
    policy interval (a rate averaged over a long gap could hide a spike)."""
    return sample.at - timedelta(seconds=min(sample.interval_s or 0.0, cap))


def _run(newest_first: Sequence[Point], metric: str, inside: Callable[[float], bool], need: float,
         max_gap: float, cap: float) -> list[tuple[Point, float]]:
    """The unbroken run of newest samples whose value is `inside`, cut once it covers `need`
    seconds: an unknown value, a value outside, or a gap over `max_gap` ends it."""
    run: list[tuple[Point, float]] = []
    for sample in newest_first:
        value = sample.value(metric)
        if value is None or not inside(value):
            break
        if run and (run[-1][0].at - sample.at).total_seconds() > max_gap:
            break
        run.append((sample, value))
        if (run[0][0].at - _measured_since(sample, cap)).total_seconds() >= need:
            break
    return run


def _covered(run: list[tuple[Point, float]], cap: float) -> float:
    return (run[0][0].at - _measured_since(run[-1][0], cap)).total_seconds() if run else 0.0


def _evidence(shard: str, metric: str, kind: Literal["hot", "cold"], run: list[tuple[Point, float]],
              threshold: float, window: float, policy: Policy, locations: dict) -> Evidence:
    values = [v for _, v in run]
    return Evidence(
        shard=shard, metric=metric, kind=kind, low=min(values), high=max(values), threshold=threshold,
        samples=len(run), since=_measured_since(run[-1][0], policy.metrics.interval), until=run[0][0].at,
        window_seconds=window,
        tolerance_percent=policy.detection.tolerance_percent, source=_source(run[0][0], metric),
        policy_location=locations.get((kind, metric), "policy"))


def _over(threshold: float) -> Callable[[float], bool]:
    return lambda value: value > threshold


def _under(threshold: float) -> Callable[[float], bool]:
    return lambda value: value < threshold


def judged(samples: Sequence[Sample], at: datetime | None) -> Sequence[Row]:
    """The samples up to the judged instant, newest first (read from the series' columns as the
    runs reach them: most runs end at the newest sample)."""
    return as_series(samples).newest_first(at)


def assess(shard: str, samples: Sequence[Sample], policy: Policy,
           locations: dict[tuple[str, str], str] | None = None, at: datetime | None = None) -> Assessment:
    """`at` is the instant judged (the observation's metrics_at; default the newest sample);
    `locations[(kind, metric)]` is the file:line the threshold came from."""
    locations = locations or {}
    newest_first = judged(samples, at)
    if not newest_first:
        return Assessment(shard=shard, state="unknown", why="no samples")
    newest = newest_first[0]
    if all(newest.value(m) is None for m in METRICS):
        # the server stopped answering: older samples say nothing about now, so no action
        return Assessment(shard=shard, state="unknown", samples=len(newest_first),
                          why=f"every metric unknown at {_time(newest.at)}")
    at = at or newest.at
    age = (at - newest.at).total_seconds()
    if age > policy.max_age_seconds:
        return Assessment(shard=shard, state="stale", samples=len(newest_first),
                          why=f"newest sample {_time(newest.at)} is {span(round(age))} old, older than"
                              f" detection.max_age ({span(policy.max_age_seconds)})")
    tol = policy.detection.tolerance_percent / 100.0
    sustain, max_gap, cap = policy.sustain_seconds, policy.max_age_seconds, policy.metrics.interval
    hot: list[Evidence] = []
    near: list[str] = []
    for metric in METRICS:
        threshold = getattr(policy.hot, metric)
        if threshold is None:
            continue
        run = _run(newest_first, metric, _over(threshold), sustain, max_gap, cap)
        unit = UNITS.get(metric, "")
        if run and _covered(run, cap) >= sustain:
            hot.append(_evidence(shard, metric, "hot", run, threshold, sustain, policy, locations))
        elif run:
            near.append(f"{metric} over the hot threshold {_num(threshold)}{unit} for {span(round(_covered(run, cap)))}"
                        f" of the {span(sustain)} sustain ({len(run)} samples, {_num(min(v for _, v in run))}{unit}"
                        f" to {_num(max(v for _, v in run))}{unit}): not hot yet")
        else:
            latest = newest.value(metric)
            if latest is not None and latest >= threshold * (1 - tol):
                near.append(f"{metric} {_num(latest)}{unit} is near the hot threshold {_num(threshold)}{unit}"
                            f" (within the {_num(policy.detection.tolerance_percent)}% tolerance under it)")
    if hot:
        return Assessment(shard=shard, state="hot", evidence=tuple(hot), near=tuple(near), samples=len(newest_first))
    cold = _cold(shard, newest_first, policy, locations)
    if cold:
        return Assessment(shard=shard, state="cold", evidence=cold, near=tuple(near), samples=len(newest_first))
    return Assessment(shard=shard, state="normal", near=tuple(near), samples=len(newest_first))


def _cold(shard: str, newest_first: Sequence[Point], policy: Policy, locations: dict) -> tuple[Evidence, ...]:
    """Every metric with a cold threshold under it for `cold_for`. Unknown never counts as cold
    (as the Kubernetes HPA takes a missing metric as "not low" when it scales in): a round with
    no sample (a gap of a whole interval or more) breaks the run as an unknown value does."""
    cold_for, cap = policy.cold_for_seconds, policy.metrics.interval
    max_gap = min(policy.max_age_seconds, 1.5 * cap)
    evidence = []
    for metric in METRICS:
        threshold = getattr(policy.cold, metric)
        if threshold is None:
            continue
        run = _run(newest_first, metric, _under(threshold), cold_for, max_gap, cap)
        if _covered(run, cap) < cold_for:
            return ()  # not under it for long enough, or unknown somewhere: not known to be cold
        evidence.append(_evidence(shard, metric, "cold", run, threshold, cold_for, policy, locations))
    return tuple(evidence)


def _source(sample: Point, metric: str) -> str:
    mv = sample.metrics.get(metric)
    return mv.source if mv else "unknown"


def premise_holds(evidence: Evidence, samples: Sequence[Sample], policy: Policy,
                  at: datetime | None = None) -> tuple[bool, str]:
    """Does a saved plan's premise still hold on the samples of the evidence's window before
    `at`? With hysteresis: every known value stays beyond the tolerance bound (module doc)."""
    unit = UNITS.get(evidence.metric, "")
    newest_first = judged(samples, at)
    known = [(s, v) for s in newest_first if (v := s.value(evidence.metric)) is not None]
    if not known:
        return False, f"{evidence.metric} is unknown now"
    at = at or newest_first[0].at
    if (at - known[0][0].at).total_seconds() > policy.max_age_seconds:
        return False, (f"{evidence.metric} has no sample newer than detection.max_age"
                       f" ({span(policy.max_age_seconds)}); the newest is from {_time(known[0][0].at)}")
    start = at - timedelta(seconds=evidence.window_seconds)
    window = [(s, v) for s, v in known if s.at > start]
    if evidence.kind == "cold":
        # unknown is never "low": a sample of the window without a value fails a merge's premise
        unknown = [s for s in newest_first if s.at > start and s.value(evidence.metric) is None]
        if unknown:
            return False, (f"{evidence.metric} was unknown in {len(unknown)} of the"
                           f" {len(unknown) + len(window)} samples of the last {span(evidence.window_seconds)}"
                           " (unknown never counts as cold)")
    latest = known[0][1]
    bound = evidence.hysteresis_bound
    if evidence.kind == "hot":
        against = [v for _, v in window if v <= bound]
        side = f"at or under {_num(bound)}{unit} (threshold {_num(evidence.threshold)}{unit} less the"
    else:
        against = [v for _, v in window if v >= bound]
        side = f"at or over {_num(bound)}{unit} (threshold {_num(evidence.threshold)}{unit} plus the"
    if not against:
        return True, ""
    return False, (f"{evidence.metric} is {_num(latest)}{unit} now; {len(against)} of {len(window)} samples of the"
                   f" last {span(evidence.window_seconds)} were {side} {_num(evidence.tolerance_percent)}% tolerance)")
