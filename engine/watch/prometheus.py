"""`/metrics` in the Prometheus exposition format, from the daemon's snapshot (prometheus_client).

A custom collector reads the snapshot at scrape time, so a scrape costs nothing between
scrapes and never touches a database. Gauges per shard and metric; counters of actions by
kind and result; a summary of collection round durations; the last pause of each moved range;
replica links (lag, missing, broken) and leftover replication.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    SummaryMetricFamily,
)

from engine.clock import system_clock
from engine.observe.metrics import METRICS
from engine.snapshot import move_eta_seconds
from engine.watch.view import View

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOAD_STATES = ("hot", "cold", "normal", "stale", "unknown")


class SnapshotCollector:
    def __init__(self, view: View):
        self.view = view

    def collect(self):
        snap = self.view.get()
        value = GaugeMetricFamily("shardctl_shard_metric", "Latest sampled value of a shard's load metric",
                                  labels=["database", "shard", "server", "metric"])
        load = GaugeMetricFamily(
            "shardctl_shard_load",
            "1 for the shard's current load state as judged by the detector",
            labels=["database", "shard", "server", "state"],
        )
        for shard in snap.shards:
            for metric in METRICS:
                v = shard.latest.get(metric)
                if v is not None:  # unknown is absent, never zero
                    value.add_metric([shard.database, shard.name, shard.server, metric], v)
            for state in LOAD_STATES:
                load.add_metric([shard.database, shard.name, shard.server, state], 1.0 if shard.load == state else 0.0)
        yield value
        yield load
        yield GaugeMetricFamily(
            "shardctl_daemon_leader", "1 when this daemon leads", value=1.0 if snap.role == "leader" else 0.0
        )
        yield GaugeMetricFamily(
            "shardctl_daemon_paused", "1 when automation is paused (shardctl pause)", value=1.0 if snap.paused else 0.0
        )
        yield GaugeMetricFamily(
            "shardctl_config_valid",
            "0 while the last edit of the config is invalid",
            value=0.0 if snap.config_error else 1.0,
        )
        pending = GaugeMetricFamily(
            "shardctl_plan_actions", "Actions in the current plan by who may apply them", labels=["by"]
        )
        pending.add_metric(["daemon"], float(len(snap.autonomous)))
        pending.add_metric(["person"], float(len(snap.pending)))
        yield pending
        actions = CounterMetricFamily("shardctl_actions", "Autonomous actions by kind and result",
                                      labels=["kind", "result"])
        for (kind, result), count in sorted(self.view.action_counts().items()):
            actions.add_metric([kind, result], float(count))
        yield actions
        rounds, seconds = self.view.collections
        yield SummaryMetricFamily("shardctl_collection_duration_seconds", "Duration of metric collection rounds",
                                  count_value=rounds, sum_value=seconds)
        yield CounterMetricFamily("shardctl_collection_failures", "Collection rounds that failed as a whole",
                                  value=float(self.view.collection_failures))
        yield from _servers(snap)
        yield from _moves(snap)
        yield from _pauses(snap)
        yield from _replicas(snap)
        yield from _branch_links(snap)
        yield from _backups(snap)
        yield from _leftovers(snap)
        if snap.last_collect_at is not None:
            yield GaugeMetricFamily("shardctl_last_collection_timestamp_seconds", "When the last round finished",
                                    value=snap.last_collect_at.timestamp())


def exposition(view: View) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(view))
    return generate_latest(registry)


def _servers(snap):
    """1 per server with active shards that answered the last collection round, 0 when silent."""
    up = GaugeMetricFamily("shardctl_server_up", "1 when the server answered the last collection round",
                           labels=["server"])
    for server in sorted({s.server for s in snap.shards}):
        up.add_metric([server], 0.0 if server in snap.silent_servers else 1.0)
    yield up


def _moves(snap):
    """The split or merge this daemon is running, if any: when it started, when it last reported,
    rows copied, replication lag and the ETA of its phase (alerting on stuck and slow moves)."""
    activity, since, progress, reported = snap.running()  # this daemon's, or a person's apply
    yield GaugeMetricFamily("shardctl_move_in_progress", "1 while an apply runs (a split or merge, a drop...),"
                            " this daemon's or another process's", value=1.0 if since is not None else 0.0)
    if since is None:
        return
    progress = progress or {}
    step = str(progress.get("step") or activity)
    started = GaugeMetricFamily("shardctl_move_started_timestamp_seconds", "When the running apply started",
                                labels=["step"])
    started.add_metric([step], since.timestamp())
    yield started
    if reported is None:
        return
    yield _one("shardctl_move_progress_timestamp_seconds", "When the running move last reported its figures", step,
               reported.timestamp())
    for name, key, help_text in (
            ("shardctl_move_rows_copied", "rows_copied", "Rows the initial copy has moved so far"),
            ("shardctl_move_rows_expected", "rows_expected", "Rows the initial copy is expected to move"),
            ("shardctl_move_lag_bytes", "lag_bytes", "Replication lag of the targets behind the source")):
        if isinstance(progress.get(key), (int, float)):
            yield _one(name, help_text, step, float(progress[key]))
    eta = move_eta_seconds(progress)
    if eta is not None:
        yield _one("shardctl_move_eta_seconds", "Time the running move's phase still needs at its pace", step, eta)


def _pauses(snap):
    """Per address, the last finished move's pause (fence armed to routing flip committed): the
    history's pause_ms, in seconds; absent before any move."""
    latest: dict[tuple[str, str], float] = {}
    for entry in snap.history:  # newest first
        if entry.pause_ms is not None:
            latest.setdefault((entry.event, entry.address), entry.pause_ms)
    if not latest:
        return
    family = GaugeMetricFamily("shardctl_move_pause_seconds",
                               "Writes to the range refused by the last move at this address, from its fence to its"
                               " routing flip committed (the history's pause_ms / 1000)", labels=["event", "address"])
    for (event, address), pause in sorted(latest.items()):
        family.add_metric([event, address], pause / 1000)
    yield family


def _one(name: str, help_text: str, step: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["step"])
    family.add_metric([step], value)
    return family


def _replicas(snap):
    """Physical standbys of the fleet's servers; absent when there are none."""
    if not snap.replicas:
        return
    lag_bytes = GaugeMetricFamily("shardctl_replica_lag_bytes", "WAL a standby has not replayed yet",
                                  labels=["server", "replica"])
    lag_seconds = GaugeMetricFamily("shardctl_replica_lag_seconds", "Replay lag of a standby (absent when idle)",
                                    labels=["server", "replica"])
    for r in snap.replicas:
        if r.lag_bytes is not None:
            lag_bytes.add_metric([r.server, r.name], r.lag_bytes)
        if r.lag_seconds is not None:
            lag_seconds.add_metric([r.server, r.name], r.lag_seconds)
    yield lag_bytes
    yield lag_seconds


def _branch_links(snap):
    """The links of `data: replica` branches: bytes of each shard's WAL not yet confirmed, the
    worst per replica, and 1 for a missing link (absent when there is no replica)."""
    if not snap.branch_links:
        return
    lag = GaugeMetricFamily("shardctl_branch_replica_lag_bytes", "WAL of a shard its replica branch has not"
                            " confirmed yet", labels=["branch", "shard", "server"])
    worst = GaugeMetricFamily("shardctl_branch_replica_max_lag_bytes", "The largest lag of a replica branch's links",
                              labels=["branch"])
    missing = GaugeMetricFamily("shardctl_branch_replica_link_missing", "1 when a replica branch has no link to"
                                " a shard of its parent (that shard's writes do not reach it)",
                                labels=["branch", "shard"])
    broken = GaugeMetricFamily("shardctl_branch_replica_link_broken", "1 when a replica branch's subscription"
                               " cannot reach a shard of its parent (a rotated password, a server gone): the"
                               " dashboard and /api/replication say why", labels=["branch", "shard", "server"])
    most = {}  # per branch, its largest known lag
    for link in snap.branch_links:
        if link.lag_bytes is not None:
            lag.add_metric([link.branch, link.shard, link.server], float(link.lag_bytes))
            most[link.branch] = max(most.get(link.branch, 0), link.lag_bytes)
        if link.state != "unknown":
            missing.add_metric([link.branch, link.shard], 1.0 if link.state == "missing" else 0.0)
        if link.state in ("ok", "broken"):
            broken.add_metric([link.branch, link.shard, link.server], 1.0 if link.state == "broken" else 0.0)
    for branch, value in sorted(most.items()):
        worst.add_metric([branch], float(value))
    yield lag
    yield worst
    yield missing
    yield broken


def _backups(snap):
    """Backed-up servers: when the newest base backup ended and its age, how often one is due,
    and WAL streaming (absent when nothing is backed up; a value not known is absent)."""
    if not snap.backups:
        return
    last = GaugeMetricFamily("shardctl_backup_last_timestamp_seconds", "When the server's newest base backup ended",
                             labels=["server"])
    age = GaugeMetricFamily("shardctl_backup_age_seconds", "Age of the server's newest base backup",
                            labels=["server"])
    every = GaugeMetricFamily("shardctl_backup_interval_seconds", "backups.every: how often a base backup is due",
                              labels=["server"])
    streaming = GaugeMetricFamily("shardctl_backup_wal_streaming", "1 while the server's WAL streams to its backups",
                                  labels=["server"])
    lag = GaugeMetricFamily("shardctl_backup_wal_lag_bytes", "WAL the server has written that its backups have"
                            " not received yet", labels=["server"])
    now = system_clock()
    for b in snap.backups:
        if b.last_backup_at is not None:
            last.add_metric([b.server], b.last_backup_at.timestamp())
            age.add_metric([b.server], max(0.0, (now - b.last_backup_at).total_seconds()))
        if b.every_seconds is not None:
            every.add_metric([b.server], b.every_seconds)
        if b.streaming is not None:
            streaming.add_metric([b.server], 1.0 if b.streaming else 0.0)
        if b.wal_lag_bytes is not None:
            lag.add_metric([b.server], float(b.wal_lag_bytes))
    yield from (last, age, every, streaming, lag)


def _leftovers(snap):
    """Slots and subscriptions of shardctl's naming that no running operation owns: how many (0
    when none, so that a quiet fleet is told from an unscraped one), and the WAL each slot keeps."""
    yield GaugeMetricFamily("shardctl_leftover_replication_objects", "Slots and subscriptions of shardctl's that no"
                            " running operation owns (`shardctl orphans --remove` drops them)",
                            value=float(len(snap.orphans)))
    retained = GaugeMetricFamily("shardctl_leftover_replication_retained_bytes", "WAL a leftover slot keeps on its"
                                 " server", labels=["server", "database", "slot"])
    for orphan in snap.orphans:
        if orphan.kind == "slot" and orphan.retained_bytes is not None:
            retained.add_metric([orphan.server, orphan.database or "", orphan.name], float(orphan.retained_bytes))
    yield retained
