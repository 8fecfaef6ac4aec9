"""The links of `data: replica` branches as observed: their names (one publication per replica on
each of the parent's shards, one slot on the shard's server and one subscription on the replica
per shard), and, from each server's slots (read by the inventory, one query per server), how many
bytes of its shard's WAL each link has not confirmed yet, which links are missing, and the worst.
Pure: reads an observation, reaches no database."""

from __future__ import annotations

import hashlib

from engine.observe.models import CatalogState, Frozen, LiveServer

SLOT_PREFIX = "shardctl_rep_"
# the inventory's read of every replica link's slot on a server (None on a standby: no WAL position of its own)
SLOTS_QUERY = (r"SELECT slot_name, CASE WHEN pg_is_in_recovery() THEN NULL ELSE"
               r" pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint END"
               r" FROM pg_replication_slots WHERE slot_name LIKE 'shardctl\_rep\_%'")


def _tag(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def publication(branch: str) -> str:
    """The publication on each of the parent's shards (one per replica; publications are per database)."""
    return f"{SLOT_PREFIX}{_tag(branch)}"


def link_name(branch: str, shard_dbname: str) -> str:
    """The slot on the shard's server and the subscription on the replica for one shard: slot
    names are per server, where several shards (and several replicas) may live."""
    return f"{publication(branch)}_{_tag(shard_dbname)}"


class Link(Frozen):
    shard: str  # database/range
    server: str
    state: str  # ok, missing (the server answered and has no such slot), unknown (it did not answer)
    lag_bytes: int | None = None


class ReplicaLinks(Frozen):
    branch: str
    parent: str
    server: str
    links: tuple[Link, ...]

    @property
    def max_lag_bytes(self) -> int | None:
        known = [link.lag_bytes for link in self.links if link.lag_bytes is not None]
        return max(known) if known else None

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(link.shard for link in self.links if link.state == "missing")


def replica_links(catalog: CatalogState, servers: dict[str, LiveServer]) -> list[ReplicaLinks]:
    """Per active replica, a link per active shard of its parent, with its lag."""
    out = []
    for branch in sorted(catalog.branches.values(), key=lambda b: b.name):
        parent = catalog.databases.get(branch.parent)
        if branch.data != "replica" or branch.state != "active" or parent is None:
            continue
        links = []
        for shard in parent.shards:
            if shard.state != "active":
                continue
            live = servers.get(shard.server)
            slot = link_name(branch.name, shard.dbname)
            if live is None or not live.reachable or live.replica_slots is None:
                links.append(Link(shard=shard.address, server=shard.server, state="unknown"))
            elif slot not in live.replica_slots:
                links.append(Link(shard=shard.address, server=shard.server, state="missing"))
            else:
                links.append(Link(shard=shard.address, server=shard.server, state="ok",
                                  lag_bytes=live.replica_slots[slot]))
        out.append(ReplicaLinks(branch=branch.name, parent=branch.parent, server=branch.server, links=tuple(links)))
    return out
