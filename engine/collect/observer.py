"""Take an observation: read the catalog, then look at every declared server and shard.

Read-only. Servers are read at once, each within a deadline, on one connection each (the
metric sampler's, when one is running: engine.collect.sampling). Shards too (the schema lives in
each database, so each needs a connection of its own): at most PER_SERVER of one server's at a
time and fanout.MAX_WORKERS in all, each with one query for the signature of its schema and its
ledger of steps (engine.observe.introspect.shard_facts), and two more, for them, only when they
are not cached under that signature (engine.collect.schema_cache); a server's shards share its
deadline, so a server that hangs costs only its own shards, which stay unknown (never missing)
with the reason. A plan hands in the connections it opened while it started
(engine.collect.early): a shard's is used only when opened with exactly the parameters the fleet
gives now. Rows and sizes (what a destruction would lose) are counted only for the databases a
plan could destroy: counting reads up to 100,000 rows a table.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg

from engine.catalog import backups as backup_catalog
from engine.catalog import store
from engine.clock import Clock, system_clock
from engine.collect import early as early_connections
from engine.collect.early import APPLICATION, EarlyConnections
from engine.collect.schema_cache import SchemaCache
from engine.errors import redact
from engine.observe import capabilities, fanout, introspect, replication
from engine.observe.models import CatalogState, Holding, LiveServer, LiveShard, Observation
from engine.rows import one
from engine.servers.connect import ServerUnreachable
from engine.servers.fleet import Fleet

if TYPE_CHECKING:
    from engine.collect.sampling import LiveSampler

INVENTORY_DEADLINE = 10.0  # seconds one server's inventory may take, connecting included
PER_SERVER = 4  # shard databases of one server read at once


def observe(fleet: Fleet, catalog_conn: psycopg.Connection | None, inspect_schemas: bool = True,
            clock: Clock = system_clock, deadline: float = INVENTORY_DEADLINE,
            sampler: LiveSampler | None = None) -> Observation:
    """`inspect_schemas=False` skips the shards (metric rounds need only the catalog and the
    servers, and every query on a shard would count as load on it). Servers are inspected at
    once, each within `deadline` seconds; a late one is unreachable, with why. With a
    `sampler`, its kept connection to each server is used (and kept)."""
    taken_at = clock()
    catalog = store.read(catalog_conn) if catalog_conn is not None else CatalogState(exists=False)
    servers = inspect_servers(fleet, sorted(fleet.servers), deadline, sampler)
    observation = Observation(catalog=catalog, servers=servers, shards={}, taken_at=taken_at)
    if catalog_conn is not None and any(b.data == "backup" for b in fleet.desired.branches.values()):
        observation = observation.model_copy(update={"backup_sources": backup_catalog.sources(
            catalog_conn, fleet.desired.branches, catalog, taken_at)})
    return inspect_shards(fleet, observation) if inspect_schemas else observation


def at_risk(fleet: Fleet, catalog: CatalogState) -> set[str]:
    """The recorded databases a plan could destroy (no longer declared, or re-keyed): only their
    shards' rows are counted. A database renamed by `moved:` is not among them."""
    desired = fleet.desired
    renamed = {old for old, _ in desired.moved.values()}
    out = set()
    for name, recorded in catalog.databases.items():
        declared = desired.databases.get(name)
        if declared is None:
            if name not in renamed:
                out.add(name)
        elif (declared.spec.shard_key.column, declared.spec.shard_key.type) != (recorded.key_column,
                                                                                recorded.key_type):
            out.add(name)
    return out


def inspect_shards(fleet: Fleet, observation: Observation, deadline: float = INVENTORY_DEADLINE,
                   per_server: int = PER_SERVER, spent: dict[str, tuple[int, float]] | None = None,
                   early: EarlyConnections | None = None) -> Observation:
    """Look into every shard the catalog knows, and every active branch: does it exist, what
    schema does it have (and, for what a plan could destroy, what it holds). A shard on a server
    that does not answer, or that runs out of its deadline, is left out: unknown, not missing,
    so the planner does not act on it; the plan's notes say which server and why. `spent` is
    filled with what looking cost each shard (statements, ms), for the metric sampler. With
    `early`, a connection it opened for a shard's database is used (engine.collect.early)."""
    catalog = observation.catalog
    cache = SchemaCache.for_config(fleet.desired.directory)
    shards, jobs = _jobs(fleet, observation, cache, early)
    outcomes = fanout.fan_out_grouped(jobs, deadline, per_group=per_server)
    branches: dict = {}
    branch_holdings: dict = {}
    silent: dict[str, str] = {}
    for server, results in sorted(outcomes.items()):
        for name, outcome in sorted(results.items()):
            kind, _, key = name.partition(" ")
            if not outcome.ok or outcome.value is None:
                if isinstance(outcome.exception, psycopg.Error | ServerUnreachable) or outcome.late:
                    silent.setdefault(server, outcome.error or "no answer")
                    continue  # unknown
                if outcome.exception is not None:
                    raise outcome.exception
                continue
            if kind == "shard":
                shard_value: tuple[LiveShard, tuple[int, float]] = outcome.value  # type: ignore[assignment]
                shards[key] = shard_value[0]
                if spent is not None:
                    spent[key] = shard_value[1]
            else:
                branch_value: tuple[dict, Holding | None] = outcome.value  # type: ignore[assignment]
                branches[key] = branch_value[0]
                if branch_value[1] is not None:
                    branch_holdings[key] = branch_value[1]
    cache.save(keep={SchemaCache.key(s.server, s.dbname) for d in catalog.databases.values() for s in d.shards})
    notes = tuple(f"server {server}: its shards' schemas could not be read ({why}); they are unknown this plan,"
                  " and nothing is planned on them" for server, why in sorted(silent.items()))
    return observation.model_copy(update={"shards": shards, "branch_schemas": branches,
                                          "branch_holdings": branch_holdings,
                                          "inventory_notes": observation.inventory_notes + notes})


def _jobs(fleet: Fleet, observation: Observation, cache: SchemaCache, early: EarlyConnections | None,
          ) -> tuple[dict[str, LiveShard], dict[str, dict[str, Callable[[fanout.Watch], object]]]]:
    """The shards known not to exist, and a job per shard and active branch to look into, by
    server (none on a server that did not answer: unknown, not missing). Their databases, in the
    order they are read, are kept for the next plan's early connections."""
    catalog, servers = observation.catalog, observation.servers
    count = at_risk(fleet, catalog)
    shards: dict[str, LiveShard] = {}
    jobs: dict[str, dict[str, Callable[[fanout.Watch], object]]] = {}
    params: dict[str, dict] = {}  # one server's for all its databases (an embedded one's are read from files)
    databases: dict[str, dict[str, str]] = {}  # server -> job -> database, for the next plan's early connections

    def reach(server: str, job: str, dbname: str) -> dict:
        if server not in params:
            params[server] = fleet.servers[server].params()
        databases.setdefault(server, {})[job] = dbname
        return {**params[server], "dbname": dbname}

    for database in catalog.databases.values():
        for shard in database.shards:
            live = servers.get(shard.server)
            if live is None or not live.reachable:
                continue  # unknown, not missing: the planner must not act on it
            if shard.dbname not in live.databases:
                shards[shard.address] = LiveShard(exists=False)
                continue
            job = f"shard {shard.address}"
            jobs.setdefault(shard.server, {})[job] = _shard_job(
                fleet, shard.server, reach(shard.server, job, shard.dbname), database.name in count, cache, early)
    for branch in catalog.branches.values():
        live = servers.get(branch.server)
        if branch.state != "active" or live is None or not live.reachable or branch.dbname not in live.databases:
            continue
        job = f"branch {branch.name}"
        jobs.setdefault(branch.server, {})[job] = _branch_job(fleet, branch.server,
                                                              reach(branch.server, job, branch.dbname), early)
    early_connections.remember(fleet.desired.directory, {
        server: (early_connections.recipe(fleet.servers[server], _free(servers[server])),
                 [by_job[j] for j in sorted(by_job)])
        for server, by_job in databases.items()})
    return shards, jobs


def _free(server: LiveServer) -> int | None:
    """The connections a server had free (for the role) when inspected; None when not known."""
    caps = server.capabilities
    if caps is None:
        return None
    free = caps.max_connections - caps.reserved_connections - caps.connections
    return min(free, caps.role_connection_limit) if caps.role_connection_limit >= 0 else free


def _connect(fleet: Fleet, server: str, params: dict, watch: fanout.Watch, early: EarlyConnections | None):
    """`params`: the server's, with the database's name (ServerHandle.params)."""
    opened = early.take(server, params, timeout=watch.remaining()) if early is not None else None
    if opened is not None:
        return opened
    try:
        # a DSN's own connect_timeout wins over the watch's, and the inventory's name over a DSN's
        reading = {"connect_timeout": watch.connect_timeout(), **params, "application_name": APPLICATION}
        return psycopg.connect(**reading, autocommit=True)
    except psycopg.OperationalError as exc:
        raise ServerUnreachable(server, params["dbname"], exc, fleet.servers[server].how_to_reach()) from None


def _shard_job(fleet: Fleet, server: str, params: dict, holdings: bool, cache: SchemaCache,
               early: EarlyConnections | None) -> Callable[[fanout.Watch], tuple[LiveShard, tuple[int, float]]]:
    dbname = params["dbname"]

    def read(watch: fanout.Watch) -> tuple[LiveShard, tuple[int, float]]:
        with _connect(fleet, server, params, watch, early) as conn, watch.connection(conn):
            facts = introspect.shard_facts(conn)
            statements, started = facts.statements, time.monotonic()
            cached = cache.get(server, dbname, facts.signature)
            if cached is None:
                steps, snap = introspect.applied_steps(conn), introspect.snapshot(conn)
                cache.put(server, dbname, facts.signature, snap, steps)
                statements += 2  # a shard always has its ledger (a failed read is not counted)
            else:
                snap, steps = cached
            holding, counted = _holding(conn) if holdings else (None, 0)
            statements += counted
        cost = (statements, facts.ms + (time.monotonic() - started) * 1000 * (statements > facts.statements))
        return LiveShard(exists=True, applied_steps=steps, schema_snapshot=snap,
                         schema_fingerprint=introspect.fingerprint(snap), holding=holding,
                         size_bytes=facts.size_bytes), cost
    return read


def _branch_job(fleet: Fleet, server: str, params: dict,
                early: EarlyConnections | None) -> Callable[[fanout.Watch], tuple]:
    def read(watch: fanout.Watch) -> tuple:
        with _connect(fleet, server, params, watch, early) as conn, watch.connection(conn):
            return introspect.snapshot(conn), _holding(conn)[0]
    return read


def _holding(conn: psycopg.Connection) -> tuple[Holding | None, int]:
    """Rows and size, or None when they cannot be read (then the database may hold rows), and
    the statements that took (in autocommit: one per table, and two more)."""
    try:
        rows, exact, size, statements = introspect.holdings(conn)
    except psycopg.Error:
        return None, 0
    return Holding(rows=rows, exact=exact, size_bytes=size), statements


def inspect_servers(fleet: Fleet, names: list[str], deadline: float = INVENTORY_DEADLINE,
                    sampler: LiveSampler | None = None) -> dict[str, LiveServer]:
    """Every named server inspected at once (engine.observe.fanout), each within `deadline`: a
    server that accepts and never answers is unreachable with that reason, and delays no other.
    With a `sampler`, on its kept connection to each server."""
    def job(name: str) -> Callable[[fanout.Watch], LiveServer]:
        return lambda watch: inspect_server(fleet, name, watch, sampler)

    setting = "metrics.deadline" if deadline != INVENTORY_DEADLINE else "the inventory's deadline"
    outcomes = fanout.fan_out({name: job(name) for name in names}, deadline, setting=setting)
    for outcome in outcomes.values():
        if outcome.exception is not None:
            # inspect_server turns a server's own failures into values; anything else (a DSN
            # variable not set, ...) is the user's to fix, reported as before
            raise outcome.exception
    return {name: outcomes[name].value or LiveServer(name=name, reachable=False, error=outcomes[name].error)
            for name in names}


SERVER = "SELECT current_setting('server_version'), current_setting('wal_level'), array(SELECT datname::text" \
         " FROM pg_database WHERE NOT datistemplate ORDER BY datname)"


def inspect_server(fleet: Fleet, name: str, watch: fanout.Watch | None = None,
                   sampler: LiveSampler | None = None) -> LiveServer:
    """One server's version, wal_level and databases; unreachable is a value, not an error. With
    a `watch` (from fan_out), connecting and reading are bounded by its deadline; with a
    `sampler` (and a watch), on the sampler's kept connection."""
    def read(conn: psycopg.Connection) -> LiveServer:
        version, wal_level, databases = one(conn.execute(SERVER))
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
        return LiveServer(name=name, reachable=True, version=version, wal_level=wal_level,
                          databases=tuple(databases), capabilities=found, replication=objects)

    try:
        if sampler is not None and watch is not None:
            return sampler.on_server(fleet.servers[name], watch, read)
        timeout = watch.connect_timeout() if watch is not None else "10"
        with fleet.servers[name].connect(connect_timeout=timeout) as conn, \
                (watch.connection(conn) if watch is not None else contextlib.nullcontext(conn)):
            return read(conn)
    except ServerUnreachable as exc:
        return LiveServer(name=name, reachable=False, error=exc.summary)
    except psycopg.Error as exc:
        return LiveServer(name=name, reachable=False, error=redact(str(exc)))
