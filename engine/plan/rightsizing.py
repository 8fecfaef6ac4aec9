"""Right-sizing advice: servers whose load stays far under their capacity over the stored
history, and the moves that would empty one so that it could be retired. Advice only: nothing
here becomes an action. No I/O: samples and the observation in, advice out, so it reads live
history, a recorded file (`plan --metrics FILE`) or longer rollups alike.

A server's load at an instant is the sum of its shards' percentages (each is a share of that
server's capacity); it counts only where every shard on it has a known value at that instant
(a server's shards are read in one round, so they share its times). A server is underused when
its peak stays under every threshold of `rightsizing` for at least `rightsizing.over`, known
throughout. Emptying it is judged on peaks: each shard's peak added to the receiving server's
peak (scaled by the declared capacities of both), which must stay under `target_max_percent`.
The catalog's server is never advised away, and servers are retired greedily, least used first,
so two pieces of advice never count on each other's room.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from engine.config import models
from engine.config.loader import Desired
from engine.durations import span
from engine.frozen import Frozen
from engine.observe.metrics import UNITS, Sample
from engine.observe.models import CatalogShard, Observation

CAPACITY_FIELD = {"cpu_percent": "cpus", "memory_percent": "memory", "storage_percent": "storage"}




class Move(Frozen):
    shard: str
    target: str


class ServerAdvice(Frozen):
    """One underused server: its peaks against the thresholds, over what history, and the moves
    that would empty it (or why it cannot be emptied)."""

    server: str
    peaks: dict[str, float]
    thresholds: dict[str, float]
    samples: int
    since: datetime
    until: datetime
    moves: tuple[Move, ...] = ()
    projected: dict[str, dict[str, float]] = {}  # receiving server -> metric -> its peak with the moves
    target_max_percent: float = 60.0
    blocked: str | None = None  # why the shards cannot go elsewhere, when they cannot
    source: str = "policy"  # where the thresholds come from, file:line

    def describe(self) -> str:
        measured = span((self.until - self.since).total_seconds())
        under = ", ".join(f"{_label(m)} {_pct(v)} (under {_pct(self.thresholds[m])})"
                          for m, v in sorted(self.peaks.items()))
        head = (f"server.{self.server}: right-sizing: its load stayed far under its capacity for {measured}"
                f" ({self.samples} samples from {_time(self.since)} to {_time(self.until)}): peak {under}")
        if self.blocked:
            tail = f"; it cannot be emptied: {self.blocked}"
        else:
            moves = ", ".join(f"{m.shard} to {m.target}" for m in self.moves)
            after = "; ".join(f"{target} then peaks at "
                              + ", ".join(f"{_label(m)} {_pct(v)}" for m, v in sorted(peaks.items()))
                              for target, peaks in sorted(self.projected.items()))
            tail = (f"; it could be retired by moving {moves} ({after}; under {_pct(self.target_max_percent)}),"
                    " then removing it from every placement")
        return f"{head}{tail}; advice only, nothing is planned; thresholds from {self.source}"


def _label(metric: str) -> str:
    return metric.removesuffix("_percent")


def _pct(value: float) -> str:
    unit = UNITS.get("cpu_percent", "%")
    return (f"{value:.3g}" if value < 100 else f"{value:,.0f}") + unit


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def server_load(shards: list[CatalogShard], metrics: Mapping[str, Sequence[Sample]],
                metric_names: list[str]) -> dict[datetime, dict[str, float]]:
    """Per instant, each metric summed over the server's shards; an instant where some shard's
    value is unknown (or missing) is left out for that metric. Sums and counts as it goes: a
    plan over 10,000 shards with a long history reads millions of values here."""
    sums: dict[datetime, list[float]] = {}
    counts: dict[datetime, list[int]] = {}
    width = len(metric_names)
    for shard in shards:
        for sample in metrics.get(shard.address, ()):
            total = sums.get(sample.at)
            if total is None:
                total = sums[sample.at] = [0.0] * width
                counts[sample.at] = [0] * width
            seen = counts[sample.at]
            values = sample.metrics
            for i, metric in enumerate(metric_names):
                mv = values.get(metric)
                if mv is not None:
                    total[i] += mv.value
                    seen[i] += 1
    wanted = len(shards)
    # kept even when empty: an instant with something unknown breaks the run (_known_run)
    return {at: {m: sums[at][i] for i, m in enumerate(metric_names) if counts[at][i] == wanted}
            for at in sorted(sums)}


def _peaks(series: dict[datetime, dict[str, float]], metric_names: list[str]) -> dict[str, float] | None:
    """Peak per metric over the instants where every metric is known; None when there are none."""
    full = [totals for totals in series.values() if all(m in totals for m in metric_names)]
    if not full:
        return None
    return {m: max(t[m] for t in full) for m in metric_names}


def _shard_peaks(shard: CatalogShard, metrics: Mapping[str, Sequence[Sample]], names: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in names:
        values = [v for s in metrics.get(shard.address, ()) if (v := s.value(metric)) is not None]
        out[metric] = max(values, default=0.0)
    return out


def _scale(metric: str, source: models.Capacity | None, target: models.Capacity | None) -> float:
    """A share of the source's capacity as a share of the target's (1 unless both are declared)."""
    field = CAPACITY_FIELD[metric]
    have = getattr(source, field, None) if source is not None else None
    want = getattr(target, field, None) if target is not None else None
    return float(have) / float(want) if have and want else 1.0


def advise(observation: Observation, settings: models.RightSizing, capacities: dict[str, models.Capacity],
           keep: frozenset[str] = frozenset(), source: str = "policy",
           max_age: float | None = None) -> tuple[ServerAdvice, ...]:
    """Underused servers, least used first, each with the moves that would empty it onto the
    others (or why it cannot be emptied). `keep`: servers never advised away (the catalog's).
    A server whose newest known load is older than `max_age` before the instant the metrics
    describe gets no advice (collection stopped: an old picture)."""
    judged = observation.metrics_at or observation.taken_at
    thresholds = settings.thresholds()
    if not settings.enabled or not thresholds:
        return ()
    names = sorted(thresholds)
    shards_by_server, placement = _layout(observation)
    # the cheap test first: a server whose first shard's history cannot span `over` is no
    # candidate, and with no candidate no server's load needs summing (a plan over 10,000
    # shards with a five-minute window pays nothing here)
    possible = [s for s, shards in shards_by_server.items() if s not in keep and _may_span(
        observation.metrics.get(shards[0].address, ()), settings.over)]
    if not possible:
        return ()
    peaks, spans = _server_peaks(observation, {s: shards_by_server[s] for s in possible}, names, with_empty=False)
    if not any(s in spans for s in possible):
        return ()
    others, _ = _server_peaks(observation, {s: v for s, v in shards_by_server.items() if s not in possible}, names)
    # a possible server without a known history is not an empty one: it has no peaks at all
    peaks = {**{s: v for s, v in others.items() if s not in possible}, **peaks}

    def underused(server: str) -> bool:
        if server not in spans or server in keep:
            return False
        since, until, _ = spans[server]
        if max_age is not None and judged is not None and (judged - until).total_seconds() > max_age:
            return False
        return ((until - since).total_seconds() >= settings.over
                and all(peaks[server][m] < thresholds[m] for m in names))

    candidates = sorted((s for s in spans if underused(s)),
                        key=lambda s: (max(peaks[s][m] / thresholds[m] if thresholds[m] else 0.0 for m in names), s))
    load = {s: dict(p) for s, p in peaks.items()}
    retired: set[str] = set()
    out: list[ServerAdvice] = []
    for server in candidates:
        since, until, count = spans[server]
        base = ServerAdvice(server=server, peaks=peaks[server], thresholds=thresholds, samples=count, since=since,
                            until=until, target_max_percent=settings.target_max_percent, source=source)
        moves, projected, blocked = _empty(server, shards_by_server[server], observation, placement, load, retired,
                                           capacities, names, settings.target_max_percent)
        if blocked:
            out.append(base.model_copy(update={"blocked": blocked}))
            continue
        retired.add(server)
        for target, values in projected.items():
            load[target] = values
        out.append(base.model_copy(update={"moves": moves, "projected": projected}))
    return tuple(out)


def _layout(observation: Observation) -> tuple[dict[str, list[CatalogShard]], dict[str, tuple[str, ...]]]:
    """Active shards by server, and each active database's placement."""
    shards_by_server: dict[str, list[CatalogShard]] = {}
    placement: dict[str, tuple[str, ...]] = {}
    for database in observation.catalog.databases.values():
        if database.state != "active":
            continue
        placement[database.name] = database.placement
        for shard in database.shards:
            if shard.state == "active":
                shards_by_server.setdefault(shard.server, []).append(shard)
    return shards_by_server, placement


def _may_span(window: Sequence[Sample], over: float) -> bool:
    return len(window) > 1 and (window[-1].at - window[0].at).total_seconds() + (window[0].interval_s or 0.0) >= over


def _server_peaks(observation: Observation, shards_by_server: dict[str, list[CatalogShard]], names: list[str],
                  with_empty: bool = True
                  ) -> tuple[dict[str, dict[str, float]], dict[str, tuple[datetime, datetime, int]]]:
    """Each server's peaks over its newest history known throughout, and that history's span
    (from, to, instants). With `with_empty`, a reachable server without shards is there too:
    it has no load (zero) and no span."""
    reachable = {n for n, s in observation.servers.items() if s.reachable} if with_empty else set()
    peaks: dict[str, dict[str, float]] = {}
    spans: dict[str, tuple[datetime, datetime, int]] = {}
    for server in sorted(reachable | set(shards_by_server)):
        shards = shards_by_server.get(server, [])
        if not shards:
            if server in reachable:
                peaks[server] = dict.fromkeys(names, 0.0)
            continue
        series = _known_run(server_load(shards, observation.metrics, names), names)
        found = _peaks(series, names)
        if found is None:
            continue
        peaks[server] = found
        times = list(series)
        first = observation.metrics.get(shards[0].address, ())
        interval = next((s.interval_s for s in first if s.at == times[0] and s.interval_s), 0.0) or 0.0
        spans[server] = (times[0] - _seconds(interval), times[-1], len(times))
    return peaks, spans


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def fleet_advice(desired: Desired, observation: Observation) -> tuple[ServerAdvice, ...]:
    """The advice for a declared fleet: thresholds from the `default` policy (a server serves
    every database), capacities as declared, the catalog's server kept."""
    resolved = desired.policies.get("default")
    policy = resolved.effective if resolved is not None and resolved.effective is not None else models.Policy()
    where = desired.where("policies", "default", "rightsizing") or desired.where("policies", "default")
    capacities = {name: spec.capacity for name, spec in desired.servers.items()}
    keep = frozenset({desired.catalog_server} if desired.catalog_server else ())
    return advise(observation, policy.rightsizing, capacities, keep, str(where) if where else "policy default",
                  max_age=policy.max_age_seconds)


def _known_run(series: dict[datetime, dict[str, float]], names: list[str]) -> dict[datetime, dict[str, float]]:
    """The newest unbroken run of instants with every metric known: an unknown instant ends the
    history that counts (a server that stopped answering says nothing about its load then)."""
    run: list[tuple[datetime, dict[str, float]]] = []
    for at, totals in reversed(list(series.items())):
        if not all(m in totals for m in names):
            break
        run.append((at, totals))
    return dict(reversed(run))


def _empty(server: str, shards: list[CatalogShard], observation: Observation, placement: dict[str, tuple[str, ...]],
           load: dict[str, dict[str, float]], retired: set[str], capacities: dict[str, models.Capacity],
           names: list[str], ceiling: float) -> tuple[tuple[Move, ...], dict[str, dict[str, float]], str | None]:
    """Place each shard of `server` on another server of its database's placement, the largest
    first, each on the server left least used; None of them may pass `ceiling`."""
    projected: dict[str, dict[str, float]] = {}
    moves: list[Move] = []
    shard_peaks = {s.address: _shard_peaks(s, observation.metrics, names) for s in shards}
    order = sorted(shards, key=lambda s: (-max(shard_peaks[s.address].values(), default=0.0), s.address))
    for shard in order:
        targets = [t for t in placement.get(shard.database, ()) if t != server and t not in retired and t in load]
        if not targets:
            return (), {}, (f"no other server of {shard.database}'s placement has known load to take {shard.address}"
                            " (add one to the placement, or wait for its samples)")
        best: tuple[float, str, dict[str, float]] | None = None
        for target in sorted(targets):
            current = projected.get(target) or load[target]
            after = {m: current[m] + shard_peaks[shard.address][m] * _scale(m, capacities.get(server),
                                                                              capacities.get(target))
                     for m in names}
            worst = max(after.values(), default=0.0)
            if worst < ceiling and (best is None or worst < best[0]):
                best = (worst, target, after)
        if best is None:
            return (), {}, (f"{shard.address} fits on no other server of {shard.database}'s placement under"
                            f" {_pct(ceiling)} of its capacity")
        projected[best[1]] = {m: round(v, 3) for m, v in best[2].items()}
        moves.append(Move(shard=shard.address, target=best[1]))
    return tuple(sorted(moves, key=lambda m: m.shard)), projected, None
