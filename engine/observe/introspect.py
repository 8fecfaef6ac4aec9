"""What a shard's schema really is: a snapshot of its tables, columns, constraints and indexes.

The snapshot is plain data (stored in the catalog after every change shardctl makes), its
fingerprint a hash of that data. A live fingerprint unequal to the recorded one means somebody
changed the shard outside shardctl: drift.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from engine.rows import one

LEDGER_SCHEMA = "_shardctl"

_EXCLUDED = "('pg_catalog', 'information_schema', '_shardctl')"

COLUMNS = f"""
SELECT n.nspname || '.' || c.relname, c.relkind::text, a.attname,
       format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
       || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN {_EXCLUDED} AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
"""

CONSTRAINTS = f"""
SELECT n.nspname || '.' || c.relname, co.conname, pg_get_constraintdef(co.oid)
FROM pg_constraint co
JOIN pg_class c ON c.oid = co.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN {_EXCLUDED}
  AND NOT (co.contype = 't' AND co.conname = 'shardctl_fence_commit')  -- a move's guard (actions/fence.py)
"""

INDEXES = f"""
SELECT schemaname || '.' || tablename, indexname, indexdef
FROM pg_indexes WHERE schemaname NOT IN {_EXCLUDED}
"""

SEQUENCES = f"""
SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S' AND n.nspname NOT IN {_EXCLUDED}
"""


# the four reads of a snapshot in one statement (one round trip), each row tagged with its part
SNAPSHOT = f"""
SELECT 'c', rel, kind, name, definition FROM ({COLUMNS}) c(rel, kind, name, definition)
UNION ALL SELECT 'k', rel, NULL, name, definition FROM ({CONSTRAINTS}) k(rel, name, definition)
UNION ALL SELECT 'i', rel, NULL, name, definition FROM ({INDEXES}) i(rel, name, definition)
UNION ALL SELECT 's', rel, NULL, NULL, NULL FROM ({SEQUENCES}) s(rel)
"""
# The rows each system catalog a schema lives in has had written (cumulative statistics): every
# change to a schema writes some, so equal counts say the schema is the one read before
# (engine.collect.schema_cache). pg_type and pg_namespace: a renamed type or schema changes how
# columns and tables are named.
SCHEMA_CATALOGS = ("pg_class", "pg_attribute", "pg_attrdef", "pg_constraint", "pg_index", "pg_type", "pg_namespace")
_COUNTERS = ("inserted", "updated", "deleted")
_WRITTEN = ", ".join(f"pg_stat_get_tuples_{n}('pg_catalog.{c}'::regclass)" for c in SCHEMA_CATALOGS for n in _COUNTERS)
# The same of the shard's ledger of schema steps, NULL without one: counted from the statistics by
# the table's oid, the table itself is not opened (in a new backend, opening it and planning a
# read of it costs more than the connection did).
_LEDGER_WRITTEN = ", ".join(f"pg_stat_get_tuples_{n}(to_regclass('_shardctl.schema_steps'))" for n in _COUNTERS)
# The database's oid without reading pg_database: the path of its own pg_class ends in
# <database oid>/<file node>, in the default tablespace or another.
_DATABASE_OID = "split_part(pg_relation_filepath('pg_catalog.pg_class'::regclass), '/', -2)::oid"
# what a plan reads of every shard, in one statement: the signature of its schema and ledger,
# its size (rebalancing weighs it) and last the clock, for what the statement has cost so far: a
# plan leaves its own work out of the shard's rates. The ledger itself (LEDGER) and the schema
# (SNAPSHOT) are read only when the signature is not the one they were cached under.
# Function calls only (no table, no operator): in the shard's new backend each relation planned
# and each operator resolved is a cold catalog lookup, and the statement that read pg_database and
# summed the counters cost the backend 2.8 ms, as much as its connection (this one about 1.9 ms);
# the sums and the difference of the clocks are Python's.
LIGHT = f"""
SELECT {_DATABASE_OID}, pg_postmaster_start_time(), pg_stat_get_db_stat_reset_time({_DATABASE_OID}),
       current_setting('track_counts'), pg_database_size(current_database()),
       ARRAY[{_WRITTEN}, {_LEDGER_WRITTEN}], statement_timestamp(), clock_timestamp()
"""
LEDGER = "SELECT sha256 FROM _shardctl.schema_steps ORDER BY seq"
KINDS = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view", "f": "foreign table"}


@dataclass(frozen=True)
class ShardFacts:
    signature: list | None  # what says the schema and ledger are unchanged (None: the statistics cannot)
    size_bytes: int
    statements: int  # what reading them ran on the shard, and for how long (ms)
    ms: float


def snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    return _snapshot(conn.execute(SNAPSHOT).fetchall())


def shard_facts(conn: psycopg.Connection) -> ShardFacts:
    """A shard's signature (its schema's and its ledger's) and size, in one statement."""
    oid, started, reset, counting, size, counters, statement_at, now = one(conn.execute(LIGHT))
    signature = None
    if counting == "on":
        n = len(_COUNTERS)
        written = [sum(counters[i:i + n]) for i in range(0, n * len(SCHEMA_CATALOGS), n)]
        ledger = counters[-n:]
        signature = [int(oid), _instant(started), _instant(reset), *written,
                     -1 if None in ledger else sum(ledger)]
    return ShardFacts(signature, int(size), 1, (now - statement_at).total_seconds() * 1000)


def _instant(at: datetime | None) -> str:
    """A timestamp as the signature holds it: the same instant in any session's time zone."""
    return at.astimezone(UTC).isoformat() if at is not None else ""


def _snapshot(rows: list[tuple]) -> dict[str, Any]:
    tables: dict[str, dict[str, Any]] = {}

    def table(name: str) -> dict[str, Any]:
        return tables.setdefault(name, {"columns": {}, "constraints": {}, "indexes": {}})

    # the parts in the order the snapshot always read them: columns, constraints, indexes
    for part in ("c", "k", "i"):
        for tag, relname, kind, name, definition in rows:
            if tag != part:
                continue
            entry = table(relname)
            if tag == "c":
                entry["kind"] = KINDS[kind]
                entry["columns"][name] = definition
            else:
                entry["constraints" if tag == "k" else "indexes"][name] = definition
    sequences = sorted(r[1] for r in rows if r[0] == "s")
    return {"tables": dict(sorted(tables.items())), "sequences": sequences}


def fingerprint(snap: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(snap, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def applied_steps(conn: psycopg.Connection) -> tuple[str, ...]:
    """The shard's own ledger of schema steps (sha256, in order); empty when there is none. One
    statement (a statement that fails is not counted by pg_stat_statements). `conn` in autocommit."""
    try:
        return tuple(r[0] for r in conn.execute(LEDGER))
    except psycopg.errors.UndefinedTable:
        return ()


# Rows are counted exactly up to this many per table (a bounded scan), estimated beyond it.
EXACT_ROWS = 100_000

TABLES = f"""
SELECT n.nspname, c.relname, c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN {_EXCLUDED} AND n.nspname NOT LIKE 'pg_toast%%'
ORDER BY 1, 2
"""


def holdings(conn: psycopg.Connection) -> tuple[int, bool, int, int]:
    """What a database holds: (rows, exact, size in bytes, statements run). Rows are counted
    exactly up to EXACT_ROWS per table and estimated from pg_class.reltuples beyond that (exact is
    False)."""
    from psycopg import sql

    rows, exact = 0, True
    tables = conn.execute(TABLES).fetchall()
    for schema, table, reltuples in tables:
        counted = one(conn.execute(sql.SQL("SELECT count(*) FROM (SELECT 1 FROM ONLY {}.{} LIMIT %s) s").format(
            sql.Identifier(schema), sql.Identifier(table)), (EXACT_ROWS + 1,)))[0]
        if counted > EXACT_ROWS:
            rows, exact = rows + max(int(reltuples), counted), False
        else:
            rows += counted
    size = one(conn.execute("SELECT pg_database_size(current_database())"))[0]
    return rows, exact, int(size), len(tables) + 2


def tables_with_key(conn: psycopg.Connection, key_column: str) -> list[tuple[str, str, bool]]:
    """The database's tables as (schema, table, has the shard key): those without it are
    reference tables, copied from the first shard only (or followed from the reference source)."""
    return [(r[0], r[1], r[2]) for r in conn.execute(
        "SELECT n.nspname, c.relname, EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid"
        " AND a.attname = %s AND NOT a.attisdropped) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl')"
        " ORDER BY 1, 2", (key_column,))]
