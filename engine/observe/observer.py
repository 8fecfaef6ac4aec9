"""Take an observation: read the catalog, then look at every declared server and shard.

Read-only. One connection per server for its inventory, servers read at once, each within a
deadline; one per existing shard for its schema
snapshot (the schema lives in each database, so there is no cheaper way to see it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import psycopg

from engine.catalog import backups as backup_catalog
from engine.catalog import store
from engine.clock import Clock, system_clock
from engine.errors import redact
from engine.observe import capabilities, fanout, introspect, replication
from engine.observe.models import CatalogState, Holding, LiveServer, LiveShard, Observation
from engine.rows import one
from engine.servers.connect import ServerUnreachable
from engine.servers.fleet import Fleet

INVENTORY_DEADLINE = 10.0  # seconds one server's inventory may take, connecting included


def observe(fleet: Fleet, catalog_conn: psycopg.Connection | None, inspect_schemas: bool = True,
            clock: Clock = system_clock, deadline: float = INVENTORY_DEADLINE) -> Observation:
    """`inspect_schemas=False` skips the per-shard connections (metric rounds need only the
    catalog and the servers, and every query on a shard would count as load on it). Servers are
    inspected at once, each within `deadline` seconds; a late one is unreachable, with why."""
    taken_at = clock()
    catalog = store.read(catalog_conn) if catalog_conn is not None else CatalogState(exists=False)
    servers = inspect_servers(fleet, sorted(fleet.servers), deadline)
    observation = Observation(catalog=catalog, servers=servers, shards={}, taken_at=taken_at)
    if catalog_conn is not None and any(b.data == "backup" for b in fleet.desired.branches.values()):
        observation = observation.model_copy(update={"backup_sources": backup_catalog.sources(
            catalog_conn, fleet.desired.branches, catalog, taken_at)})
    return inspect_shards(fleet, observation) if inspect_schemas else observation


def inspect_shards(fleet: Fleet, observation: Observation) -> Observation:
    """Look into every shard the catalog knows: does it exist, what schema does it have."""
    catalog, servers = observation.catalog, observation.servers
    shards: dict[str, LiveShard] = {}
    for database in catalog.databases.values():
        for shard in database.shards:
            live = servers.get(shard.server)
            if live is None or not live.reachable:
                continue  # unknown, not missing: the planner must not act on it
            if shard.dbname not in live.databases:
                shards[shard.address] = LiveShard(exists=False)
                continue
            try:
                # one read-only transaction: one transaction in the shard's statistics, not six
                with fleet.servers[shard.server].connect(shard.dbname, autocommit=False) as conn:
                    conn.read_only = True
                    snap = introspect.snapshot(conn)
                    steps = introspect.applied_steps(conn)
                    holding = _holding(conn)
                    conn.rollback()
                shards[shard.address] = LiveShard(
                    exists=True, applied_steps=steps,
                    schema_fingerprint=introspect.fingerprint(snap), schema_snapshot=snap, holding=holding,
                )
            except ServerUnreachable:
                continue
    branches: dict = {}
    branch_holdings: dict = {}
    for branch in catalog.branches.values():
        live = servers.get(branch.server)
        if branch.state != "active" or live is None or not live.reachable or branch.dbname not in live.databases:
            continue
        try:
            with fleet.servers[branch.server].connect(branch.dbname) as conn:
                branches[branch.name] = introspect.snapshot(conn)
                holding = _holding(conn)
                if holding is not None:
                    branch_holdings[branch.name] = holding
        except ServerUnreachable:
            continue
    return observation.model_copy(update={"shards": shards, "branch_schemas": branches,
                                          "branch_holdings": branch_holdings})


def _holding(conn: psycopg.Connection) -> Holding | None:
    """Rows and size, or None when they cannot be read (then the database may hold rows)."""
    try:
        with conn.transaction():
            rows, exact, size = introspect.holdings(conn)
    except psycopg.Error:
        return None
    return Holding(rows=rows, exact=exact, size_bytes=size)


def inspect_servers(fleet: Fleet, names: list[str], deadline: float = INVENTORY_DEADLINE) -> dict[str, LiveServer]:
    """Every named server inspected at once (engine.observe.fanout), each within `deadline`: a
    server that accepts and never answers is unreachable with that reason, and delays no other."""
    def job(name: str) -> Callable[[fanout.Watch], LiveServer]:
        return lambda watch: inspect_server(fleet, name, watch)

    setting = "metrics.deadline" if deadline != INVENTORY_DEADLINE else "the inventory's deadline"
    outcomes = fanout.fan_out({name: job(name) for name in names}, deadline, setting=setting)
    for outcome in outcomes.values():
        if outcome.exception is not None:
            # inspect_server turns a server's own failures into values; anything else (a DSN
            # variable not set, ...) is the user's to fix, reported as before
            raise outcome.exception
    return {name: outcomes[name].value or LiveServer(name=name, reachable=False, error=outcomes[name].error)
            for name in names}


def inspect_server(fleet: Fleet, name: str, watch: fanout.Watch | None = None) -> LiveServer:
    """One server's version, wal_level and databases; unreachable is a value, not an error. With
    a `watch` (from fan_out), connecting and reading are bounded by its deadline."""
    timeout = watch.connect_timeout() if watch is not None else "10"
    try:
        with fleet.servers[name].connect(connect_timeout=timeout) as conn, \
                (watch.connection(conn) if watch is not None else contextlib.nullcontext(conn)):
            version = one(conn.execute("SHOW server_version"))[0]
            wal_level = one(conn.execute("SHOW wal_level"))[0]
            databases = tuple(r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY datname"))
            try:
                found = capabilities.read(conn)
            except psycopg.Error:
                if watch is not None and watch.cut:
                    raise
                found = None  # unknown: no check is failed for it, doctor says it could not read them
            try:
                embedded = fleet.servers[name].embedded
                objects = replication.read(conn, embedded.log_file if embedded is not None else None)
            except psycopg.Error:
                if watch is not None and watch.cut:
                    raise
                objects = None  # not readable by this role: the links' state is unknown, never missing
    except ServerUnreachable as exc:
        return LiveServer(name=name, reachable=False, error=exc.summary)
    except psycopg.Error as exc:
        return LiveServer(name=name, reachable=False, error=redact(str(exc)))
    return LiveServer(name=name, reachable=True, version=version, wal_level=wal_level, databases=databases,
                      capabilities=found, replication=objects)
