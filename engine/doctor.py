"""`shardctl doctor`: the preflight checks of every declared server, read-only.

Per server: version, wal_level, free replication slots and WAL senders, replication workers,
max_slot_wal_keep_size, pg_stat_statements, pg_buffercache, connection headroom, clock skew
against the catalog's server, the replication settings against the most the fleet needs of the
server at once (engine/plan/budget.py), the role's privileges against what each kind of action needs,
backups included for a backed-up server, and shardctl's replication objects there: leftovers no
running operation owns, links that cannot reach their publisher (engine/plan/checks.py judges;
engine/render/doctor.py prints).
"""

from __future__ import annotations

import psycopg

from engine.catalog import schema, store
from engine.collect.observer import inspect_servers
from engine.config.loader import Desired
from engine.errors import UserError
from engine.observe.models import CatalogState, LiveServer
from engine.observe.replication import Orphan, orphans
from engine.plan import budget
from engine.plan.checks import (
    Check,
    backup_checks,
    budget_check,
    metrics_check,
    origin_check,
    replication_checks,
    server_checks,
    tls_check,
)
from engine.servers.fleet import Fleet


def run(desired: Desired, say=lambda _: None) -> dict[str, list[Check]]:
    fleet = Fleet(desired)
    fleet.start_embedded(say)
    live = inspect_servers(fleet, sorted(fleet.servers))
    orphaned = leftovers(fleet, live)
    needs = budget.fleet_needs(desired, recorded(fleet, live), live)
    catalog = live.get(desired.catalog_server or "")
    offset = catalog.capabilities.clock_offset_s if catalog and catalog.capabilities else None
    out = {}
    for name, server in live.items():
        checks = server_checks(server, None if name == desired.catalog_server else offset)
        if server.reachable:
            checks.append(metrics_check(name, desired.servers[name], server))
            tls = tls_check(server) if any(not s.embedded for s in desired.servers.values()) else None
            origin = origin_check(server) if any(b.data == "replica" for b in desired.branches.values()) else None
            checks.extend(c for c in (tls, origin) if c is not None)
            checks.extend(replication_checks(server, orphaned))
            within = budget_check(server, needs[name], desired.servers[name].embedded)
            if within is not None:
                checks.append(within)
            if name in desired.backups:
                checks.extend(backup_checks(server))
        out[name] = checks
    return out


def recorded(fleet: Fleet, live: dict[str, LiveServer]) -> CatalogState | None:
    """The catalog, for the shards each server holds now; None when it cannot be read."""
    catalog = live.get(fleet.desired.catalog_server or "")
    if catalog is None or not catalog.reachable:
        return None
    try:
        with fleet.catalog(create=False) as conn:
            if conn is None or not schema.installed_version(conn):
                return None
            return store.read(conn)
    except (UserError, psycopg.Error):
        return None


def leftovers(fleet: Fleet, live: dict[str, LiveServer]) -> list[Orphan] | None:
    """Replication objects no running operation owns; None when the catalog cannot tell."""
    catalog = live.get(fleet.desired.catalog_server or "")
    if catalog is None or not catalog.reachable:
        return None
    try:
        with fleet.catalog(create=False) as conn:
            if conn is None or not schema.installed_version(conn):
                return None
            return orphans(store.read(conn), live)
    except (UserError, psycopg.Error):
        return None
