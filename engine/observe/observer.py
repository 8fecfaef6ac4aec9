"""Take an observation: read the catalog, then look at every declared server and shard.

Read-only. One connection per server for its inventory; one per existing shard for its schema
snapshot (the schema lives in each database, so there is no cheaper way to see it).
"""

from __future__ import annotations

import psycopg

from engine.catalog import store
from engine.clock import Clock, system_clock
from engine.errors import redact
from engine.observe import capabilities, introspect
from engine.observe.models import CatalogState, Holding, LiveServer, LiveShard, Observation
from engine.rows import one
from engine.servers.connect import ServerUnreachable
from engine.servers.fleet import Fleet


def observe(fleet: Fleet, catalog_conn: psycopg.Connection | None, inspect_schemas: bool = True,
            clock: Clock = system_clock) -> Observation:
    """`inspect_schemas=False` skips the per-shard connections (metric rounds need only the
    catalog and the servers, and every query on a shard would count as load on it)."""
    taken_at = clock()
    catalog = store.read(catalog_conn) if catalog_conn is not None else CatalogState(exists=False)
    servers = {name: inspect_server(fleet, name) for name in sorted(fleet.servers)}
    observation = Observation(catalog=catalog, servers=servers, shards={}, taken_at=taken_at)
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


def inspect_server(fleet: Fleet, name: str) -> LiveServer:
    """One server's version, wal_level and databases; unreachable is a value, not an error."""
    try:
        with fleet.servers[name].connect() as conn:
            version = one(conn.execute("SHOW server_version"))[0]
            wal_level = one(conn.execute("SHOW wal_level"))[0]
            databases = tuple(r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY datname"))
            try:
                found = capabilities.read(conn)
            except psycopg.Error:
                found = None  # unknown: no check is failed for it, doctor says it could not read them
    except ServerUnreachable as exc:
        return LiveServer(name=name, reachable=False, error=exc.summary)
    except psycopg.Error as exc:
        return LiveServer(name=name, reachable=False, error=redact(str(exc)))
    return LiveServer(name=name, reachable=True, version=version, wal_level=wal_level, databases=databases,
                      capabilities=found)
