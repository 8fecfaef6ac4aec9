"""The catalog's record of backups: the base backups shardctl took, the restore points it placed
(with the shard map and checksums of their moment), and the shard map of any past moment.

Reads return frozen models of `engine.observe.models`; `sources` resolves each declared
`data: backup` branch to the shards that held its parent's ranges at its `at:`, for the planner.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from engine.catalog import schema
from engine.observe.models import BackupSource, CatalogState, MapShard, RestorePoint

LATEST = "latest"


def available(conn: psycopg.Connection) -> bool:
    return schema.installed_version(conn) >= schema.MIGRATIONS.index(schema.V9_BACKUPS) + 1


def parse_at(at: str) -> datetime | None:
    """The time of an `at:` value, or None when it is `latest` or a restore point's name (the
    YAML's pattern already separates them: a time has a ':' and its zone)."""
    if ":" not in at:
        return None
    text = at.replace(" ", "T").replace("Z", "+00:00")
    if len(text) > 6 and text[-5] in "+-" and text[-3] != ":":  # +0200 -> +02:00
        text = f"{text[:-2]}:{text[-2:]}"
    elif text[-3] in "+-":  # +02 -> +02:00
        text += ":00"
    return datetime.fromisoformat(text)


# ---------------------------------------------------------------------------- base backups


def record_backup(conn: psycopg.Connection, server: str, backup_id: str, operation: int | None,
                  begin_at: datetime | None, end_at: datetime | None, size_bytes: int | None) -> None:
    conn.execute("INSERT INTO shardctl.backups (server, backup_id, operation, begin_at, end_at, size_bytes)"
                 " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (server, backup_id) DO UPDATE"
                 " SET end_at = excluded.end_at, size_bytes = excluded.size_bytes",
                 (server, backup_id, operation, begin_at, end_at, size_bytes))


def backups_of_operation(conn: psycopg.Connection, operation: int) -> dict[str, str]:
    """server -> backup id, of the base backups an operation has taken so far."""
    return dict(conn.execute("SELECT server, backup_id FROM shardctl.backups WHERE operation = %s",
                             (operation,)).fetchall())


def forget_backups(conn: psycopg.Connection, server: str, keep: set[str]) -> None:
    """Forget the backups of a server that Barman no longer has (its retention deleted them)."""
    conn.execute("DELETE FROM shardctl.backups WHERE server = %s AND NOT backup_id = ANY(%s)", (server, sorted(keep)))


def last_backups(conn: psycopg.Connection) -> dict[str, datetime]:
    """server -> when its newest base backup ended."""
    if not available(conn):
        return {}
    return dict(conn.execute("SELECT server, max(end_at) FROM shardctl.backups GROUP BY server").fetchall())


# ---------------------------------------------------------------------------- restore points


def record_point(conn: psycopg.Connection, point: RestorePoint) -> None:
    conn.execute(
        "INSERT INTO shardctl.restore_points (name, kind, operation, created_at, pause_ms, servers, shard_map,"
        " checksums) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (point.name, point.kind, point.operation, point.created_at, point.pause_ms, Jsonb(point.servers),
         Jsonb({db: [s.model_dump() for s in shards] for db, shards in point.shard_map.items()}),
         Jsonb({k: {t: list(v) for t, v in tables.items()} for k, tables in point.checksums.items()})
         if point.checksums is not None else None))


_POINT = ("SELECT name, kind, operation, created_at, pause_ms, servers, shard_map, checksums"
          " FROM shardctl.restore_points")


def _point(row: tuple) -> RestorePoint:
    return RestorePoint(name=row[0], kind=row[1], operation=row[2], created_at=row[3], pause_ms=row[4],
                        servers=row[5], shard_map={db: tuple(MapShard(**s) for s in shards)
                                                   for db, shards in row[6].items()},
                        checksums={k: {t: (int(v[0]), str(v[1])) for t, v in tables.items()}
                                   for k, tables in row[7].items()} if row[7] is not None else None)


def points(conn: psycopg.Connection) -> list[RestorePoint]:
    """Every recorded restore point, oldest first."""
    if not available(conn):
        return []
    return [_point(r) for r in conn.execute(_POINT + " ORDER BY created_at, name").fetchall()]


def point(conn: psycopg.Connection, name: str) -> RestorePoint | None:
    row = conn.execute(_POINT + " WHERE name = %s", (name,)).fetchone()
    return _point(row) if row else None


def point_of_operation(conn: psycopg.Connection, operation: int) -> RestorePoint | None:
    row = conn.execute(_POINT + " WHERE operation = %s ORDER BY created_at DESC LIMIT 1", (operation,)).fetchone()
    return _point(row) if row else None


def latest_checked_point(conn: psycopg.Connection) -> RestorePoint | None:
    """The newest point `backups create` placed (the restore drill's reference)."""
    row = conn.execute(_POINT + " WHERE kind = 'backup' AND checksums IS NOT NULL"
                       " ORDER BY created_at DESC LIMIT 1").fetchone()
    return _point(row) if row else None


# ---------------------------------------------------------------------------- the shard map of a moment


def map_at(conn: psycopg.Connection, database: str, at: datetime) -> tuple[MapShard, ...] | None:
    """The active shards of DATABASE at AT, from the recorded history; None when nothing was
    recorded as early as that (the history starts when the catalog was upgraded to keep it)."""
    row = conn.execute("SELECT shards FROM shardctl.shard_maps WHERE database = %s AND at <= %s"
                       " ORDER BY at DESC, id DESC LIMIT 1", (database, at)).fetchone()
    return tuple(MapShard(**s) for s in row[0]) if row else None


def sources(conn: psycopg.Connection, branches: dict[str, Any], catalog: CatalogState,
            now: datetime) -> dict[str, BackupSource]:
    """Per declared `data: backup` branch (name -> models.Branch), where it is restored from."""
    out: dict[str, BackupSource] = {}
    wanted = {name: b for name, b in branches.items() if b.data == "backup"}
    if not wanted or not catalog.exists:
        return out
    ready = available(conn)
    for name, branch in sorted(wanted.items()):
        at = branch.at or LATEST
        out[name] = _source(conn, ready, branch.from_, at, catalog, now)
    return out


def _source(conn: psycopg.Connection, ready: bool, database: str, at: str, catalog: CatalogState,
            now: datetime) -> BackupSource:
    parent = catalog.databases.get(database)
    if at == LATEST:
        shards = tuple(MapShard(name=s.name, lo=s.lo, hi=s.hi, server=s.server, dbname=s.dbname)
                       for s in parent.shards if s.state == "active") if parent else ()
        return BackupSource(at=at, kind="latest", shards=shards)
    when = parse_at(at)
    if when is None:
        found = point(conn, at) if ready else None
        if found is None:
            return BackupSource(at=at, kind="point", point=at, problem=(
                f"there is no restore point {at!r} (`shardctl backups list` shows them; `shardctl backups create`"
                " places one)"))
        recorded_map = found.shard_map.get(database)
        if recorded_map is None:
            return BackupSource(at=at, kind="point", point=at, problem=(
                f"restore point {at!r} was placed when {database} had no shards"))
        return BackupSource(at=at, kind="point", point=at, shards=recorded_map)
    if when > now:
        return BackupSource(at=at, kind="time", time=when, problem=f"{at} is in the future")
    recorded = map_at(conn, database, when) if ready else None
    if not recorded:
        return BackupSource(at=at, kind="time", time=when, problem=(
            f"the catalog has no shard map of {database} as early as {at} (it records them since the backups"
            " were first set up; name a later time or a restore point)"))
    if not covers_keyspace(recorded):
        return BackupSource(at=at, kind="time", time=when, problem=(
            f"{database} was not whole at {at}: its shards then did not cover the keyspace (it was being created)"))
    return BackupSource(at=at, kind="time", time=when, shards=recorded)


def covers_keyspace(shards: tuple[MapShard, ...]) -> bool:
    """Whether the shards' ranges join up from the bottom of the keyspace to its top."""
    edge: int | None = None
    for index, shard in enumerate(sorted(shards, key=lambda s: (s.lo is not None, s.lo or 0))):
        if (index == 0 and shard.lo is not None) or (index > 0 and shard.lo != edge):
            return False
        edge = shard.hi
        if edge is None:
            return index == len(shards) - 1
    return False
