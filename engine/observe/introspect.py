"""What a shard's schema really is: a snapshot of its tables, columns, constraints and indexes.

The snapshot is plain data (stored in the catalog after every change shardctl makes), its
fingerprint a hash of that data. A live fingerprint unequal to the recorded one means somebody
changed the shard outside shardctl: drift.
"""

from __future__ import annotations

import hashlib
import json
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
"""

INDEXES = f"""
SELECT schemaname || '.' || tablename, indexname, indexdef
FROM pg_indexes WHERE schemaname NOT IN {_EXCLUDED}
"""

SEQUENCES = f"""
SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S' AND n.nspname NOT IN {_EXCLUDED}
"""


def snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    tables: dict[str, dict[str, Any]] = {}

    def table(name: str) -> dict[str, Any]:
        return tables.setdefault(name, {"columns": {}, "constraints": {}, "indexes": {}})

    for relname, kind, column, definition in conn.execute(COLUMNS):
        entry = table(relname)
        entry["kind"] = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view",
                         "f": "foreign table"}[kind]
        entry["columns"][column] = definition
    for relname, name, definition in conn.execute(CONSTRAINTS):
        table(relname)["constraints"][name] = definition
    for relname, name, definition in conn.execute(INDEXES):
        table(relname)["indexes"][name] = definition
    sequences = sorted(r[0] for r in conn.execute(SEQUENCES))
    return {"tables": dict(sorted(tables.items())), "sequences": sequences}


def fingerprint(snap: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(snap, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def applied_steps(conn: psycopg.Connection) -> tuple[str, ...]:
    """The shard's own ledger of schema steps (sha256, in order); empty when there is none."""
    if not one(conn.execute("SELECT to_regclass('_shardctl.schema_steps') IS NOT NULL"))[0]:
        return ()
    return tuple(r[0] for r in conn.execute("SELECT sha256 FROM _shardctl.schema_steps ORDER BY seq"))


# Rows are counted exactly up to this many per table (a bounded scan), estimated beyond it.
EXACT_ROWS = 100_000

TABLES = f"""
SELECT n.nspname, c.relname, c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN {_EXCLUDED} AND n.nspname NOT LIKE 'pg_toast%%'
ORDER BY 1, 2
"""


def holdings(conn: psycopg.Connection) -> tuple[int, bool, int]:
    """What a database holds: (rows, exact, size in bytes). Rows are counted exactly up to
    EXACT_ROWS per table and estimated from pg_class.reltuples beyond that (exact is False)."""
    from psycopg import sql

    rows, exact = 0, True
    for schema, table, reltuples in conn.execute(TABLES).fetchall():
        counted = one(conn.execute(sql.SQL("SELECT count(*) FROM (SELECT 1 FROM ONLY {}.{} LIMIT %s) s").format(
            sql.Identifier(schema), sql.Identifier(table)), (EXACT_ROWS + 1,)))[0]
        if counted > EXACT_ROWS:
            rows, exact = rows + max(int(reltuples), counted), False
        else:
            rows += counted
    size = one(conn.execute("SELECT pg_database_size(current_database())"))[0]
    return rows, exact, int(size)
