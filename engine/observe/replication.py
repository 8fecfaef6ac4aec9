"""shardctl's replication objects as each server holds them, and what is wrong with them.

Everything shardctl replicates with is named by it: a move's links and verification slots
`shardctl_op<operation>_<n>` / `shardctl_op<operation>_v<n>` (engine/actions/move/), a replica
branch's links `shardctl_rep_...` (engine/observe/replica_links.py), a shard's link to its
database's reference source `shardctl_ref_...` (engine/actions/reference.py). One query per server reads
them all from the cluster-wide catalogs (slots, and subscriptions with their apply worker and
error counters): the inventory runs it, and the daemon every collection round.

From those readings, without touching a database:

- orphans: objects of a move whose operation is not running (it finished, or was aborted, and
  left them: a server did not answer, or an older shardctl claimed a cleanup it had not done),
  replica links of no branch the catalog knows, and reference links of no shard it knows. A
  slot retains its server's WAL for as long as it exists; `shardctl orphans --remove` drops them.
- broken links: an enabled subscription with no apply worker running cannot reach its
  publisher (a rotated password, a server gone); the subscriber's own log says why, and the
  reason is read from it where shardctl may (an embedded server's log file, or
  pg_read_file on a server that grants it).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import psycopg

from engine.observe.models import CatalogState, Frozen, LiveServer, ReplicationObject
from engine.observe.replica_links import SLOT_PREFIX, publication

OPERATION_NAME = re.compile(r"^shardctl_op(?P<operation>[0-9]+)_v?[0-9]+$")
REFERENCE_PREFIX = "shardctl_ref_"


def reference_link(server: str, dbname: str) -> str:
    """A shard's subscription to its reference source, and its slot on the source's server:
    unique in the fleet (a relocated shard's two copies share a database name on two servers)."""
    return REFERENCE_PREFIX + hashlib.sha256(f"{server}/{dbname}".encode()).hexdigest()[:10]
LOG_TAIL = 256 << 10  # bytes of a server's log read for the reason a link is broken

# one statement, both cluster-wide catalogs: slots (None figures on a standby: no WAL position of
# its own) and subscriptions, each with its database
OBJECTS_QUERY = r"""
SELECT 'slot', s.slot_name::text, s.database::text, s.active,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint END,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint END,
       NULL::boolean, NULL::bigint
FROM pg_replication_slots s WHERE s.slot_name LIKE 'shardctl\_%'
UNION ALL
SELECT 'subscription', u.subname::text, d.datname::text, u.subenabled, NULL, NULL,
       EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = u.oid AND w.relid IS NULL
               AND w.pid IS NOT NULL),
       (SELECT t.apply_error_count + t.sync_error_count FROM pg_stat_subscription_stats t WHERE t.subid = u.oid)
FROM pg_subscription u JOIN pg_database d ON d.oid = u.subdbid WHERE u.subname LIKE 'shardctl\_%'
ORDER BY 1, 2
"""


class Orphan(Frozen):
    server: str
    object: ReplicationObject
    operation: int | None  # the move that made it, when it is a move's
    why: str

    @property
    def where(self) -> str:
        return f"{self.object.kind} {self.object.name} on server {self.server} (database {self.object.database})"

    @property
    def text(self) -> str:
        """What it is, what it costs, and why nothing owns it: one line for people."""
        return f"{self.where}: {describe(self.object)} ({self.why})"


def read(conn: psycopg.Connection, log_file: Path | None = None) -> tuple[ReplicationObject, ...]:
    """The server's slots and subscriptions named by shardctl; a broken subscription with the
    reason from the server's log (LOG_FILE for an embedded server, else pg_read_file if the role
    may)."""
    found = [ReplicationObject(kind=r[0], name=r[1], database=r[2], active=bool(r[3]), retained_bytes=_bytes(r[4]),
                               lag_bytes=_bytes(r[5]), running=r[6], errors=None if r[7] is None else int(r[7]))
             for r in conn.execute(OBJECTS_QUERY)]
    broken = [o.name for o in found if o.broken]
    if not broken:
        return tuple(found)
    reasons = reasons_from_log(_log_tail(conn, log_file), broken)
    return tuple(o.model_copy(update={"error": reasons.get(o.name)}) if o.broken else o for o in found)


def _bytes(value) -> int | None:
    return None if value is None else max(int(value), 0)


def _log_tail(conn: psycopg.Connection, log_file: Path | None) -> str:
    if log_file is not None:
        try:
            with open(log_file, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - LOG_TAIL))
                return f.read().decode(errors="replace")
        except OSError:
            return ""
    try:
        with conn.transaction():
            row = conn.execute("SELECT pg_read_file(f, greatest(0, (pg_stat_file(f)).size - %s), %s)"
                               " FROM pg_current_logfile() f WHERE f IS NOT NULL", (LOG_TAIL, LOG_TAIL)).fetchone()
    except psycopg.Error:
        return ""  # not this role's to read: the reason stays the server's log's
    return row[0] if row and row[0] else ""


def reasons_from_log(text: str, names: list[str]) -> dict[str, str]:
    """The last error the log holds for each named subscription (its apply worker's: "could not
    connect to the publisher: ..." and the like)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "ERROR:" not in line:
            continue
        message = line.split("ERROR:", 1)[1].strip()
        for name in names:
            if f'subscription "{name}"' in message:
                out[name] = message
    return out


def running_operations(catalog: CatalogState) -> set[int]:
    return {p.operation for p in catalog.pending_moves}


def orphans(catalog: CatalogState, servers: dict[str, LiveServer]) -> list[Orphan]:
    """Objects of shardctl's naming that nothing running owns: a move's whose operation is not
    running, a replica link of no branch in the catalog. Empty without a catalog (nothing can be
    judged then)."""
    if not catalog.exists:
        return []
    running = running_operations(catalog)
    branches = {publication(b) for b in catalog.branches}
    shards = {reference_link(s.server, s.dbname) for d in catalog.databases.values() for s in d.shards}
    out = []
    for name, live in sorted(servers.items()):
        for obj in live.replication or ():
            match = OPERATION_NAME.match(obj.name)
            if match:
                operation = int(match.group("operation"))
                if operation not in running:
                    out.append(Orphan(server=name, object=obj, operation=operation,
                                      why=f"operation {operation} is not running: it finished or was aborted"))
            elif obj.name.startswith(SLOT_PREFIX) and not any(obj.name.startswith(p + "_") for p in branches):
                out.append(Orphan(server=name, object=obj, operation=None,
                                  why="a replica branch's link, and no branch in the catalog owns it"))
            elif obj.name.startswith(REFERENCE_PREFIX) and obj.name not in shards:
                out.append(Orphan(server=name, object=obj, operation=None,
                                  why="a shard's link to its reference tables' source, and no shard in the catalog"
                                      " owns it"))
    return out


def of_operation(servers: dict[str, LiveServer], operation: int) -> list[tuple[str, ReplicationObject]]:
    """The objects a (running) operation holds on the servers that answered."""
    return [(name, obj) for name, live in sorted(servers.items()) for obj in live.replication or ()
            if (m := OPERATION_NAME.match(obj.name)) and int(m.group("operation")) == operation]


def size_text(n: int | float) -> str:
    """Bytes of WAL as people read them (decimal units, as the moves' progress says them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} bytes"


def describe(obj: ReplicationObject) -> str:
    """One line of what an object costs or lacks: the WAL a slot retains, a subscription's state."""
    if obj.kind == "slot":
        kept = "retains an unknown amount of WAL" if obj.retained_bytes is None else \
            f"retains {size_text(obj.retained_bytes)} of WAL"
        return f"{kept}{', streaming' if obj.active else ''}"
    if not obj.active:
        return "disabled"
    if obj.broken:
        return f"cannot reach its publisher: {obj.error}" if obj.error else \
            "cannot reach its publisher (its server's log says why)"
    return "streaming"
