"""Hot/cold detection over a window of samples. Pure functions: samples and policy in, verdict
with evidence out.

Hot: some metric above its hot threshold, by more than the tolerance band, in at least K of the
last N samples. Cold: every metric that has a cold threshold known and below it, by more than
the band, in every one of the last cold_window samples. A value inside the band around a
threshold is "near": a warning, never an action (as the Kubernetes HPA's 10% tolerance).
Unknown values never count toward an action, and a window of unknowns is "unknown".

Re-checking a saved plan's premises uses the band the other way (hysteresis): a hot premise
still holds while K of N samples stay above threshold x (1 - tolerance), so a small dip after
review does not break the plan, while a real cool-down does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from engine.config.models import Policy
from engine.observe.metrics import METRICS, UNITS, Sample

State = Literal["hot", "cold", "normal", "unknown"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Evidence(Frozen):
    """One metric's case, checkable by a person: value, threshold, rule, source, samples."""

    shard: str  # address, e.g. orders/40-80
    metric: str
    kind: Literal["hot", "cold"]
    value: float  # the latest known value
    threshold: float
    tolerance_percent: float
    samples_agreeing: int
    window: int
    observed_at: datetime
    source: str
    policy_location: str

    def describe(self) -> str:
        unit = UNITS.get(self.metric, "")
        rel = ">" if self.kind == "hot" else "<"
        return (f"{self.shard}: {self.metric} {_num(self.value)}{unit} {rel} {_num(self.threshold)}{unit}"
                f" in {self.samples_agreeing} of {self.window} samples (tolerance {_num(self.tolerance_percent)}%,"
                f" latest at {self.observed_at.strftime('%Y-%m-%dT%H:%M:%SZ')}; source: {self.source};"
                f" threshold from {self.policy_location})")


class Assessment(Frozen):
    shard: str
    state: State
    evidence: tuple[Evidence, ...] = ()
    near: tuple[str, ...] = ()
    samples: int = 0

    @property
    def severity(self) -> float:
        """How far over its threshold the worst metric is; orders competing splits."""
        return max((e.value / e.threshold for e in self.evidence if e.threshold), default=0.0)


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:g}"


def _known(samples: tuple[Sample, ...] | list[Sample], metric: str) -> list[tuple[Sample, float]]:
    return [(s, v) for s in samples if (v := s.value(metric)) is not None]


def assess(shard: str, samples: tuple[Sample, ...], policy: Policy,
           locations: dict[tuple[str, str], str] | None = None) -> Assessment:
    """`locations[(kind, metric)]` is the file:line the threshold came from."""
    locations = locations or {}
    d = policy.detection
    tol = d.tolerance_percent / 100.0
    window = tuple(samples[-d.window:])
    if not window or all(all(s.value(m) is None for m in METRICS) for s in window):
        return Assessment(shard=shard, state="unknown", samples=len(window))
    if all(window[-1].value(m) is None for m in METRICS):
        # the server stopped answering: older samples say nothing about now, so no action
        return Assessment(shard=shard, state="unknown", samples=len(window))

    hot: list[Evidence] = []
    near: list[str] = []
    for metric in METRICS:
        threshold = getattr(policy.hot, metric)
        if threshold is None:
            continue
        known = _known(window, metric)
        if not known:
            continue
        over = [(s, v) for s, v in known if v > threshold * (1 + tol)]
        latest_sample, latest = known[-1]
        if len(over) >= d.hot_samples:
            hot.append(Evidence(
                shard=shard, metric=metric, kind="hot", value=latest, threshold=threshold, tolerance_percent=d.tolerance_percent,
                samples_agreeing=len(over), window=len(window), observed_at=latest_sample.at,
                source=_source(latest_sample, metric), policy_location=locations.get(("hot", metric), "policy"),
            ))
        elif threshold * (1 - tol) <= latest <= threshold * (1 + tol) or (over and len(over) < d.hot_samples):
            unit = UNITS.get(metric, "")
            near.append(f"{metric} {_num(latest)}{unit} is near the hot threshold {_num(threshold)}{unit}"
                        f" ({len(over)} of {len(window)} samples over it, {d.hot_samples} needed)")
    if hot:
        return Assessment(shard=shard, state="hot", evidence=tuple(hot), near=tuple(near), samples=len(window))

    cold = _cold(shard, samples, policy, locations)
    if cold:
        return Assessment(shard=shard, state="cold", evidence=cold, near=tuple(near), samples=len(window))
    return Assessment(shard=shard, state="normal", near=tuple(near), samples=len(window))


def _cold(shard: str, samples: tuple[Sample, ...], policy: Policy, locations: dict) -> tuple[Evidence, ...]:
    d = policy.detection
    tol = d.tolerance_percent / 100.0
    window = tuple(samples[-d.cold_window:])
    if len(window) < d.cold_window:
        return ()
    evidence = []
    for metric in METRICS:
        threshold = getattr(policy.cold, metric)
        if threshold is None:
            continue
        known = _known(window, metric)
        if len(known) < len(window):
            return ()  # an unknown in the window: not known to be cold
        if any(v >= threshold * (1 - tol) for _, v in known):
            return ()
        latest_sample, latest = known[-1]
        evidence.append(Evidence(
            shard=shard, metric=metric, kind="cold", value=max(v for _, v in known), threshold=threshold,
            tolerance_percent=d.tolerance_percent, samples_agreeing=len(known), window=len(window),
            observed_at=latest_sample.at, source=_source(latest_sample, metric),
            policy_location=locations.get(("cold", metric), "policy"),
        ))
    return tuple(evidence)


def _source(sample: Sample, metric: str) -> str:
    mv = sample.metrics.get(metric)
    return mv.source if mv else "unknown"


def premise_holds(evidence: Evidence, samples: tuple[Sample, ...], hot_samples: int, window: int) -> tuple[bool, str]:
    """Does a saved plan's premise still hold on fresh samples? With hysteresis (see module doc)."""
    tol = evidence.tolerance_percent / 100.0
    recent = tuple(samples[-window:])
    known = _known(recent, evidence.metric)
    if not known:
        return False, f"{evidence.metric} is unknown now"
    latest = known[-1][1]
    unit = UNITS.get(evidence.metric, "")
    if evidence.kind == "hot":
        floor = evidence.threshold * (1 - tol)
        over = sum(1 for _, v in known if v > floor)
        if over >= min(hot_samples, len(recent)):
            return True, ""
        return False, (f"{evidence.metric} is {_num(latest)}{unit} now, above {_num(floor)}{unit} (threshold"
                       f" {_num(evidence.threshold)}{unit} less the {_num(evidence.tolerance_percent)}% tolerance)"
                       f" in only {over} of {len(recent)} samples")
    ceiling = evidence.threshold * (1 + tol)
    if all(v < ceiling for _, v in known):
        return True, ""
    return False, f"{evidence.metric} is {_num(latest)}{unit} now, no longer below {_num(ceiling)}{unit}"
