"""`shardctl doctor`: the preflight checks of every declared server, read-only.

Per server: version, wal_level, free replication slots and WAL senders, replication workers,
max_slot_wal_keep_size, pg_stat_statements, pg_buffercache, connection headroom, clock skew
against the catalog's server, and the role's privileges against what each kind of action needs
(engine/plan/checks.py judges; engine/render/doctor.py prints).
"""

from __future__ import annotations

from engine.config.loader import Desired
from engine.observe.observer import inspect_servers
from engine.plan.checks import Check, metrics_check, origin_check, server_checks, tls_check
from engine.servers.fleet import Fleet


def run(desired: Desired, say=lambda _: None) -> dict[str, list[Check]]:
    fleet = Fleet(desired)
    fleet.start_embedded(say)
    live = inspect_servers(fleet, sorted(fleet.servers))
    catalog = live.get(desired.catalog_server or "")
    offset = catalog.capabilities.clock_offset_s if catalog and catalog.capabilities else None
    out = {}
    for name, server in live.items():
        found = server_checks(server, None if name == desired.catalog_server else offset)
        if server.reachable:
            found.append(metrics_check(name, desired.servers[name], server))
            tls = tls_check(server) if any(not s.embedded for s in desired.servers.values()) else None
            origin = origin_check(server) if any(b.data == "replica" for b in desired.branches.values()) else None
            found.extend(c for c in (tls, origin) if c is not None)
        out[name] = found
    return out
