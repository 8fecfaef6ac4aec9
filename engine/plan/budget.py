"""Replication budgets: what logical replication uses on each server, what the fleet needs at
most, and whether a plan's moves and replica links fit in what each server allows. Pure.

Four settings bound logical replication, each counted per server (PostgreSQL refuses the one
that would pass it, and a move or a replica that meets the refusal half built is stuck):

  slots    max_replication_slots: a move's link (one per target), its comparison's slot, each
           table-sync worker's temporary slot on the source, a replica's link per shard, a backup
  senders  max_wal_senders: one per streaming link and per table-sync worker, one per comparison
           slot (streamed from the last key rounds to the flip, when the table syncs are done),
           two for a backup
  origins  max_active_replication_origins (PostgreSQL 18; max_replication_slots before): one per
           subscription on the server (its state is kept while it exists, enabled or not) and
           one per table-sync worker copying into it
  workers  max_logical_replication_workers: one apply worker per enabled subscription, its
           table-sync workers while it copies, its parallel apply workers (a move's links stream
           in parallel); max_worker_processes must hold them and PostgreSQL's own

A server takes part in one move at a time: `moves.parallel` runs at once only moves whose
servers do not overlap (engine/actions/parallel.py). So a server's most is what its replicas'
links keep, plus the largest single move through it (as source or target, the replicas'
links to a move's new shards included), plus a replica's initial copy, plus backups.

`fleet_needs` says that most per server (from the YAML, and the catalog's shards where known):
embedded servers are configured with it and headroom (engine/servers/embedded.py), `doctor`
compares it with each server's settings. `admit` walks a plan: an action that needs more than
a server's setting can ever give is a problem naming the setting and the number needed; one
that needs more than is free now (links of others, an earlier action of this plan) waits for a
later plan, said as "waiting for a replication origin on server b".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.observe.models import Capabilities, CatalogState, LiveServer, Observation

RESOURCES = ("slots", "senders", "origins", "workers")
WHAT = {"slots": "a replication slot", "senders": "a WAL sender", "origins": "a replication origin",
        "workers": "a logical replication worker"}
SYNC = 4  # table-sync workers per subscription on embedded servers (max_sync_workers_per_subscription)
PG_SYNC, PG_PARALLEL = 2, 2  # PostgreSQL's defaults, for a server whose settings were not read
EMBEDDED_SETTINGS = ("max_replication_slots", "max_wal_senders", "max_logical_replication_workers",
                     "max_worker_processes", "max_active_replication_origins")
OWN_WORKERS = 10  # max_worker_processes beyond logical replication: parallel query's 8, the launcher, spare


def setting(resource: str, major: int | None) -> str:
    """The setting that bounds a resource on a server of this major version."""
    if resource == "origins":
        return "max_active_replication_origins" if (major or 18) >= 18 else "max_replication_slots"
    return {"slots": "max_replication_slots", "senders": "max_wal_senders",
            "workers": "max_logical_replication_workers"}[resource]


@dataclass
class Use:
    """Amounts per resource, with what each is for (for people)."""

    amounts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESOURCES, 0))
    why: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in RESOURCES})

    def add(self, resource: str, n: int, why: str) -> None:
        if n > 0:
            self.amounts[resource] += n
            self.why[resource].append(f"{why}: {n}")

    def plus(self, other: Use) -> Use:
        out = Use()
        for r in RESOURCES:
            out.amounts[r] = self.amounts[r] + other.amounts[r]
            out.why[r] = self.why[r] + other.why[r]
        return out

    def __getitem__(self, resource: str) -> int:
        return self.amounts[resource]


def _per_server(out: dict[str, Use], server: str) -> Use:
    return out.setdefault(server, Use())


def _sync(caps: Capabilities | None) -> int:
    return caps.max_sync_workers_per_subscription if caps is not None and \
        caps.max_sync_workers_per_subscription is not None else PG_SYNC


def _parallel(caps: Capabilities | None) -> int:
    return caps.max_parallel_apply_workers_per_subscription if caps is not None and \
        caps.max_parallel_apply_workers_per_subscription is not None else PG_PARALLEL


# ---------------------------------------------------------------------------------- what a thing takes


def link_out(use: Use, n: int, sync: int, what: str, compare: int = 0) -> None:
    """The source side of `n` links (slots and WAL senders), `sync` table-sync workers copying
    from it at once, and `compare` comparison slots (streamed once the copy is done: a WAL
    sender each, never beside the table syncs')."""
    use.add("slots", n + sync + compare, what)
    use.add("senders", n + max(sync, compare), what)


def link_in(use: Use, n: int, sync: int, parallel: int, what: str) -> None:
    """The subscriber side of `n` subscriptions, with `sync` table-sync workers and `parallel`
    parallel apply workers each at most."""
    use.add("origins", n * (1 + sync), what)
    use.add("workers", n * (1 + sync + parallel), what)


def _move(out: dict[str, Use], links: list[tuple[str, str]], sources: list[str], targets: list[str],
          replicas: list[str], sync_of, parallel_of, what: str) -> None:
    """A move's links (source server, target server): a split's source feeds every target, each
    of a merge's sources the one target. Every link's table-sync workers may copy at once (unless
    copy_streams says otherwise); each source shard has its comparison's slot; each replica
    (its server) links to every new shard (`targets`: their servers)."""
    for server in sorted({s for s, _ in links}):
        mine = [t for s, t in links if s == server]
        link_out(_per_server(out, server), len(mine), sum(sync_of(t) for t in mine), f"{what} (source)",
                 compare=sources.count(server))
    for server in sorted({t for _, t in links}):
        n = sum(1 for _, t in links if t == server)
        link_in(_per_server(out, server), n, sync_of(server), parallel_of(server), f"{what} (target)")
    for replica in replicas:
        for server in targets:
            link_out(_per_server(out, server), 1, 0, f"{what} (a replica's link to a new shard)")
        link_in(_per_server(out, replica), len(targets), 0, 0, f"{what} (the replica's links to the new shards)")


# ---------------------------------------------------------------------------------- the fleet's most


class _Sizing:
    """Per server: table-sync and parallel apply workers a subscription there may run (embedded
    servers: shardctl's settings; others: what they said, else PostgreSQL's defaults)."""

    def __init__(self, desired, servers: dict[str, LiveServer]):
        self.desired, self.servers = desired, servers

    def _embedded(self, name: str) -> bool:
        return name in self.desired.servers and bool(self.desired.servers[name].embedded)

    def _caps(self, name: str) -> Capabilities | None:
        live = self.servers.get(name)
        return live.capabilities if live is not None else None

    def sync_of(self, name: str) -> int:
        return SYNC if self._embedded(name) else _sync(self._caps(name))

    def parallel_of(self, name: str) -> int:
        return PG_PARALLEL if self._embedded(name) else _parallel(self._caps(name))


def _layout(desired, catalog: CatalogState | None, name: str) -> dict[str, int]:
    """A database's shards per server: the catalog's active ones, else the declared count
    round-robin over its placement."""
    recorded = catalog.databases.get(name) if catalog is not None else None
    out: dict[str, int] = {}
    for s in recorded.shards if recorded is not None else ():
        if s.state == "active":
            out[s.server] = out.get(s.server, 0) + 1
    if out:
        return out
    db = desired.databases[name]
    placement = list(dict.fromkeys(db.spec.placement))
    return {server: len(range(i, db.spec.shards, len(placement))) for i, server in enumerate(placement)}


def _replica_links(steady: dict[str, Use], bname: str, branch, shards: dict[str, int], sizing: _Sizing) -> None:
    """A replica's links to every shard of its database, for good, and its initial copy."""
    total = sum(shards.values())
    sync = sizing.sync_of(branch.server)
    for server, n in shards.items():
        # its initial copy: the replica's table-sync workers read the shards at once
        link_out(_per_server(steady, server), n, min(n, sync), f"replica {bname}'s links to {branch.from_}")
    target = _per_server(steady, branch.server)
    link_in(target, total, 0, 0, f"replica {bname}'s links to the {total} shards of {branch.from_}")
    target.add("origins", sync, f"replica {bname}'s initial copy")
    target.add("workers", sync, f"replica {bname}'s initial copy")


def _largest_moves(moves: dict[str, list[Use]], dname: str, db, shards: dict[str, int], replicas: list[str],
                   sizing: _Sizing) -> None:
    """Per server of the database, the moves through it that may take the most: a split of one
    of its shards (its targets placed elsewhere when they can be), a merge of two of its shards,
    or a split whose new shards all land here (a placement with one server able to take them)."""
    placement = list(dict.fromkeys(db.spec.placement))
    targets = db.effective_policy.autosplit.targets
    spread = [placement[i % len(placement)] for i in range(targets)]
    for server in sorted(set(placement) | set(shards)):
        candidates = (
            ([(server, t) for t in spread], [server], spread, f"a split of a {dname} shard"),
            ([(server, server)] * 2, [server] * 2, [server], f"a merge of {dname} shards"),
            ([(server, server)] * targets, [server], [server] * targets,
             f"a split of a {dname} shard into {targets} here"),
        )
        for links, sources, new, what in candidates:
            use: dict[str, Use] = {}
            _move(use, links, sources, new, replicas, sizing.sync_of, sizing.parallel_of, what)
            for touched, amounts in use.items():
                moves.setdefault(touched, []).append(amounts)


def fleet_needs(desired, catalog: CatalogState | None = None,
                servers: dict[str, LiveServer] | None = None) -> dict[str, Use]:
    """The most each declared server uses at once (module doc): from the YAML, with the
    catalog's active shards where it has them (a database grown by splits beyond `shards:`)."""
    sizing = _Sizing(desired, servers or {})
    steady: dict[str, Use] = {}
    moves: dict[str, list[Use]] = {}
    for bname, branch in sorted(desired.branches.items()):
        if branch.data == "replica" and branch.from_ in desired.databases:
            _replica_links(steady, bname, branch, _layout(desired, catalog, branch.from_), sizing)
    for name in sorted(desired.backups):
        use = _per_server(steady, name)
        use.add("slots", 1, "backups (Barman's WAL streaming)")
        use.add("senders", 2, "backups (WAL streaming and a base backup)")
    for dname, db in sorted(desired.databases.items()):
        replicas = sorted({b.server for b in desired.branches.values() if b.data == "replica" and b.from_ == dname})
        _largest_moves(moves, dname, db, _layout(desired, catalog, dname), replicas, sizing)
    out: dict[str, Use] = {}
    for name in sorted(desired.servers):
        biggest = Use()
        for use in moves.get(name, []):
            for r in RESOURCES:
                if use[r] > biggest[r]:
                    biggest.amounts[r], biggest.why[r] = use[r], list(use.why[r])
        out[name] = steady.get(name, Use()).plus(biggest)
    return out


def with_headroom(n: int) -> int:
    """A setting for a need of n: a quarter more, at least eight more, rounded up to a multiple of 8."""
    wanted = n + max(8, n // 4)
    return int(math.ceil(wanted / 8) * 8)


def embedded_settings(need: Use, major: int, floors: dict[str, int]) -> dict[str, int]:
    """An embedded server's replication settings for what its fleet needs, never under FLOORS
    (the settings embedded servers always had)."""
    origins = with_headroom(need["origins"])
    workers = max(floors.get("max_logical_replication_workers", 0), with_headroom(need["workers"]))
    settings = {
        "max_replication_slots": max(floors.get("max_replication_slots", 0), with_headroom(need["slots"]),
                                     origins if major < 18 else 0),
        "max_wal_senders": max(floors.get("max_wal_senders", 0), with_headroom(need["senders"])),
        "max_logical_replication_workers": workers,
        "max_worker_processes": max(floors.get("max_worker_processes", 0), workers + OWN_WORKERS),
    }
    if major >= 18:
        settings["max_active_replication_origins"] = max(floors.get("max_active_replication_origins", 0), origins)
    return settings


# ---------------------------------------------------------------------------------- a server's now


def limits(caps: Capabilities) -> dict[str, int | None]:
    return {"slots": caps.max_replication_slots, "senders": caps.max_wal_senders,
            "origins": caps.max_replication_origins, "workers": caps.max_logical_replication_workers}


def used(caps: Capabilities) -> dict[str, int | None]:
    return {"slots": caps.used_replication_slots, "senders": caps.used_wal_senders,
            "origins": caps.used_replication_origins, "workers": caps.used_replication_workers}


def major_of(caps: Capabilities | None) -> int | None:
    return caps.version_num // 10000 if caps is not None else None


def shortfalls(name: str, caps: Capabilities | None, need: Use) -> list[tuple[str, str, int, int, str]]:
    """(resource, setting, now, needed, why) for each setting of a server under what it needs."""
    if caps is None:
        return []
    out = []
    for resource, limit in limits(caps).items():
        if limit is not None and need[resource] > limit:
            out.append((resource, setting(resource, major_of(caps)), limit, need[resource],
                        "; ".join(need.why[resource])))
    if caps.max_worker_processes < need["workers"] + 1:
        out.append(("workers", "max_worker_processes", caps.max_worker_processes, need["workers"] + OWN_WORKERS,
                    "logical replication workers and PostgreSQL's own background workers"))
    return out


# ---------------------------------------------------------------------------------- a plan's actions


def action_use(action, observation: Observation) -> dict[str, Use]:
    """What one action takes at most, per server, while it runs (a replica's links: for good)."""
    servers = observation.servers

    def caps(name: str) -> Capabilities | None:
        live = servers.get(name)
        return live.capabilities if live is not None else None

    def sync_of(name: str) -> int:
        return _sync(caps(name))

    def parallel_of(name: str) -> int:
        return _parallel(caps(name))

    out: dict[str, Use] = {}
    kind = action.kind
    if kind in ("split_shard", "merge_shards", "move_shard"):
        from engine.plan.needs import active_replicas

        sources = [s.server for s in (action.sources if kind == "merge_shards" else [action.source])]
        targets = [t.server for t in (action.targets if kind == "split_shard" else [action.target])]
        links = [(s, t) for s in sources for t in targets]
        replicas = [b.server for b in active_replicas(observation, action.database)]
        _move(out, links, sources, targets, replicas, sync_of, parallel_of, f"the {kind.replace('_', ' ')}")
    elif kind in ("create_branch", "reset_branch") and action.data == "replica" and action.clone_of is None:
        shards: dict[str, int] = {}
        for s in action.shards:
            shards[s.server] = shards.get(s.server, 0) + 1
        total = len(action.shards)
        sync = sync_of(action.server)
        for server, n in shards.items():
            link_out(_per_server(out, server), n, min(n, sync), f"replica {action.branch}'s links")
        target = _per_server(out, action.server)
        link_in(target, total, 0, 0, f"replica {action.branch}'s {total} links")
        target.add("origins", sync, f"replica {action.branch}'s initial copy")
        target.add("workers", sync, f"replica {action.branch}'s initial copy")
        if kind == "reset_branch":  # its links are removed before they are made again
            for server, n in shards.items():
                link_out(_per_server(out, server), -n, 0, "its links now")
            link_in(target, -total, 0, 0, "its links now")
    return out


@dataclass
class Admission:
    kept: list
    waiting: list[str]
    problems: list[tuple[str, str]]  # (server, message)


def _fits(action, use: dict[str, Use], caps_of: dict[str, Capabilities], free: dict[str, dict[str, int]],
          embedded: frozenset[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Why an action can never run on these servers (server, message), and what it waits for."""
    problems: list[tuple[str, str]] = []
    held: list[str] = []
    for server, amounts in sorted(use.items()):
        caps = caps_of.get(server)
        if caps is None:
            continue
        for resource in RESOURCES:
            need = amounts[resource]
            limit = limits(caps)[resource]
            if need <= 0 or limit is None:
                continue
            name = setting(resource, major_of(caps))
            if need > limit:
                fix = (f"shardctl sizes embedded server {server}'s settings for the declared fleet: restart it to"
                       f" take them (`shardctl down`, then `shardctl up`)" if server in embedded else
                       f"ALTER SYSTEM SET {name} = {with_headroom(need)}; then restart server {server}")
                problems.append((server, f"{action.address}: server {server}'s {name} is {limit}, and it needs"
                                         f" {need} ({'; '.join(amounts.why[resource])}); fix: {fix}"))
            elif need > free[server][resource]:
                held.append(f"{WHAT[resource]} on server {server} ({max(free[server][resource], 0)} of {limit}"
                            f" free, it needs {need}: {name})")
    return problems, held


def admit(actions: list, observation: Observation, embedded: frozenset[str] = frozenset()) -> Admission:
    """Walk the actions in plan order against what each server allows (module doc). A replica's
    links stay made for the actions after it; a move's are gone once it is done."""
    free: dict[str, dict[str, int]] = {}
    caps_of: dict[str, Capabilities] = {}
    for name, live in observation.servers.items():
        caps = live.capabilities
        if caps is None or not live.reachable:
            continue
        caps_of[name] = caps
        free[name] = {r: (limit - (used(caps)[r] or 0)) for r, limit in limits(caps).items() if limit is not None}
    kept: list = []
    waiting: list[str] = []
    problems: list[tuple[str, str]] = []
    for action in actions:
        if getattr(action, "operation", None) is not None:
            kept.append(action)  # resumed: what it made is made, and counted in the servers' use
            continue
        use = action_use(action, observation)
        refused, held = _fits(action, use, caps_of, free, embedded)
        if refused:
            problems.extend(refused)
            continue
        if held:
            waiting.append(f"{action.address}: {action.kind.replace('_', ' ')} waiting for "
                           + "; ".join(held) + ": a later plan runs it once those are free")
            continue
        kept.append(action)
        if action.kind in ("create_branch", "reset_branch"):
            for server, amounts in use.items():  # a replica's links stay
                for resource in free.get(server, {}):
                    free[server][resource] -= max(amounts[resource], 0)
    return Admission(kept, waiting, problems)
