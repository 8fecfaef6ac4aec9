"""Replication that should not be there any more, removed: shardctl's slots, subscriptions and
publications that no running operation owns (`shardctl orphans --remove`), and whatever
replicates into or out of a database before shardctl drops it.

What counts as an orphan is engine/observe/replication.py's (names of shardctl's making whose
operation is not running, replica links of no known branch). Publications live in each database,
not in the cluster-wide catalogs, so they are looked for in the databases the catalog knows and
in those where an orphan was found. Every removal is a journaled step of one operation
(`remove_orphans`) and is safe to run again: what is gone already is skipped.
"""

from __future__ import annotations

import re

from psycopg import sql

from engine.actions.base import ApplyContext
from engine.actions.replica import detach_reference, drop_slot, drop_subscription
from engine.catalog import store
from engine.observe.models import CatalogState, LiveServer
from engine.observe.replica_links import publication
from engine.observe.replication import OPERATION_NAME, Orphan, running_operations
from engine.plan.models import ShardSpec
from engine.servers.connect import ServerUnreachable

REPLICA_PUBLICATION = re.compile(r"^shardctl_rep_[0-9a-f]{10}$")


def orphaned_publications(ctx: ApplyContext, catalog: CatalogState, servers: dict[str, LiveServer],
                          found: list[Orphan]) -> list[tuple[str, str, str]]:
    """(server, database, publication) of shardctl's naming that nothing running owns, in every
    database the catalog knows (shards in any state, branches) and those of FOUND, on servers
    that answered."""
    running = running_operations(catalog)
    branches = {publication(b) for b in catalog.branches}
    places = {(s.server, s.dbname) for d in catalog.databases.values() for s in d.shards}
    places |= {(b.server, b.dbname) for b in catalog.branches.values()}
    places |= {(o.server, o.object.database) for o in found if o.object.database}
    out = []
    for server, dbname in sorted(places):
        live = servers.get(server)
        if live is None or not live.reachable or dbname not in live.databases:
            continue
        try:
            with ctx.fleet.servers[server].connect(dbname) as conn:
                names = [r[0] for r in conn.execute(
                    r"SELECT pubname FROM pg_publication WHERE pubname LIKE 'shardctl\_%' ORDER BY 1")]
        except ServerUnreachable:
            continue
        for name in names:
            match = OPERATION_NAME.match(name)
            if (match and int(match.group("operation")) not in running) or (
                    REPLICA_PUBLICATION.match(name) and name not in branches):
                out.append((server, dbname, name))
    return out


def remove(ctx: ApplyContext, found: list[Orphan], publications: list[tuple[str, str, str]]) -> int:
    """Drop them, subscriptions first (their walsenders then let go of the slots), each a step of
    one journaled operation. Returns how many objects were removed."""
    op = ctx.begin("remove_orphans", "replication", objects=len(found) + len(publications))
    ordered = sorted(found, key=lambda o: (o.object.kind != "subscription", o.server, o.object.name))
    for orphan in ordered:
        obj = orphan.object
        with op.step(f"drop {obj.kind} {obj.name} on {orphan.server}", database=obj.database or ""), \
                ctx.fleet.servers[orphan.server].connect(obj.database or "postgres") as conn:
            if obj.kind == "subscription":
                drop_subscription(conn, obj.name)
            else:
                drop_slot(conn, obj.name)
        ctx.say(f"  dropped {orphan.where}")
    for server, dbname, name in publications:
        with op.step(f"drop publication {name} on {server}", database=dbname), \
                ctx.fleet.servers[server].connect(dbname) as conn:
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
        ctx.say(f"  dropped publication {name} on server {server} (database {dbname})")
    op.finish()
    return len(ordered) + len(publications)


def unlink_database(ctx: ApplyContext, shard: ShardSpec) -> None:
    """Before a shard's database is dropped: what replicates into it (its subscriptions of
    shardctl's naming: DROP DATABASE refuses a database that has one) and out of it (its slots,
    and the subscriptions elsewhere that stream from them: an active slot also stops the drop,
    and a subscription left without its slot would fail forever). A subscriber whose server does
    not answer keeps its subscription: it shows as an orphan until `shardctl orphans --remove`."""
    handle = ctx.fleet.servers.get(shard.server)
    if handle is None:
        return  # drop_database says so
    detach_reference(ctx, shard)  # its copy of the reference tables: the slot is on the source's server
    with handle.connect() as conn:
        if not store.database_exists(conn, shard.dbname):
            return
        slots = [r[0] for r in conn.execute(
            r"SELECT slot_name FROM pg_replication_slots WHERE database = %s AND slot_name LIKE 'shardctl\_%%'"
            " ORDER BY 1", (shard.dbname,))]
    with handle.connect(shard.dbname) as conn:
        for (name,) in conn.execute(
                r"SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE"
                r" datname = current_database()) AND subname LIKE 'shardctl\_%' ORDER BY 1").fetchall():
            drop_subscription(conn, name)
    if not slots:
        return
    for _, other in sorted(ctx.fleet.servers.items()):
        try:
            with other.connect() as conn:
                streaming = conn.execute("SELECT s.subname, d.datname FROM pg_subscription s JOIN pg_database d"
                                         " ON d.oid = s.subdbid WHERE s.subname = ANY(%s) ORDER BY 1",
                                         (slots,)).fetchall()
            for name, dbname in streaming:
                with other.connect(dbname) as conn:
                    drop_subscription(conn, name)
        except ServerUnreachable:
            continue
    with handle.connect(shard.dbname) as conn:
        for name in slots:
            drop_slot(conn, name)
