"""The `postgres` collector: every shard of a server from one connection, a few queries.

Tier 1 (every round): pg_stat_database joined with pg_stat_activity (a plan's own inspection
sessions, `shardctl-inventory`, left out of the connections: engine.collect.observer). Tier 2 (every round, when
the extension is loaded): pg_stat_statements grouped by database. Tier 3 (full rounds only):
pg_database_size and pg_buffercache. The queries are the ones measured in
shared/METRICS-BRANCH-NOTES.md; they run unchanged as a member of pg_monitor.
"""

from __future__ import annotations

import psycopg

from engine.clock import system_clock
from engine.collect.collectors.base import Collector, register
from engine.observe.metrics import Reading
from engine.observe.models import CatalogShard
from engine.rows import one
from engine.servers.connect import ServerHandle

TIER1 = """
SELECT d.datname, s.xact_commit + s.xact_rollback AS xacts, s.active_time AS active_ms,
       coalesce(a.conns, 0) AS conns
FROM pg_database d JOIN pg_stat_database s ON s.datid = d.oid
LEFT JOIN (SELECT datid, count(*) AS conns
           FROM pg_stat_activity WHERE backend_type = 'client backend'
             AND application_name IS DISTINCT FROM 'shardctl-inventory' GROUP BY datid) a
       ON a.datid = d.oid
WHERE d.datname = ANY(%s)
"""
TIER2 = """
SELECT d.datname, sum(p.calls) AS calls, sum(p.total_exec_time) AS exec_ms
FROM pg_stat_statements(false) p JOIN pg_database d ON d.oid = p.dbid
WHERE d.datname = ANY(%s) GROUP BY d.datname
"""
SIZES = "SELECT datname, pg_database_size(oid) FROM pg_database WHERE datname = ANY(%s)"
BUFFERS = """
SELECT d.datname, count(*) * current_setting('block_size')::bigint AS buffer_bytes
FROM pg_buffercache b JOIN pg_database d ON d.oid = b.reldatabase
WHERE d.datname = ANY(%s) GROUP BY d.datname
"""
EXTENSIONS = "SELECT extname FROM pg_extension WHERE extname IN ('pg_stat_statements', 'pg_buffercache')"
SHARED_BUFFERS = (
    "SELECT setting::bigint * current_setting('block_size')::bigint FROM pg_settings WHERE name = 'shared_buffers'"
)


@register
class PostgresCollector(Collector):
    name = "postgres"

    def __init__(self) -> None:
        # settings that change only with a restart or an extension install: read once a minute
        self._cached: dict[tuple[str, str], tuple[float, object]] = {}

    def _once_a_minute(self, key: tuple[str, str], read):
        import time

        hit = self._cached.get(key)
        if hit is None or time.monotonic() - hit[0] > 60:
            hit = (time.monotonic(), read())
            self._cached[key] = hit
        return hit[1]

    def _extensions(self, server: ServerHandle, conn: psycopg.Connection) -> set[str]:
        return self._once_a_minute((server.name, "ext"), lambda: {r[0] for r in conn.execute(EXTENSIONS)})

    def _shared_buffers(self, server: ServerHandle, conn: psycopg.Connection) -> str:
        return self._once_a_minute((server.name, "sb"), lambda: str(one(conn.execute(SHARED_BUFFERS))[0]))

    def collect(self, server: ServerHandle, conn: psycopg.Connection, shards: list[CatalogShard],
                readings: dict[str, Reading], full: bool) -> dict[str, Reading]:
        by_db = {s.dbname: s for s in shards}
        names = sorted(by_db)
        out = dict(readings)
        with conn.transaction():  # one snapshot of the statistics for the round
            at = system_clock()
            extensions = self._extensions(server, conn)
            counters: dict[str, dict[str, float]] = {n: {} for n in names}
            gauges: dict[str, dict[str, float]] = {n: {} for n in names}
            for datname, xacts, active_ms, conns in conn.execute(TIER1, (names,)):
                counters[datname].update(xacts=float(xacts), active_ms=float(active_ms or 0.0))
                gauges[datname]["connections"] = float(conns)
            if "pg_stat_statements" in extensions:
                try:
                    with conn.transaction():  # a savepoint: a failure here leaves tier 1 intact
                        rows = conn.execute(TIER2, (names,)).fetchall()
                    for datname, calls, exec_ms in rows:
                        counters[datname].update(calls=float(calls), exec_ms=float(exec_ms))
                    for n in names:  # a database with no statements yet has zero calls, not unknown
                        counters[n].setdefault("calls", 0.0)
                        counters[n].setdefault("exec_ms", 0.0)
                except psycopg.Error:
                    pass  # created but not preloaded: tier 2 stays unknown
            notes = {"shared_buffers_bytes": self._shared_buffers(server, conn)}
            # sizes already in the readings (a plan's inspection read them a moment ago) are not read again
            unsized = [n for n in names if "size_bytes" not in getattr(out.get(by_db[n].address), "gauges", {})]
            if full and unsized:
                # each in a savepoint: a missing grant (pg_monitor) loses that metric, not the round
                try:
                    with conn.transaction():
                        sizes = conn.execute(SIZES, (unsized,)).fetchall()
                    for datname, size in sizes:
                        gauges[datname]["size_bytes"] = float(size)
                except psycopg.errors.InsufficientPrivilege:
                    pass  # storage unknown; doctor and the plan's notes say why
                if "pg_buffercache" in extensions:
                    try:
                        with conn.transaction():
                            buffers = conn.execute(BUFFERS, (names,)).fetchall()
                        for n in names:
                            gauges[n]["buffer_bytes"] = 0.0
                        for datname, buffer_bytes in buffers:
                            gauges[datname]["buffer_bytes"] = float(buffer_bytes)
                    except psycopg.errors.InsufficientPrivilege:
                        pass  # memory unknown: reading pg_buffercache needs pg_monitor
        for dbname, shard in by_db.items():
            previous = out.get(shard.address)
            base = previous.model_dump() if previous else {}
            out[shard.address] = Reading(
                shard=shard.address, server=server.name, dbname=dbname, at=at,
                counters={**base.get("counters", {}), **counters[dbname]},
                gauges={**base.get("gauges", {}), **gauges[dbname]},
                per_pid_ticks=base.get("per_pid_ticks", {}),
                notes={**base.get("notes", {}), **notes},
            )
        return out
