"""What the executors share: the apply context and the idempotent steps they are built from.

Every step checks what already exists before it acts, so an apply killed at any point can be
run again and converge. Identifiers go through psycopg.sql; the only SQL text run as-is is the
user's own schema steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import errors, sql

from engine.catalog import store
from engine.catalog.journal import Operation
from engine.clock import Clock, system_clock
from engine.errors import UserError
from engine.observe import introspect
from engine.plan.models import ShardSpec, StepSpec
from engine.servers.fleet import Fleet

LEDGER = """
CREATE SCHEMA IF NOT EXISTS _shardctl;
CREATE TABLE IF NOT EXISTS _shardctl.schema_steps (
    seq        int PRIMARY KEY,
    name       text NOT NULL,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""
LOCK_TIMEOUT = "5s"


@dataclass
class ApplyContext:
    fleet: Fleet
    catalog: psycopg.Connection
    plan_serial: int
    say: Callable[[str], None] = lambda _: None
    # the latest progress figures of a long step (copy, catch-up, comparison), for a daemon's API
    progress: Callable[[dict], None] = lambda _: None
    actor: str = "apply"  # who runs it: a person's apply, or "daemon <who>"; kept in the history
    counts: dict[str, int] = field(default_factory=lambda: {"added": 0, "changed": 0, "destroyed": 0, "retired": 0})

    clock: Clock = system_clock  # expiry dates are set from it; tests may pin it

    def begin(self, kind: str, address: str, **detail) -> Operation:
        return Operation.start(self.catalog, kind, address, self.plan_serial, detail)

    def resume_or_begin(self, action) -> Operation:
        """The interrupted operation the action resumes, or a new one that records the action, so
        that a rerun (or `shardctl abort`) knows what it was doing."""
        if action.operation is not None:
            return Operation(self.catalog, action.operation)
        return self.begin(action.kind, action.address, action=action.model_dump(mode="json"))

    def now(self) -> datetime:
        return self.clock()


class NotOwned(UserError):
    """A database shardctl did not create stands where it would create, reuse or drop one."""

    def __init__(self, shard: ShardSpec, doing: str):
        super().__init__(
            f"database {shard.dbname} on server {shard.server} exists, and shardctl did not create it:"
            f" it will not {doing} it",
            "nothing of it was touched. It may hold someone's data: rename or drop it yourself if it is no one's,"
            " or declare what shardctl makes under another name; then plan and apply again")


def _oid(conn: psycopg.Connection, dbname: str) -> int | None:
    row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
    return int(row[0]) if row else None


def _owns(ctx: ApplyContext, shard: ShardSpec, oid: int) -> bool:
    """Whether the database with this oid is the one shardctl created under this name. A row
    without an oid (recorded before oids were, or a create killed before it noted one) is
    trusted, and its oid noted now."""
    if ctx.fleet.is_catalog(shard.server, shard.dbname):
        return False  # the control database is never a shard's, a branch's or a target's
    owned, recorded = store.owned_database(ctx.catalog, shard.server, shard.dbname)
    if owned and recorded is None:
        store.claim_database(ctx.catalog, shard.server, shard.dbname, oid)
    return owned and recorded in (None, oid)


@contextmanager
def creating(ctx: ApplyContext, shard: ShardSpec, conn: psycopg.Connection) -> Iterator[bool]:
    """Around a CREATE DATABASE on `conn` (the shard's server): yields True when the database
    is to be created, False when shardctl's own is there already; refuses one it did not make.
    The name is claimed in the catalog before the CREATE, so a rerun after a kill in between
    knows the database as its own; its oid is recorded after."""
    live = _oid(conn, shard.dbname)
    if live is not None:
        if not _owns(ctx, shard, live):
            raise NotOwned(shard, "reuse or replace")
        yield False
        return
    store.claim_database(ctx.catalog, shard.server, shard.dbname)
    try:
        yield True
    except errors.DuplicateDatabase:
        # made by someone else between the look and the CREATE: not ours, and not claimed
        store.forget_database(ctx.catalog, shard.server, shard.dbname)
        raise NotOwned(shard, "reuse or replace") from None
    store.claim_database(ctx.catalog, shard.server, shard.dbname, _oid(conn, shard.dbname))


def ensure_database(ctx: ApplyContext, shard: ShardSpec) -> bool:
    """CREATE DATABASE unless shardctl's own exists. Returns True when it was created now."""
    handle = ctx.fleet.servers[shard.server]
    with handle.connect() as conn, creating(ctx, shard, conn) as create:
        if create:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(
                sql.Identifier(shard.dbname)))
    return create


def drop_database(ctx: ApplyContext, shard: ShardSpec) -> bool:
    """DROP DATABASE of one shardctl created (engine.catalog.store.owned_database); a database
    made by anyone else under the name, the catalog above all, is refused and left alone."""
    handle = ctx.fleet.servers.get(shard.server)
    if handle is None:
        raise UserError(f"server {shard.server!r} of shard {shard.dbname} is no longer declared",
                        "declare it again so shardctl can reach the shard")
    with handle.connect() as conn:
        live = _oid(conn, shard.dbname)
        if live is None:
            store.forget_database(ctx.catalog, shard.server, shard.dbname)
            return False
        if not _owns(ctx, shard, live):
            raise NotOwned(shard, "drop")
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(shard.dbname)))
    store.forget_database(ctx.catalog, shard.server, shard.dbname)
    return True


def apply_steps(ctx: ApplyContext, shard: ShardSpec, steps: tuple[StepSpec, ...]) -> int:
    """Run the steps the shard's own ledger lacks, each with its ledger row in one transaction,
    so a step runs exactly once per shard however often apply is rerun."""
    handle = ctx.fleet.servers[shard.server]
    applied = 0
    with handle.connect(shard.dbname) as conn:
        conn.execute(LEDGER)
        done = dict(conn.execute("SELECT seq, sha256 FROM _shardctl.schema_steps").fetchall())
        for step in steps:
            if step.seq in done:
                if done[step.seq] != step.sha256:
                    raise UserError(
                        f"shard {shard.dbname} on {shard.server} ran a different schema step {step.seq} ({step.name})",
                        "its ledger (_shardctl.schema_steps) disagrees with the plan; inspect the shard by hand",
                    )
                continue
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
                    conn.execute(step.sql)  # the user's declared DDL, run as written
                    conn.execute("INSERT INTO _shardctl.schema_steps (seq, name, sha256) VALUES (%s, %s, %s)",
                                 (step.seq, step.name, step.sha256))
            except psycopg.Error as exc:
                raise UserError(
                    f"schema step {step.name} failed on shard {shard.dbname} (server {shard.server}): "
                    f"{str(exc).strip().splitlines()[0]}",
                    "the step was rolled back on this shard; fix it by adding a new step, then apply again",
                ) from None
            applied += 1
    return applied


def record_schema(ctx: ApplyContext, database: str, shard: ShardSpec, state: str = "active") -> None:
    handle = ctx.fleet.servers[shard.server]
    with handle.connect(shard.dbname) as conn:
        snap = introspect.snapshot(conn)
    store.set_shard_schema(ctx.catalog, database, shard.name, introspect.fingerprint(snap), snap, state)


class Timer:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __str__(self) -> str:
        return f"{time.monotonic() - self.start:.1f}s"
