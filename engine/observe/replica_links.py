"""The links of `data: replica` branches as observed: their names (one publication per replica on
each of the parent's shards, one slot on the shard's server and one subscription on the replica
per shard), and, from each server's replication objects (read by the inventory, one query per
server: engine/observe/replication.py), how many bytes of its shard's WAL each link has not
confirmed yet, which links are missing, which are broken (the replica's subscription cannot
reach the shard: a rotated password, a server gone, with the reason its server logged), and
the worst lag. Pure: reads an observation, reaches no database."""

from __future__ import annotations

import hashlib

from engine.observe.models import CatalogState, Frozen, LiveServer, ReplicationObject

SLOT_PREFIX = "shardctl_rep_"


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
    # ok; missing (the server answered and has no such slot); unknown (it did not answer); broken
    # (the replica's subscription cannot reach the shard's server: ERROR says why, when known)
    state: str
    lag_bytes: int | None = None
    error: str | None = None


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

    @property
    def broken(self) -> tuple[Link, ...]:
        return tuple(link for link in self.links if link.state == "broken")


def replica_links(catalog: CatalogState, servers: dict[str, LiveServer]) -> list[ReplicaLinks]:
    """Per active replica, a link per active shard of its parent, with its lag."""
    out = []
    for branch in sorted(catalog.branches.values(), key=lambda b: b.name):
        parent = catalog.databases.get(branch.parent)
        if branch.data != "replica" or branch.state != "active" or parent is None:
            continue
        subscriptions = _objects(servers.get(branch.server), "subscription")
        links = []
        for shard in parent.shards:
            if shard.state != "active":
                continue
            slots = _objects(servers.get(shard.server), "slot")
            name = link_name(branch.name, shard.dbname)
            if slots is None:
                links.append(Link(shard=shard.address, server=shard.server, state="unknown"))
            elif name not in slots:
                links.append(Link(shard=shard.address, server=shard.server, state="missing"))
            else:
                subscription = (subscriptions or {}).get(name)
                broken = subscription if subscription is not None and subscription.broken else None
                links.append(Link(shard=shard.address, server=shard.server, state="broken" if broken else "ok",
                                  lag_bytes=slots[name].lag_bytes, error=broken.error if broken else None))
        out.append(ReplicaLinks(branch=branch.name, parent=branch.parent, server=branch.server, links=tuple(links)))
    return out


def broken_text(branch: str, replica_server: str, shard: str, shard_server: str, error: str | None) -> str:
    """A broken link: what the replica's server logged, and the way forward."""
    why = error or f"the reason is in server {replica_server}'s log"
    return (f"the replica's subscription cannot reach {shard} on server {shard_server}: {why}. The replica falls"
            f" behind from here (the slot keeps what it needs). If the password was rotated, give shardctl the new"
            f" one and run `shardctl branches reset {branch}` (its links are made again); if the server is down,"
            " bring it back")


def _objects(live: LiveServer | None, kind: str) -> dict[str, ReplicationObject] | None:
    """A server's replication objects of one kind by name; None when they were not read."""
    if live is None or not live.reachable or live.replication is None:
        return None
    return {o.name: o for o in live.replication if o.kind == kind}
