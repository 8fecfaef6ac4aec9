"""What the executors share: the apply context and the idempotent steps they are built from.

Every step checks what already exists before it acts, so an apply killed at any point can be
run again and converge. Identifiers go through psycopg.sql; the only SQL text run as-is is the
user's own schema steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


def ensure_database(ctx: ApplyContext, shard: ShardSpec) -> bool:
    """CREATE DATABASE unless it exists. Returns True when it was created now."""
    handle = ctx.fleet.servers[shard.server]
    with handle.connect() as conn:
        if store.database_exists(conn, shard.dbname):
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(
                sql.Identifier(shard.dbname)))
        except errors.DuplicateDatabase:
            return False
    return True


def drop_database(ctx: ApplyContext, shard: ShardSpec) -> bool:
    handle = ctx.fleet.servers.get(shard.server)
    if handle is None:
        raise UserError(f"server {shard.server!r} of shard {shard.dbname} is no longer declared",
                        "declare it again so shardctl can reach the shard")
    with handle.connect() as conn:
        if not store.database_exists(conn, shard.dbname):
            return False
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(shard.dbname)))
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
