"""The plan: frozen data, one class per kind of action, rendered elsewhere, applied as saved.

A reason explains an action; it never steers apply. Apply reads only the fields of the action,
so a saved plan does exactly what it shows. The JSON form of `Plan` is a versioned contract
(`format_version`); add fields, never change the meaning of one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from engine.detect.detector import Evidence
from engine.detect.forecast import LoadForecast
from engine.frozen import Frozen

# 2: evidence says what was judged (low, high, samples, since, until, window_seconds)
# 3: the plan records the fleet it was made for and how the YAML declared what it acts on
#    (`fleet`), and each split, merge and move the settings it runs with (`settings`)
FORMAT_VERSION = 3

Cause = Literal["config", "drift", "resume", "load", "forecast", "manual"]  # manual: `plan -split/-merge`
Symbol = Literal["create", "update", "delete", "replace"]




class Reason(Frozen):
    cause: Cause
    text: str


class ShardSpec(Frozen):
    name: str  # range name, e.g. 40-80
    lo: int | None
    hi: int | None
    server: str
    dbname: str


class StepSpec(Frozen):
    seq: int
    name: str
    sha256: str
    sql: str


class AttributeChange(Frozen):
    path: str
    before: Any = None
    after: Any = None


class DatabaseSettings(Frozen):
    """What the catalog records about a database besides its shards."""

    protect: bool
    policy_name: str
    policy: dict[str, Any]
    placement: tuple[str, ...]
    shards: int | None = None  # the declared shard count (None: a catalog from before it was recorded)
    reference_tables: tuple[str, ...] = ()  # schema-qualified, sorted: whole on every shard, from one source


class MoveSettings(Frozen):
    """What a split, merge or move runs with, as planned: apply reads these, never the YAML, and a
    resumed or aborted operation reads them from its recorded action."""

    key_column: str
    key_type: Literal["bigint", "text"]
    steps: tuple[StepSpec, ...]  # every schema step the shards ran: a new target runs the same
    converge_timeout: float  # moves.*
    pause_budget: float
    fence_timeout: float
    copy_streams: int | None
    parallel: int
    retire_after: float  # autosplit.retire_after: how long the retired source is kept


class ActionBase(Frozen):
    """What every action has: the database it acts on and why. `address` names it in output."""

    database: str
    reason: Reason
    address_prefix: ClassVar[str] = "database"

    @property
    def address(self) -> str:
        return f"{self.address_prefix}.{self.database}"


class CreateDatabase(ActionBase):
    """Create every shard database of a new sharded database and apply its schema."""

    kind: Literal["create_database"] = "create_database"
    symbol: Symbol = "create"
    key_column: str
    key_type: Literal["bigint", "text"]
    settings: DatabaseSettings
    shards: tuple[ShardSpec, ...]
    steps: tuple[StepSpec, ...]


class Holding(Frozen):
    """What a database would lose: rows (exact up to a bound per table, else estimated from
    pg_class.reltuples) and size (pg_database_size). None: it could not be read."""

    rows: int | None = None
    exact: bool = True
    size_bytes: int | None = None

    @property
    def may_hold_rows(self) -> bool:
        return self.rows is None or self.rows > 0

    def describe(self) -> str:
        if self.rows is None:
            return "rows unknown (could not be read)"
        rows = f"{self.rows:,} row{'s' if self.rows != 1 else ''}" + ("" if self.exact else " (estimate)")
        if self.rows == 0 or self.size_bytes is None:
            return "no rows" if self.rows == 0 else rows
        return f"{rows}, {size_text(self.size_bytes)}"


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class DestroyDatabase(ActionBase):
    """Drop every shard database of a database and forget it."""

    kind: Literal["destroy_database"] = "destroy_database"
    symbol: Symbol = "delete"
    shards: tuple[ShardSpec, ...]
    holdings: dict[str, Holding] = {}  # by shard name: what each shard would lose


class RenameDatabase(ActionBase):
    """A declared rename (`moved:`): the catalog's names change; shard databases and rows stay."""

    kind: Literal["rename_database"] = "rename_database"
    symbol: Symbol = "update"
    from_name: str
    shards: tuple[ShardSpec, ...]


class ApplySchema(ActionBase):
    """Apply new schema steps to every shard, one transaction per shard."""

    kind: Literal["apply_schema"] = "apply_schema"
    symbol: Symbol = "update"
    steps: tuple[StepSpec, ...]
    shards: tuple[ShardSpec, ...]
    address_prefix: ClassVar[str] = "schema"


class UpdateDatabase(ActionBase):
    """Record changed settings (policy and thresholds, protection, placement) in the catalog."""

    kind: Literal["update_database"] = "update_database"
    symbol: Symbol = "update"
    settings: DatabaseSettings
    changes: tuple[AttributeChange, ...]


class RecreateShard(ActionBase):
    """A shard database that was dropped outside shardctl: create it again, empty, with its schema."""

    kind: Literal["recreate_shard"] = "recreate_shard"
    symbol: Symbol = "create"
    shard: ShardSpec
    steps: tuple[StepSpec, ...]

    @property
    def address(self) -> str:
        return f"shard.{self.database}/{self.shard.name}"


class SplitShard(ActionBase):
    """Replace a hot shard by N shards dividing its range (rows move by logical replication).

    `evidence` is also the plan's premise: apply re-measures it and refuses the plan when it no
    longer holds. `automatic` says whether policy lets the daemon apply it without a person."""

    kind: Literal["split_shard"] = "split_shard"
    symbol: Symbol = "replace"
    source: ShardSpec
    targets: tuple[ShardSpec, ...]
    evidence: tuple[Evidence, ...]
    automatic: bool
    operation: int | None = None  # set when resuming an interrupted operation: its names derive from it
    settings: MoveSettings | None = None  # None: recorded by a shardctl before format 3 (see move.settings_for)
    # cause `forecast`: the forecast that crosses the hot threshold within the lead time, and
    # that lead time (evidence is then empty: the shard is not hot yet)
    forecast: LoadForecast | None = None
    lead_time: str | None = None

    @property
    def address(self) -> str:
        return f"shard.{self.database}/{self.source.name}"


class MergeShards(ActionBase):
    """Replace adjacent cold shards by one shard owning their joint range."""

    kind: Literal["merge_shards"] = "merge_shards"
    symbol: Symbol = "replace"
    sources: tuple[ShardSpec, ...]
    target: ShardSpec
    evidence: tuple[Evidence, ...]
    automatic: bool
    operation: int | None = None
    settings: MoveSettings | None = None  # None: recorded by a shardctl before format 3 (see move.settings_for)

    @property
    def address(self) -> str:
        return f"shard.{self.database}/{self.target.name}"


class ServerBalance(Frozen):
    """One server's share of a database, before and after a plan's rebalancing moves."""

    server: str
    target_bytes: int
    before_bytes: int
    after_bytes: int
    before_shards: int
    after_shards: int


class MoveShard(ActionBase):
    """Move a shard to another server, whole: one source, one unfiltered link, the same fence,
    catch-up, verification and flip as a split; the copy left behind retires. Its range and
    name stay; while it moves, the target is recorded as `NAME@SERVER`, and after the flip the
    retired copy is (a later plan drops it)."""

    kind: Literal["move_shard"] = "move_shard"
    symbol: Symbol = "update"
    source: ShardSpec
    target: ShardSpec  # same name and range, another server
    balance: tuple[ServerBalance, ...] = ()  # rebalancing: every placement server before and after the plan
    automatic: bool = False
    operation: int | None = None
    settings: MoveSettings | None = None  # None: recorded by a shardctl before format 3 (see move.settings_for)

    @property
    def address(self) -> str:
        return f"shard.{self.database}/{self.source.name}"


def transit_name(name: str, server: str) -> str:
    """The catalog name of a moved shard's copy on `server`: the target while it moves, the
    source once retired (a range name is unique among a database's shards)."""
    return f"{name}@{server}"


class DropRetiredShard(ActionBase):
    """Drop a shard database that a split or merge retired, once its grace period is over."""

    kind: Literal["drop_retired_shard"] = "drop_retired_shard"
    symbol: Symbol = "delete"
    shard: ShardSpec
    retired_at: datetime

    @property
    def address(self) -> str:
        return f"shard.{self.database}/{self.shard.name}"


class _BranchBuild(ActionBase):
    """What a branch is made from and where: shared by its creation and its reset."""

    branch: str
    data: Literal["schema", "sample", "full", "replica", "backup"]
    sample_percent: float | None
    server: str
    dbname: str
    shards: tuple[ShardSpec, ...]
    reset_token: str | None = None  # the declared `reset` value its data is made for
    operation: int | None = None  # the interrupted creation or reset this resumes (rebuilding from the start)
    clone_of: ShardSpec | None = None  # an instant branch: the replica branch's database it is cloned from
    # data: backup: the moment it is restored to (`latest`, a restore point's name, a time); its
    # shards are then those of the shard map of that moment, read from restored copies
    at: str | None = None

    @property
    def address(self) -> str:
        return f"branch.{self.branch}"


class CreateBranch(_BranchBuild):
    """Make a branch: the parent's schema, then (a sample of) its rows from every shard, streamed
    with COPY from a consistent snapshot of each shard; indexes and constraints after the data."""

    kind: Literal["create_branch"] = "create_branch"
    symbol: Symbol = "create"
    ttl_seconds: float
    ttl_declared: bool = True  # False: the default ttl, said so in the plan


class ResetBranch(_BranchBuild):
    """Re-make a branch from its parent's current data: same name, server, database (so the same
    connection string) and expiry; the branch's own rows and schema changes are replaced."""

    kind: Literal["reset_branch"] = "reset_branch"
    symbol: Symbol = "update"


class UpdateBranch(ActionBase):
    """Record a branch's changed settings in place: its ttl (the expiry moves: from its creation,
    as the YAML's ttl means), nothing of its database touched."""

    kind: Literal["update_branch"] = "update_branch"
    symbol: Symbol = "update"
    branch: str
    server: str
    dbname: str
    expires_at: datetime  # the new expiry: its creation plus the declared ttl
    changes: tuple[AttributeChange, ...]

    @property
    def address(self) -> str:
        return f"branch.{self.branch}"


class DeleteBranch(ActionBase):
    """Drop a branch's database: removed from the YAML, or past its expiry."""

    kind: Literal["delete_branch"] = "delete_branch"
    symbol: Symbol = "delete"
    branch: str
    server: str
    dbname: str
    expired: bool
    holding: Holding | None = None
    unfinished: bool = False  # its creation or reset never finished: it holds no one's work
    operation: int | None = None  # the interrupted creation or reset it closes
    resume_replica: ShardSpec | None = None  # an interrupted clone's replica, whose subscriptions it resumes

    @property
    def address(self) -> str:
        return f"branch.{self.branch}"


class MergeBranchSchema(ActionBase):
    """Apply a branch's schema change (diff of its base -> the branch) to every shard, shard by
    shard, one transaction each with lock_timeout; the statements become a schema step."""

    kind: Literal["merge_branch_schema"] = "merge_branch_schema"
    symbol: Symbol = "update"
    branch: str
    statements: tuple[str, ...]
    findings: tuple[tuple[str, str, str], ...]  # (severity, statement, finding)
    shards: tuple[ShardSpec, ...]
    branch_schema_sha256: str
    operation: int | None = None  # the interrupted merge this resumes (shards that ran it skip it)

    @property
    def address(self) -> str:
        return f"branch.{self.branch}.schema"


Action = Annotated[
    CreateDatabase
    | DestroyDatabase
    | ApplySchema
    | UpdateDatabase
    | RecreateShard
    | SplitShard
    | MergeShards
    | MoveShard
    | DropRetiredShard
    | CreateBranch
    | ResetBranch
    | DeleteBranch
    | UpdateBranch
    | MergeBranchSchema
    | RenameDatabase,
    Field(discriminator="kind"),
]
LOAD_KINDS = ("split_shard", "merge_shards")
MOVE_KINDS = ("split_shard", "merge_shards", "move_shard")  # the actions that move rows between shards
LOAD_CAUSES = ("load", "forecast")  # what the fleet's load caused (now or ahead), not a person's change

# Destructive first, so the danger is read before the rest (UX.md).
ORDER = {"destroy_database": 0, "delete_branch": 1, "drop_retired_shard": 2, "merge_shards": 3, "split_shard": 4,
         "move_shard": 4.5,
         "recreate_shard": 5, "create_database": 6, "apply_schema": 7, "merge_branch_schema": 8, "update_database": 9,
         "create_branch": 10, "rename_database": 11, "reset_branch": 12, "update_branch": 13}


class Drift(Frozen):
    """Something changed outside shardctl, told in the past tense, apart from the actions."""

    address: str
    kind: Literal["deleted", "schema_changed", "unmanaged", "unreachable", "strays", "replica_link",
                  "leftover_replication"]
    summary: str
    details: tuple[str, ...] = ()


class Waiting(Frozen):
    """What the configuration asks for and this plan cannot do yet: the fleet does not match the
    configuration until a later plan does it. Why it waits, and until when where that is known
    (a grace period, a cooldown); None: until something else happens first (named in `reason`)."""

    address: str
    reason: str
    until: datetime | None = None


class Summary(Frozen):
    add: int
    change: int
    destroy: int
    by_kind: dict[str, int]
    by_cause: dict[str, int]


WhatIfKind = Literal["now_split", "no_longer_split", "now_merge", "no_longer_merge"]


class WhatIfChange(Frozen):
    """A shard whose verdict differs between the baseline policy and the proposed one."""

    address: str
    change: WhatIfKind
    evidence: tuple[Evidence, ...]
    under: Literal["baseline", "proposed"]


class PolicyWhatIf(Frozen):
    baseline: str
    metrics_source: str
    changes: tuple[WhatIfChange, ...]
    hot_both: int
    cold_both: int
    # the stored hourly history replayed under each policy, reactive and predictive
    # (engine.detect.backtest.compare_policies), one line per shard with enough history
    backtest: tuple[str, ...] = ()


class Declared(Frozen):
    """How the YAML declared one thing a plan acts on when it was made (None: not declared).
    Servers are recorded by how they are reached, never with a secret (a service by digest)."""

    kind: Literal["catalog", "server", "database", "branch"]
    name: str
    value: dict[str, Any] | None


class PlanFleet(Frozen):
    """The fleet a plan was made for: the catalog's identity (None: no catalog yet, or one
    older than identities) and the declarations it depends on, with their digest."""

    fleet_id: str | None
    config_digest: str
    declared: tuple[Declared, ...]


class Plan(Frozen):
    format_version: int = FORMAT_VERSION
    shardctl_version: str
    based_on_serial: int
    catalog_exists: bool
    actions: tuple[Action, ...]
    drift: tuple[Drift, ...] = ()
    warnings: tuple[str, ...] = ()
    waiting: tuple[Waiting, ...] = ()  # the configuration's changes a later plan does (engine.plan.reshard)
    metrics_source: str = "none"
    what_if: PolicyWhatIf | None = None  # with `plan --compare-policy`
    fleet: PlanFleet | None = None  # what the plan was made for (engine.plan.identity); apply checks it

    @property
    def has_changes(self) -> bool:
        return bool(self.actions)

    @property
    def summary(self) -> Summary:
        """Objects added, changed and destroyed, as Terraform counts them: a split adds its
        targets and retires its source; a merge adds its target and retires its sources."""
        add = change = destroy = 0
        by_kind: dict[str, int] = {}
        by_cause: dict[str, int] = {}
        for action in self.actions:
            if isinstance(action, SplitShard):
                add, destroy = add + len(action.targets), destroy + 1
            elif isinstance(action, MergeShards):
                add, destroy = add + 1, destroy + len(action.sources)
            elif action.symbol == "create":
                add += 1
            elif action.symbol == "update":
                change += 1
            elif action.symbol == "delete":
                destroy += 1
            by_kind[action.kind] = by_kind.get(action.kind, 0) + 1
            by_cause[action.reason.cause] = by_cause.get(action.reason.cause, 0) + 1
        return Summary(add=add, change=change, destroy=destroy, by_kind=dict(sorted(by_kind.items())),
                       by_cause=dict(sorted(by_cause.items())))


def sort_actions(actions: list) -> tuple:
    return tuple(sorted(actions, key=lambda a: (ORDER[a.kind], a.address)))
