"""The stages before the copy runs: record, targets, publish, subscribe, guard, follow.

Each takes the live move (engine/actions/move/live.py), journals one step, hands nothing on,
and checks what exists before it acts: run again after a crash, it finds its work done.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from engine.actions import fence, reference, replica
from engine.actions.base import apply_steps, ensure_database
from engine.actions.move.errors import MoveFailed, subscription_failed
from engine.actions.move.fencing import table_by_table
from engine.actions.move.live import Live
from engine.actions.subscription import create_subscription, resolved_conninfo
from engine.catalog import store
from engine.errors import UserError


def record(live: Live) -> None:
    """Targets enter the catalog as 'moving' (not routed)."""
    spec, catalog = live.spec, live.ctx.catalog
    with live.step("record"), catalog.transaction():
        for target in spec.targets:
            row = catalog.execute("SELECT state FROM shardctl.shards WHERE database = %s AND name = %s",
                                  (spec.database, target.name)).fetchone()
            if row and row[0] != "moving":
                raise MoveFailed(f"{spec.label}: shard {target.name} exists already ({row[0]})",
                                 "a retired shard of the same range is dropped after autosplit.retire_after")
            store.upsert_shard(catalog, database=spec.database, name=target.name, lo=target.lo,
                               hi=target.hi, server=target.server, dbname=target.dbname, state="moving")
        store.bump_serial(catalog)


def targets(live: Live) -> None:
    """Target databases created with the database's schema steps (what every shard ran: the same
    schema as the source), and given their copy of the reference tables."""
    spec = live.spec
    with live.step("targets"):
        unknown = [s.name for s in spec.steps if not s.sql]
        if unknown:
            raise UserError(f"schema step {unknown[0]} of {spec.database} is no longer in the configuration",
                            "a new shard needs every step the others ran; restore it")
        for target in spec.targets:
            ensure_database(live.ctx, target)
            apply_steps(live.ctx, target, spec.steps)
            with live.connect(target) as conn:
                conn.execute(fence.MARKS)
        _attach_reference(live)


def _attach_reference(live: Live) -> None:
    """Each target subscribes to the reference source and has its copy before the move's own
    links exist (its reference tables are guarded by then: they are not the move's)."""
    source = reference.source_of(live.ctx, live.spec.database)
    if source is None:
        return
    tables = reference.tables_of(live.ctx, live.spec.database)
    for target in live.spec.targets:
        reference.attach(live.ctx, source, target, tables)
    reference.wait_synced(live.ctx, live.spec.targets, live.say)


def _check_replica_identity(live: Live) -> None:
    """A row filter on a column outside the replica identity breaks UPDATE and DELETE on the
    source the moment the publication exists: refuse before creating anything."""
    spec = live.spec
    for source in spec.sources:
        with live.connect(source) as conn:
            bad = [f"{r[0]}.{r[1]}" for r in conn.execute(
                f"""SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                     AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl')
                     AND n.nspname NOT LIKE 'pg_toast%%' AND c.relreplident <> 'f' AND NOT {reference.GUARDED}
                     AND NOT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a
                                     ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                                     WHERE i.indrelid = c.oid AND i.indisprimary AND a.attname = %s)
                   ORDER BY 1, 2""", (spec.key_column,))]
        if bad:
            raise MoveFailed(f"{spec.label}: table {bad[0]} has no primary key containing {spec.key_column}",
                             "rows can move only when the shard key is in every table's primary key")


def publish(live: Live) -> None:
    """Per link: a row-filtered publication and an explicit logical slot on the source."""
    spec = live.spec
    with live.step("publish"):
        _check_replica_identity(live)
        for link in spec.links:
            name = spec.link_name(link)
            tables = live.tables(link.source)
            with live.connect(link.source) as conn:
                exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
                if not exists:
                    members = [
                        sql.SQL("{}.{}{}").format(
                            sql.Identifier(schema), sql.Identifier(table),
                            sql.SQL(" WHERE ({})").format(spec.range_filter(link.target)) if link.filtered
                            else sql.SQL(""))
                        for schema, table in tables
                    ]
                    # the fence's mark travels with the rows: its arrival is the exact catch-up
                    conn.execute(fence.MARKS)
                    # only this operation's marks: earlier moves left theirs in every shard they made
                    members.append(sql.SQL("_shardctl.fence_marks WHERE (operation = {})").format(
                        sql.Literal(spec.operation)))
                    conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                        sql.Identifier(name), sql.SQL(", ").join(members)))
                slot = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
                if not slot:
                    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))


def subscribe(live: Live) -> None:
    """Per link: a subscription on the target (create_slot = false, binary, sync commit off)."""
    spec = live.spec
    with live.step("subscribe"):
        for link in spec.links:
            name = spec.link_name(link)
            with live.connect(link.target) as conn:
                if conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)).fetchone():
                    continue
                # synchronous_commit off: the apply worker stops waiting on a WAL flush per
                # transaction (it spent 84-88% of its time there, and never caught up with a busy
                # source). Safe: it reports to the source only positions already durable here,
                # so the slot replays anything a crash of this server would lose.
                # streaming: large transactions are applied while they run instead of spooled
                # to disk first; in parallel by a second worker where the server has it (16+).
                # the source's connection string (its password) never appears in a statement's
                # text: engine/actions/subscription.py says how and why
                streaming = "parallel" if conn.info.server_version >= 160000 else "on"
                # with a copy throttle, the links past it wait disabled; sync enables them in turn
                enabled = spec.settings.copy_streams is None or link.index < spec.settings.copy_streams
                try:
                    create_subscription(conn, name, _source_conninfo(live, link.source), publication=name,
                                        slot=name, streaming=streaming, enabled=enabled)
                except psycopg.Error as exc:
                    raise subscription_failed(spec.label, spec.operation, link.target.server, link.target.dbname,
                                              exc, live.source_state()) from None


def _source_conninfo(live: Live, source) -> str:
    """How the target's subscription reaches the source: what libpq resolved here (service
    file, PG* variables, passfile and sslmode included), spelled out for the subscriber."""
    with live.connect(source) as conn:
        return resolved_conninfo(conn)


def guard(live: Live) -> None:
    """While the copy runs: the fence's guard triggers on every table of every source, one
    table per short transaction with a lock timeout and retries (engine/actions/fence.py).
    They refuse nothing until the fence arms them; a table guarded already is skipped."""
    with live.step("guard"):
        table_by_table(live, fence.unguarded, fence.install,
                       lambda source, schema, table: f"fence writes on {source.dbname} (installing its guard on"
                                                     f" {schema}.{table})")


def follow(live: Live) -> None:
    """Each active replica of the database gets its (disabled) links to the targets before the
    flip, so that no write to a target after it is missed."""
    spec = live.spec
    for branch, copy in replica.followers(live.ctx, spec.database):
        with live.step(f"follow {branch}", replica=copy.dbname):
            for target in spec.targets:
                replica.follow(live.ctx, branch, copy, target, spec.key_column, spec.database)
