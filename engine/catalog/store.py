"""Reading and writing the catalog: the system of record and the routing table.

Reads return the frozen models of `engine.observe.models`. Writes are small functions used by
the action executors; each change that alters the fleet's recorded state bumps the serial in
the same transaction, so a saved plan can tell that the state moved under it.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from engine.catalog import lock, schema
from engine.observe.models import (
    AppliedStep,
    CatalogBranch,
    CatalogDatabase,
    CatalogShard,
    CatalogState,
    PendingMove,
    ReshardEvent,
)
from engine.rows import one

MOVE_KINDS = ("split_shard", "merge_shards", "move_shard")


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


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
    databases = {}
    declared = "declared_shards" if version >= schema.MIGRATIONS.index(schema.V7_CAPACITY) + 1 else "NULL"
    for row in conn.execute(
        sql.SQL("SELECT name, key_column, key_type, protect, policy_name, policy, placement, state, {}"
                " FROM shardctl.databases ORDER BY name").format(sql.SQL(declared))  # a static column or NULL
    ):
        databases[row[0]] = CatalogDatabase(
            name=row[0], key_column=row[1], key_type=row[2], protect=row[3], policy_name=row[4], policy=row[5],
            placement=tuple(row[6]), state=row[7], schema_steps=tuple(steps.get(row[0], [])),
            shards=tuple(shards.get(row[0], [])), declared_shards=row[8],
        )
    events = tuple(
        ReshardEvent(at=e["at"], database=e["detail"].get("database", e["address"].split(".", 1)[-1].split("/")[0]),
                     ranges=tuple((r[0], r[1]) for r in e["detail"].get("ranges", [])))
        for e in reshard_events(conn)
    ) if version >= 2 else ()
    return CatalogState(exists=True, schema_version=version, serial=serial, epoch=epoch, databases=databases,
                        reshard_events=events, pending_moves=tuple(pending_moves(conn)),
                        branches=read_branches(conn) if version >= 3 else {},
                        apply_in_flight=lock.held_elsewhere(conn))


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


def add_history(conn: psycopg.Connection, event: str, address: str, detail: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO shardctl.history (event, address, serial, detail)"
        " VALUES (%s, %s, (SELECT serial FROM shardctl.state), %s)",
        (event, address, Jsonb(json.loads(json.dumps(detail, default=str)))),
    )


def history(conn: psycopg.Connection, limit: int = 50) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT at, event, address, serial, detail FROM shardctl.history ORDER BY id DESC LIMIT %s", (limit,)
    ).fetchall()
    return [dict(at=r[0], event=r[1], address=r[2], serial=r[3], detail=r[4]) for r in rows]


# ---------------------------------------------------------------------------- metric history


def save_samples(conn: psycopg.Connection, rows: list[tuple[Any, Any]], keep: dict[str, int]) -> None:
    """Store (reading, sample) pairs and keep only the newest `keep[shard]` per shard. Two
    statements a round, whatever the shard count: a daemon does this every interval."""
    if not rows:
        return
    shards = sorted({s.shard for _, s in rows})
    with conn.transaction():
        conn.execute(
            "INSERT INTO shardctl.metric_samples (shard, server, at, reading, metrics)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::jsonb[], %s::jsonb[])",
            ([s.shard for _, s in rows], [s.server for _, s in rows], [s.at for _, s in rows],
             [Jsonb(r.model_dump(mode="json")) for r, _ in rows], [Jsonb(s.model_dump(mode="json")) for _, s in rows]),
        )
        conn.execute(
            "DELETE FROM shardctl.metric_samples m USING ("
            "   SELECT id, shard, row_number() OVER (PARTITION BY shard ORDER BY at DESC, id DESC) AS newest"
            "   FROM shardctl.metric_samples WHERE shard = ANY(%s)) ranked"
            " JOIN unnest(%s::text[], %s::int[]) AS k(shard, keep) ON k.shard = ranked.shard"
            " WHERE m.id = ranked.id AND ranked.newest > k.keep",
            (shards, shards, [keep.get(shard, 10) for shard in shards]),
        )


def load_samples(conn: psycopg.Connection) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every stored (reading, sample) pair, oldest first."""
    if schema.installed_version(conn) < 2:
        return []
    return [(r[0], r[1]) for r in conn.execute("SELECT reading, metrics FROM shardctl.metric_samples ORDER BY at, id")]


def reshard_events(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Splits and merges from the history, for cooldowns."""
    rows = conn.execute(
        "SELECT at, event, address, detail FROM shardctl.history"
        " WHERE event IN ('split_shard', 'merge_shards') ORDER BY id"
    ).fetchall()
    return [dict(at=r[0], event=r[1], address=r[2], detail=r[3]) for r in rows]


def pending_moves(conn: psycopg.Connection) -> list[PendingMove]:
    rows = conn.execute(
        """SELECT o.id, o.kind, o.detail,
                  (SELECT step FROM shardctl.journal j WHERE j.operation = o.id ORDER BY seq DESC LIMIT 1),
                  EXISTS (SELECT 1 FROM shardctl.journal j WHERE j.operation = o.id AND j.step LIKE '%%: fence'
                          AND j.status = 'done'),
                  EXISTS (SELECT 1 FROM shardctl.journal j WHERE j.operation = o.id AND j.step LIKE '%%: flip'
                          AND j.status = 'done')
           FROM shardctl.operations o
           WHERE o.state = 'running' AND o.kind = ANY(%s) ORDER BY o.id""",
        (list(MOVE_KINDS),),
    ).fetchall()
    return [PendingMove(operation=r[0], kind=r[1], database=r[2]["action"]["database"], action=r[2]["action"],
                        last_step=r[3], fenced=r[4], flipped=r[5]) for r in rows]


def read_branches(conn: psycopg.Connection) -> dict[str, CatalogBranch]:
    rows = conn.execute("SELECT name, parent, data, sample_percent, server, dbname, state, created_at, expires_at,"
                        " size_bytes, base_schema FROM shardctl.branches ORDER BY name").fetchall()
    return {r[0]: CatalogBranch(name=r[0], parent=r[1], data=r[2], sample_percent=r[3], server=r[4], dbname=r[5],
                                state=r[6], created_at=r[7], expires_at=r[8], size_bytes=r[9], base_schema=r[10])
            for r in rows}
