"""The preflight checks of one server: what each purpose needs from it, judged on what was
observed (no side effects). Which purposes each kind of action has on which server is declared
in engine/plan/needs.py. `shardctl doctor` prints every check; the planner refuses an action
whose server fails a check that action needs, naming the check and its fix.

Purposes (what a server is used for by an action):

  shard           create shard, branch and target databases: CREATEDB
  move_source     rows leave it (split, merge, move): wal_level = logical, REPLICATION (logical
                  slots, walsenders), a free slot and a free WAL sender per link
  move_target     rows arrive (split, merge, move): CREATE SUBSCRIPTION (superuser before
                  PostgreSQL 16, pg_create_subscription from 16), workers
  replica_source  one of a replica's parent shards: its publication and slot, as move_source
  replica_target  the replica's server: its subscriptions, as move_target
  replica_follow  a replica follows a move (links with `origin = none`): PostgreSQL 16 or later on
                  the replica's server and the new shards' (a move that could not is held)
  replica_unlink  a replica's slots are dropped with it: REPLICATION
  metrics         statistics of every database (pg_monitor), pg_stat_statements, pg_buffercache:
                  without them metrics are unknown, never zero; nothing is refused
  backups         a backed-up server (Barman): REPLICATION (pg_basebackup, pg_receivewal on a slot),
                  restore points and WAL switches, pg_backup_start/stop and pg_monitor (Barman's own
                  check), a WAL sender for the streaming and one for a base backup
"""

from __future__ import annotations

from collections.abc import Callable

from engine.frozen import Frozen
from engine.observe.models import Capabilities, LiveServer
from engine.observe.replication import Orphan, size_text

SUPPORTED_MAJOR = 15
SKEW_WARN_S = 1.0
HEADROOM = 10  # connections a move may open at once on one server (sources, targets, comparison)


class Check(Frozen):
    server: str
    name: str
    ok: bool | None  # None: could not be judged
    found: str
    fix: str = ""
    needed_by: tuple[str, ...] = ()  # purposes; empty: informational or a warning only
    warning: bool = False  # a failure degrades (metrics unknown, WAL retained) but refuses nothing

    @property
    def mark(self) -> str:
        if self.ok:
            return "ok"
        return "warn" if self.warning or self.ok is None else "FAIL"


def _role(caps: Capabilities) -> str:
    return caps.role or "<role>"


def server_checks(live: LiveServer, catalog_offset_s: float | None = None) -> list[Check]:
    """Every check of one server. Unreachable: one failing check, needed by everything."""
    name = live.name
    everything = ("shard", "move_source", "move_target", "replica_source", "replica_target", "replica_unlink")
    source, target = ("move_source", "replica_source"), ("move_target", "replica_target")
    if not live.reachable:
        return [Check(server=name, name="reachable", ok=False, found=live.error or "unreachable",
                      fix="start the server, or fix its DSN / service (`shardctl up` starts embedded servers)",
                      needed_by=everything)]
    caps = live.capabilities
    if caps is None:
        return [Check(server=name, name="privileges", ok=None, found="could not read the server's settings and"
                      " the role's privileges", fix="", warning=True)]
    role, major = _role(caps), caps.version_num // 10000
    checks = _Checks(name, [Check(server=name, name="version", ok=major >= SUPPORTED_MAJOR,
                                  found=f"PostgreSQL {live.version}",
                                  fix=f"PostgreSQL {SUPPORTED_MAJOR} or later is needed", needed_by=everything)])
    _replication(checks.add, caps, source, target)
    _warnings(checks.add, caps)
    _headroom(checks.add, caps, catalog_offset_s, everything)
    _privileges(checks.add, caps, role, major, source, target)
    return checks.out


class _Checks:
    """One server's checks, in the order they are made."""

    def __init__(self, server: str, out: list[Check]) -> None:
        self.server, self.out = server, out

    def add(self, check_name, ok, found, fix, needed_by=(), warning=False) -> None:
        self.out.append(Check(server=self.server, name=check_name, ok=ok, found=found, fix=fix if not ok else "",
                              needed_by=tuple(needed_by), warning=warning))


def _replication(add: Callable[..., None], caps: Capabilities, source: tuple[str, ...],
                 target: tuple[str, ...]) -> None:
    """Room for logical replication: a move's or replica's source, and its target."""
    add("wal_level", caps.wal_level == "logical", f"wal_level = {caps.wal_level}",
        "ALTER SYSTEM SET wal_level = logical; then restart the server", source)
    free_slots = caps.max_replication_slots - caps.used_replication_slots
    add("replication slots", free_slots >= 2, f"{free_slots} of {caps.max_replication_slots} free",
        "ALTER SYSTEM SET max_replication_slots = 32; then restart (a split uses one slot per target, a"
        " replica one per shard)", source)
    free_senders = caps.max_wal_senders - caps.used_wal_senders
    add("wal senders", free_senders >= 2, f"{free_senders} of {caps.max_wal_senders} free",
        "ALTER SYSTEM SET max_wal_senders = 32; then restart (one per link, more during the copy)", source)
    add("replication workers", caps.max_logical_replication_workers >= 2 and caps.max_worker_processes >= 4,
        f"max_logical_replication_workers = {caps.max_logical_replication_workers},"
        f" max_worker_processes = {caps.max_worker_processes}",
        "ALTER SYSTEM SET max_logical_replication_workers = 16; ALTER SYSTEM SET max_worker_processes = 32;"
        " then restart", target)


def _warnings(add: Callable[..., None], caps: Capabilities) -> None:
    """What degrades without refusing anything: WAL a slot may retain, metrics left unknown."""
    keep = caps.max_slot_wal_keep_size_bytes
    add("max_slot_wal_keep_size", keep is not None and keep >= 0,
        "unlimited" if keep is None or keep < 0 else f"{keep // 1048576} MB",
        "ALTER SYSTEM SET max_slot_wal_keep_size = '2GB'; SELECT pg_reload_conf(); (a slot left by an"
        " interrupted move otherwise retains WAL without limit)", warning=True)
    add("pg_stat_statements", caps.stat_statements_loaded and caps.stat_statements_created,
        "loaded and created" if caps.stat_statements_loaded and caps.stat_statements_created
        else ("created but not in shared_preload_libraries" if caps.stat_statements_created
              else "not created" + ("" if caps.stat_statements_loaded else " nor preloaded")),
        "shared_preload_libraries = 'pg_stat_statements' (restart), then CREATE EXTENSION pg_stat_statements;"
        " in the postgres database (latency stays unknown without it)", warning=True)
    if caps.stat_statements_loaded:
        add("pg_stat_statements.track", caps.stat_statements_track != "all",
            f"pg_stat_statements.track = {caps.stat_statements_track}",
            "ALTER SYSTEM SET pg_stat_statements.track = top; SELECT pg_reload_conf(); (with `all`, nested"
            " statements are kept, and the statement that creates a subscription holds its source's password)",
            warning=True)
    add("pg_buffercache", caps.buffercache_created, "created" if caps.buffercache_created else "not created",
        "CREATE EXTENSION pg_buffercache; in the postgres database (memory stays unknown without it)",
        warning=True)


def _headroom(add: Callable[..., None], caps: Capabilities, catalog_offset_s: float | None,
              everything: tuple[str, ...]) -> None:
    """Connections free for a move, and the clock against the catalog's server."""
    free = caps.max_connections - caps.reserved_connections - caps.connections
    if caps.role_connection_limit >= 0:
        free = min(free, caps.role_connection_limit)
    add("connection headroom", free >= HEADROOM, f"{free} connections free of {caps.max_connections}",
        f"raise max_connections (restart) or end idle sessions; a move opens up to {HEADROOM} at once",
        list(everything))
    if catalog_offset_s is not None:
        skew = caps.clock_offset_s - catalog_offset_s
        add("clock skew", abs(skew) <= SKEW_WARN_S, f"{skew:+.3f}s against the catalog's server",
            "synchronise the servers' clocks (NTP): cooldowns, sample ages and branch expiry compare them",
            warning=True)


def _privileges(add: Callable[..., None], caps: Capabilities, role: str, major: int, source: tuple[str, ...],
                target: tuple[str, ...]) -> None:
    """What shardctl's role may do on the server."""
    su = " (superuser)" if caps.superuser else ""
    add("CREATEDB", caps.superuser or caps.createdb, f"role {role}{su}" + ("" if caps.superuser or caps.createdb
                                                                         else " lacks CREATEDB"),
        f"ALTER ROLE {role} CREATEDB;", ["shard", *target])
    add("REPLICATION", caps.superuser or caps.replication, f"role {role}{su}" + (
        "" if caps.superuser or caps.replication else " lacks REPLICATION"),
        f"ALTER ROLE {role} REPLICATION;", [*source, "replica_unlink"])
    if major < 16:
        add("CREATE SUBSCRIPTION", caps.superuser,
            f"role {role}{su}" + ("" if caps.superuser else f": PostgreSQL {major} lets only a superuser create"
                                                              " subscriptions"),
            "a subscription (a move's target, a replica) needs superuser before PostgreSQL 16: place targets"
            " and replicas on a 16+ server (this one can still be a source), upgrade, or run shardctl as a"
            " superuser here", target)
    else:
        add("CREATE SUBSCRIPTION", caps.superuser or caps.create_subscription,
            f"role {role}{su}" + ("" if caps.superuser or caps.create_subscription
                                  else " is not a member of pg_create_subscription"),
            f"GRANT pg_create_subscription TO {role};", target)
    add("catch-up", True, "through the target's replication origin" if caps.superuser or caps.origin_progress
        else "through the source slot's confirmation (the replication origin's progress is a superuser's to"
             " read): a longer pause, 275-700 ms against 100-200 ms in a 15 -> 18 split under a writer", "")
    add("pg_monitor", caps.superuser or caps.monitor,
        f"role {role}{su}" + ("" if caps.superuser or caps.monitor else " sees only its own sessions' statistics"),
        f"GRANT pg_monitor TO {role}; (metrics of every database; without it they are unknown)", warning=True)


def origin_check(live: LiveServer) -> Check | None:
    """Whether a replica on this server, or a move's new shard here, can follow moves: its links
    skip the moved rows by their replication origin (`origin = none`, PostgreSQL 16). Worth saying
    in fleets that declare a replica; a move that could not be followed is held, not refused."""
    caps = live.capabilities
    if caps is None:
        return None
    major = caps.version_num // 10000
    return Check(server=live.name, name="replication origin", ok=major >= 16,
                 found=f"PostgreSQL {major}: " + ("subscriptions can skip replicated rows (origin = none)"
                                                  if major >= 16 else "no origin filter for subscriptions"),
                 fix="" if major >= 16 else "a replica follows splits, merges and moves only with PostgreSQL 16 or"
                 " later on its server and the new shards': such moves are held; place replicas and targets on 16+,"
                 " or upgrade", needed_by=("replica_follow",), warning=True)


BACKUP_GRANT = ("GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean), pg_switch_wal(),"
                " pg_create_restore_point(text) TO {role};")


def backup_checks(live: LiveServer) -> list[Check]:
    """What a backed-up server needs from shardctl's role (`backups:` in the YAML)."""
    caps = live.capabilities
    if not live.reachable or caps is None:
        return []
    role, su = _role(caps), caps.superuser
    needed = ("backups",)
    grant = BACKUP_GRANT.format(role=role)
    checks = _Checks(live.name, [])
    replicates, points, base = su or caps.replication, su or caps.restore_points, su or (
        caps.backup_functions and caps.monitor)
    checks.add("backups: REPLICATION", replicates, f"role {role}" + ("" if replicates else " lacks REPLICATION"),
               f"ALTER ROLE {role} REPLICATION; and a `replication` line for it in pg_hba.conf (pg_basebackup and"
               " pg_receivewal are physical replication)", needed)
    checks.add("backups: restore points", points, f"role {role}" + (
        "" if points else " may not create restore points or switch WAL segments"), grant, needed)
    checks.add("backups: base backups", base, f"role {role}" + (
        "" if base else " lacks what Barman checks: EXECUTE on pg_backup_start/stop and pg_monitor"),
        f"{grant} GRANT pg_monitor TO {role};", needed)
    free = caps.max_wal_senders - caps.used_wal_senders
    checks.add("backups: WAL senders", free >= 1, f"{free} of {caps.max_wal_senders} free",
               "ALTER SYSTEM SET max_wal_senders = 32; then restart (WAL streaming holds one, a base backup"
               " one more)", needed)
    return checks.out


def failing(live: LiveServer | None, purpose: str) -> list[Check]:
    """The checks of this server that a purpose needs and that fail (unknown never fails)."""
    if live is None or not live.reachable or live.capabilities is None:
        return []  # unreachable servers are refused elsewhere; unread capabilities are not guessed
    return [c for c in server_checks(live) if c.ok is False and not c.warning and purpose in c.needed_by]


def why_not(live: LiveServer | None, purpose: str) -> str | None:
    """One line naming the first failing check a purpose needs, with its fix, or None."""
    bad = failing(live, purpose)
    if not bad:
        return None
    first = bad[0]
    return f"server {first.server} fails the check {first.name!r} ({first.found}); fix: {first.fix.rstrip(';')}"


def metric_gaps(name: str, spec, live: LiveServer | None) -> dict[str, str]:
    """Metrics that stay unknown for every shard of a server, and why (with the fix): no declared
    capacity where this host cannot measure it, an extension not created, a grant missing."""
    gaps: dict[str, str] = {}
    local = bool(getattr(spec, "embedded", False))
    capacity = getattr(spec, "capacity", None)
    if not local and not (capacity and capacity.cpus):
        gaps["cpu_percent"] = ("no declared capacity (its cores are not this host's):"
                               f" declare servers.{name}.capacity.cpus")
    if not local and not (capacity and capacity.storage):
        gaps["storage_percent"] = (f"no declared capacity (its disk is not this host's): declare"
                                   f" servers.{name}.capacity.storage")
    caps = live.capabilities if live is not None else None
    if caps is not None:
        if not caps.buffercache_created:
            gaps["memory_percent"] = "pg_buffercache is not created: CREATE EXTENSION pg_buffercache; in postgres"
        elif not (caps.superuser or caps.monitor):
            gaps["memory_percent"] = (f"role {_role(caps)} may not read pg_buffercache: GRANT pg_monitor TO"
                                      f" {_role(caps)};")
    return gaps


def metrics_check(name: str, spec, live: LiveServer) -> Check:
    gaps = metric_gaps(name, spec, live)
    return Check(server=name, name="metrics", ok=not gaps,
                 found="every metric readable" if not gaps else "unknown for every shard: " + "; ".join(
                     f"{metric} ({why.split(':')[0]})" for metric, why in sorted(gaps.items())),
                 fix="; ".join(why.split(": ", 1)[1] for _, why in sorted(gaps.items())), warning=True)


def replication_checks(live: LiveServer, orphans: list[Orphan] | None) -> list[Check]:
    """What shardctl's replication objects on this server say: leftovers that no running operation
    owns (ORPHANS: None when the catalog could not be read), and subscriptions that cannot reach
    their publisher. Warnings: nothing is refused for them."""
    if live.replication is None:
        return []
    out = []
    if orphans is not None:
        mine = [o for o in orphans if o.server == live.name]
        kept = sum(o.object.retained_bytes or 0 for o in mine)
        out.append(Check(server=live.name, name="leftover replication", ok=not mine,
                         found="none" if not mine else f"{len(mine)} object{'s' if len(mine) != 1 else ''} no running"
                         f" operation owns, {size_text(kept)} of WAL retained: "
                         + "; ".join(f"{o.object.kind} {o.object.name}" for o in mine),
                         fix="" if not mine else "`shardctl orphans --remove` drops them (`shardctl orphans` lists"
                         " them with why)", warning=True))
    broken = [o for o in live.replication if o.broken]
    subscriptions = sum(1 for o in live.replication if o.kind == "subscription")
    out.append(Check(server=live.name, name="replication links", ok=not broken,
                     found=f"{subscriptions} subscriptions of shardctl's, none failing to connect" if not broken
                     else "; ".join(
                         f"subscription {o.name} (database {o.database}) cannot reach its publisher: "
                         + (o.error or "its server's log says why") for o in broken),
                     fix="" if not broken else "if a password was rotated, give shardctl the new one and make the"
                     " link again (`shardctl branches reset NAME` for a replica; `shardctl apply` for a move);"
                     " if its publisher's server is down, bring it back", warning=True))
    return out


def tls_check(live: LiveServer) -> Check | None:
    """Whether this server's subscriptions can use TLS (its libpq has SSL): worth saying when some
    source may be reached over TLS, i.e. in a fleet with servers that are not embedded."""
    caps = live.capabilities
    if caps is None:
        return None
    return Check(server=live.name, name="TLS for subscriptions", ok=bool(caps.ssl_library),
                 found=f"built with {caps.ssl_library}" if caps.ssl_library else "built without SSL support",
                 fix="" if caps.ssl_library else "as a move's target, this server's subscriptions cannot reach a"
                 " source with sslmode require or verify-*: use a build with SSL (Debian's packages have it) or place"
                 " targets elsewhere", warning=True)


def budget_check(live: LiveServer, need, embedded: bool) -> Check | None:
    """Whether the server's replication settings hold the most the declared fleet needs of it at
    once (engine/plan/budget.py: its replicas' links, the largest move through it, backups),
    naming each setting short with the number needed. An embedded server is sized by shardctl:
    a shortfall there waits for its restart."""
    from engine.plan import budget

    caps = live.capabilities
    if caps is None or not live.reachable:
        return None
    short = budget.shortfalls(live.name, caps, need)
    if not short:
        most = ", ".join(f"{budget.setting(r, caps.version_num // 10000)} {need[r]} of {limit}"
                         for r, limit in budget.limits(caps).items() if limit is not None)
        return Check(server=live.name, name="replication budget", ok=True,
                     found=f"the fleet needs at most {most}")
    found = "; ".join(f"{setting} = {now}, the fleet needs up to {needed} ({why})"
                      for _, setting, now, needed, why in short)
    if embedded:
        fix = ("shardctl has written the settings the fleet needs to the server's shardctl.conf; they take effect"
               " when it restarts (`shardctl down`, then `shardctl up`)")
    else:
        fix = "; ".join(f"ALTER SYSTEM SET {setting} = {budget.with_headroom(needed)}"
                        for _, setting, _, needed, _ in short) + "; then restart the server"
    return Check(server=live.name, name="replication budget", ok=False, found=found, fix=fix)
