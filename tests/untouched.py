"""What is on a fleet's servers, table by table, to show that a refused command changed nothing:
every database of every server (the catalog and hand-made ones included) with a checksum of
each of its tables' contents."""

from __future__ import annotations

from psycopg import sql

TABLES = ("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
          " WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
          " AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2")


def server_state(fleet, servers: tuple[str, ...] = ("a", "b")) -> dict[str, dict[str, dict[str, str]]]:
    """server -> database -> table -> md5 of its rows (sorted as text)."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for server in servers:
        with fleet.connect(server) as conn:
            names = sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate"))
        out[server] = {}
        for name in names:
            with fleet.connect(server, name) as conn:
                tables = {}
                for schema, table in conn.execute(TABLES).fetchall():
                    query = sql.SQL("SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
                                    " FROM {}.{} t").format(sql.Identifier(schema), sql.Identifier(table))
                    tables[f"{schema}.{table}"] = conn.execute(query).fetchone()[0]
                out[server][name] = tables
    return out


def catalog_intact(fleet, before: dict) -> None:
    """The catalog holds what it held: same serial, same rows in every table."""
    after = server_state(fleet, ("a",))["a"]["shardctl"]
    assert after == before["a"]["shardctl"], "the catalog changed"
