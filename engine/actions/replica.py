"""The links of a `data: replica` branch: one read-only database holding every row of a sharded
database, kept current by logical replication from each of its active shards.

Per shard: a publication of its tables (reference tables, present in every shard, only from the
first shard, so they are copied once), a logical slot made beforehand, and on the replica a
subscription to it (password-free, engine/actions/subscription.py) whose initial table sync
copies the shard's rows; the shards' rows are disjoint, so the replica is their union. This
module owns the names of those objects, making them, waiting for the initial copy, removing
them (before the replica's database is dropped or rebuilt: a database holding subscriptions
cannot be dropped, and a forgotten slot would keep the shard's WAL forever). Their names and
observed lag are engine/observe/replica_links.py's.

A replica does not follow its parent through splits, merges or moves: the planner holds those
back while a replica of the database exists (engine/plan/planner.py, `_hold_moves_under_replicas`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import psycopg
from psycopg import sql

from engine.actions.base import ApplyContext
from engine.actions.subscription import create_subscription, resolved_conninfo
from engine.catalog import store
from engine.errors import UserError
from engine.observe.replica_links import link_name, publication
from engine.plan.models import ShardSpec
from engine.rows import one

SYNC_POLL = 0.2  # seconds between looks at the initial copy's progress


def attach(ctx: ApplyContext, branch: str, target: ShardSpec, shard: ShardSpec,
           tables: list[tuple[str, str, bool]], first: bool) -> str:
    """Publish one shard's tables (reference tables only from the FIRST shard), make its slot, and
    subscribe the replica to it (copying its rows). Returns the subscription's name. What an
    earlier try left is removed first by `detach` (the replica is rebuilt from the top)."""
    chosen = [sql.SQL("{}.{}").format(sql.Identifier(s), sql.Identifier(t)) for s, t, has_key in tables
              if has_key or first]
    name = link_name(branch, shard.dbname)
    with ctx.fleet.servers[shard.server].connect(shard.dbname) as conn:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(publication(branch)), sql.SQL(", ").join(chosen)))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        conninfo = resolved_conninfo(conn)
    with ctx.fleet.servers[target.server].connect(target.dbname) as conn:
        create_subscription(conn, name, conninfo, publication=publication(branch), slot=name, streaming="on")
    return name


def wait_synced(ctx: ApplyContext, target: ShardSpec, names: list[str], say) -> None:
    """Until every table of every link has finished its initial copy (state 'r'). A link that
    fails (a sync or apply error) is said with the way forward instead of waiting forever."""
    last = -1
    with ctx.fleet.servers[target.server].connect(target.dbname) as conn:
        while True:
            pending, total = one(conn.execute(
                "SELECT count(*) FILTER (WHERE sr.srsubstate <> 'r'), count(*) FROM pg_subscription_rel sr"
                " JOIN pg_subscription s ON s.oid = sr.srsubid WHERE s.subname = ANY(%s)", (names,)))
            if total and not pending:
                return
            errors = conn.execute(
                "SELECT subname, apply_error_count, sync_error_count FROM pg_stat_subscription_stats"
                " WHERE subname = ANY(%s) AND apply_error_count + sync_error_count > 0", (names,)).fetchall()
            if errors:
                raise UserError(
                    f"the replica {target.dbname} on {target.server} could not copy from its parent's shards ("
                    + "; ".join(f"{n}: {a} apply errors, {s} table-sync errors" for n, a, s in errors) + ")",
                    f"server {target.server}'s log says why; fix it, then apply again (the replica is rebuilt"
                    " from the start), or remove the branch from the configuration")
            if pending != last:
                say(f"branch.{target.name}: initial copy, {total - pending} of {total} tables done")
                last = pending
            time.sleep(SYNC_POLL)


def detach(ctx: ApplyContext, branch: str, target: ShardSpec, shards: Iterable[ShardSpec]) -> None:
    """Remove the replica's links: its subscriptions (disabled and cut from their slots first, so
    that this works with a shard unreachable), then each shard's slot and publication. Safe to
    repeat; a shard whose database is gone is skipped."""
    handle = ctx.fleet.servers.get(target.server)
    prefix = publication(branch)
    if handle is not None:
        with handle.connect() as conn:
            exists = store.database_exists(conn, target.dbname)
        if exists:
            with handle.connect(target.dbname) as conn:
                conn.execute("SET default_transaction_read_only = off")  # read-only is for its readers
                for (name,) in conn.execute("SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM"
                                            " pg_database WHERE datname = current_database())").fetchall():
                    ident = sql.Identifier(name)
                    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                    conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
    for shard in shards:
        server = ctx.fleet.servers.get(shard.server)
        if server is None:
            continue
        with server.connect() as conn:
            if not store.database_exists(conn, shard.dbname):
                continue  # the shard's database is gone (dropped after a move): nothing of ours is left in it
        with server.connect(shard.dbname) as conn:
            _drop_slot(conn, link_name(branch, shard.dbname))
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(prefix)))


def detach_recorded(ctx: ApplyContext, branch: str, target: ShardSpec, database: str, data: str | None) -> None:
    """`detach` for a branch the catalog records as a replica (DATA: as recorded, or as the
    interrupted action declared it), before its database is dropped; other branches have no links."""
    if data != "replica":
        return
    shards = [ShardSpec(name=r[0], lo=r[1], hi=r[2], server=r[3], dbname=r[4]) for r in ctx.catalog.execute(
        "SELECT name, lo, hi, server, dbname FROM shardctl.shards WHERE database = %s ORDER BY lo NULLS FIRST",
        (database,)).fetchall()]
    detach(ctx, branch, target, shards)


def _drop_slot(conn: psycopg.Connection, name: str, patience: float = 10.0) -> None:
    """Drop our slot; a walsender still serving a just-disabled subscription lets go of it in a
    moment (and is ended if it does not: the slot is ours and its subscription is gone)."""
    deadline = time.monotonic() + patience
    while True:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
        if row is None:
            return
        if row[0] is None:
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                return
            except psycopg.errors.ObjectInUse:
                pass
        elif time.monotonic() > deadline:
            conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        time.sleep(0.05)


def _subscriptions(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM"
                                       " pg_database WHERE datname = current_database()) ORDER BY 1")]


def pause(ctx: ApplyContext, source: ShardSpec, patience: float = 10.0) -> None:
    """Disable the replica's subscriptions and wait until their workers have left its database
    (CREATE DATABASE ... TEMPLATE needs it to itself). The shards keep the WAL in the slots."""
    handle = ctx.fleet.servers[source.server]
    with handle.connect(source.dbname) as conn:
        conn.execute("SET default_transaction_read_only = off")  # read-only is for its readers
        for name in _subscriptions(conn):
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(name)))
    with handle.connect() as conn:
        deadline = time.monotonic() + patience
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type LIKE"
                           " 'logical replication%%'", (source.dbname,)).fetchone() != (0,):
            if time.monotonic() > deadline:
                return  # CREATE DATABASE says who is still there
            time.sleep(0.05)


def resume(ctx: ApplyContext, source: ShardSpec) -> None:
    """Enable the replica's subscriptions again: it catches up from its slots. Safe to repeat,
    and a replica gone since has nothing to resume."""
    handle = ctx.fleet.servers.get(source.server)
    if handle is None:
        return
    with handle.connect() as conn:
        if not store.database_exists(conn, source.dbname):
            return
    with handle.connect(source.dbname) as conn:
        conn.execute("SET default_transaction_read_only = off")
        for name in _subscriptions(conn):
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(name)))


def clone(ctx: ApplyContext, source: ShardSpec, target: ShardSpec) -> str:
    """An instant branch: the paused replica's database copied file by file on its own server
    (`pause` before, `resume` after, whatever happens: the caller journals the three). The
    copy holds each shard's rows as of the pause. Readers connected to the replica are not
    terminated: PostgreSQL waits 5 s for them to leave, then the clone is refused, naming them,
    with the way forward. With PostgreSQL 18's `file_copy_method = clone` the files are cloned
    where the filesystem can (XFS, btrfs), so its cost does not grow with the data. Returns how
    the files were copied."""
    with ctx.fleet.servers[source.server].connect() as conn:
        method = "file copy"
        if conn.execute("SELECT 1 FROM pg_settings WHERE name = 'file_copy_method'").fetchone():
            conn.execute("SET file_copy_method = clone")
            method = "clone (file_copy_method = clone)"
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
            sql.Identifier(target.dbname), sql.Identifier(source.dbname))
        try:
            conn.execute(statement)
        except psycopg.errors.ObjectInUse as exc:
            readers = conn.execute(
                "SELECT count(*), string_agg(DISTINCT coalesce(nullif(application_name, ''), usename::text), ', ')"
                " FROM pg_stat_activity WHERE datname = %s", (source.dbname,)).fetchone()
            raise UserError(
                f"branch.{target.name}: replica {source.name} could not be cloned: {str(exc).splitlines()[0]}"
                + (f" ({readers[0]} connected: {readers[1]})" if readers and readers[0] else ""),
                "a clone needs the replica to itself for a moment, and shardctl does not cut its readers"
                " off; have them disconnect (or pause them), then apply again. The replica kept following"
                " its parent") from None
        except psycopg.Error as exc:
            if method == "file copy" or "clone" not in str(exc):
                raise
            # a filesystem that cannot clone: an ordinary file copy, said so
            conn.execute("RESET file_copy_method")
            conn.execute(statement)
            method = f"file copy (clone refused: {str(exc).splitlines()[0]})"
    return method
