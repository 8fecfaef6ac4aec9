"""What the daemon shows: one frozen snapshot, replaced (never mutated) by the loops and read
by the HTTP API, the Prometheus exposition and the dashboard. No database access here.

Each shard keeps a short in-memory series for the dashboard's charts (`SERIES_POINTS`
collection rounds); the catalog keeps only the window the detector judges.
"""

from __future__ import annotations

import threading
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from engine.observe.metrics import METRICS
from engine.plan.models import Plan
from engine.watch.autonomy import Pending

SERIES_POINTS = 180  # 30 minutes at the default 10 s interval


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class ShardView(Frozen):
    address: str
    database: str
    name: str
    server: str
    load: str = "unknown"  # hot, cold, normal, stale or unknown, as the detector judged the last window
    evidence: tuple[str, ...] = ()
    latest: dict[str, float | None] = Field(default_factory=lambda: dict.fromkeys(METRICS))  # None: unknown
    hot_thresholds: dict[str, float] = {}  # the effective policy's, for the charts
    sampled_at: datetime | None = None


class ReplicaView(Frozen):
    """A physical standby streaming from a fleet server (pg_stat_replication on the primary)."""

    server: str
    name: str  # application_name, else the client address
    lag_bytes: float | None = None  # WAL written on the primary and not yet replayed there
    lag_seconds: float | None = None  # replay_lag; None when the standby is idle and caught up


class BranchView(Frozen):
    name: str
    parent: str
    data: str
    server: str
    state: str
    created_at: datetime | None = None
    expires_at: datetime | None = None
    size_bytes: int | None = None


class HistoryEntry(Frozen):
    at: datetime
    event: str
    address: str
    actor: str
    summary: str
    evidence: tuple[str, ...] = ()


class Snapshot(Frozen):
    who: str
    config_dir: str
    started_at: datetime
    role: str = "starting"  # starting, standby, leader, stopping
    leader: str | None = None  # who leads (this daemon or another)
    paused: bool = False
    pause_reason: str = ""
    paused_by: str = ""
    config_error: str | None = None
    plan: Plan | None = None
    plan_text: str = ""
    planned_at: datetime | None = None
    autonomous: tuple[str, ...] = ()  # addresses the last check let automation apply
    pending: tuple[Pending, ...] = ()
    notes: tuple[str, ...] = ()
    shards: tuple[ShardView, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    branches: tuple[BranchView, ...] = ()
    activity: str = "idle"
    activity_since: datetime | None = None  # when the running apply started
    progress: dict[str, Any] | None = None  # the running move's latest figures (rows, rates, lag, ETA)
    progress_at: datetime | None = None  # when they were reported
    replicas: tuple[ReplicaView, ...] = ()
    silent_servers: tuple[str, ...] = ()  # servers that did not answer the last collection round
    last_collect_at: datetime | None = None
    last_collect_seconds: float | None = None
    last_error: str | None = None

    @property
    def alerts(self) -> tuple[str, ...]:
        return tuple(f"{s.address} is hot: {'; '.join(e.removeprefix(s.address + ': ') for e in s.evidence)}"
                     for s in self.shards if s.load == "hot")


class View:
    """The current snapshot behind a lock, plus the per-shard series."""

    def __init__(self, snapshot: Snapshot):
        self._lock = threading.Lock()
        self._snapshot = snapshot
        self._series: dict[str, deque] = {}
        self.actions: dict[tuple[str, str], int] = {}  # (kind, result) -> count, for /metrics
        self.collections = (0, 0.0)  # rounds, seconds in all: a Prometheus summary
        self.collection_failures = 0  # rounds that failed as a whole (the catalog did not answer)

    def get(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def update(self, **changes: Any) -> Snapshot:
        with self._lock:
            self._snapshot = self._snapshot.model_copy(update=changes)
            return self._snapshot

    def update_with(self, changes: Callable[[Snapshot], dict[str, Any]]) -> Snapshot:
        """Changes computed from the current snapshot, under the lock: two loops that each
        refresh part of the shard list cannot overwrite each other's part."""
        with self._lock:
            self._snapshot = self._snapshot.model_copy(update=changes(self._snapshot))
            return self._snapshot

    def count_action(self, kind: str, result: str) -> None:
        with self._lock:
            self.actions[(kind, result)] = self.actions.get((kind, result), 0) + 1

    def record_collection(self, seconds: float) -> None:
        with self._lock:
            self.collections = (self.collections[0] + 1, self.collections[1] + seconds)

    def record_collection_failure(self) -> None:
        with self._lock:
            self.collection_failures += 1

    def action_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.actions)

    def add_points(self, points: dict[str, tuple[datetime, dict[str, float | None]]]) -> None:
        """One collection round: a point per shard (None values for a shard that did not answer)."""
        with self._lock:
            for address, (at, values) in points.items():
                series = self._series.get(address)
                if series is None:
                    series = self._series[address] = deque(maxlen=SERIES_POINTS)
                series.append((at.timestamp(), *(values.get(m) for m in METRICS)))

    def series(self, address: str) -> list[tuple]:
        with self._lock:
            return list(self._series.get(address, ()))

    def forget(self, keep: set[str]) -> None:
        with self._lock:
            for address in set(self._series) - keep:
                del self._series[address]


def now() -> datetime:
    return datetime.now(timezone.utc)
