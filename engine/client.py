"""A small client for applications: route a key to its shard, and ride through splits and merges.

    client = ShardClient("host=/tmp/... dbname=shardctl user=postgres", "orders")
    client.run(customer_id, lambda conn: conn.execute("INSERT INTO orders ...", (...)))

The shard map (ranges, servers, routing epoch) is read from the catalog once and cached. Keys
are hashed locally, exactly as PostgreSQL's `hashint8extended(key, 0)` does (a port of its
lookup3 mix, checked against the server in the tests), so routing costs no round trip; text
keys are hashed by the shard's server. A write that meets a fenced shard (SQLSTATE 25006,
raised by shardctl's fence during a split or merge) or a shard that is gone makes the client
re-read the map and retry on the new owner, until `retry_timeout`. While it waits it connects to
the shard that will own the key and listens for the catalog's notification of the flip, so the
first write after the cutover costs neither a poll interval nor a connection's setup.

Reference tables (declared in `reference_tables:`) are written in the database's reference
source, whatever shard is concerned, and read on any shard:

    client.reference(lambda conn: conn.execute("INSERT INTO countries VALUES ('fr', 'France')"))
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict

from engine.keyspace import SIGNED_MIN
from engine.rows import one

T = TypeVar("T")
ROUTING_CHANNEL = "shardctl_routing"  # the catalog notifies it when a flip changes the routing
MASK32 = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & MASK32


def hashint8extended(value: int, seed: int = 0) -> int:
    """PostgreSQL's hashint8extended(value, seed), as a signed 64-bit integer."""
    lohalf = value & MASK32
    hihalf = (value >> 32) & MASK32
    lohalf ^= hihalf if value >= 0 else (~hihalf & MASK32)
    a = b = c = (0x9E3779B9 + 4 + 3923095) & MASK32
    if seed:
        seed &= (1 << 64) - 1
        a = (a + (seed >> 32)) & MASK32
        b = (b + (seed & MASK32)) & MASK32
        a, b, c = _mix(a, b, c)
    a = (a + lohalf) & MASK32
    a, b, c = _final(a, b, c)
    result = (b << 32) | c
    return result - (1 << 64) if result >= 1 << 63 else result


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & MASK32; a ^= _rot(c, 4); c = (c + b) & MASK32  # noqa: E702
    b = (b - a) & MASK32; b ^= _rot(a, 6); a = (a + c) & MASK32  # noqa: E702
    c = (c - b) & MASK32; c ^= _rot(b, 8); b = (b + a) & MASK32  # noqa: E702
    a = (a - c) & MASK32; a ^= _rot(c, 16); c = (c + b) & MASK32  # noqa: E702
    b = (b - a) & MASK32; b ^= _rot(a, 19); a = (a + c) & MASK32  # noqa: E702
    c = (c - b) & MASK32; c ^= _rot(b, 4); b = (b + a) & MASK32  # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> tuple[int, int, int]:
    c ^= b; c = (c - _rot(b, 14)) & MASK32  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & MASK32  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & MASK32  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & MASK32  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & MASK32  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & MASK32  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & MASK32  # noqa: E702
    return a, b, c


@dataclass(frozen=True)
class Shard:
    name: str
    lo: int | None
    hi: int | None
    server: str
    dbname: str

    def owns(self, h: int) -> bool:
        return (self.lo is None or h >= self.lo) and (self.hi is None or h < self.hi)


class ShardClient:
    """Routes keys of one sharded database. Not thread-safe: one client per thread."""

    def __init__(self, catalog: str | dict[str, Any], database: str, *, retry_timeout: float = 30.0,
                 servers: dict[str, str] | None = None):
        self._catalog_params = conninfo_to_dict(catalog) if isinstance(catalog, str) else dict(catalog)
        self.database = database
        self.retry_timeout = retry_timeout
        self._server_overrides = servers or {}
        self._conns: dict[tuple[str, str], psycopg.Connection] = {}
        self.epoch = 0
        self.key_type = "bigint"
        self.shards: list[Shard] = []
        self._starts: list[int] = []
        self.upcoming: list[Shard] = []  # shards a move is filling: they own their range after its flip
        self.reference_source: Shard | None = None  # where the reference tables are written
        self._servers: dict[str, dict[str, Any]] = {}
        self.retries = 0
        self._catalog_conn: psycopg.Connection | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the routing map; on the connection kept to the catalog, because a cutover is
        the moment a refresh must be quick (a new connection would cost its setup there)."""
        try:
            self._refresh(self._catalog())
        except psycopg.OperationalError:
            self._catalog_conn = None  # the catalog restarted: once more on a new connection
            self._refresh(self._catalog())

    def _catalog(self) -> psycopg.Connection:
        if self._catalog_conn is None or self._catalog_conn.closed:
            self._catalog_conn = psycopg.connect(**self._catalog_params, autocommit=True,
                                                 application_name="shardctl-client")
            self._catalog_conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ROUTING_CHANNEL)))
        return self._catalog_conn

    def _refresh(self, conn: psycopg.Connection) -> None:
        self.epoch = one(conn.execute("SELECT epoch FROM shardctl.state"))[0]
        # the reference column is read by name from the row's JSON: a catalog older than it has none
        row = conn.execute("SELECT key_type, to_jsonb(d) -> 'reference' FROM shardctl.databases d"
                           " WHERE name = %s AND state = 'active'", (self.database,)).fetchone()
        if row is None:
            raise LookupError(f"no active sharded database {self.database!r} in the catalog")
        self.key_type = row[0]
        self.reference_source = Shard("reference", None, None, row[1]["server"], row[1]["dbname"]) if row[1] else None
        shards = [(r[0], Shard(*r[1:])) for r in conn.execute(
            "SELECT state, name, lo, hi, server, dbname FROM shardctl.shards WHERE database = %s"
            " AND state IN ('active', 'moving') ORDER BY lo NULLS FIRST", (self.database,))]
        self.shards = [shard for state, shard in shards if state == "active"]
        self._starts = [SIGNED_MIN if shard.lo is None else shard.lo for shard in self.shards]
        self.upcoming = [shard for state, shard in shards if state == "moving"]
        self._servers = {name: conninfo_to_dict(self._server_overrides.get(name, described or ""))
                         for name, described in conn.execute("SELECT name, connection FROM shardctl.servers")}

    def _hash(self, key: Any) -> int:
        if self.key_type == "bigint":
            return hashint8extended(int(key))
        conn = self._connection(self.shards[0])
        return one(conn.execute("SELECT hashtextextended(%s, 0)", (str(key),)))[0]

    def shard_for(self, key: Any) -> Shard:
        h = self._hash(key)
        # the active shards sorted by their lower bound: the owner is the last one starting at or
        # below the key (a search, not a scan: databases run thousands of shards)
        i = bisect.bisect_right(self._starts, h) - 1
        if i >= 0 and self.shards[i].owns(h):
            return self.shards[i]
        raise LookupError(f"no shard of {self.database} owns key {key!r} (epoch {self.epoch})")

    def _connection(self, shard: Shard) -> psycopg.Connection:
        key = (shard.server, shard.dbname)
        conn = self._conns.get(key)
        if conn is None or conn.closed:
            params = {**self._servers[shard.server], "dbname": shard.dbname}
            conn = psycopg.connect(**params, application_name="shardctl-client")
            self._conns[key] = conn
        return conn

    def run(self, key: Any, work: Callable[[psycopg.Connection], T]) -> T:
        """Run `work(conn)` in one transaction on the shard that owns `key`; retried on the new
        owner when the shard was fenced or retired under it."""
        deadline = time.monotonic() + self.retry_timeout
        while True:
            shard = self.shard_for(key)
            conn = self._connection(shard)
            try:
                with conn.transaction():
                    return work(conn)
            except (errors.ReadOnlySqlTransaction, errors.InvalidCatalogName, psycopg.OperationalError) as exc:
                if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, errors.InvalidCatalogName):
                    self._conns.pop((shard.server, shard.dbname), None)
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                epoch = self.epoch
                self.refresh()
                if self.epoch == epoch:  # fenced, not yet flipped: the cutover takes milliseconds
                    self._warm(key)
                    self._wait_for_routing(min(0.05, max(0.0, deadline - time.monotonic())))
                    self.refresh()  # the new owner at once, not after another refusal by the old one

    def reference(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run `work(conn)` in one transaction on the reference source, where the database's
        reference tables are written; every shard receives the change by replication."""
        if self.reference_source is None:
            self.refresh()
        if self.reference_source is None:
            raise LookupError(f"database {self.database!r} declares no reference_tables")
        conn = self._connection(self.reference_source)
        with conn.transaction():
            return work(conn)

    def _warm(self, key: Any) -> None:
        """Connect now to the shard that is about to own `key`, so that the first write after the
        flip does not pay a connection's setup."""
        h = self._hash(key)
        for shard in self.upcoming:
            if shard.owns(h):
                with contextlib.suppress(psycopg.OperationalError):  # else the write after the flip connects
                    self._connection(shard)

    def _wait_for_routing(self, timeout: float) -> None:
        """Until the catalog announces a routing change (shardctl notifies at every flip), or the
        timeout: a flip is then seen within a round trip instead of at the next poll."""
        try:
            for _ in self._catalog().notifies(timeout=timeout, stop_after=1):
                break
        except psycopg.OperationalError:
            self._catalog_conn = None
            time.sleep(min(timeout, 0.005))

    def execute(self, key: Any, query: str, params: Any = None) -> list[tuple]:
        def work(conn: psycopg.Connection) -> list[tuple]:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []
        return self.run(key, work)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        if self._catalog_conn is not None:
            self._catalog_conn.close()
            self._catalog_conn = None

    def __enter__(self) -> ShardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
