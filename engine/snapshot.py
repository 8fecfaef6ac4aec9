"""What the watch daemon shows, as frozen models: its snapshot of the fleet, the shards with
their latest values and verdicts, branches, history, standbys and the running move.

The daemon (engine.watch) builds and replaces them; the dashboard (engine.render), the HTTP
API and /metrics read them. Neither side imports the other's package for them, and nothing
here touches a database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from engine.detect.forecast import LoadForecast
from engine.frozen import Frozen
from engine.observe.metrics import METRICS
from engine.plan.models import Plan


class Pending(Frozen):
    """A planned action automation leaves to a person, and why."""

    address: str
    kind: str
    why: str


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
    lo: int | None = None  # its keyspace range [lo, hi), signed as the catalog stores it
    hi: int | None = None
    outlook: tuple[str, ...] = ()  # what its forecasts say (storage fill date, crossings ahead)
    forecasts: tuple[LoadForecast, ...] = ()  # for the charts' forecast band


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


class BranchLinkView(Frozen):
    """One link of a `data: replica` branch: how far behind its shard it is, or that it is missing
    or broken (its subscription cannot reach the shard's server; `error` says why and what to do)."""

    branch: str
    shard: str  # database/range
    server: str  # the shard's
    state: str  # ok, missing, broken, unknown
    lag_bytes: int | None = None
    error: str | None = None


class OrphanView(Frozen):
    """A slot or subscription of shardctl's naming that no running operation owns."""

    server: str
    kind: str  # slot or subscription
    name: str
    database: str | None = None
    operation: int | None = None
    retained_bytes: int | None = None  # a slot's WAL kept on its server
    text: str  # what it is, what it costs, and why it is an orphan


class BackupView(Frozen):
    """A backed-up server: its newest base backup, and how far its WAL has reached the backups."""

    server: str
    last_backup_at: datetime | None = None  # None: never backed up
    every_seconds: float | None = None  # backups.every: when the next base backup is due
    streaming: bool | None = None  # None: unknown (the server did not answer)
    wal_lag_bytes: int | None = None  # WAL written on the server and not yet received by its backups
    received_lsn: str | None = None
    last_point: str | None = None  # the newest restore point placed on it
    last_point_at: datetime | None = None


class OperationView(Frozen):
    """An operation the catalog records as running, whoever started it (this daemon, a person's
    `apply -split`, another host): in progress while its process holds the apply lock, else
    interrupted (the next apply resumes it)."""

    id: int
    kind: str
    address: str
    step: str | None = None
    by: str | None = None  # who holds the apply lock; None: nobody (interrupted)
    started_at: datetime | None = None
    progress: dict[str, Any] | None = None  # its latest figures, as its process keeps them in the catalog

    @property
    def in_progress(self) -> bool:
        return self.by is not None


class HistoryEntry(Frozen):
    at: datetime
    event: str
    address: str
    actor: str
    summary: str
    evidence: tuple[str, ...] = ()
    pause_ms: float | None = None  # a split's, merge's or relocation's: the history's own figure, never recomputed


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
    advice: tuple[str, ...] = ()  # right-sizing: underused servers and the moves that would empty one
    shards: tuple[ShardView, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    branches: tuple[BranchView, ...] = ()
    branch_links: tuple[BranchLinkView, ...] = ()  # of replica branches, as of the last collection round
    orphans: tuple[OrphanView, ...] = ()  # leftover replication, as of the last collection round
    activity: str = "idle"
    activity_since: datetime | None = None  # when the running apply started
    progress: dict[str, Any] | None = None  # the running move's latest figures (rows, rates, lag, ETA)
    progress_at: datetime | None = None  # when they were reported
    replicas: tuple[ReplicaView, ...] = ()
    backups: tuple[BackupView, ...] = ()  # backed-up servers (engine/backups.py), as of the daemon's last look
    operations: tuple[OperationView, ...] = ()  # running in the catalog, as of the last collection round
    silent_servers: tuple[str, ...] = ()  # servers that did not answer the last collection round
    last_collect_at: datetime | None = None
    last_collect_seconds: float | None = None
    last_error: str | None = None

    def running(self) -> tuple[str, datetime | None, dict[str, Any] | None, datetime | None]:
        """What runs now, whoever runs it: this daemon's own apply, else an operation another
        process holds the apply lock for (a person's `apply -split`): (what, since, its latest
        progress figures, when they were reported). ("idle", None, None, None) when nothing runs."""
        if self.activity_since is not None:
            return self.activity, self.activity_since, self.progress, self.progress_at
        for op in self.operations:
            if op.in_progress:
                figures = op.progress or {}
                reported = figures.get("at")
                return (f"operation {op.id} {op.kind} {op.address}" + (f" at step {op.step!r}" if op.step else "")
                        + f", run by {op.by}", op.started_at, figures,
                        datetime.fromisoformat(reported) if isinstance(reported, str) else op.started_at)
        return "idle", None, None, None

    @property
    def alerts(self) -> tuple[str, ...]:
        return tuple(f"{s.address} is hot: {'; '.join(e.removeprefix(s.address + ': ') for e in s.evidence)}"
                     for s in self.shards if s.load == "hot")


def move_eta_seconds(progress: dict[str, Any]) -> float | None:
    """How long the running move's current phase still needs at its measured pace; None when
    unknown (no pace yet, or a catch-up that is not converging)."""
    phase = progress.get("phase")
    if phase == "copy":
        rate = progress.get("rows_per_s") or 0
        left = (progress.get("rows_expected") or 0) - (progress.get("rows_copied") or 0)
        return max(0.0, left / rate) if rate > 0 and progress.get("rows_expected") else None
    if phase == "catch-up":
        gain = (progress.get("apply_rate") or 0) - (progress.get("wal_rate") or 0)
        return (progress.get("lag_bytes") or 0) / gain if gain > 0 else None
    if phase == "caught up":
        return 0.0
    return None
