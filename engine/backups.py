"""Backups of the whole fleet, with Barman doing the backing up (engine/servers/barman.py):
`shardctl backups create | list | verify`, the restore points shardctl places on every server at
once, WAL streaming, and the restored copies (engine/servers/scratch.py) that the restore drill
and branches from backups read.

**A restore point across servers.** shardctl has no cross-shard transactions, so a consistent
moment of the fleet is one where no shard is being written: every active shard's tables are
locked in SHARE mode at once (writers wait; readers do not; the same short lock timeout and
retries as a move's fence, so it never joins a deadlock), `shardctl.shards` too (no move can
flip its routing meanwhile), and while all of them are held, `pg_create_restore_point(NAME)` runs
on every backed-up server. Every write committed before the point is before it on every server,
and every write after it is after it everywhere: restoring each server to NAME gives the fleet
as it was at one moment (writes paused for `pause_ms`, recorded with the point). Each shard's
snapshot is taken under those locks; the locks are let go (a savepoint is rolled back) and the
rows are counted and checksummed per table in that snapshot, so the counts are exactly those of
the point. The point is recorded in the catalog with the shard map of that moment.

**WAL.** Each server streams WAL to Barman continuously (`barman receive-wal`: pg_receivewal on a
replication slot). A point is recoverable once the segment that holds it is archived: shardctl
switches to a new segment and waits for it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import errors, sql

from engine.catalog import backups as catalog
from engine.catalog import schema
from engine.catalog.journal import Operation
from engine.catalog.lock import who
from engine.clock import system_clock
from engine.config.loader import Desired
from engine.errors import UserError
from engine.observe.introspect import tables_with_key
from engine.observe.models import MapShard, RestorePoint
from engine.rows import one
from engine.servers import scratch
from engine.servers.barman import SLOT, Barman, lsn_value
from engine.servers.connect import ServerHandle
from engine.servers.fleet import Fleet
from engine.servers.locking import with_lock_retries_all

Say = Callable[[str], None]
KIND = "create_backup"
BACKUP_LOCK_KEY = 0x5348_4442_4B50  # "SHDBKP": one `backups create` at a time (the daemon's or a person's)
STREAM_START_WAIT = 15.0  # seconds a just-started receiver may take to connect
CUT_NAME = "shardctl_cut"
OTHER_BACKUP_WAIT = 600.0  # seconds a base backup left running by an interrupted run is waited for


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------- WAL streaming


@dataclass(frozen=True)
class WalStatus:
    """How far a server's WAL has reached its backups: its current position, what the receiver
    has written (None: nothing is streaming), and the difference in bytes."""

    server: str
    streaming: bool
    reachable: bool = True
    current_lsn: str | None = None
    received_lsn: str | None = None
    lag_bytes: int | None = None
    error: str | None = None


WAL_QUERY = f"""
SELECT pg_current_wal_lsn()::text, s.active, coalesce(r.write_lsn, s.restart_lsn)::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), coalesce(r.write_lsn, s.restart_lsn))::bigint
  FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
 WHERE s.slot_name = '{SLOT}'
"""


def wal_status(fleet: Fleet, servers: list[str]) -> dict[str, WalStatus]:
    """Each server's WAL streaming, read on the server itself (one query)."""
    out = {}
    for name in servers:
        try:
            with fleet.servers[name].connect(connect_timeout="5") as conn:
                row = conn.execute(WAL_QUERY).fetchone()
        except (UserError, psycopg.Error) as exc:
            out[name] = WalStatus(server=name, streaming=False, reachable=False, error=str(exc).splitlines()[0])
            continue
        if row is None:
            out[name] = WalStatus(server=name, streaming=False, error=f"no replication slot {SLOT} yet")
        else:
            out[name] = WalStatus(server=name, streaming=bool(row[1]), current_lsn=row[0], received_lsn=row[2],
                                  lag_bytes=max(0, int(row[3])) if row[3] is not None else None)
    return out


def ensure_slot(barman: Barman, handle: ServerHandle) -> None:
    with handle.connect() as conn:
        exists = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)).fetchone()
    if not exists:
        barman.create_slot(handle.name)


def ensure_streaming(barman: Barman, fleet: Fleet, servers: list[str], say: Say = _quiet) -> None:
    """WAL streams from every server to its backups: its slot exists and a receiver runs on it
    (started here in the background when none does; the watch daemon keeps them running)."""
    started = []
    for name in servers:
        ensure_slot(barman, fleet.servers[name])
        if not wal_status(fleet, [name])[name].streaming:
            proc = barman.receiver(name, detached=True)
            started.append((name, proc))
    deadline = time.monotonic() + STREAM_START_WAIT
    for name, proc in started:
        while not wal_status(fleet, [name])[name].streaming:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"WAL streaming of server {name} did not start",
                                f"see {barman.config_file.parent / f'receive-wal-{name}.log'}")
            time.sleep(0.2)
        say(f"Started WAL streaming of server {name} to its backups (pid {proc.pid}; the watch daemon keeps"
            " it running)")


def switch_and_archive(barman: Barman, handle: ServerHandle, at_least: str | None = None) -> str:
    """Close the server's current WAL segment and wait until it is in the backups; the segment's
    name. (A WAL record right after the switch makes pg_receivewal start the next segment, so
    Barman may archive the closed one at once rather than after the next checkpoint.)"""
    with handle.connect() as conn:
        try:
            wal = one(conn.execute("SELECT pg_walfile_name(pg_switch_wal())"))[0]
        except errors.InsufficientPrivilege:
            raise UserError(f"server {handle.name}: role may not switch WAL segments",
                            "GRANT EXECUTE ON FUNCTION pg_switch_wal() TO <role>; (`shardctl doctor` lists the"
                            " backup grants)") from None
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELECT pg_logical_emit_message(false, 'shardctl', 'WAL segment closed for backups')")
    wanted = max(wal, at_least) if at_least else wal
    barman.wait_archived(handle.name, wanted)
    return wanted


# ---------------------------------------------------------------------------- the lock of `backups create`


@contextmanager
def backup_lock(conn: psycopg.Connection, timeout: float = 0.0, say: Say = _quiet) -> Iterator[None]:
    deadline = time.monotonic() + timeout
    told = False
    while not one(conn.execute("SELECT pg_try_advisory_lock(%s)", (BACKUP_LOCK_KEY,)))[0]:
        if time.monotonic() >= deadline:
            raise UserError("another `shardctl backups create` is running (the watch daemon's schedule, or a"
                            " person's)", "wait for it to finish, or pass --lock-timeout to wait here")
        if not told:
            say("Waiting for another backup to finish...")
            told = True
        time.sleep(0.5)
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s)", (BACKUP_LOCK_KEY,))


def backup_in_flight(conn: psycopg.Connection) -> bool:
    """Whether another session holds the backup lock (its operation is running, not interrupted)."""
    return bool(one(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = ("
        " SELECT oid FROM pg_database WHERE datname = current_database()) AND classid = %s AND objid = %s"
        " AND objsubid = 1 AND pid <> pg_backend_pid())", (BACKUP_LOCK_KEY >> 32, BACKUP_LOCK_KEY & 0xFFFF_FFFF)))[0])


# ---------------------------------------------------------------------------- a restore point on every server


def point_name(conn: psycopg.Connection, base: str, op: Operation) -> str:
    """A name never used before, also by an earlier try of the same operation (a try killed
    after placing its points leaves them in the WAL, unrecorded: recovery stops at the first
    point of a name)."""
    tries = one(conn.execute("SELECT count(*) FROM shardctl.journal WHERE operation = %s AND step LIKE 'point %%'"
                             " AND status = 'begin'", (op.id,)))[0]
    return base if tries == 0 else f"{base}-{tries + 1}"


@dataclass
class _Shard:
    database: str
    spec: MapShard
    conn: psycopg.Connection
    tables: list[str]  # its tables as quoted relation names (who holds their locks is asked by them)
    pairs: list[tuple[str, str]]  # the same as (schema, table)


def place_point(fleet: Fleet, catalog_conn: psycopg.Connection, servers: list[str], name: str, kind: str,
                operation: int | None, checksums: bool, say: Say = _quiet) -> RestorePoint:
    """The fleet's consistent moment (this module's docstring says how), recorded in the catalog."""
    handle = fleet.catalog_server
    for _ in range(3):  # a move that flips routing between reading the map and locking it: again
        shard_map = _active_map(catalog_conn, servers)
        with ExitStack() as stack:
            cut = stack.enter_context(handle.connect(fleet.desired.catalog_database, autocommit=False))
            shards = _open_shards(fleet, catalog_conn, shard_map, stack)
            placed = _cut(fleet, cut, shards, shard_map, servers, name, stack, say)
            if placed is None:
                continue
            where, pause_ms = placed
            sums = _checksums(shards) if checksums else None
            for shard in shards:
                shard.conn.rollback()
        created = system_clock()
        point = RestorePoint(name=name, kind=kind, operation=operation, created_at=created,
                             pause_ms=round(pause_ms, 1), servers=where,
                             shard_map={db: tuple(specs) for db, specs in shard_map.items()}, checksums=sums)
        with catalog_conn.transaction():
            catalog.record_point(catalog_conn, point)
        say(f"Restore point {name} placed on {len(where)} server{'s' if len(where) != 1 else ''}"
            f" ({len(shards)} shards; writes waited {pause_ms:.0f} ms)")
        return point
    raise UserError("the shard map kept changing while the restore point was placed (moves finishing)",
                    "run `shardctl backups create` again")


def _active_map(conn: psycopg.Connection, servers: list[str]) -> dict[str, list[MapShard]]:
    out: dict[str, list[MapShard]] = {}
    for database, name, lo, hi, server, dbname in conn.execute(
            "SELECT s.database, s.name, s.lo, s.hi, s.server, s.dbname FROM shardctl.shards s"
            " JOIN shardctl.databases d ON d.name = s.database WHERE s.state = 'active' AND d.state = 'active'"
            " ORDER BY s.database, s.lo NULLS FIRST, s.name"):
        if server in servers:
            out.setdefault(database, []).append(MapShard(name=name, lo=lo, hi=hi, server=server, dbname=dbname))
    return out


def _open_shards(fleet: Fleet, catalog_conn: psycopg.Connection, shard_map: dict[str, list[MapShard]],
                 stack: ExitStack) -> list[_Shard]:
    keys: dict[str, str] = dict(catalog_conn.execute("SELECT name, key_column FROM shardctl.databases").fetchall())
    shards = []
    for database, specs in shard_map.items():
        for spec in specs:
            conn = stack.enter_context(fleet.servers[spec.server].connect(spec.dbname))
            pairs = [(s, t) for s, t, _ in tables_with_key(conn, keys.get(database, ""))]
            conn.autocommit = False
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            shards.append(_Shard(database, spec, conn, [sql.Identifier(s, t).as_string(conn) for s, t in pairs],
                                 pairs))
    return shards


def _cut(fleet: Fleet, cut: psycopg.Connection, shards: list[_Shard], shard_map: dict[str, list[MapShard]],
         servers: list[str], name: str, stack: ExitStack, say: Say) -> tuple[dict[str, dict[str, Any]], float] | None:
    """Lock every shard's tables and the shard map, place the point on every server, let go.
    (where the point is on each server, how long writes waited); None when the map moved."""
    points = {s: stack.enter_context(fleet.servers[s].connect()) for s in servers}
    locked_at: dict[int, float] = {}
    where: dict[str, dict[str, Any]] = {}
    moved: list[bool] = []

    def lock_shard(index: int) -> Callable[[psycopg.Connection], None]:
        shard = shards[index]

        def work(conn: psycopg.Connection) -> None:
            conn.execute(sql.SQL("SAVEPOINT {}").format(sql.Identifier(CUT_NAME)))
            if shard.pairs:
                conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.SQL(", ").join(
                    sql.SQL("{}.{}").format(sql.Identifier(s), sql.Identifier(t)) for s, t in shard.pairs)))
            locked_at[index] = time.monotonic()
            conn.execute("SELECT 1")  # the transaction's snapshot, taken while its tables are locked
        return work

    def lock_map(conn: psycopg.Connection) -> None:
        conn.execute("LOCK TABLE shardctl.shards IN SHARE MODE")
        moved[:] = [_active_map(conn, servers) != shard_map]

    def place() -> None:
        if moved and moved[0]:
            return
        def one_server(server: str) -> tuple[str, dict[str, Any]]:
            row = one(points[server].execute(
                "SELECT lsn::text, pg_walfile_name(lsn), clock_timestamp(),"
                " pg_size_bytes(current_setting('wal_segment_size')) FROM pg_create_restore_point(%s) lsn", (name,)))
            return server, {"lsn": row[0], "wal": row[1], "at": row[2].isoformat(), "segment_bytes": row[3]}
        with ThreadPoolExecutor(max_workers=min(8, len(servers))) as pool:
            where.update(pool.map(one_server, servers))

    def finish(conn: psycopg.Connection) -> None:
        if conn is cut:
            conn.commit()
            return
        conn.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(sql.Identifier(CUT_NAME)))  # the locks go
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SET LOCAL lock_timeout = 0")

    parts = [(cut, lock_map, ["shardctl.shards"])] + [
        (shard.conn, lock_shard(i), shard.tables) for i, shard in enumerate(shards)]
    try:
        with_lock_retries_all(parts, what=f"place restore point {name} (writes to every shard wait a moment)",
                              say=say, held=place, finish=finish)
    except errors.InsufficientPrivilege:
        raise UserError(f"the role may not place restore point {name}",
                        "GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO <role>; on each server"
                        " (`shardctl doctor` lists the backup grants)") from None
    if moved and moved[0]:
        for shard in shards:
            shard.conn.rollback()
        return None
    released = time.monotonic()
    return where, (released - min(locked_at.values(), default=released)) * 1000


def table_sums(conn: psycopg.Connection, pairs: list[tuple[str, str]]) -> dict[str, tuple[int, str]]:
    """Per table: rows, and an order-independent checksum of their values (the sum of a hash of
    each row; a type without a hash function is hashed through its text form)."""
    out = {}
    for schema_name, table in pairs:
        qualified = sql.SQL("{}.{}").format(sql.Identifier(schema_name), sql.Identifier(table))
        rows = total = None
        for expression in ("hash_record_extended(t, 0)", "hashtextextended(t::text, 0)"):
            try:
                with conn.transaction():
                    rows, total = one(conn.execute(sql.SQL(
                        "SELECT count(*), coalesce(sum({}), 0)::text FROM {} t").format(
                        sql.SQL(expression), qualified)))
                break
            except errors.FeatureNotSupported:  # no hash function for a column's type (json, point...)
                continue
        out[f"{schema_name}.{table}"] = (int(rows or 0), str(total or "0"))
    return out


def _checksums(shards: list[_Shard]) -> dict[str, dict[str, tuple[int, str]]]:
    def one_shard(shard: _Shard) -> tuple[str, dict[str, tuple[int, str]]]:
        return f"{shard.database}/{shard.spec.name}", table_sums(shard.conn, shard.pairs)
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(shards)))) as pool:
        return dict(pool.map(one_shard, shards))


# ---------------------------------------------------------------------------- backups create


def create(desired: Desired, say: Say = _quiet, servers: list[str] | None = None, lock_timeout: float = 0.0,
           actor: str = "backups create") -> RestorePoint:
    """A base backup of every backed-up server (or of SERVERS), then one restore point on every
    backed-up server at once, recorded with the shard map and checksums; then retention. An
    interrupted run is resumed by the next: servers already backed up are not backed up again."""
    barman = _barman(desired)
    wanted = sorted(servers or barman.servers())
    fleet = Fleet(desired)
    fleet.start_embedded(say)
    with fleet.catalog(create=False) as conn:
        if conn is None:
            raise UserError("there is no catalog yet", "run `shardctl apply` first")
        schema.migrate(conn)
        with backup_lock(conn, lock_timeout, say):
            op = _resume_or_begin(conn, wanted, actor, say)
            ensure_streaming(barman, fleet, barman.servers(), say)
            _base_backups(barman, fleet, conn, op, wanted, say)
            point = catalog.point_of_operation(conn, op.id)
            if point is None:
                name = point_name(conn, f"backup-op{op.id}", op)
                with op.step(f"point {name}"):
                    point = place_point(fleet, conn, barman.servers(), name, "backup", op.id, True, say)
            for server in sorted(point.servers):
                with op.step(f"archive {server}", wal=point.servers[server]["wal"]):
                    switch_and_archive(barman, fleet.servers[server], point.servers[server]["wal"])
            with op.step("retention"), ThreadPoolExecutor(max_workers=min(4, len(barman.servers()))) as pool:
                for job in [pool.submit(_retention, barman, conn, s, say) for s in barman.servers()]:
                    job.result()
            with conn.transaction():
                op.finish()
    return point


def _barman(desired: Desired) -> Barman:
    if not desired.backups:
        raise UserError("no server is backed up", "declare `backups: {}` (every server, with Barman's defaults) or a"
                        " server's own `backups:` in the YAML")
    barman = Barman(desired)
    barman.write_config()
    return barman


def _resume_or_begin(conn: psycopg.Connection, servers: list[str], actor: str, say: Say) -> Operation:
    row = conn.execute("SELECT id, (SELECT step FROM shardctl.journal j WHERE j.operation = o.id ORDER BY seq DESC"
                       " LIMIT 1) FROM shardctl.operations o WHERE kind = %s AND state = 'running'"
                       " ORDER BY id DESC LIMIT 1", (KIND,)).fetchone()
    if row is not None:
        say(f"Resuming operation {row[0]} (backups create), interrupted at step {row[1]!r}...")
        return Operation(conn, row[0])
    return Operation.start(conn, KIND, "backups", 0, {"servers": servers, "actor": actor, "who": who()})


def _base_backups(barman: Barman, fleet: Fleet, conn: psycopg.Connection, op: Operation, servers: list[str],
                  say: Say) -> None:
    done = catalog.backups_of_operation(conn, op.id)
    resumed = bool(one(conn.execute("SELECT count(*) FROM shardctl.journal WHERE operation = %s", (op.id,)))[0])
    todo = [s for s in servers if s not in done]

    def one_server(server: str) -> None:
        with op.step(f"backup {server}"):
            started, begin = time.monotonic(), system_clock()
            name = f"shardctl-op{op.id}"
            adopted = _adopt(barman, server, name, say) if resumed else None
            if adopted is not None:
                backup_id, size = adopted
                with _writing(fleet.servers[server]):
                    barman.check_backup(server, backup_id)
            else:
                with _writing(fleet.servers[server]):
                    backup_id, size = barman.backup(server, name)
            # one statement on the catalog connection, which the servers' threads share (no transaction block)
            catalog.record_backup(conn, server, backup_id, op.id, begin, system_clock(), size)
            say(f"Base backup {backup_id} of server {server}: {_size(size)} in {time.monotonic() - started:.1f}s")

    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:
        jobs = [pool.submit(one_server, s) for s in todo]
        problems = [job.exception() for job in jobs]
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise first


def _adopt(barman: Barman, server: str, name: str, say: Say) -> tuple[str, int | None] | None:
    """A resumed run's base backup of SERVER that an interrupted try finished (its Barman process
    outlives a killed shardctl: it is waited for), or None; one left unfinished is deleted."""
    deadline = time.monotonic() + OTHER_BACKUP_WAIT
    while any(p.get("name") == "backup" for p in barman.processes(server)):
        if time.monotonic() > deadline:
            raise UserError(f"a base backup of server {server} is still running after {OTHER_BACKUP_WAIT:.0f}s",
                            "let it finish (`barman -c .shardctl/barman/barman.conf list-processes SERVER`), then"
                            " run `shardctl backups create` again")
        time.sleep(1.0)
    for backup in barman.list_backups(server):
        if not str(backup.get("backup_name", "")).startswith("shardctl-"):
            continue
        if backup.get("status") in ("STARTED", "FAILED"):
            barman.delete(server, backup["backup_id"])
            say(f"Deleted the unfinished base backup {backup['backup_id']} of server {server}")
        elif backup.get("backup_name") == name and backup.get("status") in ("WAITING_FOR_WALS", "DONE"):
            say(f"Base backup {backup['backup_id']} of server {server}, made by the interrupted run, is kept")
            return str(backup["backup_id"]), backup.get("size_bytes")
    return None


@contextmanager
def _writing(handle: ServerHandle, every: float = 0.5) -> Iterator[None]:
    """A small WAL record on the server every EVERY seconds while the block runs: pg_receivewal
    starts a new segment (and Barman may archive the one before) only when the server writes, so
    waiting for a just-closed segment would otherwise last until the next checkpoint on an idle
    server. The record is a non-transactional logical message (`pg_logical_emit_message`, open to
    every role); a role or server that refuses it only makes the wait longer."""
    stop = threading.Event()

    def nudge() -> None:
        with contextlib.suppress(UserError, psycopg.Error), handle.connect() as conn:
            while not stop.wait(every):
                conn.execute("SELECT pg_logical_emit_message(false, 'shardctl', 'backup')")

    thread = threading.Thread(target=nudge, name=f"shardctl-wal-{handle.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _retention(barman: Barman, conn: psycopg.Connection, server: str, say: Say) -> None:
    """Barman's retention policy: the backups it reports obsolete are deleted (with the WAL only
    they needed), and the catalog forgets them."""
    kept = set()
    for backup in barman.list_backups(server):
        if backup.get("retention_status") == "OBSOLETE":
            barman.delete(server, backup["backup_id"])
            say(f"Deleted base backup {backup['backup_id']} of server {server} (retention:"
                f" {barman.desired.backups[server].retention})")
        else:
            kept.add(backup["backup_id"])
    catalog.forget_backups(conn, server, kept)  # one statement (the servers' threads share the connection)


def _size(size: int | None) -> str:
    return "size unknown" if size is None else f"{size / 2**20:,.1f} MiB"


# ---------------------------------------------------------------------------- restoring a server


def backup_before(barman: Barman, server: str, lsn: str) -> str:
    """The newest base backup of SERVER that ends before LSN (so it can be recovered to it)."""
    for backup in barman.list_backups(server):
        if backup.get("status") != "DONE":
            continue
        end = (barman.show_backup(server, backup["backup_id"]).get("base_backup_information") or {}).get("end_lsn")
        if end and lsn_value(end) <= lsn_value(lsn):
            return str(backup["backup_id"])
    raise UserError(f"no base backup of server {server} ends before WAL position {lsn}",
                    "the backups that did were deleted by the retention policy; `shardctl backups list` shows what"
                    " can still be restored")


@dataclass(frozen=True)
class Target:
    """A moment to restore a server to: a restore point (by name, with where it is in each
    server's WAL) or a time."""

    point: RestorePoint | None = None
    time: datetime | None = None

    def describe(self) -> str:
        return f"restore point {self.point.name}" if self.point else f"{self.time:%Y-%m-%d %H:%M:%S%z}"


def restore(barman: Barman, fleet: Fleet, server: str, target: Target, label: str, operation: int | None,
            say: Say = _quiet) -> tuple[scratch.Scratch, ServerHandle]:
    """SERVER restored by Barman to TARGET into a scratch server, started and promoted."""
    copy = scratch.Scratch(fleet.desired.directory, label, server)
    role = scratch.role_for(fleet.servers[server])
    copy.claim(operation)
    started = time.monotonic()
    if target.point is not None:
        place = target.point.servers[server]
        if lsn_value(place["lsn"]) % int(place.get("segment_bytes") or 16 << 20):
            # just before the first record after the point: the state the point names, and Barman copies
            # only the WAL up to it (to a name, it would copy all the WAL it holds)
            barman.recover(server, "auto", copy.data_dir, ("target-lsn", place["lsn"]), exclusive=True)
        else:  # the point ends its segment: the record after it is in the next one, which only a name reaches
            barman.recover(server, backup_before(barman, server, place["lsn"]), copy.data_dir,
                           ("target-name", target.point.name))
    else:
        assert target.time is not None
        barman.recover(server, "auto", copy.data_dir, ("target-time", target.time.isoformat()))
    copy.start(role)
    copy.wait_recovered(role, say)
    say(f"Restored server {server} to {target.describe()} in {time.monotonic() - started:.1f}s")
    return copy, copy.handle(role)


# ---------------------------------------------------------------------------- backups verify


@dataclass(frozen=True)
class Verdict:
    """One shard of the drill: its tables as restored against the catalog's record, or why the
    server could not be restored."""

    server: str
    shard: str  # database/range, or "" for the whole server
    ok: bool
    detail: str


def verify(desired: Desired, say: Say = _quiet) -> tuple[RestorePoint, list[Verdict]]:
    """The restore drill: each server's latest backup restored to the newest restore point of
    `backups create` into a scratch server, and every shard's rows counted and checksummed per
    table against what the catalog recorded at that point."""
    barman = _barman(desired)
    fleet = Fleet(desired)
    fleet.start_embedded(say)
    with fleet.catalog(create=False) as conn:
        if conn is None or not catalog.available(conn):
            raise UserError("there is no backup to verify", "run `shardctl backups create` first")
        point = catalog.latest_checked_point(conn)
        running = {r[0] for r in conn.execute("SELECT id FROM shardctl.operations WHERE state = 'running'")}
    if point is None:
        raise UserError("there is no backup to verify", "run `shardctl backups create` first")
    scratch.sweep(desired.directory, running)
    say(f"Restore drill: restore point {point.name} ({point.created_at:%Y-%m-%d %H:%M:%S %Z})")
    verdicts: list[Verdict] = []
    for server in sorted(point.servers):
        if server not in desired.backups:
            continue
        label = f"verify-{os.getpid()}-{server}"
        copy = None
        try:
            copy, handle = restore(barman, fleet, server, Target(point=point), label, None, say)
            verdicts += _compare(point, server, handle)
        except UserError as exc:
            verdicts.append(Verdict(server, "", False, exc.render().removeprefix("Error: ")))
        finally:
            if copy is not None:
                copy.remove()
            else:
                scratch.Scratch(desired.directory, label, server).remove()
    return point, verdicts


def _compare(point: RestorePoint, server: str, handle: ServerHandle) -> list[Verdict]:
    out = []
    recorded = point.checksums or {}
    for database, shards in sorted(point.shard_map.items()):
        for shard in shards:
            if shard.server != server:
                continue
            address = f"{database}/{shard.name}"
            expected = recorded.get(address, {})
            with handle.connect(shard.dbname) as conn:
                found = table_sums(conn, [tuple(t.split(".", 1)) for t in sorted(expected)])  # type: ignore[misc]
            wrong = [f"{t}: {found[t][0]:,} rows (checksum {found[t][1]}), recorded {expected[t][0]:,} rows"
                     f" (checksum {expected[t][1]})" for t in sorted(expected) if found.get(t) != expected[t]]
            rows = sum(v[0] for v in expected.values())
            out.append(Verdict(server, address, not wrong, "; ".join(wrong) if wrong else
                               f"{len(expected)} tables, {rows:,} rows, checksums equal"))
    return out


# ---------------------------------------------------------------------------- backups list


def listing(desired: Desired, say: Say = _quiet) -> dict[str, Any]:
    """Per backed-up server: Barman's base backups, the oldest recoverable time, WAL streaming;
    and the restore points recorded in the catalog."""
    barman = _barman(desired)
    fleet = Fleet(desired)
    fleet.start_embedded(say)
    wal = wal_status(fleet, barman.servers())
    servers = []
    oldest: dict[str, datetime | None] = {}
    for name in barman.servers():
        backups = list(reversed(barman.list_backups(name)))
        done = [b for b in backups if b.get("status") == "DONE"]
        first = datetime.fromtimestamp(int(done[0]["end_time_timestamp"]), UTC) if done else None
        oldest[name] = first
        status = wal[name]
        servers.append({
            "server": name, "directory": str(barman.backup_directory(name)),
            "retention": desired.backups[name].retention, "every_seconds": desired.backups[name].every,
            "backups": [{"id": b["backup_id"], "name": b.get("backup_name"), "status": b.get("status"),
                         "end": datetime.fromtimestamp(int(b["end_time_timestamp"]), UTC).isoformat()
                         if b.get("end_time_timestamp") else None, "size_bytes": b.get("size_bytes"),
                         "retention": b.get("retention_status")} for b in backups],
            "oldest_recoverable": first.isoformat() if first else None,
            "wal": {"streaming": status.streaming, "received_lsn": status.received_lsn,
                    "current_lsn": status.current_lsn, "lag_bytes": status.lag_bytes, "error": status.error},
        })
    with fleet.catalog(create=False) as conn:
        recorded = catalog.points(conn) if conn is not None else []
    points = []
    for p in recorded:
        missing = [s for s in p.servers if oldest.get(s) is None
                   or datetime.fromisoformat(p.servers[s]["at"]) < oldest[s]]  # type: ignore[operator]
        points.append({"name": p.name, "kind": p.kind, "created_at": p.created_at.isoformat(),
                       "pause_ms": p.pause_ms, "servers": sorted(p.servers),
                       "databases": {db: len(shards) for db, shards in sorted(p.shard_map.items())},
                       "recoverable": not missing, "lost_on": sorted(missing)})
    return {"servers": servers, "restore_points": points}


# ---------------------------------------------------------------------------- the daemon's part


@dataclass(frozen=True)
class ServerBackupState:
    """What status, the dashboard and /metrics show of one backed-up server."""

    server: str
    last_backup_at: datetime | None
    streaming: bool | None  # None: unknown (the server did not answer)
    wal_lag_bytes: int | None
    received_lsn: str | None
    every_seconds: float
    last_point: str | None = None
    last_point_at: datetime | None = None


def states(desired: Desired, fleet: Fleet, conn: psycopg.Connection | None,
           wal: dict[str, WalStatus] | None = None) -> list[ServerBackupState]:
    """Each backed-up server's last base backup (from the catalog) and WAL streaming (from the
    server, unless WAL gives what was just read)."""
    if not desired.backups:
        return []
    last = catalog.last_backups(conn) if conn is not None else {}
    recorded = catalog.points(conn) if conn is not None else []
    wal = wal or wal_status(fleet, sorted(desired.backups))
    out = []
    for name, settings in sorted(desired.backups.items()):
        status = wal[name]
        point = next((p for p in reversed(recorded) if name in p.servers), None)
        out.append(ServerBackupState(
            server=name, last_backup_at=last.get(name), streaming=status.streaming if status.reachable else None,
            wal_lag_bytes=status.lag_bytes, received_lsn=status.received_lsn, every_seconds=settings.every,
            last_point=point.name if point else None, last_point_at=point.created_at if point else None))
    return out


def due(desired: Desired, last: dict[str, datetime], now: datetime) -> list[str]:
    """The backed-up servers whose newest base backup is older than their `backups.every`."""
    return [name for name, settings in sorted(desired.backups.items())
            if name not in last or (now - last[name]).total_seconds() >= settings.every]


class Supervisor:
    """The watch daemon's WAL streaming: one `barman receive-wal` child per backed-up server,
    started when the server's slot has no receiver, started again when it exits; what they
    finish is archived (`barman archive-wal`). A receiver someone else runs (a `backups create`
    by hand, another daemon's) is left alone: the slot being active is what counts."""

    ARCHIVE_EVERY = 60.0

    def __init__(self, log: Callable[..., None]):
        self.log = log
        self.children: dict[str, Any] = {}  # server -> subprocess.Popen
        self._archived = 0.0

    def tick(self, desired: Desired, fleet: Fleet) -> dict[str, WalStatus]:
        barman = _barman(desired)
        servers = barman.servers()
        for name in sorted(set(self.children) - set(servers)):
            self._end(name, "no longer backed up")
        status = wal_status(fleet, servers)
        for name in servers:
            child = self.children.get(name)
            if child is not None and child.poll() is not None:
                del self.children[name]
                self.log("wal_streaming_stopped", server=name, exit_code=child.returncode,
                         log=str(barman.config_file.parent / f"receive-wal-{name}.log"),
                         effect="started again now if the server answers")
                child = None
            if status[name].streaming or child is not None or not status[name].reachable:
                continue  # streaming, starting, or the server does not answer (tried again next tick)
            try:
                ensure_slot(barman, fleet.servers[name])
                self.children[name] = barman.receiver(name, detached=False)
                self.log("wal_streaming_started", server=name, pid=self.children[name].pid)
            except UserError as exc:
                self.log("wal_streaming_failed", server=name, error=exc.render().removeprefix("Error: "))
        if time.monotonic() - self._archived >= self.ARCHIVE_EVERY:
            self._archived = time.monotonic()
            for name in servers:
                with contextlib.suppress(UserError):
                    barman.archive_wal(name)
        return status

    def _end(self, name: str, why: str) -> None:
        child = self.children.pop(name, None)
        if child is None or child.poll() is not None:
            return
        child.terminate()  # Barman forwards it to pg_receivewal, which flushes what it received
        try:
            child.wait(timeout=15)
        except Exception:
            child.kill()
            child.wait()
        self.log("wal_streaming_ended", server=name, reason=why)

    def stop(self) -> None:
        for name in sorted(self.children):
            self._end(name, "the daemon stops leading")
