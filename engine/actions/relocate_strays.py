"""Stray rows moved to the shards that own their keys (`shardctl strays ADDRESS --move`).

Crash-safe without a journal because every step can be repeated: rows are copied into the
owner with ON CONFLICT DO NOTHING, then deleted from the stray shard only where the owner
holds the identical row (compared by value). A row whose primary key exists on the owner with
other values is left where it is and reported: which one is right is the operator's call.
Tables are copied parents first and deleted children first, by their foreign keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from engine.keyspace import KeyRange
from engine.observe import strays
from engine.plan.models import ShardSpec
from engine.rows import one
from engine.servers.fleet import Fleet


@dataclass(frozen=True)
class Relocated:
    table: str
    owner: str
    moved: int
    conflicting: int


def tables_in_fk_order(conn: psycopg.Connection, key_column: str) -> list[tuple[str, str]]:
    """Tables with the key column, parents before the tables that reference them."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %s AND NOT a.attisdropped"
        " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl') ORDER BY 1, 2",
        (key_column,)).fetchall()
    oids = {r[2]: (r[0], r[1]) for r in rows}
    parents: dict[int, set[int]] = {oid: set() for oid in oids}
    for child, parent in conn.execute("SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f'"):
        if child in oids and parent in oids and child != parent:
            parents[child].add(parent)
    ordered: list[int] = []
    while parents:
        ready = sorted((o for o, p in parents.items() if not p - set(ordered)), key=lambda o: oids[o])
        if not ready:  # a cycle of foreign keys: name order for the rest
            ready = sorted(parents, key=lambda o: oids[o])
        for oid in ready:
            ordered.append(oid)
            del parents[oid]
    return [oids[o] for o in ordered]


def relocate(fleet: Fleet, key_column: str, key_type: str, shard: ShardSpec,
             owners: list[ShardSpec]) -> list[Relocated]:
    out: list[Relocated] = []
    with fleet.servers[shard.server].connect(shard.dbname) as src:
        tables = tables_in_fk_order(src, key_column)
        for owner in owners:
            if owner.name == shard.name:
                continue
            # rows of this stray shard that the owner's range claims
            claims = sql.SQL("NOT ({}) AND ({})").format(
                strays.outside(key_column, key_type, owner.lo, owner.hi),
                strays.outside(key_column, key_type, shard.lo, shard.hi))
            with fleet.servers[owner.server].connect(owner.dbname) as dst:
                for schema, table in tables:
                    qualified = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
                    staged = sql.Identifier(f"_shardctl_strays_{table}"[:63])
                    dst.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {})").format(staged, qualified))
                    dst.execute(sql.SQL("TRUNCATE {}").format(staged))
                    with src.cursor().copy(sql.SQL("COPY (SELECT * FROM {} WHERE {}) TO STDOUT (FORMAT binary)").format(
                            qualified, claims)) as out_copy, \
                            dst.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(staged)) as in_copy:
                        for block in out_copy:
                            in_copy.write(block)
                    found = one(dst.execute(sql.SQL("SELECT count(*) FROM {}").format(staged)))[0]
                    if not found:
                        continue
                    dst.execute(sql.SQL("INSERT INTO {} SELECT * FROM {} ON CONFLICT DO NOTHING").format(
                        qualified, staged))
            out += _delete_copied(fleet, src, owner, schema_tables=tables, key_column=key_column, claims=claims)
    return out


def _delete_copied(fleet: Fleet, src: psycopg.Connection, owner: ShardSpec, *, schema_tables, key_column: str,
                   claims: sql.Composable) -> list[Relocated]:
    """Delete from the stray shard the rows the owner now holds identically (children first)."""
    out = []
    with fleet.servers[owner.server].connect(owner.dbname) as dst:
        for schema, table in reversed(schema_tables):
            qualified = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            hashes = [r[0] for r in src.execute(sql.SQL(
                "SELECT hash_record_extended(t, 0) FROM {} t WHERE {}").format(qualified, claims))]
            if not hashes:
                continue
            present = {r[0] for r in dst.execute(sql.SQL(
                "SELECT h FROM (SELECT hash_record_extended(t, 0) AS h FROM {} t) x WHERE h = ANY(%s)").format(
                    qualified), (hashes,))}
            deleted = src.execute(sql.SQL(
                "DELETE FROM {} t WHERE ({}) AND hash_record_extended(t, 0) = ANY(%s)").format(qualified, claims),
                (sorted(present),)).rowcount
            out.append(Relocated(f"{schema}.{table}", owner.name, deleted, len(hashes) - deleted))
    return out


def owners_of(ranges: list[tuple[str, int | None, int | None, str, str]]) -> list[ShardSpec]:
    return [ShardSpec(name=KeyRange(lo, hi).name, lo=lo, hi=hi, server=server, dbname=dbname)
            for name, lo, hi, server, dbname in ranges]
