"""The plan's `forecast` cause: split a shard before its load crosses a hot threshold. No I/O.

For every active shard of a database whose policy has `forecast.mode` other than off, each
metric with a hot threshold is forecast from the shard's hourly history (engine.detect.forecast).
When the upper edge of the forecast's band crosses the threshold within the lead time (the
slowest past move of similar size, measured from the catalog, plus `forecast.lead_margin`), the
plan gets a split whose reason is the forecast, with the forecast, its band, the crossing and
the history it was fitted on as evidence. In `advise` mode (forecast-only, the default) the
same finding is a note in the plan and the PR comment and nothing acts. A forecast never plans
a merge (engine.plan.load holds a merge back when the merged shard is forecast hot). The same
rules as a load split apply: resharding switches, cooldown, max_shards, max_concurrent, the
preconditions of a move.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from engine.config.loader import Desired, DesiredDatabase
from engine.config.models import span
from engine.detect.forecast import History, LoadForecast, about, lead_time, outlook, storage_note
from engine.keyspace import KeyRange
from engine.observe.metrics import METRICS, UNITS
from engine.observe.models import CatalogShard, Observation
from engine.plan.load import (
    _overlaps,
    _spec,
    capable_targets,
    judged_at,
    name_taken,
    preconditions,
    split_targets,
    storage_by_server,
)
from engine.plan.models import Reason, SplitShard


def forecast_actions(desired: Desired, observation: Observation, planned: list) -> tuple[list[SplitShard], list[str]]:
    """Splits planned on a forecast (after the load-driven actions `planned`), and notes."""
    actions: list[SplitShard] = []
    notes: list[str] = []
    now = judged_at(observation) or observation.now()
    storage = storage_by_server(observation)
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
        for shard in shards:
            hourly = observation.hourly.get(shard.address, ())
            note = storage_note(shard.address, hourly, policy, now) if hourly else None
            if note:
                notes.append(f"shard.{shard.address}: {note}")
            found = _first_crossing(shard, hourly, db, now)
            if found is None:
                continue
            forecast, crossing, threshold = found
            action, line = _consider(db, shard, forecast, crossing, threshold, observation, now, ours + actions,
                                     storage, desired.resharding_enabled)
            if action:
                actions.append(action)
            if line:
                notes.append(line)
    return actions, notes


def _first_crossing(shard: CatalogShard, hourly: History, db: DesiredDatabase,
                    now: datetime) -> tuple[LoadForecast, datetime, float] | None:
    policy = db.effective_policy
    best: tuple[LoadForecast, datetime, float] | None = None
    for metric in METRICS:
        threshold = getattr(policy.hot, metric)
        if threshold is None or not hourly:
            continue
        found = outlook(shard.address, metric, hourly, threshold, now, policy)
        if found and found[1] and (best is None or found[1] < best[1]):
            best = (found[0], found[1], threshold)
    return best


def _consider(db: DesiredDatabase, shard: CatalogShard, forecast: LoadForecast, crossing: datetime,
              threshold: float, observation: Observation, now: datetime, planned: list,
              storage: dict[str, float], fleet_enabled: bool) -> tuple[SplitShard | None, str | None]:
    policy = db.effective_policy
    live = observation.shards.get(shard.address)
    size = live.holding.size_bytes if live and live.holding else None
    lead = lead_time(observation.moves, size, policy.forecast.lead_margin, policy.forecast.default_move)
    head = (f"shard.{shard.address}: {forecast.describe(threshold, UNITS.get(forecast.metric, ''), now)};"
            f" lead time {span(round(lead.seconds))} ({lead.why})")
    if policy.forecast.mode == "advise":
        return None, (f"{head}; forecast-only (forecast.mode: advise): no split is planned; with forecast.mode: act"
                      " one is planned once the crossing is within the lead time")
    if crossing - now > timedelta(seconds=lead.seconds):
        return None, f"{head}; a split is planned once the crossing is within the lead time"
    address = f"shard.{db.name}/{shard.name}"
    if any(getattr(a, "address", None) == address for a in planned):
        return None, None  # already split for its load
    blocked = _why_not(db, shard, observation, now, planned, fleet_enabled)
    if blocked:
        return None, f"{head}; no split is planned: {blocked}"
    able, _ = capable_targets(db.spec.placement, observation)
    text = (f"{shard.address} is forecast to cross the hot threshold of {forecast.metric} in about"
            f" {about(crossing - now)}, within the lead time {span(round(lead.seconds))}")
    targets = split_targets(db, shard, storage, able, policy.autosplit.targets)
    return SplitShard(database=db.name, source=_spec(shard), targets=targets,
                      evidence=(), automatic=policy.autosplit.enabled, lead_time=lead.why,
                      forecast=forecast.model_copy(update={"threshold": threshold, "judged_at": now}),
                      reason=Reason(cause="forecast", text=text)), None


def _why_not(db: DesiredDatabase, shard: CatalogShard, observation: Observation, now: datetime, planned: list,
             fleet_enabled: bool) -> str | None:
    policy = db.effective_policy
    if not fleet_enabled:
        return "resharding is disabled for the whole fleet (resharding: {enabled: false})"
    if not db.spec.resharding:
        return f"resharding is disabled for {db.name} (resharding: false)"
    cooldown = timedelta(seconds=policy.autosplit.cooldown)
    for event in observation.catalog.reshard_events:
        if (event.database == db.name and event.at + cooldown > now and cooldown > timedelta(0)
                and any(_overlaps((shard.lo, shard.hi), r) for r in event.ranges)):
            return f"held back by the cooldown until {(event.at + cooldown).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    active = [s for s in observation.catalog.databases[db.name].shards if s.state == "active"]
    ours = [a for a in planned if a.database == db.name]
    if len(active) + (policy.autosplit.targets - 1) * (1 + len(ours)) > policy.autosplit.max_shards:
        return f"{db.name} would exceed autosplit.max_shards ({policy.autosplit.max_shards})"
    if len(ours) >= policy.autosplit.max_concurrent:
        return f"deferred to a later plan (autosplit.max_concurrent is {policy.autosplit.max_concurrent})"
    recorded_names = {s.name: s.state for s in observation.catalog.databases[db.name].shards}
    return (preconditions(db, [shard], observation) or capable_targets(db.spec.placement, observation)[1]
            or name_taken(recorded_names, KeyRange(shard.lo, shard.hi).split(policy.autosplit.targets)))
