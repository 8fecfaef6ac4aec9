"""What the daemon shows: one frozen snapshot, replaced (never mutated) by the loops and read
by the HTTP API, the Prometheus exposition and the dashboard. No database access here.

Each shard keeps a short in-memory series for the dashboard's charts (`SERIES_POINTS`
collection rounds); the catalog keeps only the window the detector judges.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

from engine.clock import system_clock
from engine.observe.metrics import METRICS
from engine.snapshot import (
    BackupView,
    BranchLinkView,
    BranchView,
    HistoryEntry,
    OperationView,
    OrphanView,
    Pending,
    ReplicaView,
    ShardView,
    Snapshot,
)

__all__ = [
    "SERIES_POINTS",
    "BackupView",
    "BranchLinkView",
    "BranchView",
    "HistoryEntry",
    "OperationView",
    "OrphanView",
    "Pending",
    "ReplicaView",
    "ShardView",
    "Snapshot",
    "View",
    "now",
]

SERIES_POINTS = 180  # 30 minutes at the default 10 s interval


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
    return system_clock()
