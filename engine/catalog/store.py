"""Reading and writing the catalog: the system of record and the routing table.

Reads return the frozen models of `engine.observe.models`. Writes are small functions used by
the action executors; each change that alters the fleet's recorded state bumps the serial in
the same transaction, so a saved plan can tell that the state moved under it.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from engine.catalog import journal, lock, schema
from engine.config.models import Retention
from engine.observe.metrics import METRICS
from engine.observe.models import (
    AppliedStep,
    CatalogBranch,
    CatalogDatabase,
    CatalogShard,
    CatalogState,
    MoveRecord,
    PendingMove,
    ReshardEvent,
)
from engine.observe.rollup import rollup_rows
from engine.rows import one

MOVE_KINDS, BRANCH_KINDS = journal.MOVE_KINDS, journal.BRANCH_KINDS


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def fleet_id(conn: psycopg.Connection) -> str | None:
    """The catalog's identity (V10_OWNERSHIP); None before that migration ran."""
    if schema.installed_version(conn) < schema.MIGRATIONS.index(schema.V10_OWNERSHIP) + 1:
        return None
    row = conn.execute("SELECT value FROM shardctl.meta WHERE key = 'fleet_id'").fetchone()
    return row[0] if row else None


def owned_database(conn: psycopg.Connection, server: str, dbname: str) -> tuple[bool, int | None]:
    """Whether shardctl made `dbname` on `server`, and the oid it had (None: not known yet)."""
    row = conn.execute("SELECT oid FROM shardctl.owned_databases WHERE server = %s AND dbname = %s",
                       (server, dbname)).fetchone()
    return (row is not None, row[0] if row else None)


def claim_database(conn: psycopg.Connection, server: str, dbname: str, oid: int | None = None) -> None:
    """Record a database shardctl is about to create (oid None) or has created."""
    conn.execute("INSERT INTO shardctl.owned_databases (server, dbname, oid) VALUES (%s, %s, %s)"
                 " ON CONFLICT (server, dbname) DO UPDATE SET oid = excluded.oid", (server, dbname, oid))


def forget_database(conn: psycopg.Connection, server: str, dbname: str) -> None:
    conn.execute("DELETE FROM shardctl.owned_databases WHERE server = %s AND dbname = %s", (server, dbname))


def read(conn: psycopg.Connection) -> CatalogState:
    version = schema.installed_version(conn)
    if version == 0:
        return CatalogState(exists=False)
    schema.check_readable(version)
    serial, epoch = one(conn.execute("SELECT serial, epoch FROM shardctl.state"))
    steps: dict[str, list[AppliedStep]] = {}
    for database, seq, name, sha, text in conn.execute(
        "SELECT database, seq, name, sha256, sql FROM shardctl.schema_steps ORDER BY database, seq"
    ):
        steps.setdefault(database, []).append(AppliedStep(seq=seq, name=name, sha256=sha, sql=text))
    shards: dict[str, list[CatalogShard]] = {}
    for row in conn.execute(
        "SELECT database, name, lo, hi, server, dbname, state, schema_fingerprint, schema_snapshot, retired_at"
        " FROM shardctl.shards ORDER BY database, lo NULLS FIRST, name"
    ):
        shard = CatalogShard(database=row[0], name=row[1], lo=row[2], hi=row[3], server=row[4], dbname=row[5],
                             state=row[6], schema_fingerprint=row[7], schema_snapshot=row[8], retired_at=row[9])
        shards.setdefault(shard.database, []).append(shard)
    lowered, kept = declared_changes(conn)
    databases = {}
    declared = "declared_shards" if version >= schema.MIGRATIONS.index(schema.V7_CAPACITY) + 1 else "NULL"
    reference = "reference" if version >= schema.MIGRATIONS.index(schema.V11_REFERENCE) + 1 else "NULL"
    for row in conn.execute(
        sql.SQL("SELECT name, key_column, key_type, protect, policy_name, policy, placement, state, {}, {}"
                " FROM shardctl.databases ORDER BY name").format(sql.SQL(declared), sql.SQL(reference))  # static
    ):
        databases[row[0]] = CatalogDatabase(
            name=row[0], key_column=row[1], key_type=row[2], protect=row[3], policy_name=row[4], policy=row[5],
            placement=tuple(row[6]), state=row[7], schema_steps=tuple(steps.get(row[0], [])),
            shards=tuple(shards.get(row[0], [])), declared_shards=row[8],
            shards_lowered=row[0] in lowered, kept_shards=kept.get(row[0], 0),
            reference_tables=tuple((row[9] or {}).get("tables", ())),
        )
    events = tuple(
        ReshardEvent(at=e["at"], database=e["detail"].get("database", e["address"].split(".", 1)[-1].split("/")[0]),
                     ranges=tuple((r[0], r[1]) for r in e["detail"].get("ranges", [])))
        for e in reshard_events(conn)
    ) if version >= 2 else ()
    return CatalogState(exists=True, schema_version=version, serial=serial, epoch=epoch, databases=databases,
                        reshard_events=events, pending_moves=tuple(pending_moves(conn)),
                        pending_branches=tuple(pending_moves(conn, BRANCH_KINDS)),
                        branches=read_branches(conn) if version >= 3 else {},
                        apply_in_flight=lock.held_elsewhere(conn), fleet_id=fleet_id(conn))


# ---------------------------------------------------------------------------- writes


def bump_serial(conn: psycopg.Connection) -> int:
    return one(conn.execute(
        "UPDATE shardctl.state SET serial = serial + 1, updated_at = now() RETURNING serial"
    ))[0]


def current_serial(conn: psycopg.Connection) -> int:
    return one(conn.execute("SELECT serial FROM shardctl.state"))[0]


def record_server(conn: psycopg.Connection, name: str, kind: str, connection: str) -> None:
    conn.execute(
        "INSERT INTO shardctl.servers (name, kind, connection) VALUES (%s, %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, connection = excluded.connection, seen_at = now()",
        (name, kind, connection),
    )


def upsert_database(conn: psycopg.Connection, *, name: str, key_column: str, key_type: str, protect: bool,
                    policy_name: str, policy: dict[str, Any], placement: list[str], state: str,
                    declared_shards: int | None = None) -> None:
    """`declared_shards` None keeps what was recorded (a settings model from before it was kept)."""
    conn.execute(
        """
        INSERT INTO shardctl.databases (name, key_column, key_type, protect, policy_name, policy, placement, state,
                                        declared_shards)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (name) DO UPDATE SET key_column = excluded.key_column, key_type = excluded.key_type,
            protect = excluded.protect, policy_name = excluded.policy_name, policy = excluded.policy,
            placement = excluded.placement, state = excluded.state,
            declared_shards = coalesce(excluded.declared_shards, shardctl.databases.declared_shards),
            updated_at = now()
        """,
        (name, key_column, key_type, protect, policy_name, Jsonb(policy), placement, state, declared_shards),
    )


def set_reference(conn: psycopg.Connection, database: str, tables: tuple[str, ...], server: str,
                  dbname: str) -> None:
    """The database's reference tables and where their source is (None of them: no source)."""
    conn.execute("UPDATE shardctl.databases SET reference = %s, updated_at = now() WHERE name = %s",
                 (Jsonb({"tables": list(tables), "server": server, "dbname": dbname}) if tables else None, database))


def reference_of(conn: psycopg.Connection, database: str) -> tuple[tuple[str, ...], str, str] | None:
    """(tables, server, dbname) of the database's reference source, or None when it has none."""
    row = conn.execute("SELECT reference FROM shardctl.databases WHERE name = %s", (database,)).fetchone()
    if row is None or not row[0]:
        return None
    return tuple(row[0]["tables"]), row[0]["server"], row[0]["dbname"]


def set_database_state(conn: psycopg.Connection, name: str, state: str) -> None:
    conn.execute("UPDATE shardctl.databases SET state = %s, updated_at = now() WHERE name = %s", (state, name))


def delete_database(conn: psycopg.Connection, name: str) -> None:
    conn.execute("DELETE FROM shardctl.databases WHERE name = %s", (name,))


def rename_database(conn: psycopg.Connection, old: str, new: str) -> None:
    """A declared rename: the catalog's names change; shard databases and their rows stay as they are."""
    conn.execute(
        """
        INSERT INTO shardctl.databases (name, key_column, key_type, protect, policy_name, policy, placement, state,
                                        declared_shards, created_at)
        SELECT %s, key_column, key_type, protect, policy_name, policy, placement, state, declared_shards, created_at
        FROM shardctl.databases WHERE name = %s
        """,
        (new, old),
    )
    conn.execute("UPDATE shardctl.schema_steps SET database = %s WHERE database = %s", (new, old))
    conn.execute("UPDATE shardctl.shards SET database = %s WHERE database = %s", (new, old))
    if one(conn.execute("SELECT to_regclass('shardctl.branches') IS NOT NULL"))[0]:
        conn.execute("UPDATE shardctl.branches SET parent = %s WHERE parent = %s", (new, old))
    if one(conn.execute("SELECT to_regclass('shardctl.metric_samples') IS NOT NULL"))[0]:
        conn.execute("UPDATE shardctl.metric_samples SET shard = %s || substr(shard, length(%s) + 1)"
                     " WHERE shard LIKE %s", (new, old, old + "/%"))
    if one(conn.execute("SELECT to_regclass('shardctl.metric_rollups') IS NOT NULL"))[0]:
        conn.execute("UPDATE shardctl.metric_rollups SET shard = %s || substr(shard, length(%s) + 1)"
                     " WHERE shard LIKE %s", (new, old, old + "/%"))
    conn.execute("DELETE FROM shardctl.databases WHERE name = %s", (old,))


def upsert_shard(conn: psycopg.Connection, *, database: str, name: str, lo: int | None, hi: int | None,
                 server: str, dbname: str, state: str) -> None:
    conn.execute(
        """
        INSERT INTO shardctl.shards (database, name, lo, hi, server, dbname, state)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (database, name) DO NOTHING
        """,
        (database, name, lo, hi, server, dbname, state),
    )


def set_shard_schema(conn: psycopg.Connection, database: str, name: str, fingerprint: str,
                     snapshot: dict[str, Any], state: str) -> None:
    conn.execute(
        "UPDATE shardctl.shards SET schema_fingerprint = %s, schema_snapshot = %s, state = %s"
        " WHERE database = %s AND name = %s",
        (fingerprint, Jsonb(snapshot), state, database, name),
    )


def record_steps(conn: psycopg.Connection, database: str, steps: list[tuple]) -> None:
    """(seq, name, sha256[, sql]) per step."""
    for seq, name, sha, *sql_text in steps:
        conn.execute(
            "INSERT INTO shardctl.schema_steps (database, seq, name, sha256, sql) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (database, seq) DO NOTHING",
            (database, seq, name, sha, sql_text[0] if sql_text else None),
        )


def add_history(conn: psycopg.Connection, event: str, address: str, detail: dict[str, Any]) -> int:
    return int(one(conn.execute(
        "INSERT INTO shardctl.history (event, address, serial, detail)"
        " VALUES (%s, %s, (SELECT serial FROM shardctl.state), %s) RETURNING id",
        (event, address, Jsonb(json.loads(json.dumps(detail, default=str)))),
    ))[0])


def history(conn: psycopg.Connection, limit: int = 50) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT at, event, address, serial, detail FROM shardctl.history ORDER BY id DESC LIMIT %s", (limit,)
    ).fetchall()
    return [dict(at=r[0], event=r[1], address=r[2], serial=r[3], detail=r[4]) for r in rows]


# ---------------------------------------------------------------------------- metric history


def _rollup_columns() -> list[str]:
    return [f"{m}_{part}" for m in METRICS for part in ("sum", "n", "max")]


def save_samples(conn: psycopg.Connection, rows: list[tuple[Any, Any]], keep: dict[str, int],
                 retention: dict[str, Retention] | None = None) -> None:
    """Store (reading, sample) pairs, add them to the 1-minute and 1-hour rollups, and drop what
    each shard's `retention` no longer keeps (raw samples always keep the newest `keep[shard]`).
    A fixed number of statements a round, whatever the shard count: a daemon does this every
    interval. Without `retention`, raw samples keep only the newest `keep[shard]`."""
    if not rows:
        return
    retention = retention or {}
    shards = sorted({s.shard for _, s in rows})
    newest: dict[str, datetime] = {}
    for _, s in rows:
        newest[s.shard] = max(newest.get(s.shard, s.at), s.at)
    with conn.transaction():
        conn.execute(
            "INSERT INTO shardctl.metric_samples (shard, server, at, reading, metrics)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::jsonb[], %s::jsonb[])",
            ([s.shard for _, s in rows], [s.server for _, s in rows], [s.at for _, s in rows],
             [Jsonb(r.model_dump(mode="json")) for r, _ in rows], [Jsonb(s.model_dump(mode="json")) for _, s in rows]),
        )
        # raw rows beyond the newest `keep` and older than the raw retention; the subquery finds
        # the keep-th newest through the (shard, at) index, so a round reads O(keep) rows a shard
        conn.execute(
            "DELETE FROM shardctl.metric_samples m"
            " USING unnest(%s::text[], %s::int[], %s::timestamptz[]) AS k(shard, keep, cutoff)"
            " WHERE m.shard = k.shard AND m.at < k.cutoff"
            "   AND m.at < (SELECT n.at FROM shardctl.metric_samples n WHERE n.shard = k.shard"
            "               ORDER BY n.at DESC, n.id DESC OFFSET k.keep - 1 LIMIT 1)",
            (shards, [keep.get(shard, 10) for shard in shards],
             [newest[shard] - timedelta(seconds=retention[shard].raw if shard in retention else 0.0)
              + timedelta(microseconds=1) for shard in shards]),
        )
        if schema.installed_version(conn) < 5:
            return
        _add_rollups(conn, rollup_rows([s for _, s in rows]))
        for resolution, kept in ((60, "minute"), (3600, "hour")):
            conn.execute(
                "DELETE FROM shardctl.metric_rollups r USING unnest(%s::text[], %s::timestamptz[]) AS k(shard, cutoff)"
                " WHERE r.resolution = %s AND r.shard = k.shard AND r.bucket < k.cutoff",
                (shards, [newest[shard] - timedelta(seconds=getattr(retention[shard], kept) if shard in retention
                                                    else getattr(Retention(), kept)) for shard in shards],
                 resolution),
            )


def _add_rollups(conn: psycopg.Connection, rollups: list[tuple]) -> None:
    if not rollups:
        return
    columns = _rollup_columns()
    types = ["text", "int", "timestamptz", "int"] + [t for _ in METRICS for t in ("float8", "int", "float8")]
    merge = []
    for metric in METRICS:
        total, count, high = (sql.Identifier(f"{metric}_{p}") for p in ("sum", "n", "max"))
        merge += [sql.SQL("{c} = r.{c} + excluded.{c}").format(c=total),
                  sql.SQL("{c} = r.{c} + excluded.{c}").format(c=count),
                  sql.SQL("{c} = greatest(r.{c}, excluded.{c})").format(c=high)]
    statement = sql.SQL(
        "INSERT INTO shardctl.metric_rollups AS r (shard, resolution, bucket, samples, {columns})"
        " SELECT * FROM unnest({arrays})"
        " ON CONFLICT (shard, resolution, bucket) DO UPDATE SET samples = r.samples + excluded.samples, {merge}"
    ).format(columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
             arrays=sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(t)) for t in types),
             merge=sql.SQL(", ").join(merge))
    conn.execute(statement, [list(col) for col in zip(*rollups, strict=True)])


def load_samples(conn: psycopg.Connection, per_shard: int = 1000) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The newest `per_shard` stored (reading, sample) pairs of every shard, oldest first. The
    shards are found by skipping through the (shard, at) index, so hours of raw samples kept
    for charts cost a plan nothing."""
    if schema.installed_version(conn) < 2:
        return []
    return [(r[0], r[1]) for r in conn.execute(
        """WITH RECURSIVE s AS (
               (SELECT shard FROM shardctl.metric_samples ORDER BY shard LIMIT 1)
               UNION ALL
               SELECT (SELECT m.shard FROM shardctl.metric_samples m WHERE m.shard > s.shard ORDER BY m.shard LIMIT 1)
               FROM s WHERE s.shard IS NOT NULL)
           SELECT w.reading, w.metrics FROM s CROSS JOIN LATERAL (
               SELECT reading, metrics, at, id FROM shardctl.metric_samples m WHERE m.shard = s.shard
               ORDER BY at DESC, id DESC LIMIT %s) w
           WHERE s.shard IS NOT NULL ORDER BY w.at, w.id""", (per_shard,))]


def load_windows(conn: psycopg.Connection, per_shard: int = 1000) -> list[tuple]:
    """The newest `per_shard` stored samples of every shard as columns, one row per shard, for
    engine.observe.series (a plan over a thousand shards with a 30-minute window reads 180,000
    samples: decoding each one's JSON in Python took seconds). Per shard: (shard, servers, times
    in microseconds since the epoch, intervals, then per metric its values and its source runs
    (indexes and sources where the source of a known value changes), then the newest reading's
    JSON), all oldest first. Shards are found by skipping through the (shard, at) index."""
    if schema.installed_version(conn) < 2:
        return []
    per_metric = []
    for metric in METRICS:
        # a value that is not a number (a row from another version) is unknown, not an error
        value = sql.SQL("CASE WHEN jsonb_typeof(w.metrics->'metrics'->{m}->'value') = 'number'"
                        " THEN (w.metrics->'metrics'->{m}->>'value')::float8 END").format(m=sql.Literal(metric))
        source = sql.SQL("w.metrics->'metrics'->{m}->>'source'").format(m=sql.Literal(metric))
        changed = "FILTER (WHERE {s} IS DISTINCT FROM {p} AND {s} IS NOT NULL)"
        per_metric.append(sql.SQL("array_agg({v} ORDER BY w.n), "
                                  f"array_agg(w.n - 1 ORDER BY w.n) {changed}, "
                                  f"array_agg({{s}} ORDER BY w.n) {changed}"
                                  ).format(
            v=value, s=source, p=sql.Identifier(f"prev_{metric}")))
    lags = sql.SQL(", ").join(
        sql.SQL("lag(m.metrics->'metrics'->{m}->>'source') OVER o AS {a}").format(
            m=sql.Literal(metric), a=sql.Identifier(f"prev_{metric}")) for metric in METRICS)
    statement = sql.SQL(
        """WITH RECURSIVE s AS (
               (SELECT shard FROM shardctl.metric_samples ORDER BY shard LIMIT 1)
               UNION ALL
               SELECT (SELECT m.shard FROM shardctl.metric_samples m WHERE m.shard > s.shard ORDER BY m.shard LIMIT 1)
               FROM s WHERE s.shard IS NOT NULL),
           w AS (
               SELECT m.*, row_number() OVER o AS n,
                      row_number() OVER (PARTITION BY m.shard ORDER BY m.at DESC, m.id DESC) AS newest, {lags}
               FROM s CROSS JOIN LATERAL (
                   SELECT shard, server, at, id, reading, metrics FROM shardctl.metric_samples m
                   WHERE m.shard = s.shard ORDER BY at DESC, id DESC LIMIT %s) m
               WHERE s.shard IS NOT NULL
               WINDOW o AS (PARTITION BY m.shard ORDER BY m.at, m.id))
           SELECT w.shard, array_agg(w.server ORDER BY w.n),
                  array_agg((extract(epoch FROM w.at) * 1000000)::int8 ORDER BY w.n),
                  array_agg(CASE WHEN jsonb_typeof(w.metrics->'interval_s') = 'number'
                                 THEN (w.metrics->>'interval_s')::float8 END ORDER BY w.n), {per_metric},
                  (array_agg(w.reading) FILTER (WHERE w.newest = 1))[1]
           FROM w GROUP BY w.shard ORDER BY w.shard""").format(
        lags=lags, per_metric=sql.SQL(", ").join(per_metric))
    with conn.cursor(binary=True) as cursor:  # binary arrays: no text parsing of every float
        return cursor.execute(statement, (per_shard,)).fetchall()


def load_hourly_columns(conn: psycopg.Connection, since: datetime,
                        shards: list[str] | None = None) -> list[tuple]:
    """The 1-hour buckets from `since`, one row per shard: (shard, bucket starts, then one array
    of means per metric, NULL where unknown, then the greatest mean per metric, then the
    greatest sample per metric), aggregated by the server: a plan reads four weeks
    for every shard, and one row per shard is far cheaper to fetch than one per hour."""
    if schema.installed_version(conn) < 5:
        return []
    means = [sql.SQL("array_agg({t} / nullif({n}, 0) ORDER BY bucket)").format(
        t=sql.Identifier(f"{m}_sum"), n=sql.Identifier(f"{m}_n")) for m in METRICS]
    means += [sql.SQL("max({t} / nullif({n}, 0))").format(t=sql.Identifier(f"{m}_sum"), n=sql.Identifier(f"{m}_n"))
              for m in METRICS]
    means += [sql.SQL("max({h})").format(h=sql.Identifier(f"{m}_max")) for m in METRICS]
    where = sql.SQL(" AND shard = ANY(%s)") if shards is not None else sql.SQL("")
    statement = sql.SQL("SELECT shard, array_agg(bucket ORDER BY bucket), {means} FROM shardctl.metric_rollups"
                        " WHERE resolution = 3600 AND bucket >= %s{where} GROUP BY shard ORDER BY shard").format(
        means=sql.SQL(", ").join(means), where=where)
    params: list[Any] = [since] + ([shards] if shards is not None else [])
    with conn.cursor(binary=True) as cursor:  # binary arrays: no text parsing of every float
        return cursor.execute(statement, params).fetchall()


def load_held(conn: psycopg.Connection, metric: str, minutes: int, since: datetime,
              shards: list[str]) -> list[tuple]:
    """Per shard and hour from `since`, from the 1-minute buckets: the level `metric` held for
    `minutes` minutes in a row inside the hour (the greatest, over runs of that many consecutive
    1-minute means, of the run's least), as (shard, hour start, level). Computed by the server:
    only the hours come back."""
    if schema.installed_version(conn) < 5 or not shards:
        return []
    statement = sql.SQL(
        "SELECT shard, date_trunc('hour', bucket, 'UTC'), max(held) FROM ("
        "  SELECT shard, bucket, min(m) OVER w AS held, count(m) OVER w AS n, first_value(bucket) OVER w AS first"
        "  FROM (SELECT shard, bucket, {t} / nullif({n}, 0) AS m FROM shardctl.metric_rollups"
        "        WHERE resolution = 60 AND bucket >= %s AND shard = ANY(%s)) minute"
        "  WINDOW w AS (PARTITION BY shard ORDER BY bucket ROWS BETWEEN {back} PRECEDING AND CURRENT ROW)) runs"
        " WHERE n = %s AND bucket - first = %s AND date_trunc('hour', first, 'UTC') = date_trunc('hour', bucket, 'UTC')"
        " GROUP BY 1, 2 ORDER BY 1, 2").format(
        t=sql.Identifier(f"{metric}_sum"), n=sql.Identifier(f"{metric}_n"), back=sql.Literal(minutes - 1))
    return conn.execute(statement, (since, shards, minutes, timedelta(minutes=minutes - 1))).fetchall()


def load_rollups(conn: psycopg.Connection, resolution: int, since: datetime,
                 shards: list[str] | None = None) -> list[tuple]:
    """Buckets of one resolution from `since` on, by shard then time: (shard, bucket, samples,
    then mean and max of each metric, None where unknown)."""
    if schema.installed_version(conn) < 5:
        return []
    means = [sql.SQL("{t} / nullif({n}, 0), {h}").format(t=sql.Identifier(f"{m}_sum"), n=sql.Identifier(f"{m}_n"),
                                                        h=sql.Identifier(f"{m}_max")) for m in METRICS]
    where = sql.SQL(" AND shard = ANY(%s)") if shards is not None else sql.SQL("")
    statement = sql.SQL("SELECT shard, bucket, samples, {means} FROM shardctl.metric_rollups"
                        " WHERE resolution = %s AND bucket >= %s{where} ORDER BY shard, bucket").format(
        means=sql.SQL(", ").join(means), where=where)
    params: list[Any] = [resolution, since] + ([shards] if shards is not None else [])
    return conn.execute(statement, params).fetchall()


def finished_moves(conn: psycopg.Connection, limit: int = 50) -> list[MoveRecord]:
    """The newest finished splits and merges: how long each ran, and the bytes its copy
    reported (the progress kept beside the journal), for the lead time of a predictive split."""
    rows = conn.execute(
        "SELECT kind, extract(epoch FROM finished_at - started_at), (detail->'progress'->>'bytes_copied')::float8"
        " FROM shardctl.operations WHERE state = 'done' AND kind = ANY(%s) AND finished_at IS NOT NULL"
        " ORDER BY id DESC LIMIT %s", (list(MOVE_KINDS), limit)).fetchall()
    return [MoveRecord(kind=r[0], seconds=float(r[1]), size_bytes=r[2]) for r in rows]


def declared_changes(conn: psycopg.Connection) -> tuple[set[str], dict[str, int]]:
    """Per database, whether the newest applied change of `shards:` lowered it, and the net number
    of shards that splits and merges not caused by the declaration (load, forecast, by hand) have
    added since it: those are kept, while the lowered count is otherwise reached whatever stopped
    the first plan's merges (a retired shard's name, a grace period)."""
    rows = conn.execute(
        """WITH changed AS (
               SELECT DISTINCT ON (h.address) split_part(h.address, '.', 2) AS database, h.id,
                      EXISTS (SELECT 1 FROM jsonb_array_elements(h.detail -> 'changes') c
                              WHERE c ->> 'path' = 'shards' AND jsonb_typeof(c -> 'before') = 'number'
                                AND (c ->> 'before')::numeric > (c ->> 'after')::numeric) AS lowered
               FROM shardctl.history h
               WHERE h.event = 'update_database' AND h.detail -> 'changes' @> '[{"path": "shards"}]'
               ORDER BY h.address, h.id DESC)
           SELECT c.database, c.lowered, coalesce(sum(
                      CASE WHEN m.event = 'split_shard' THEN jsonb_array_length(m.detail -> 'targets') - 1
                           ELSE 1 - jsonb_array_length(m.detail -> 'sources') END)
                      FILTER (WHERE o.detail -> 'action' -> 'reason' ->> 'cause' IS DISTINCT FROM 'config'), 0)
           FROM changed c
           LEFT JOIN shardctl.history m ON m.id > c.id AND m.event IN ('split_shard', 'merge_shards')
                AND m.detail ->> 'database' = c.database
           LEFT JOIN shardctl.operations o ON o.id = (m.detail ->> 'operation')::bigint
           GROUP BY c.database, c.lowered""").fetchall()
    return {r[0] for r in rows if r[1]}, {r[0]: int(r[2]) for r in rows}


def reshard_events(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Splits and merges from the history, for cooldowns."""
    rows = conn.execute(
        "SELECT at, event, address, detail FROM shardctl.history"
        " WHERE event IN ('split_shard', 'merge_shards') ORDER BY id"
    ).fetchall()
    return [dict(at=r[0], event=r[1], address=r[2], detail=r[3]) for r in rows]


def pending_moves(conn: psycopg.Connection, kinds: tuple[str, ...] = MOVE_KINDS) -> list[PendingMove]:
    """Operations of these kinds left 'running', with the action each was started from; a move's
    `flipped` is read from the routing state (journal.CUT_OVER)."""
    rows = conn.execute(
        """SELECT o.id, o.kind, o.detail,
                  (SELECT step FROM shardctl.journal j WHERE j.operation = o.id ORDER BY seq DESC LIMIT 1),
                  EXISTS (SELECT 1 FROM shardctl.journal j WHERE j.operation = o.id AND j.step LIKE '%%: fence'
                          AND j.status = 'done'),
                  """ + journal.CUT_OVER + """
           FROM shardctl.operations o
           WHERE o.state = 'running' AND o.kind = ANY(%s) ORDER BY o.id""",
        (list(kinds),),
    ).fetchall()
    return [PendingMove(operation=r[0], kind=r[1], database=r[2]["action"]["database"], action=r[2]["action"],
                        last_step=r[3], fenced=r[4], flipped=r[5]) for r in rows]


def read_branches(conn: psycopg.Connection) -> dict[str, CatalogBranch]:
    columns = {r[0] for r in conn.execute(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = 'shardctl.branches'::regclass"
        " AND attname IN ('reset_token', 'source_at')")}  # a catalog not migrated yet (a read-only look)
    rows = conn.execute(sql.SQL(
        "SELECT name, parent, data, sample_percent, server, dbname, state, created_at, expires_at,"
        " size_bytes, base_schema, {}, {} FROM shardctl.branches ORDER BY name").format(
            sql.SQL("reset_token, reset_at" if "reset_token" in columns else "NULL, NULL"),
            sql.SQL("source_at" if "source_at" in columns else "NULL"))).fetchall()
    return {r[0]: CatalogBranch(name=r[0], parent=r[1], data=r[2], sample_percent=r[3], server=r[4], dbname=r[5],
                                state=r[6], created_at=r[7], expires_at=r[8], size_bytes=r[9], base_schema=r[10],
                                reset_token=r[11], reset_at=r[12], source_at=r[13])
            for r in rows}
