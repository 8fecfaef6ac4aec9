"""Reference tables: tables without the shard key (countries, currencies...) that every shard
holds whole, written in one place and kept identical on every shard by PostgreSQL's logical
replication (Citus's reference tables, Vitess's reference tables materialized from an unsharded
keyspace).

The one place is the database's reference source: a database `<database>_reference` on the
catalog's server, made with every schema step of the database (so DDL reaches it as it reaches
the shards), where applications write the reference tables (`ShardClient.reference`). It is not
a shard: it never moves, splits or retires, so a split, merge or move of the shards never has
to carry the writes of reference tables along; the catalog's server is the one server the
fleet never drains. Its sharded tables refuse writes (`shardctl_sharded` triggers: their rows
belong to the shards), and one publication, `shardctl_ref`, carries the reference tables.

Each shard subscribes to it (`shardctl_ref_<tag>`, a slot of the same name made beforehand on
the source's server: the source's server may be the shard's own, where a subscription cannot
make its slot); the initial table sync copies the tables, and the changes stream from then on.
On the shard, the reference tables refuse writes (`shardctl_reference` triggers, ENABLE: they
fire for sessions, never for the apply worker, which runs as a replica): every copy is the
source's. These triggers are also how a move tells a reference table from a sharded one
(engine/actions/move/ leaves them out of its publications, comparison and fence): a new
shard made by a split, merge or move is attached here before its flip, and a retired one is
detached before its database is dropped (engine/actions/leftovers.py).

Every function is safe to run again: it looks at what exists before it acts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import psycopg
from psycopg import sql

from engine.actions.base import ApplyContext, apply_steps, drop_database, ensure_database
from engine.actions.leftovers import unlink_database
from engine.actions.replica import detach_reference, reference_source
from engine.actions.subscription import create_subscription, resolved_conninfo
from engine.catalog import store
from engine.config.names import qualified, reference_dbname
from engine.errors import UserError
from engine.observe.replication import reference_link
from engine.plan.models import ShardSpec, StepSpec
from engine.rows import one

PUBLICATION = "shardctl_ref"
COPY_TRIGGER = "shardctl_reference"  # on a shard's copy of a reference table
SHARDED_TRIGGER = "shardctl_sharded"  # on the source's (empty) sharded tables
SYNC_TIMEOUT = 600.0  # seconds the initial copy of the reference tables may take before we say so
FAILING_ERRORS = 3  # a link's sync or apply errors before it is said to fail (as moves do)

USER_TABLES = """
SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl') AND n.nspname NOT LIKE 'pg_toast%%'
 ORDER BY 1"""

# the tables of a shard that are reference copies: what engine/actions/move/ leaves out
GUARDED = f"""EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = '{COPY_TRIGGER}')"""


def link_name(shard: ShardSpec) -> str:
    """The subscription on a shard and its slot on the source's server."""
    return reference_link(shard.server, shard.dbname)


def source_of(ctx: ApplyContext, database: str) -> ShardSpec | None:
    """The database's reference source as the catalog records it, or None when it has none."""
    return reference_source(ctx, database)


def tables_of(ctx: ApplyContext, database: str) -> tuple[str, ...]:
    recorded = store.reference_of(ctx.catalog, database)
    return recorded[0] if recorded else ()


def _split(table: str) -> sql.Composable:
    schema, name = qualified(table).split(".", 1)
    return sql.Identifier(schema, name)


def _guard_function(name: str, message: str) -> sql.Composed:
    return sql.SQL("""
CREATE SCHEMA IF NOT EXISTS _shardctl;
CREATE OR REPLACE FUNCTION _shardctl.{}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION {}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME USING ERRCODE = 'read_only_sql_transaction';
END
$$;""").format(sql.Identifier(name), sql.Literal(message))


def _set_triggers(conn: psycopg.Connection, trigger: str, function: str, tables: Iterable[str]) -> None:
    """The refusing triggers on exactly TABLES (schema-qualified): added where missing, removed
    from the tables that no longer need them."""
    want = set(tables)
    have = {r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = %s", (trigger,))}
    for table in sorted(want - have):
        conn.execute(sql.SQL(
            "CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OR DELETE ON {t}"
            " FOR EACH STATEMENT EXECUTE FUNCTION _shardctl.{function}();"
            " CREATE TRIGGER {truncate} BEFORE TRUNCATE ON {t}"
            " FOR EACH STATEMENT EXECUTE FUNCTION _shardctl.{function}()"
        ).format(trigger=sql.Identifier(trigger), truncate=sql.Identifier(trigger + "_truncate"), t=_split(table),
                 function=sql.Identifier(function)))
    for table in sorted(have - want):
        for name in (trigger, trigger + "_truncate"):
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), _split(table)))


def ensure_source(ctx: ApplyContext, database: str, tables: tuple[str, ...],
                  steps: tuple[StepSpec, ...]) -> ShardSpec:
    """The source database with every schema step, its sharded tables refusing writes, and its
    publication of exactly TABLES. Recorded in the catalog before it is made, so that a rerun
    (and a destroy) knows it."""
    source = source_of(ctx, database) or ShardSpec(
        name="reference", lo=None, hi=None, server=ctx.fleet.desired.catalog_server or "",
        dbname=reference_dbname(database))
    with ctx.catalog.transaction():
        store.set_reference(ctx.catalog, database, tables, source.server, source.dbname)
    ensure_database(ctx, source)
    apply_steps(ctx, source, steps)
    with ctx.fleet.servers[source.server].connect(source.dbname) as conn:
        present = [r[0] for r in conn.execute(USER_TABLES)]
        conn.execute(_guard_function(
            "sharded_table", f"% is sharded: write its rows through the shards (ShardClient), not into"
                             f" {source.dbname}, which holds the reference tables of {database}"))
        _set_triggers(conn, SHARDED_TRIGGER, "sharded_table", [t for t in present if t not in tables])
        # validate makes sure the steps create every declared table; one a newer step dropped (its
        # declaration goes in the same plan, by a settings change after the steps) left the
        # publication with it
        published = [t for t in tables if t in present]
        exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (PUBLICATION,)).fetchone()
        if published:
            members = sql.SQL(", ").join(_split(t) for t in published)
            conn.execute(sql.SQL("{} PUBLICATION {} {} TABLE {}").format(
                sql.SQL("ALTER" if exists else "CREATE"), sql.Identifier(PUBLICATION),
                sql.SQL("SET" if exists else "FOR"), members))
    return source


def attach(ctx: ApplyContext, source: ShardSpec, shard: ShardSpec, tables: tuple[str, ...]) -> str:
    """The shard's copies of TABLES guarded, and its subscription to the source: made (copying the
    tables) or refreshed (a table added to or removed from the publication). Returns its name;
    `wait_synced` waits for its copy."""
    name = link_name(shard)
    with ctx.fleet.servers[source.server].connect(source.dbname) as conn:
        if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone():
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        conninfo = resolved_conninfo(conn)
    with ctx.fleet.servers[shard.server].connect(shard.dbname) as conn:
        conn.execute(_guard_function(
            "reference_copy", f"% is a reference table: write it in {source.dbname} on server {source.server}"
                              " (ShardClient.reference), every shard holds a copy of it"))
        row = conn.execute("SELECT oid FROM pg_subscription WHERE subname = %s", (name,)).fetchone()
        if row is None:
            # a copy starts empty: rows left by an earlier link would collide with the copy's
            _set_triggers(conn, COPY_TRIGGER, "reference_copy", ())
            with conn.transaction():
                for table in tables:
                    if one(conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(_split(table))))[0]:
                        conn.execute(sql.SQL("DELETE FROM {}").format(_split(table)))
            _set_triggers(conn, COPY_TRIGGER, "reference_copy", tables)
            create_subscription(conn, name, conninfo, publication=PUBLICATION, slot=name, streaming="on")
        else:
            _set_triggers(conn, COPY_TRIGGER, "reference_copy", tables)
            subscribed = {r[0] for r in conn.execute(
                "SELECT n.nspname || '.' || c.relname FROM pg_subscription_rel sr JOIN pg_class c ON c.oid = sr.srrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE sr.srsubid = %s", (row[0],))}
            if subscribed != set(tables):
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} REFRESH PUBLICATION").format(sql.Identifier(name)))
    return name


def wait_synced(ctx: ApplyContext, shards: Iterable[ShardSpec], say, timeout: float = SYNC_TIMEOUT) -> None:
    """Until every shard's link has copied every reference table (state 'r'); a link that keeps
    failing is said, with where to look, instead of waited on."""
    deadline = time.monotonic() + timeout
    for shard in shards:
        name = link_name(shard)
        with ctx.fleet.servers[shard.server].connect(shard.dbname) as conn:
            while True:
                pending, errors = one(conn.execute(
                    "SELECT (SELECT count(*) FROM pg_subscription_rel sr WHERE sr.srsubid = s.oid"
                    "        AND sr.srsubstate <> 'r'),"
                    " coalesce((SELECT apply_error_count + sync_error_count FROM pg_stat_subscription_stats t"
                    "           WHERE t.subid = s.oid), 0)"
                    " FROM pg_subscription s WHERE s.subname = %s", (name,)))
                if pending == 0:
                    break
                if errors >= FAILING_ERRORS or time.monotonic() > deadline:
                    raise UserError(
                        f"the reference tables did not reach {shard.dbname} on server {shard.server}: {pending}"
                        f" tables not copied yet, {errors} replication errors",
                        f"server {shard.server}'s log says why (look for subscription {name}); fix the cause and"
                        " apply again")
                time.sleep(0.1)
    say("reference tables copied")


def unlink_shard(ctx: ApplyContext, shard: ShardSpec) -> None:
    """Before a shard's database is dropped: its link to the reference source, then whatever else
    replicates into or out of it (engine/actions/leftovers.py)."""
    if shard.server in ctx.fleet.servers:
        detach(ctx, shard)  # its copy of the reference tables: the slot is on the source's server
    unlink_database(ctx, shard)


def detach(ctx: ApplyContext, shard: ShardSpec) -> None:
    """Before a shard's database is dropped: its subscription to the source, and its slot (with
    the slots of an unfinished table copy) on whichever server holds them (replica.py does it)."""
    detach_reference(ctx, shard)


def reconcile(ctx: ApplyContext, op, database: str, tables: tuple[str, ...], steps: tuple[StepSpec, ...],
              shards: Iterable[ShardSpec]) -> None:
    """The reference source and every given shard's link made to match TABLES (schema-qualified),
    each a journaled step; no tables (none declared any more) removes the links and the source."""
    shards = list(shards)
    if not tables:
        source = source_of(ctx, database)
        if source is None:
            return
        for shard in shards:
            with op.step(f"reference detach {database}/{shard.name}"):
                detach(ctx, shard)
                with ctx.fleet.servers[shard.server].connect(shard.dbname) as conn:
                    _set_triggers(conn, COPY_TRIGGER, "reference_copy", ())
        with op.step(f"reference source {database}", dbname=source.dbname):
            drop_source(ctx, database)
        return
    with op.step(f"reference source {database}", tables=list(tables)):
        source = ensure_source(ctx, database, tables, steps)
    for shard in shards:
        with op.step(f"reference link {database}/{shard.name}"):
            attach(ctx, source, shard, tables)
    with op.step(f"reference sync {database}"):
        wait_synced(ctx, shards, lambda text: ctx.say(f"database.{database}: {text}"))


def drop_source(ctx: ApplyContext, database: str) -> None:
    """The source database, its slots and every subscription to it, then its catalog record."""
    source = source_of(ctx, database)
    if source is None:
        return
    if source.server in ctx.fleet.servers:
        unlink_shard(ctx, source)
        drop_database(ctx, source)
    with ctx.catalog.transaction():
        store.set_reference(ctx.catalog, database, (), source.server, source.dbname)
