"""One shard's sample window in columns: what a plan holds for every shard it judges.

A `Series` is a sequence of `Sample`s (oldest first) kept as arrays: the times as whole
microseconds, the interval each sample measured, and one array of floats per metric, NaN where
the value is unknown; each metric's source is kept as runs (the index where it changes, and the
new source), since it changes rarely if ever. A plan over 10,000 shards holds 310,000 samples
(a five-minute sustain at 10 s); as one pydantic model each they took 1.66 KB apiece and the
observation 515 MB; as columns they take about 50 bytes.

Reading stays the Sample interface: `series[i]` and iteration build a `Sample`, `rows()` gives
light read-only views for the loops that judge every sample of every shard (the detector, the
right-sizing sums), and `values(metric)` / `latest(metric)` read a column without building
anything. A series is immutable: `appended` and `of` make new ones.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, overload

from engine.observe.metrics import METRICS, MetricValue, Sample

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NAN = float("nan")
_INDEX = {m: i for i, m in enumerate(METRICS)}


def micros(at: datetime) -> int:
    """Whole microseconds since the epoch (a time without a zone is taken as UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    delta = at - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


class Series(Sequence[Sample]):
    """A shard's samples in columns (module doc). Build with `Series.of(samples)` or
    `Series.columns(...)`; equal to any sequence of the same Samples."""

    __slots__ = ("_at", "_interval", "_runs", "_servers", "_values", "shard")

    def __init__(self, shard: str, servers: tuple[tuple[int, str], ...], at: array, interval: array,
                 values: tuple[array, ...], runs: tuple[tuple[tuple[int, str], ...], ...]):
        self.shard = shard
        self._servers = servers  # runs, as the sources: the server each sample was read from
        self._at = at
        self._interval = interval
        self._values = values
        self._runs = runs

    @property
    def server(self) -> str:
        """The server of the newest sample (a shard moved since keeps its older ones' servers)."""
        return self._servers[-1][1] if self._servers else ""

    # ------------------------------------------------------------------ making one

    @classmethod
    def of(cls, samples: Iterable[Sample], shard: str = "", server: str = "") -> Series:
        """The samples in columns, in time order (a stable sort: of two samples with one time,
        the first given stays first)."""
        if isinstance(samples, Series):
            return samples
        ordered = sorted(samples, key=lambda s: micros(s.at))
        at = array("q", (micros(s.at) for s in ordered))
        interval = array("d", (NAN if s.interval_s is None else s.interval_s for s in ordered))
        values: list[array] = []
        runs: list[tuple[tuple[int, str], ...]] = []
        for metric in METRICS:
            column = array("d")
            changes: list[tuple[int, str]] = []
            for i, sample in enumerate(ordered):
                mv = sample.metrics.get(metric)
                if mv is None:
                    column.append(NAN)
                    continue
                column.append(mv.value)
                if not changes or changes[-1][1] != mv.source:
                    changes.append((i, mv.source))
            values.append(column)
            runs.append(tuple(changes))
        return cls(ordered[0].shard if ordered else shard, _runs_of(s.server for s in ordered) if ordered
                   else (((0, server),) if server else ()), at, interval, tuple(values), tuple(runs))

    @classmethod
    def columns(cls, shard: str, servers: Sequence[str], at_micros: Sequence[int], interval: Sequence[float | None],
                values: dict[str, Sequence[float | None]],
                sources: dict[str, Sequence[tuple[int, str]]]) -> Series:
        """From columns as the catalog returns them (oldest first): times in microseconds since the
        epoch, None for unknown (a metric missing from `values` is unknown throughout), each
        metric's sources as (index, source) where a known value's source may change."""
        n = len(at_micros)
        return cls(shard, _runs_of(servers), array("q", at_micros),
                   array("d", (NAN if v is None else float(v) for v in interval)),
                   tuple(array("d", (NAN if v is None else float(v) for v in values.get(m, (None,) * n)))
                         for m in METRICS),
                   tuple(_canonical(sources.get(m, ())) for m in METRICS))

    def appended(self, sample: Sample) -> Series:
        """This series with one more sample (newer than the others, as a fresh round's is)."""
        if not len(self):
            return Series.of([sample])
        return Series.of([*self, sample]) if micros(sample.at) < self._at[-1] else self._concat(Series.of([sample]))

    def _concat(self, other: Series) -> Series:
        offset = len(self)
        runs = []
        for mine, theirs in zip(self._runs, other._runs, strict=True):
            merged = list(mine)
            for i, source in theirs:
                if not merged or merged[-1][1] != source:
                    merged.append((i + offset, source))
            runs.append(tuple(merged))
        servers = list(self._servers)
        for i, server in other._servers:
            if not servers or servers[-1][1] != server:
                servers.append((i + offset, server))
        return Series(self.shard or other.shard, tuple(servers), self._at + other._at,
                      self._interval + other._interval,
                      tuple(a + b for a, b in zip(self._values, other._values, strict=True)), tuple(runs))

    def take(self, indexes: Sequence[int]) -> Series:
        """The samples at these positions (in this order), as a new series."""
        runs = []
        for m in range(len(METRICS)):
            changes: list[tuple[int, str]] = []
            column = self._values[m]
            for new, old in enumerate(indexes):
                if math.isnan(column[old]):
                    continue
                source = self._source(m, old)
                if not changes or changes[-1][1] != source:
                    changes.append((new, source))
            runs.append(tuple(changes))
        return Series(self.shard, _runs_of(self.server_at(i) for i in indexes),
                      array("q", (self._at[i] for i in indexes)),
                      array("d", (self._interval[i] for i in indexes)),
                      tuple(array("d", (column[i] for i in indexes)) for column in self._values), tuple(runs))

    def with_unknown(self, index: int, metric: str) -> Series:
        """A copy with one value made unknown (cleaning)."""
        values = list(self._values)
        column = array("d", values[_INDEX[metric]])
        column[index] = NAN
        values[_INDEX[metric]] = column
        return Series(self.shard, self._servers, self._at, self._interval, tuple(values), self._runs)

    # ------------------------------------------------------------------ reading it

    def __len__(self) -> int:
        return len(self._at)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> Series: ...

    def __getitem__(self, index: int | slice) -> Sample | Series:
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("series index out of range")
        return Sample.model_construct(
            shard=self.shard, server=self.server_at(index), at=from_micros(self._at[index]),
            interval_s=self.interval_at(index), metrics=self.metrics_at(index))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Series):
            return (self.shard, self._servers, self._at, self._runs) == (other.shard, other._servers, other._at,
                                                                         other._runs) \
                and _same(self._interval, other._interval) \
                and all(_same(a, b) for a, b in zip(self._values, other._values, strict=True))
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Series({self.shard!r}, {len(self)} samples)"

    def at(self, index: int) -> datetime:
        return from_micros(self._at[index])

    def micros_at(self, index: int) -> int:
        return self._at[index]

    def interval_at(self, index: int) -> float | None:
        value = self._interval[index]
        return None if math.isnan(value) else value

    def value_at(self, index: int, metric: str) -> float | None:
        value = self._values[_INDEX[metric]][index]
        return None if math.isnan(value) else value

    def _source(self, m: int, index: int) -> str:
        return _in_run(self._runs[m], index)

    def server_at(self, index: int) -> str:
        return _in_run(self._servers, index)

    def source_at(self, index: int, metric: str) -> str | None:
        m = _INDEX[metric]
        return None if math.isnan(self._values[m][index]) else self._source(m, index)

    def metrics_at(self, index: int) -> dict[str, MetricValue | None]:
        out: dict[str, MetricValue | None] = {}
        for m, metric in enumerate(METRICS):
            value = self._values[m][index]
            out[metric] = None if math.isnan(value) else MetricValue(value=value, source=self._source(m, index))
        return out

    def values(self, metric: str) -> list[float | None]:
        """One metric over the window, oldest first, None where unknown."""
        return [None if math.isnan(v) else v for v in self._values[_INDEX[metric]]]

    def latest(self, metric: str) -> float | None:
        """The newest sample's value of one metric (None: unknown, or no sample)."""
        return self.value_at(len(self) - 1, metric) if len(self) else None

    def rows(self) -> list[Row]:
        """Light views of every sample, oldest first, for loops over every shard's window."""
        return [Row(self, i) for i in range(len(self))]

    def newest_first(self, until: datetime | None) -> NewestFirst:
        """The samples up to `until` (all when None), newest first, made as they are read."""
        end = len(self) if until is None else bisect_right(self._at, micros(until))
        return NewestFirst(self, end)


def _runs_of(values: Iterable[str]) -> tuple[tuple[int, str], ...]:
    runs: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        if not runs or runs[-1][1] != value:
            runs.append((i, value))
    return tuple(runs)


def _canonical(runs: Iterable[tuple[int, str]]) -> tuple[tuple[int, str], ...]:
    """Runs as Series.of makes them: a run only where the source changes."""
    out: list[tuple[int, str]] = []
    for i, value in runs:
        if not out or out[-1][1] != value:
            out.append((int(i), str(value)))
    return tuple(out)


def _in_run(runs: tuple[tuple[int, str], ...], index: int) -> str:
    k = bisect_right(runs, index, key=lambda run: run[0]) - 1
    return runs[max(k, 0)][1] if runs else ""


def _same(a: array, b: array) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


class Row:
    """One sample of a series, read in place: what the detector reads of a Sample."""

    __slots__ = ("_i", "_s", "at", "interval_s")

    def __init__(self, series: Series, index: int):
        self._s = series
        self._i = index
        self.at = series.at(index)
        self.interval_s = series.interval_at(index)

    @property
    def shard(self) -> str:
        return self._s.shard

    @property
    def server(self) -> str:
        return self._s.server_at(self._i)

    def value(self, metric: str) -> float | None:
        value = self._s._values[_INDEX[metric]][self._i]  # Series.value_at, inlined: the detector's inner loop
        return None if value != value else value  # NaN (unknown) is the only value unequal to itself

    @property
    def metrics(self) -> dict[str, MetricValue | None]:
        return self._s.metrics_at(self._i)

    def sample(self) -> Sample:
        return self._s[self._i]


class NewestFirst(Sequence[Row]):
    """The first `end` samples of a series, newest first; each row is made once, when read."""

    __slots__ = ("_end", "_rows", "_series")

    def __init__(self, series: Series, end: int):
        self._series = series
        self._end = end
        self._rows: list[Row] = []

    def __len__(self) -> int:
        return self._end

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> list[Row]: ...

    def __getitem__(self, index: int | slice) -> Row | list[Row]:
        if isinstance(index, slice):
            return [self[i] for i in range(self._end)[index]]
        if index < 0:
            index += self._end
        if not 0 <= index < self._end:
            raise IndexError("index out of range")
        while len(self._rows) <= index:
            self._rows.append(Row(self._series, self._end - 1 - len(self._rows)))
        return self._rows[index]

    def __iter__(self) -> Iterator[Row]:
        rows, series, end = self._rows, self._series, self._end
        for i in range(end):
            if i == len(rows):
                rows.append(Row(series, end - 1 - i))
            yield rows[i]

    def __bool__(self) -> bool:
        return self._end > 0


def as_series(samples: Series | Iterable[Sample] | None, shard: str = "") -> Series:
    """A window as a Series, whatever it was given as (recordings and tests give Samples)."""
    if isinstance(samples, Series):
        return samples
    return Series.of(samples or (), shard=shard)


def validate(value: Any) -> Series:
    """Observation.metrics' values: a Series, or samples (models or their JSON) made into one."""
    if isinstance(value, Series):
        return value
    if isinstance(value, (list, tuple)):
        return Series.of([v if isinstance(v, Sample) else Sample.model_validate(v) for v in value])
    raise TypeError("a metric window is a list of samples")
