"""The links of a `data: replica` branch: one read-only database holding every row of a sharded
database, kept current by logical replication from each of its active shards.

Per shard: a publication of its tables (declared reference tables are not among them: the
replica subscribes to the database's reference source for those, as the shards do,
engine/actions/reference.py; tables without the shard key of a database that declares none,
only from the first shard, so they are copied once), a logical slot made beforehand, and on
the replica a subscription to it (password-free, engine/actions/subscription.py) whose initial table sync
copies the shard's rows; the shards' rows are disjoint, so the replica is their union. This
module owns the names of those objects, making them, waiting for the initial copy, removing
them (before the replica's database is dropped or rebuilt: a database holding subscriptions
cannot be dropped, and a forgotten slot would keep the shard's WAL forever). Their names and
observed lag are engine/observe/replica_links.py's.

A replica follows its parent through splits, merges and moves (`follow`, `hand_over`, `unfollow`,
called by the move at its stages, engine/actions/move/). Before the cutover, each target gets
its own link, made with its slot but left disabled, with `origin = none`: the target's rows
arrive by the move's own replication (its table copy and applied changes carry a replication
origin), so this link skips all of them and carries only what is written on the target itself,
which is nothing until the flip and every write after it. After the flip, once the replica has
confirmed everything its links to the retired sources carry (they take no writes any more), the
targets' links are enabled and the sources' removed: the replica applies a range's writes in
their order, the source's before the target's. `origin` needs PostgreSQL 16 on both ends; the
planner holds a move that a replica could not follow (engine/plan/planner.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import psycopg
from psycopg import sql

from engine.actions.base import ApplyContext, creating
from engine.actions.subscription import create_subscription, resolved_conninfo
from engine.catalog import store
from engine.errors import UserError
from engine.observe import replication
from engine.observe.introspect import tables_with_key
from engine.observe.replica_links import link_name, publication
from engine.plan.models import ShardSpec
from engine.rows import one
from engine.servers.connect import ServerUnreachable

SYNC_POLL = 0.2  # seconds between looks at the initial copy's progress
NEXT = "_next"  # a successor link's subscription, until the hand-over gives it its slot's name
HAND_OVER_STALL = 60.0  # seconds a replica may confirm nothing more of a retired source before the move says so


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
    if handle is not None:
        with handle.connect() as conn:
            exists = store.database_exists(conn, target.dbname)
        if exists:
            with handle.connect(target.dbname) as conn:
                conn.execute("SET default_transaction_read_only = off")  # read-only is for its readers
                for name in _subscriptions(conn):
                    drop_subscription(conn, name)
    _unlink(ctx, branch, shards, publications=True)


def _unlink(ctx: ApplyContext, branch: str, shards: Iterable[ShardSpec], publications: bool) -> None:
    """The shards' ends of a replica's links: each slot (and, with PUBLICATIONS, the publication).
    A shard whose server is no longer declared, or whose database is gone (dropped after a
    move), has nothing of ours left."""
    for shard in shards:
        server = ctx.fleet.servers.get(shard.server)
        if server is None:
            continue
        with server.connect() as conn:
            if not store.database_exists(conn, shard.dbname):
                continue
        with server.connect(shard.dbname) as conn:
            drop_slot(conn, link_name(branch, shard.dbname))
            if publications:
                conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication(branch))))


def detach_recorded(ctx: ApplyContext, branch: str, target: ShardSpec, database: str, data: str | None) -> None:
    """`detach` for a branch the catalog records as a replica (DATA: as recorded, or as the
    interrupted action declared it), before its database is dropped; other branches have no links."""
    if data != "replica":
        return
    shards = [ShardSpec(name=r[0], lo=r[1], hi=r[2], server=r[3], dbname=r[4]) for r in ctx.catalog.execute(
        "SELECT name, lo, hi, server, dbname FROM shardctl.shards WHERE database = %s ORDER BY lo NULLS FIRST",
        (database,)).fetchall()]
    source = reference_source(ctx, database)
    detach(ctx, branch, target, shards + ([source] if source else []))


def reference_source(ctx: ApplyContext, database: str) -> ShardSpec | None:
    """The database's reference source (engine/actions/reference.py), which a replica follows for
    the reference tables; None when it declares none."""
    recorded = store.reference_of(ctx.catalog, database)
    return ShardSpec(name="reference", lo=None, hi=None, server=recorded[1], dbname=recorded[2]) if recorded else None


def detach_reference(ctx: ApplyContext, shard: ShardSpec) -> None:
    """Before a shard's database is dropped: its subscription to the source, and its slot (with
    the slots of an unfinished table copy) on whichever server holds them. A database or server
    already gone holds nothing."""
    name = replication.reference_link(shard.server, shard.dbname)  # reference.link_name
    handle = ctx.fleet.servers.get(shard.server)
    sync_prefix = None
    if handle is not None:
        with handle.connect() as conn:
            exists = store.database_exists(conn, shard.dbname)
        if exists:
            with handle.connect(shard.dbname) as conn:
                row = conn.execute("SELECT oid FROM pg_subscription WHERE subname = %s", (name,)).fetchone()
                if row is not None:
                    sync_prefix = f"pg_{row[0]}_sync_"
                drop_subscription(conn, name)
    for _, server in sorted(ctx.fleet.servers.items()):
        try:
            with server.connect() as conn:
                slots = [r[0] for r in conn.execute(
                    "SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s"
                    " OR (%s::text IS NOT NULL AND starts_with(slot_name, %s)) ORDER BY 1",
                    (name, sync_prefix, sync_prefix or ""))]
                for slot in slots:
                    drop_slot(conn, slot)
        except ServerUnreachable:
            continue


def drop_slot(conn: psycopg.Connection, name: str, patience: float = 10.0) -> None:
    """Drop our slot; a walsender still serving a just-disabled subscription, or a move's
    verification stream just closed, lets go of it in a moment (and is ended if it does not:
    the slot is ours and what read it is gone)."""
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
    with ctx.fleet.servers[source.server].connect() as conn, creating(ctx, target, conn):
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


# ---------------------------------------------------------------- following moves


def followers(ctx: ApplyContext, database: str) -> list[tuple[str, ShardSpec]]:
    """The active replicas of DATABASE: (branch, its database). One being built or reset is not
    among them: it is rebuilt from the shards active when its build runs."""
    return [(r[0], ShardSpec(name=r[0], lo=None, hi=None, server=r[1], dbname=r[2])) for r in ctx.catalog.execute(
        "SELECT name, server, dbname FROM shardctl.branches WHERE parent = %s AND data = 'replica'"
        " AND state = 'active' ORDER BY name", (database,)).fetchall()]


def reference_link(ctx: ApplyContext, branch: str, target: ShardSpec, database: str,
                   tables: list[tuple[str, str, bool]]) -> str | None:
    """The replica's link to the reference source, for the reference tables (those of TABLES
    without the shard key); None when the database declares none. Its rows reach the shards by
    replication, so a shard's link (origin = none after a move) would not carry them."""
    source = reference_source(ctx, database)
    if source is None:
        return None
    return attach(ctx, branch, target, source, [t for t in tables if not t[2]], first=True)


def follow(ctx: ApplyContext, branch: str, replica: ShardSpec, target: ShardSpec, key_column: str,
           database: str) -> None:
    """Before a move's cutover: the replica's link to one of its targets, disabled, taking only
    the target's own writes (origin = none) from the slot made now. Safe to repeat: what exists
    is kept (its slot must not be made again, or writes before the new one would be skipped)."""
    name = link_name(branch, target.dbname)
    with ctx.fleet.servers[target.server].connect(target.dbname) as conn:
        if not conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication(branch),)).fetchone():
            # tables without the shard key come from the first shard only, as when the replica was made,
            # or from the reference source (declared reference tables)
            source = reference_source(ctx, database)
            chosen = [sql.SQL("{}.{}").format(sql.Identifier(s), sql.Identifier(t))
                      for s, t, has_key in tables_with_key(conn, key_column)
                      if has_key or (target.lo is None and source is None)]
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(publication(branch)), sql.SQL(", ").join(chosen)))
        if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone():
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        conninfo = resolved_conninfo(conn)
    with ctx.fleet.servers[replica.server].connect(replica.dbname) as conn:
        conn.execute("SET default_transaction_read_only = off")  # read-only is for its readers
        if not conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name + NEXT,)).fetchone():
            create_subscription(conn, name + NEXT, conninfo, publication=publication(branch), slot=name,
                                streaming="on", enabled=False, copy_data=False, origin="none")


def hand_over(ctx: ApplyContext, branch: str, replica: ShardSpec, sources: Iterable[ShardSpec],
              targets: Iterable[ShardSpec], say) -> None:
    """After a move's flip: once the replica has confirmed all of each retired source (fenced: it
    takes no more writes), its links to the targets are enabled and those to the sources
    removed; the targets' links then take their slots' names. Safe to repeat from any point: a
    target link still named `..._next` is what says the hand-over is unfinished. A replica that
    stops confirming (its server down, its apply failing) fails this step with the way forward;
    the parent's writers never wait for it."""
    handle = ctx.fleet.servers.get(replica.server)
    if handle is None:
        raise UserError(f"branch.{branch}: replica server {replica.server!r} is no longer declared",
                        "declare it again (or delete the replica), then apply to finish the move")
    sources, targets = list(sources), list(targets)
    with handle.connect(replica.dbname) as conn:
        present = set(_subscriptions(conn))
    pending = [t for t in targets if link_name(branch, t.dbname) + NEXT in present]
    if not pending:
        return  # handed over already (or the replica was not following this move)
    # a source's link still has its own name until the targets' links are renamed (a relocated
    # shard's target link takes that very name, which is why the renaming comes last)
    source_links = [s for s in sources if link_name(branch, s.dbname) in present]
    for source in source_links:
        _wait_confirmed(ctx, branch, source, link_name(branch, source.dbname), say)
    with handle.connect(replica.dbname) as conn:
        conn.execute("SET default_transaction_read_only = off")  # read-only is for its readers
        for target in pending:
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(
                sql.Identifier(link_name(branch, target.dbname) + NEXT)))
        for source in source_links:
            drop_subscription(conn, link_name(branch, source.dbname))
    _unlink(ctx, branch, sources, publications=True)
    with handle.connect(replica.dbname) as conn:
        conn.execute("SET default_transaction_read_only = off")
        for target in pending:
            name = link_name(branch, target.dbname)
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} RENAME TO {}").format(
                sql.Identifier(name + NEXT), sql.Identifier(name)))
    say(f"branch.{branch}: the replica follows {', '.join(t.dbname for t in pending)}")


def _wait_confirmed(ctx: ApplyContext, branch: str, source: ShardSpec, slot: str, say) -> None:
    """Until the replica's slot on SOURCE has confirmed the source's current WAL position; it
    may take as long as it keeps making progress."""
    with ctx.fleet.servers[source.server].connect(source.dbname) as conn:
        goal = one(conn.execute("SELECT pg_current_wal_lsn()::text"))[0]
        best, since = None, time.monotonic()
        while True:
            row = conn.execute("SELECT confirmed_flush_lsn::text, pg_wal_lsn_diff(%s::pg_lsn, confirmed_flush_lsn)"
                               " FROM pg_replication_slots WHERE slot_name = %s", (goal, slot)).fetchone()
            if row is None or row[1] is None or row[1] <= 0:
                return
            if best is None or row[1] < best:
                if best is not None and best - row[1] > (16 << 20):
                    say(f"branch.{branch}: replica catching up on {source.dbname}, {int(row[1]):,} bytes left")
                best, since = row[1], time.monotonic()
            elif time.monotonic() - since > HAND_OVER_STALL:
                raise UserError(
                    f"branch.{branch}: the replica confirmed nothing more of retired shard {source.dbname} on"
                    f" {source.server} for {HAND_OVER_STALL:.0f} s ({int(row[1]):,} bytes left to apply)",
                    "the move itself is done and the parent takes writes; the replica's server log says why it"
                    " does not apply (is it up?). Once fixed, apply again to hand the replica over to the new"
                    " shards, or delete the replica")
            time.sleep(0.05)


def drop_subscription(conn: psycopg.Connection, name: str) -> None:
    """Disable it, cut it from its slot (so that this works with the publisher down: the slot is
    dropped on the publisher's side), drop it. Nothing to do when it does not exist. (A replica's
    database is read-only for its readers, not for this.)"""
    conn.execute("SET default_transaction_read_only = off")
    if not conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s AND subdbid = (SELECT oid FROM"
                        " pg_database WHERE datname = current_database())", (name,)).fetchone():
        return
    ident = sql.Identifier(name)
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
    conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))


def unfollow(ctx: ApplyContext, database: str, targets: Iterable[ShardSpec]) -> None:
    """Undo `follow` for a move that is aborted: every replica's (any state's) links to the
    targets, before the targets' databases are dropped (a slot would stop DROP DATABASE)."""
    targets = list(targets)
    for branch, server, dbname in ctx.catalog.execute(
            "SELECT name, server, dbname FROM shardctl.branches WHERE parent = %s AND data = 'replica'"
            " ORDER BY name", (database,)).fetchall():
        handle = ctx.fleet.servers.get(server)
        if handle is not None:
            with handle.connect() as conn:
                exists = store.database_exists(conn, dbname)
            if exists:
                with handle.connect(dbname) as conn:
                    conn.execute("SET default_transaction_read_only = off")
                    present = set(_subscriptions(conn))
                    for target in targets:
                        if link_name(branch, target.dbname) + NEXT in present:
                            drop_subscription(conn, link_name(branch, target.dbname) + NEXT)
        _unlink(ctx, branch, targets, publications=False)  # the targets' databases are dropped next
