"""Samples cleaned on the way in, live, stored or recorded: ordered by time, repeated times
folded to one sample (the first recorded; a disagreement is noted), and values that cannot be a
measurement (NaN, infinite, negative) turned into unknown with a note. Unknown never acts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from engine.observe.metrics import MetricValue, Sample

MAX_LISTED = 3  # rejected values named per shard in a note; the rest are counted


def _bad(value: float) -> str | None:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "infinite"
    if value < 0:
        return "negative"
    return None


def _time(sample: Sample) -> str:
    return sample.at.strftime("%Y-%m-%dT%H:%M:%SZ")


def clean_window(shard: str, samples: Iterable[Sample]) -> tuple[tuple[Sample, ...], tuple[str, ...]]:
    """One shard's samples, cleaned, oldest first, with a note for each kind of thing dropped.
    Samples without a time zone are dropped here (recorded files are refused earlier, by name)."""
    notes: list[str] = []
    samples = list(samples)
    aware = [s for s in samples if s.at.tzinfo is not None]
    if len(aware) < len(samples):
        notes.append(f"{shard}: {len(samples) - len(aware)} samples without a time zone dropped")
    ordered = sorted(aware, key=lambda s: s.at)  # stable: the first recorded stays first
    rejected: list[str] = []
    measured: list[Sample] = []
    for sample in ordered:
        metrics: dict[str, MetricValue | None] = {}
        for name, mv in sample.metrics.items():
            why = None if mv is None else _bad(mv.value)
            if why:
                rejected.append(f"{name} {why} at {_time(sample)}")
            metrics[name] = None if why else mv
        measured.append(sample if metrics == sample.metrics else sample.model_copy(update={"metrics": metrics}))
    if rejected:
        notes.append(f"{shard}: {len(rejected)} value{'s' if len(rejected) != 1 else ''} rejected as unknown (not a"
                     f" measurement): {', '.join(rejected[:MAX_LISTED])}"
                     + (f" and {len(rejected) - MAX_LISTED} more" if len(rejected) > MAX_LISTED else ""))
    out: list[Sample] = []
    repeated = 0
    disagreeing: list[str] = []
    for sample in measured:
        if out and out[-1].at == sample.at:
            if out[-1].metrics == sample.metrics:
                repeated += 1
            else:
                disagreeing.append(_time(sample))
            continue
        out.append(sample)
    if repeated:
        notes.append(f"{shard}: {repeated} repeated sample{'s' if repeated != 1 else ''} (same time, same values)"
                     " folded into one")
    if disagreeing:
        times = sorted(set(disagreeing))
        notes.append(
            f"{shard}: {len(disagreeing)} sample{'s' if len(disagreeing) != 1 else ''} with the time of an"
            f" earlier one but other values dropped (kept the first recorded): at {', '.join(times[:MAX_LISTED])}"
            + (f" and {len(times) - MAX_LISTED} more" if len(times) > MAX_LISTED else "")
        )
    return tuple(out), tuple(notes)


def clean(windows: Mapping[str, Iterable[Sample]]) -> tuple[dict[str, tuple[Sample, ...]], tuple[str, ...]]:
    """Every shard's window cleaned, and all the notes, sorted."""
    out: dict[str, tuple[Sample, ...]] = {}
    notes: list[str] = []
    for shard, samples in sorted(windows.items()):
        out[shard], shard_notes = clean_window(shard, list(samples))
        notes.extend(f"metrics: {n}" for n in shard_notes)
    return out, tuple(notes)
