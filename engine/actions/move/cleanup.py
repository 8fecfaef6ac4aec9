"""The stages after the flip (hand over, cleanup), and the abort that undoes a move before it.

Both remove what the move made by the names it derives from its operation id, wherever it is.
A server that does not answer is "not done yet" (never "already gone"): what it still holds
is listed (Leftovers) and the operation stays open.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import psycopg
from psycopg import sql

from engine.actions import reference, replica
from engine.actions.base import drop_database
from engine.actions.move.errors import Leftovers, MoveFailed
from engine.actions.move.fencing import lift, remove_guard
from engine.actions.move.live import Live
from engine.actions.move.spec import Link
from engine.catalog import journal, store
from engine.plan.models import ShardSpec
from engine.servers.connect import ServerUnreachable


def hand_over(live: Live) -> None:
    """After the flip: each replica leaves the retired sources for the targets."""
    spec = live.spec
    for branch, copy in replica.followers(live.ctx, spec.database):
        with live.step(f"hand over {branch}", replica=copy.dbname):
            replica.hand_over(live.ctx, branch, copy, spec.sources, spec.targets, live.say)


def cleanup(live: Live) -> None:
    """Subscriptions, slots and publications removed."""
    with live.step("cleanup"):
        remove_replication(live, after_cutover=True)


def remove_replication(live: Live, after_cutover: bool = False) -> None:
    """Subscriptions, slots and publications of this operation, wherever they are. A slot
    left behind would retain WAL; a target with a live subscription could not be dropped.
    A database that is gone holds none of them; a server that does not answer may: what it
    still holds is listed (Leftovers) and the operation stays open, to finish when it answers."""
    spec = live.spec
    left: list[str] = []
    silent: dict[str, str] = {}

    def on(shard: ShardSpec, objects: list[str], work: Callable[[psycopg.Connection], None]) -> None:
        try:
            with live.database(shard) as conn:
                if conn is not None:
                    work(conn)
        except (ServerUnreachable, psycopg.OperationalError) as exc:
            silent.setdefault(shard.server, exc.summary if isinstance(exc, ServerUnreachable)
                              else str(exc).strip().splitlines()[0])
            left.extend(f"{what} on server {shard.server} (database {shard.dbname})" for what in objects)

    syncs: dict[str, list[str]] = {}  # per source: the prefixes of its links' table-sync slots

    def unsubscribe(conn: psycopg.Connection, link: Link) -> None:
        name = spec.link_name(link)
        row = conn.execute("SELECT oid FROM pg_subscription WHERE subname = %s", (name,)).fetchone()
        if row:  # dropped cut from its slot, it leaves a copy's unfinished table-sync slots to us
            syncs.setdefault(link.source.name, []).append(f"pg_{row[0]}_sync_")
        replica.drop_subscription(conn, name)

    for link in spec.links:  # subscriptions first: their walsenders then let go of the slots
        on(link.target, [f"subscription {spec.link_name(link)}"], partial(unsubscribe, link=link))
    for source in spec.sources:
        names = [spec.link_name(link) for link in spec.links if link.source == source]
        slots = [*names, spec.verify_slot(source)]  # and the verification's
        on(source, [f"slot {n}" for n in slots] + [f"publication {n}" for n in names],
           partial(_unpublish, slots=slots, publications=names, sync_prefixes=syncs.get(source.name, [])))
    if left:
        raise _leftovers(live, left, silent, after_cutover)


def _leftovers(live: Live, left: list[str], silent: dict[str, str], after_cutover: bool) -> Leftovers:
    spec = live.spec
    servers = ", ".join(f"server {name} did not answer ({why})" for name, why in sorted(silent.items()))
    listed = "\n".join(f"  - {item}" for item in left)
    if after_cutover:
        return Leftovers(
            f"{spec.label}: the cutover is done ({', '.join(t.name for t in spec.targets)} own the range and take"
            f" writes), but its cleanup is not: {servers}",
            f"Left behind (a slot keeps its server's WAL until it is dropped):\n{listed}\n"
            "No row is lost and no writer waits on them. The operation stays open: once the server answers"
            " again (`shardctl up` starts an embedded one), `shardctl apply` finishes the cleanup;"
            " `shardctl status` lists what is left.")
    return Leftovers(
        f"{spec.label}: not finished: {servers}",
        f"Left behind:\n{listed}\nThe operation stays open; once the server answers again (`shardctl up`"
        f" starts an embedded one), run `shardctl abort {spec.operation}` again.")


def _unpublish(conn: psycopg.Connection, slots: list[str], publications: list[str], sync_prefixes: list[str]) -> None:
    for prefix in sync_prefixes:
        slots = slots + [r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE"
                                                    " starts_with(slot_name, %s) ORDER BY 1", (prefix,))]
    for name in slots:
        replica.drop_slot(conn, name)
    for name in publications:
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


def abort(live: Live, state: str = "aborted") -> None:
    """Undo an operation that has not flipped: replication objects, fence, targets. After the
    cutover the targets own the range and hold writes nobody else has: refused."""
    spec, catalog = live.spec, live.ctx.catalog
    if journal.cut_over(catalog, spec.operation):
        raise MoveFailed(f"{spec.label}: operation {spec.operation} has passed its cutover and cannot be undone",
                         "its targets own the range and hold the writes made since; `shardctl apply` finishes it")
    remove_replication(live)
    replica.unfollow(live.ctx, spec.database, spec.targets)
    lift(live)
    remove_guard(live)
    for target in spec.targets:
        reference.detach(live.ctx, target)
        drop_database(live.ctx, target)
    with catalog.transaction():
        for target in spec.targets:
            catalog.execute("DELETE FROM shardctl.shards WHERE database = %s AND name = %s AND state = 'moving'",
                            (spec.database, target.name))
        store.bump_serial(catalog)
    live.op.finish(state)
