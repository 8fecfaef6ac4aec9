"""The plan's `forecast` cause: split a shard before its load crosses a hot threshold. No I/O.

For every active shard of a database whose policy has `forecast.mode` other than off, each
metric with a hot threshold is forecast from the shard's hourly history (engine.detect.forecast),
and, for a shard made by a split or a merge, its ancestors' history (the parent's, the merged
sources' summed: `lineage`). A crossing is the point forecast over the threshold (or the band's
upper edge for three hours in a row). The shards forecast to cross are a batch, in the order of
their crossings: with `autosplit.max_concurrent` moves at a time, the n-th of them is split n
moves after the first starts, so its lead time is n moves (the slowest past move of similar
size, measured from the catalog) plus `forecast.lead_margin`. When any of them is within its
lead time, the plan splits the first of the batch (as many as max_concurrent allows) with the
forecast, its band, the crossing and the history it was fitted on as evidence. In `advise`
mode (forecast-only, the default) the same finding is a note in the plan and the PR comment and
nothing acts. A forecast never plans a merge (engine/plan/load_rules.py holds a merge back when the
merged shard is forecast hot). The same rules as a load split apply: resharding switches,
cooldown (judged at the present, as the load path does: the catalog's events happened in real
time, even when the load is a recording's), max_shards, max_concurrent, the preconditions of a
move.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from engine.config.loader import Desired, DesiredDatabase
from engine.detect.forecast import (
    STORAGE_HORIZON,
    History,
    LeadTime,
    Lineage,
    LoadForecast,
    about,
    lead_time,
    outlook,
    storage_note,
)
from engine.durations import span
from engine.keyspace import KeyRange, parse_name
from engine.observe.metrics import METRICS, UNITS
from engine.observe.models import CatalogShard, HourlySeries, Observation
from engine.plan.load_rules import judged_at
from engine.plan.models import Reason, SplitShard
from engine.plan.placement import (
    capable_targets,
    name_taken,
    overlaps,
    preconditions,
    spec_of,
    split_targets,
    storage_by_server,
)


def forecast_actions(desired: Desired, observation: Observation, planned: list) -> tuple[list[SplitShard], list[str]]:
    """Splits planned on a forecast (after the load-driven actions `planned`), and notes."""
    actions: list[SplitShard] = []
    notes: list[str] = []
    now = judged_at(observation) or observation.now()
    storage = storage_by_server(observation)
    families = lineages(observation)
    for name, db in desired.databases.items():
        policy = db.effective_policy
        recorded = observation.catalog.databases.get(name)
        if policy.forecast.mode == "off" or recorded is None or recorded.state != "active":
            continue
        if any(p.database == name for p in observation.catalog.pending_moves):
            continue
        shards = sorted((s for s in recorded.shards if s.state == "active"),
                        key=lambda s: KeyRange(s.lo, s.hi).lo_unsigned)
        ours = [a for a in planned if a.database == name]
        batch = []
        for shard in shards:
            hourly = observation.hourly.get(shard.address, ())
            family = families.get(shard.address)
            note = storage_note(shard.address, hourly, policy, now, family) if hourly else None
            if note:
                notes.append(f"shard.{shard.address}: {note}")
            found = _first_crossing(shard, hourly, db, now, family)
            if found is not None:
                batch.append((found[1], shard.address, shard, found))
        batch.sort(key=lambda item: (item[0], item[1]))
        # the n-th of the batch waits for the n - 1 moves before it (and this plan's load splits)
        leads = {}
        due = False
        for position, (crossing, address, _, _) in enumerate(batch, start=len(ours) + 1):
            live = observation.shards.get(address)
            size = live.size if live else None
            leads[address] = lead_time(observation.moves, size, policy.forecast.lead_margin,
                                       policy.forecast.default_move).queued(position, policy.autosplit.max_concurrent)
            due |= crossing - now <= timedelta(seconds=leads[address].seconds)
        for crossing, address, shard, (forecast, _, threshold) in batch:
            action, line = _consider(db, shard, forecast, crossing, threshold, observation, now, ours + actions,
                                     storage, desired.resharding_enabled, leads[address], due)
            if action:
                actions.append(action)
            if line:
                notes.append(line)
    return actions, notes


def lineages(observation: Observation) -> dict[str, Lineage]:
    """Where each active shard's load was before the shard existed, by address: the shard it was
    split from (the narrowest recorded range holding it), or the shards merged into it (recorded
    ranges inside it), from the hourly history of addresses that are no longer active and whose
    history ended when the shard's began. One pass over the history, whatever the shard count."""
    retired: dict[str, list[tuple[int, int, str, History, datetime]]] = {}
    active = {s.address for d in observation.catalog.databases.values() for s in d.shards if s.state == "active"}
    for address, history in observation.hourly.items():
        database, _, name = address.partition("/")
        newest = _newest_hour(history)
        if address in active or newest is None:
            continue
        try:
            other = parse_name(name)
        except ValueError:
            continue
        retired.setdefault(database, []).append((other.lo_unsigned, other.hi_unsigned, address, history, newest))
    out = {}
    for database, recorded in observation.catalog.databases.items():
        for shard in recorded.shards if database in retired else ():
            if shard.state == "active" and (found := _lineage(shard, retired[database], observation)):
                out[shard.address] = found
    return out


def _lineage(shard: CatalogShard, retired: list[tuple[int, int, str, History, datetime]],
             observation: Observation) -> Lineage | None:
    first = _first_hour(observation.hourly.get(shard.address, ()))
    mine = KeyRange(shard.lo, shard.hi)
    lo, hi = mine.lo_unsigned, mine.hi_unsigned
    parents, sources = [], []
    for o_lo, o_hi, address, history, newest in retired:
        if first is not None and newest > first + timedelta(hours=1):
            continue  # it still had load after this shard began: not what this shard took over
        if o_lo <= lo and hi <= o_hi and (o_lo, o_hi) != (lo, hi):
            parents.append((o_hi - o_lo, address, history))
        elif lo <= o_lo and o_hi <= hi:
            sources.append((address, history))
    if parents:
        _, address, history = min(parents, key=lambda p: (p[0], p[1]))
        return Lineage(address, (history,))
    if sources:
        sources.sort(key=lambda pair: pair[0])
        return Lineage(" + ".join(a for a, _ in sources), tuple(h for _, h in sources))
    return None


def _first_hour(history: History) -> datetime | None:
    if isinstance(history, HourlySeries):
        return history.at[0] if history.at else None
    return history[0].at if history else None


def _newest_hour(history: History) -> datetime | None:
    if isinstance(history, HourlySeries):
        return history.at[-1] if history.at else None
    return history[-1].at if history else None


def _first_crossing(shard: CatalogShard, hourly: History, db: DesiredDatabase, now: datetime,
                    family: Lineage | None) -> tuple[LoadForecast, datetime, float] | None:
    policy = db.effective_policy
    best: tuple[LoadForecast, datetime, float] | None = None
    for metric in METRICS:
        threshold = getattr(policy.hot, metric)
        if threshold is None or not hourly:
            continue
        horizon = STORAGE_HORIZON if metric == "storage_percent" else None
        found = outlook(shard.address, metric, hourly, threshold, now, policy, horizon, family)
        if found and found[1] and (best is None or found[1] < best[1]):
            best = (found[0], found[1], threshold)
    return best


def _consider(db: DesiredDatabase, shard: CatalogShard, forecast: LoadForecast, crossing: datetime,
              threshold: float, observation: Observation, now: datetime, planned: list,
              storage: dict[str, float], fleet_enabled: bool, lead: LeadTime,
              due: bool) -> tuple[SplitShard | None, str | None]:
    policy = db.effective_policy
    head = (f"shard.{shard.address}: {forecast.describe(threshold, UNITS.get(forecast.metric, ''), now)};"
            f" lead time {span(round(lead.seconds))} ({lead.why})")
    if policy.forecast.mode == "advise":
        return None, (f"{head}; forecast-only (forecast.mode: advise): no split is planned; with forecast.mode: act"
                      " one is planned once the crossing is within the lead time")
    if not due:
        return None, f"{head}; a split is planned once the crossing is within the lead time"
    address = f"shard.{db.name}/{shard.name}"
    if any(getattr(a, "address", None) == address for a in planned):
        return None, None  # already split for its load
    blocked = _why_not(db, shard, observation, planned, fleet_enabled)
    if blocked:
        return None, f"{head}; no split is planned: {blocked}"
    able, _ = capable_targets(db.spec.placement, observation)
    text = (f"{shard.address} is forecast to cross the hot threshold of {forecast.metric} in about"
            f" {about(crossing - now)}, within the lead time {span(round(lead.seconds))}")
    targets = split_targets(db, shard, storage, able, policy.autosplit.targets)
    return SplitShard(database=db.name, source=spec_of(shard), targets=targets,
                      evidence=(), automatic=policy.autosplit.enabled, lead_time=lead.why,
                      forecast=forecast.model_copy(update={"threshold": threshold, "judged_at": now}),
                      reason=Reason(cause="forecast", text=text)), None


def _why_not(db: DesiredDatabase, shard: CatalogShard, observation: Observation, planned: list,
             fleet_enabled: bool) -> str | None:
    policy = db.effective_policy
    now = observation.now()  # the catalog's events happened in real time: a cooldown is judged at the present
    if not fleet_enabled:
        return "resharding is disabled for the whole fleet (resharding: {enabled: false})"
    if not db.spec.resharding:
        return f"resharding is disabled for {db.name} (resharding: false)"
    cooldown = timedelta(seconds=policy.autosplit.cooldown)
    for event in observation.catalog.reshard_events:
        if (event.database == db.name and event.at + cooldown > now and cooldown > timedelta(0)
                and any(overlaps((shard.lo, shard.hi), r) for r in event.ranges)):
            return f"held back by the cooldown until {(event.at + cooldown).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    active = [s for s in observation.catalog.databases[db.name].shards if s.state == "active"]
    ours = [a for a in planned if a.database == db.name]
    if len(active) + (policy.autosplit.targets - 1) * (1 + len(ours)) > policy.autosplit.max_shards:
        return f"{db.name} would exceed autosplit.max_shards ({policy.autosplit.max_shards})"
    if len(ours) >= policy.autosplit.max_concurrent:
        return f"deferred to a later plan (autosplit.max_concurrent is {policy.autosplit.max_concurrent})"
    return (preconditions(db, [shard], observation) or capable_targets(db.spec.placement, observation)[1]
            or name_taken(db, observation, KeyRange(shard.lo, shard.hi).split(policy.autosplit.targets)))
