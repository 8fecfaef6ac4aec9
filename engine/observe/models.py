"""What was observed at one moment: the catalog's records and what really exists on servers.

Frozen models, so a plan computed from an observation can always be explained from it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import PlainSerializer, PlainValidator, model_validator

from engine.clock import system_clock
from engine.frozen import Frozen
from engine.observe import series
from engine.observe.metrics import Sample
from engine.observe.series import Series

# A shard's sample window: a Series (columns), from a Series or a list of Samples; as JSON, the samples.
Window = Annotated[Series, PlainValidator(series.validate),
                   PlainSerializer(lambda s: [x.model_dump(mode="json") for x in s], when_used="json")]




class AppliedStep(Frozen):
    seq: int
    name: str
    sha256: str
    sql: str | None = None  # kept by the catalog for steps merged from a branch (not in the YAML)


class CatalogShard(Frozen):
    database: str
    name: str
    lo: int | None
    hi: int | None
    server: str
    dbname: str
    state: str
    schema_fingerprint: str | None = None
    schema_snapshot: dict[str, Any] | None = None
    retired_at: datetime | None = None

    @property
    def address(self) -> str:
        return f"{self.database}/{self.name}"


class CatalogDatabase(Frozen):
    name: str
    key_column: str
    key_type: str
    protect: bool
    policy_name: str
    policy: dict[str, Any]
    placement: tuple[str, ...]
    state: str
    schema_steps: tuple[AppliedStep, ...]
    shards: tuple[CatalogShard, ...]
    declared_shards: int | None = None  # `shards:` when last applied; None: recorded before it was kept
    # the newest applied change of `shards:` lowered it, and the shards that load-driven and by-hand
    # splits and merges have added since (net): engine/plan/reshard.py reaches the lowered count
    # unless those (which are kept) account for the difference
    shards_lowered: bool = False
    kept_shards: int = 0
    reference_tables: tuple[str, ...] = ()  # as last applied (engine/actions/reference.py)


class ReshardEvent(Frozen):
    """A split or merge from the history: cooldowns start from these."""

    at: datetime
    database: str
    ranges: tuple[tuple[int | None, int | None], ...]  # every range it touched, before and after


class PendingMove(Frozen):
    """A split or merge (or a branch's creation, reset or schema merge) that started and did not
    finish: its action, to be resumed or aborted."""

    operation: int
    kind: str
    database: str
    action: dict[str, Any]
    last_step: str | None = None
    fenced: bool = False
    flipped: bool = False


class CatalogBranch(Frozen):
    name: str
    parent: str
    data: str
    sample_percent: float | None
    server: str
    dbname: str
    state: str
    created_at: datetime
    expires_at: datetime
    size_bytes: int | None = None
    base_schema: dict[str, Any] | None = None
    reset_token: str | None = None  # the declared `reset` value its data was last made for
    reset_at: datetime | None = None
    source_at: str | None = None  # data: backup: the `at:` it was restored to


class MapShard(Frozen):
    """One active shard in a recorded shard map."""

    name: str
    lo: int | None
    hi: int | None
    server: str
    dbname: str


class RestorePoint(Frozen):
    """A restore point placed on every backed-up server at once (engine/backups.py), with the
    shard map of that moment and, for `backups create`, each shard's rows counted and
    checksummed per table as of the point."""

    name: str
    kind: str  # backup (`backups create`) or branch (`at: latest`)
    operation: int | None = None
    created_at: datetime
    pause_ms: float | None = None  # how long writes to the shards waited for the point
    servers: dict[str, dict[str, Any]]  # server -> {lsn, wal, at}
    shard_map: dict[str, tuple[MapShard, ...]]  # database -> its active shards
    checksums: dict[str, dict[str, tuple[int, str]]] | None = None  # database/shard -> table -> (rows, sum)


class BackupSource(Frozen):
    """Where a `data: backup` branch is restored from, resolved against the catalog: the moment,
    the shards that held the parent's ranges then (the shard map of that time), or why it
    cannot be made."""

    at: str
    kind: Literal["latest", "point", "time"]
    point: str | None = None
    time: datetime | None = None
    shards: tuple[MapShard, ...] = ()
    problem: str | None = None


class CatalogState(Frozen):
    exists: bool
    schema_version: int = 0
    serial: int = 0
    epoch: int = 0
    databases: dict[str, CatalogDatabase] = {}
    reshard_events: tuple[ReshardEvent, ...] = ()
    pending_moves: tuple[PendingMove, ...] = ()
    pending_branches: tuple[PendingMove, ...] = ()  # unfinished branch creations, resets, schema merges
    branches: dict[str, CatalogBranch] = {}
    apply_in_flight: str | None = None  # who holds the apply lock from elsewhere, when someone does
    fleet_id: str | None = None  # the catalog's identity (None: not created yet, or an older catalog)


class Holding(Frozen):
    """What a database holds, for plans that would destroy it."""

    rows: int
    exact: bool  # False: at least one table was estimated from pg_class.reltuples
    size_bytes: int


class LiveShard(Frozen):
    """A shard database as found on its server."""

    exists: bool
    applied_steps: tuple[str, ...] = ()  # sha256 of the steps in the shard's own ledger
    schema_fingerprint: str | None = None
    schema_snapshot: dict[str, Any] | None = None
    holding: Holding | None = None  # None: not counted (no access, or not at risk), so it may hold rows
    size_bytes: int | None = None  # pg_database_size, read with the schema

    @property
    def size(self) -> int | None:
        """Its size in bytes, from whichever read it (None: unknown)."""
        return self.size_bytes if self.size_bytes is not None else self.holding.size_bytes if self.holding else None


class Capabilities(Frozen):
    """What the server lets shardctl's role do (engine/observe/capabilities.py reads it)."""

    version_num: int
    superuser: bool
    createdb: bool
    replication: bool
    monitor: bool  # pg_monitor or pg_read_all_stats: every database's statistics
    create_subscription: bool  # member of pg_create_subscription (16+)
    origin_progress: bool  # EXECUTE on pg_replication_origin_progress(text, boolean)
    wal_level: str
    max_replication_slots: int
    used_replication_slots: int
    max_wal_senders: int
    used_wal_senders: int
    max_worker_processes: int
    max_logical_replication_workers: int
    max_slot_wal_keep_size_bytes: int | None  # -1: unlimited
    stat_statements_loaded: bool
    stat_statements_created: bool
    buffercache_created: bool
    stat_statements_track: str
    max_connections: int
    reserved_connections: int
    connections: int  # client sessions, shardctl's own inventory's left out (they end with the inventory)
    role_connection_limit: int
    role: str = ""
    ssl_library: str = ""  # empty: built without SSL (its subscriptions cannot use TLS)
    restore_points: bool = False  # EXECUTE on pg_create_restore_point(text) and pg_switch_wal() (backups)
    backup_functions: bool = False  # EXECUTE on pg_backup_start and pg_backup_stop (Barman's backup check)
    clock_offset_s: float  # the server's clock minus this host's
    # the replication budget (engine/plan/budget.py); None: not read (an older observation)
    max_replication_origins: int | None = None  # max_active_replication_origins (18), max_replication_slots before
    used_replication_origins: int | None = None  # origins with state (superuser), else subscriptions
    used_replication_workers: int | None = None  # logical replication workers running (apply, table sync, parallel)
    max_sync_workers_per_subscription: int | None = None
    max_parallel_apply_workers_per_subscription: int | None = None  # 16+
    pending_restart: tuple[str, ...] = ()  # settings changed in the files and waiting for a restart


class ReplicationObject(Frozen):
    kind: str  # slot or subscription
    name: str
    database: str | None  # the slot's or the subscription's database
    active: bool  # a slot: a walsender streams from it; a subscription: enabled
    retained_bytes: int | None = None  # a slot: WAL kept for it (None: unknown, e.g. invalidated)
    lag_bytes: int | None = None  # a slot: WAL its consumer has not confirmed yet
    running: bool | None = None  # a subscription: its apply worker runs (connected to its publisher)
    errors: int | None = None  # a subscription: apply and table-sync errors since it was made
    error: str | None = None  # a broken subscription: the reason its server logged, when readable

    @property
    def broken(self) -> bool:
        """An enabled subscription whose apply worker is not running: it cannot reach its publisher
        (the worker is started again every few seconds and fails each time)."""
        return self.kind == "subscription" and self.active and self.running is False


class LiveServer(Frozen):
    name: str
    reachable: bool
    error: str | None = None
    version: str | None = None
    wal_level: str | None = None
    databases: tuple[str, ...] = ()
    capabilities: Capabilities | None = None  # None: not read (an older observation, or the query failed)
    # every slot and subscription named by shardctl (engine/observe/replication.py; None: not read)
    replication: tuple[ReplicationObject, ...] | None = None


class HourlySeries(Frozen):
    """One shard's hourly means, oldest first: each bucket's end and, per metric, its mean
    (None: nothing known was measured). Columns rather than one Sample per hour: a plan reads
    four weeks of them for every shard, and a model per hour costs 45 us to build.

    `highs`, where the history has them: per hour, the level the load held for the detector's
    sustain (k 1-minute means in a row, engine.observe.rollup.series_of): what a hot
    verdict is judged on, which a mean hides when a batch peaks for minutes inside an hour."""

    at: tuple[datetime, ...]
    values: dict[str, tuple[float | None, ...]]
    peaks: dict[str, float] = {}  # the greatest known mean per metric (a plan asks it of every shard)
    highs: dict[str, tuple[float | None, ...]] = {}
    high_peaks: dict[str, float] = {}  # the greatest high per metric (from the catalog: the greatest sample)

    @model_validator(mode="after")
    def _peaks(self) -> HourlySeries:
        if not self.peaks:
            peaks = {m: max(known) for m, column in self.values.items()
                     if (known := [v for v in column if v is not None])}
            object.__setattr__(self, "peaks", peaks)
        if self.highs and not self.high_peaks:
            high_peaks = {m: max(known) for m, column in self.highs.items()
                          if (known := [v for v in column if v is not None])}
            object.__setattr__(self, "high_peaks", high_peaks)
        return self

    def __len__(self) -> int:
        return len(self.at)

    def known(self, metric: str, highs: bool = False) -> list[tuple[datetime, float]]:
        column = (self.highs if highs else self.values).get(metric, ())
        return [(at, v) for at, v in zip(self.at, column, strict=False) if v is not None]


class MoveRecord(Frozen):
    """A finished split or merge from the catalog: how long it took and how much it copied
    (None when its progress did not say), for the lead time of a predictive split."""

    kind: str
    seconds: float
    size_bytes: float | None = None


class Observation(Frozen):
    catalog: CatalogState
    servers: dict[str, LiveServer]
    shards: dict[str, LiveShard]  # by address, e.g. "orders/-40"
    metrics: dict[str, Window] = {}  # sample window per shard address, oldest first (engine.observe.series)
    metrics_source: str = "none"  # "live", "recorded FILE" or "none"
    metrics_notes: tuple[str, ...] = ()  # what cleaning the samples dropped or folded, for the plan's notes
    inventory_notes: tuple[str, ...] = ()  # servers whose shards could not be looked into, and why
    branch_schemas: dict[str, dict[str, Any]] = {}  # live schema of each active branch
    branch_holdings: dict[str, Holding] = {}  # rows and size of each active branch
    # The wall clock when the observation was made: cooldowns, branch expiry and retirement
    # grace periods are judged against it, because the catalog's events happened in real time.
    taken_at: datetime | None = None
    # The instant the metrics describe: the newest recorded sample for `--metrics FILE`, else
    # `taken_at`. Load windows are judged against it; it never decides a cooldown.
    metrics_at: datetime | None = None
    # rows whose key hashes outside their shard's range, by shard address then table; counted
    # only for shards a plan would move (it reads every row)
    strays: dict[str, dict[str, int]] = {}
    # the long history forecasts are fitted on: hourly means per shard address, oldest first
    # (engine.observe.rollup.bucket_sample), and the moves finished so far, for lead times
    hourly: dict[str, HourlySeries | tuple[Sample, ...]] = {}  # a recording's may be Samples
    moves: tuple[MoveRecord, ...] = ()
    # per declared `data: backup` branch, what it is restored from (engine/catalog/backups.py)
    backup_sources: dict[str, BackupSource] = {}

    def now(self) -> datetime:
        """The observation's wall clock (the present when it was not recorded)."""
        return self.taken_at or system_clock()

    @property
    def serial(self) -> int:
        return self.catalog.serial
