"""`/metrics` in the Prometheus exposition format, from the daemon's snapshot (prometheus_client).

A custom collector reads the snapshot at scrape time, so a scrape costs nothing between
scrapes and never touches a database. Gauges per shard and metric; counters of actions by
kind and result; a summary of collection round durations.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    SummaryMetricFamily,
)

from engine.observe.metrics import METRICS
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
        load = GaugeMetricFamily("shardctl_shard_load", "1 for the shard's current load state as judged by the detector",
                                 labels=["database", "shard", "server", "state"])
        for shard in snap.shards:
            for metric in METRICS:
                v = shard.latest.get(metric)
                if v is not None:  # unknown is absent, never zero
                    value.add_metric([shard.database, shard.name, shard.server, metric], v)
            for state in LOAD_STATES:
                load.add_metric([shard.database, shard.name, shard.server, state], 1.0 if shard.load == state else 0.0)
        yield value
        yield load
        yield GaugeMetricFamily("shardctl_daemon_leader", "1 when this daemon leads", value=1.0 if snap.role == "leader" else 0.0)
        yield GaugeMetricFamily("shardctl_daemon_paused", "1 when automation is paused (shardctl pause)",
                                value=1.0 if snap.paused else 0.0)
        yield GaugeMetricFamily("shardctl_config_valid", "0 while the last edit of the config is invalid",
                                value=0.0 if snap.config_error else 1.0)
        pending = GaugeMetricFamily("shardctl_plan_actions", "Actions in the current plan by who may apply them",
                                    labels=["by"])
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
        if snap.last_collect_at is not None:
            yield GaugeMetricFamily("shardctl_last_collection_timestamp_seconds", "When the last round finished",
                                    value=snap.last_collect_at.timestamp())


def exposition(view: View) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(view))
    return generate_latest(registry)
