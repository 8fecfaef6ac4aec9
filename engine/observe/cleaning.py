"""Samples cleaned on the way in, live, stored or recorded: ordered by time, repeated times
folded to one sample (the first recorded; a disagreement is noted), and values that cannot be a
measurement (NaN, infinite, negative) turned into unknown with a note. Unknown never acts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime

from engine.observe.metrics import METRICS, Sample
from engine.observe.series import Series, micros

MAX_LISTED = 3  # rejected values named per shard in a note; the rest are counted


def _bad(value: float) -> str | None:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "infinite"
    if value < 0:
        return "negative"
    return None


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rejected_in_series(series: Series, rejected: list[tuple[int, int, str]]) -> Series:
    """A series from the catalog (no NaN there: JSON has none, but a value may be bad) with its
    bad values made unknown; each is added to `rejected` as (time, metric index, text)."""
    for m, metric in enumerate(METRICS):
        for i, value in enumerate(series.values(metric)):
            why = None if value is None else _bad(value)
            if why:
                rejected.append((series.micros_at(i), m, f"{metric} {why} at {_time(series.at(i))}"))
                series = series.with_unknown(i, metric)
    return series


def _rejected_in_samples(shard: str, samples: list[Sample], rejected: list[tuple[int, int, str]],
                         notes: list[str]) -> Series:
    """Samples as a series, without those that have no time zone and with bad values unknown:
    cleaned before the columns are made, where a NaN would be indistinguishable from unknown."""
    aware = [s for s in samples if s.at.tzinfo is not None]
    if len(aware) < len(samples):
        notes.append(f"{shard}: {len(samples) - len(aware)} samples without a time zone dropped")
    measured = []
    for sample in sorted(aware, key=lambda s: s.at):  # stable: the first recorded stays first
        metrics = {}
        for name, mv in sample.metrics.items():
            why = None if mv is None else _bad(mv.value)
            if why:
                rejected.append((micros(sample.at), METRICS.index(name) if name in METRICS else len(METRICS),
                                 f"{name} {why} at {_time(sample.at)}"))
            metrics[name] = None if why else mv
        measured.append(sample if metrics == sample.metrics else sample.model_copy(update={"metrics": metrics}))
    return Series.of(measured, shard=shard)


def clean_sample(sample: Sample) -> Sample:
    """One fresh sample with its values that cannot be a measurement made unknown (what
    clean_window does to a window of one, without building the window)."""
    metrics = {name: None if mv is None or _bad(mv.value) else mv for name, mv in sample.metrics.items()}
    return sample if metrics == sample.metrics else sample.model_copy(update={"metrics": metrics})


def clean_window(shard: str, samples: Series | Iterable[Sample]) -> tuple[Series, tuple[str, ...]]:
    """One shard's samples, cleaned, oldest first (a Series), with a note for each kind of thing
    dropped. Samples without a time zone are dropped here (recorded files are refused earlier,
    by name)."""
    notes: list[str] = []
    rejected: list[tuple[int, int, str]] = []
    if isinstance(samples, Series):
        series = _rejected_in_series(samples, rejected)
    else:
        series = _rejected_in_samples(shard, list(samples), rejected, notes)
    if rejected:
        listed = [text for _, _, text in sorted(rejected, key=lambda r: r[:2])]
        notes.append(f"{shard}: {len(listed)} value{'s' if len(listed) != 1 else ''} rejected as unknown (not a"
                     f" measurement): {', '.join(listed[:MAX_LISTED])}"
                     + (f" and {len(listed) - MAX_LISTED} more" if len(listed) > MAX_LISTED else ""))
    kept: list[int] = []
    repeated = 0
    disagreeing: list[str] = []
    for i in range(len(series)):
        if kept and series.micros_at(kept[-1]) == series.micros_at(i):
            if series.metrics_at(kept[-1]) == series.metrics_at(i):
                repeated += 1
            else:
                disagreeing.append(_time(series.at(i)))
            continue
        kept.append(i)
    if len(kept) < len(series):
        series = series.take(kept)
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
    return series, tuple(notes)


def clean(windows: Mapping[str, Series | Iterable[Sample]]) -> tuple[dict[str, Series], tuple[str, ...]]:
    """Every shard's window cleaned, and all the notes, sorted."""
    out: dict[str, Series] = {}
    notes: list[str] = []
    for shard, samples in sorted(windows.items()):
        out[shard], shard_notes = clean_window(shard, samples if isinstance(samples, Series) else list(samples))
        notes.extend(f"metrics: {n}" for n in shard_notes)
    return out, tuple(notes)
