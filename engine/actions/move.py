"""Moving rows online with PostgreSQL's logical replication: what splits and merges share.

A move is a set of links, each from a source shard to a target shard with an optional hash
range filter (a split: one source, N filtered links; a merge: N sources, one target, unfiltered).
The steps, each journaled and each safe to run again after a crash:

  record     targets enter the catalog as 'moving' (not routed)
  targets    target databases created with the database's schema steps
  publish    per link: a row-filtered publication and an explicit logical slot on the source
  subscribe  per link: a subscription on the target (create_slot = false, binary, sync commit)
  sync       wait until every table is copied and the slots' lag is small
  fence      LOCK the source tables, then a trigger that refuses every write, in one
             transaction (durable, and unlike REVOKE it stops superusers and owners too)
  catch up   wait until every slot has confirmed the fence's LSN
  sequences  targets' sequences set past the sources', in disjoint blocks per target
  verify     per table: count and an order-independent checksum, frozen sources vs targets
  flip       catalog: targets active, sources retired, new routing epoch (one transaction)
  cleanup    subscriptions, slots and publications removed

Names of everything created derive from the operation id (shardctl_op<id>_<n>), so a resumed
or aborted operation finds exactly what it made. Identifiers go through psycopg.sql.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from engine.actions.base import (
    ApplyContext,
    apply_steps,
    drop_database,
    ensure_database,
    record_schema,
)
from engine.catalog import journal, store
from engine.catalog.journal import Operation
from engine.errors import UserError
from engine.plan.models import ShardSpec, StepSpec

SYNC_TIMEOUT = 600.0
CATCH_UP_TIMEOUT = 30.0
LAG_BYTES = 1 << 20
FENCE_LOCK_TIMEOUT = "2s"
FENCE_RETRIES = 10
HASH = {"bigint": "hashint8extended", "text": "hashtextextended"}


class MoveFailed(UserError):
    pass


@dataclass(frozen=True)
class Link:
    index: int
    source: ShardSpec
    target: ShardSpec
    filtered: bool  # split links carry the target's range as a row filter

    def name(self, operation: int) -> str:
        return f"shardctl_op{operation}_{self.index}"


@dataclass
class Move:
    ctx: ApplyContext
    op: Operation
    database: str
    key_column: str
    key_type: str
    sources: tuple[ShardSpec, ...]
    targets: tuple[ShardSpec, ...]
    links: tuple[Link, ...]
    label: str  # e.g. "split orders/40-80"

    # ------------------------------------------------------------------ helpers

    def step(self, name: str, **detail):
        return self.op.step(f"{self.label}: {name}", **detail)

    def connect(self, shard: ShardSpec, **kw):
        return self.ctx.fleet.servers[shard.server].connect(shard.dbname, **kw)

    def tables(self, shard: ShardSpec) -> list[tuple[str, str]]:
        with self.connect(shard) as conn:
            return [(r[0], r[1]) for r in conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
                " AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl')"
                " AND n.nspname NOT LIKE 'pg_toast%%' ORDER BY 1, 2")]

    def range_filter(self, target: ShardSpec) -> sql.Composable:
        h = sql.SQL("{}({}, 0)").format(sql.SQL(HASH[self.key_type]), sql.Identifier(self.key_column))
        parts = []
        if target.lo is not None:
            parts.append(sql.SQL("{} >= {}").format(h, sql.Literal(target.lo)))
        if target.hi is not None:
            parts.append(sql.SQL("{} < {}").format(h, sql.Literal(target.hi)))
        return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")

    def source_conninfo(self, source: ShardSpec) -> str:
        params = self.ctx.fleet.servers[source.server].params(source.dbname)
        return make_conninfo(**params)

    def say(self, text: str) -> None:
        self.ctx.say(f"{self.label}: {text}")

    # ------------------------------------------------------------------ the steps

    def record(self) -> None:
        with self.step("record"):
            with self.ctx.catalog.transaction():
                for target in self.targets:
                    row = self.ctx.catalog.execute(
                        "SELECT state FROM shardctl.shards WHERE database = %s AND name = %s",
                        (self.database, target.name)).fetchone()
                    if row and row[0] != "moving":
                        raise MoveFailed(f"{self.label}: shard {target.name} exists already ({row[0]})",
                                         "a retired shard of the same range is dropped after autosplit.retire_after")
                    store.upsert_shard(self.ctx.catalog, database=self.database, name=target.name, lo=target.lo,
                                       hi=target.hi, server=target.server, dbname=target.dbname, state="moving")
                store.bump_serial(self.ctx.catalog)

    def create_targets(self) -> None:
        with self.step("targets"):
            steps = database_steps(self.ctx, self.database)  # what every shard ran: same schema as the source
            for target in self.targets:
                ensure_database(self.ctx, target)
                apply_steps(self.ctx, target, steps)

    def check_replica_identity(self) -> None:
        """A row filter on a column outside the replica identity breaks UPDATE and DELETE on the
        source the moment the publication exists: refuse before creating anything."""
        for source in self.sources:
            with self.connect(source) as conn:
                bad = [f"{r[0]}.{r[1]}" for r in conn.execute(
                    """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                         AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_shardctl')
                         AND n.nspname NOT LIKE 'pg_toast%%' AND c.relreplident <> 'f'
                         AND NOT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a
                                         ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                                         WHERE i.indrelid = c.oid AND i.indisprimary AND a.attname = %s)
                       ORDER BY 1, 2""", (self.key_column,))]
            if bad:
                raise MoveFailed(f"{self.label}: table {bad[0]} has no primary key containing {self.key_column}",
                                 "rows can move only when the shard key is in every table's primary key")

    def publish(self) -> None:
        with self.step("publish"):
            self.check_replica_identity()
            for link in self.links:
                name = link.name(self.op.id)
                tables = self.tables(link.source)
                with self.connect(link.source) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
                    if not exists:
                        members = [
                            sql.SQL("{}.{}{}").format(
                                sql.Identifier(schema), sql.Identifier(table),
                                sql.SQL(" WHERE ({})").format(self.range_filter(link.target)) if link.filtered
                                else sql.SQL(""))
                            for schema, table in tables
                        ]
                        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                            sql.Identifier(name), sql.SQL(", ").join(members)))
                    slot = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
                    if not slot:
                        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))

    def subscribe(self) -> None:
        with self.step("subscribe"):
            for link in self.links:
                name = link.name(self.op.id)
                with self.connect(link.target) as conn:
                    if conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)).fetchone():
                        continue
                    conn.execute(sql.SQL(
                        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (slot_name = {}, create_slot = false,"
                        " copy_data = true, synchronous_commit = 'on', binary = true)"
                    ).format(sql.Identifier(name), sql.Literal(self.source_conninfo(link.source)),
                             sql.Identifier(name), sql.Literal(name)))

    def _lag(self) -> tuple[int, int, int]:
        """(tables not yet ready, tables in all, worst slot lag in bytes)."""
        waiting = total = 0
        for link in self.links:
            name = link.name(self.op.id)
            with self.connect(link.target) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE sr.srsubstate <> 'r'), count(*) FROM pg_subscription_rel sr"
                    " JOIN pg_subscription s ON s.oid = sr.srsubid WHERE s.subname = %s", (name,)).fetchone()
                waiting += row[0]
                total += row[1]
        worst = 0
        for link in self.links:
            with self.connect(link.source) as conn:
                lag = conn.execute(
                    "SELECT coalesce(pg_current_wal_lsn() - confirmed_flush_lsn, 0)::bigint FROM pg_replication_slots"
                    " WHERE slot_name = %s", (link.name(self.op.id),)).fetchone()
                worst = max(worst, int(lag[0]) if lag else 0)
        return waiting, total, worst

    def _subscription_errors(self) -> str:
        out = []
        for link in self.links:
            with self.connect(link.target) as conn:
                row = conn.execute("SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats"
                                   " WHERE subname = %s", (link.name(self.op.id),)).fetchone()
            if row and (row[0] or row[1]):
                out.append(f"{link.target.dbname}: {row[0]} apply errors, {row[1]} table-sync errors")
        return "; ".join(out)

    def sync(self) -> None:
        with self.step("sync"):
            deadline = time.monotonic() + SYNC_TIMEOUT
            told = 0.0
            expected = sum(len(self.tables(link.source)) for link in self.links)
            while True:
                waiting, total, lag = self._lag()
                if total >= expected and waiting == 0 and lag < LAG_BYTES:
                    break
                failing = self._subscription_errors()
                if failing:
                    raise MoveFailed(f"{self.label}: replication into the targets is failing ({failing})",
                                     "the source is untouched; see the target server's log, then `shardctl abort`"
                                     " the operation or fix the cause and apply again")
                if time.monotonic() - told > 2:
                    self.say(f"copying: {total - waiting}/{expected} tables synchronised, replication lag "
                             f"{lag / 1e6:.1f} MB")
                    told = time.monotonic()
                if time.monotonic() > deadline:
                    raise MoveFailed(f"{self.label}: the initial copy did not finish within {SYNC_TIMEOUT:.0f}s",
                                     "the source is untouched; `shardctl abort` removes what was created")
                time.sleep(0.1)

    def fence(self) -> dict[str, str]:
        """Stop writes on every source; returns each source's fence LSN (a logical message after it)."""
        with self.step("fence"):
            started = time.monotonic()
            for source in self.sources:
                self._fence_one(source)
            fence_ms = (time.monotonic() - started) * 1000
            lsns: dict[str, str] = {}  # per source: LSNs of different servers do not compare
            for source in self.sources:
                with self.connect(source) as conn:
                    lsns[source.name] = conn.execute(
                        "SELECT pg_logical_emit_message(true, 'shardctl_fence', %s)::text",
                        (f"operation {self.op.id}",)).fetchone()[0]
            self.say(f"writes fenced in {fence_ms:.0f} ms")
            self.fence_ms = fence_ms
            return lsns

    def _fence_one(self, source: ShardSpec) -> None:
        tables = self.tables(source)
        with self.connect(source, autocommit=False) as conn:
            for attempt in range(FENCE_RETRIES):
                try:
                    with conn.transaction():
                        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(FENCE_LOCK_TIMEOUT)))
                        conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
                            sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(s), sql.Identifier(t))
                                               for s, t in tables)))
                        conn.execute(FENCE_FUNCTION)
                        for schema, table in tables:
                            qualified = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
                            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS shardctl_fence ON {}").format(qualified))
                            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS shardctl_fence_truncate ON {}").format(qualified))
                            conn.execute(sql.SQL(
                                "CREATE TRIGGER shardctl_fence BEFORE INSERT OR UPDATE OR DELETE ON {}"
                                " FOR EACH STATEMENT EXECUTE FUNCTION _shardctl.fence()").format(qualified))
                            conn.execute(sql.SQL(
                                "CREATE TRIGGER shardctl_fence_truncate BEFORE TRUNCATE ON {}"
                                " FOR EACH STATEMENT EXECUTE FUNCTION _shardctl.fence()").format(qualified))
                    conn.commit()
                    return
                except errors.LockNotAvailable:
                    conn.rollback()
                    time.sleep(0.05 * (attempt + 1))  # a session idle in transaction holds a lock: retry
            raise MoveFailed(f"{self.label}: could not lock {source.dbname} to fence writes after {FENCE_RETRIES} tries",
                             "a session holds a lock on its tables (idle in transaction?); apply again to retry")

    def lift_fence(self) -> None:
        for source in self.sources:
            tables = self.tables(source)
            with self.connect(source) as conn:
                for schema, table in tables:
                    qualified = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
                    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS shardctl_fence ON {}").format(qualified))
                    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS shardctl_fence_truncate ON {}").format(qualified))

    def catch_up(self, fence_lsns: dict[str, str]) -> None:
        with self.step("catch up", lsn=" ".join(f"{k}={v}" for k, v in sorted(fence_lsns.items()))):
            deadline = time.monotonic() + CATCH_UP_TIMEOUT
            while True:
                behind = 0
                for link in self.links:
                    with self.connect(link.source) as conn:
                        row = conn.execute(
                            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                            (fence_lsns[link.source.name], link.name(self.op.id))).fetchone()
                        if not row or not row[0]:
                            behind += 1
                if not behind:
                    return
                if time.monotonic() > deadline:
                    raise MoveFailed(f"{self.label}: the targets did not confirm the fence within {CATCH_UP_TIMEOUT:.0f}s")
                time.sleep(0.005)

    def sequences(self) -> None:
        with self.step("sequences"):
            last: dict[tuple[str, str], tuple[int, int]] = {}
            for source in self.sources:
                with self.connect(source) as conn:
                    for schema, name, value, maximum in conn.execute(
                            "SELECT schemaname, sequencename, coalesce(last_value, start_value), max_value"
                            " FROM pg_sequences WHERE schemaname <> '_shardctl'"):
                        prev = last.get((schema, name), (value, maximum))
                        last[(schema, name)] = (max(prev[0], value), maximum)
            for i, target in enumerate(self.targets):
                with self.connect(target) as conn:
                    for (schema, name), (value, maximum) in last.items():
                        # disjoint blocks: each target continues in its own range past the source
                        gap = min(10**9, max(1, (maximum - value) // (len(self.targets) + 1)))
                        conn.execute("SELECT setval(%s, %s, true)",
                                     (sql.Identifier(schema, name).as_string(conn), value + i * gap + 1))

    def verify(self) -> dict[str, dict[str, int]]:
        """Counts and checksums per table: the frozen sources (restricted to each target's range
        for a split) against the targets. Returns the figures; raises on any difference.

        This runs while writes are fenced, so it is made fast: every query of it runs at once
        (one connection each: sources and targets live on different servers and cores), and rows
        are hashed with hash_record_extended (by value, about twice as fast as hashing their text
        form), falling back to the text form for a table with a column type that has no hash."""
        with self.step("verify"):
            jobs: list[tuple[str, ShardSpec, sql.Composable, sql.Composable]] = []
            keys: list[tuple[ShardSpec, str, str]] = []
            for target in self.targets:
                for schema, table in self.tables(target):
                    qualified = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
                    key = f"{target.name}:{schema}.{table}"
                    keys.append((target, schema, table))
                    jobs.append((key + "|target", target, qualified, sql.SQL("true")))
                    for link in self.links:
                        if link.target == target:
                            where = self.range_filter(target) if link.filtered else sql.SQL("true")
                            jobs.append((f"{key}|source{link.index}", link.source, qualified, where))
            with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
                results = dict(zip([j[0] for j in jobs], pool.map(lambda j: self._checksum(*j[1:]), jobs)))
            figures: dict[str, dict[str, int]] = {}
            mismatches = []
            for target, schema, table in keys:
                key = f"{target.name}:{schema}.{table}"
                count, total = results[key + "|target"]
                expected = [0, 0]
                for name, (c, t) in results.items():
                    if name.startswith(key + "|source"):
                        expected[0] += c
                        expected[1] += t
                figures[key] = {"rows": count, "expected_rows": expected[0]}
                if (count, total) != (expected[0], expected[1]):
                    mismatches.append(f"{target.dbname} {schema}.{table}: {count} rows (checksum {total}),"
                                      f" sources have {expected[0]} rows (checksum {expected[1]})")
            if mismatches:
                self.lift_fence()
                raise MoveFailed(f"{self.label}: verification failed; the fence was lifted and the source is untouched",
                                 "\n".join(mismatches))
            return figures

    def _checksum(self, shard: ShardSpec, table: sql.Composable, where: sql.Composable) -> tuple[int, int]:
        with self.connect(shard) as conn:
            try:
                row = conn.execute(sql.SQL("SELECT count(*), coalesce(sum(hash_record_extended(t, 0)), 0)::text"
                                           " FROM {} t WHERE {}").format(table, where)).fetchone()
            except errors.FeatureNotSupported:  # a column type without a hash function (json, point, ...)
                row = conn.execute(sql.SQL("SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text"
                                           " FROM {} t WHERE {}").format(table, where)).fetchone()
        return int(row[0]), int(row[1])

    def cleanup(self) -> None:
        with self.step("cleanup"):
            self.remove_replication()

    def remove_replication(self) -> None:
        """Subscriptions, slots and publications of this operation, wherever they are. A slot
        left behind would retain WAL; a target with a live subscription could not be dropped."""
        for link in self.links:
            name = link.name(self.op.id)
            try:
                with self.connect(link.target) as conn:
                    if conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)).fetchone():
                        ident = sql.Identifier(name)
                        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                        conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
            except UserError:
                pass  # the target database is gone already
            with self.connect(link.source) as conn:
                for _ in range(50):
                    active = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                          (name,)).fetchone()
                    if not active:
                        break
                    if not active[0]:
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                        break
                    time.sleep(0.1)  # the walsender of a just-disabled subscription is exiting
                conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))

    def flip(self, history: dict) -> None:
        with self.step("flip"):
            with self.ctx.catalog.transaction():
                for target in self.targets:
                    record_schema(self.ctx, self.database, target, state="active")
                for source in self.sources:
                    self.ctx.catalog.execute(
                        "UPDATE shardctl.shards SET state = 'retired', retired_at = now()"
                        " WHERE database = %s AND name = %s", (self.database, source.name))
                self.ctx.catalog.execute("UPDATE shardctl.state SET epoch = epoch + 1")
                store.bump_serial(self.ctx.catalog)
                ranges = [[s.lo, s.hi] for s in self.sources] + [[t.lo, t.hi] for t in self.targets]
                store.add_history(self.ctx.catalog, history["event"], history["address"],
                                  {**history, "database": self.database, "ranges": ranges})

    def abort(self, state: str = "aborted") -> None:
        """Undo an operation that has not flipped: replication objects, fence, targets."""
        self.remove_replication()
        self.lift_fence()
        for target in self.targets:
            drop_database(self.ctx, target)
        with self.ctx.catalog.transaction():
            for target in self.targets:
                self.ctx.catalog.execute("DELETE FROM shardctl.shards WHERE database = %s AND name = %s"
                                         " AND state = 'moving'", (self.database, target.name))
            store.bump_serial(self.ctx.catalog)
        self.op.finish(state)


FENCE_FUNCTION = """
CREATE SCHEMA IF NOT EXISTS _shardctl;
CREATE OR REPLACE FUNCTION _shardctl.fence() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'shard is read-only: shardctl moved its rows; re-resolve the route'
        USING ERRCODE = 'read_only_sql_transaction';
END
$$;
"""


def for_action(ctx: ApplyContext, action, op: Operation, label: str | None = None) -> Move:
    """The move a SplitShard or MergeShards action describes (also used to abort one)."""
    key_column, key_type = key_of(ctx, action.database)
    if action.kind == "split_shard":
        sources, targets = (action.source,), action.targets
        links = tuple(Link(i, action.source, t, filtered=True) for i, t in enumerate(targets))
        label = label or f"split {action.database}/{action.source.name}"
    else:
        sources, targets = action.sources, (action.target,)
        links = tuple(Link(i, s, action.target, filtered=False) for i, s in enumerate(sources))
        label = label or f"merge {action.database}/{action.target.name}"
    return Move(ctx=ctx, op=op, database=action.database, key_column=key_column, key_type=key_type,
                sources=sources, targets=targets, links=links, label=label)


def operation_for(ctx: ApplyContext, action) -> Operation:
    """The action's operation: the interrupted one it resumes, or a new one."""
    if action.operation is not None:
        return Operation(ctx.catalog, action.operation)
    return ctx.begin(action.kind, action.address, action=action.model_dump(mode="json"))


def key_of(ctx: ApplyContext, database: str) -> tuple[str, str]:
    row = ctx.catalog.execute("SELECT key_column, key_type FROM shardctl.databases WHERE name = %s",
                              (database,)).fetchone()
    return row[0], row[1]


def database_steps(ctx: ApplyContext, database: str) -> tuple[StepSpec, ...]:
    """The schema steps every shard of the database has run; a new target runs the same, so
    its schema equals the source's. The SQL comes from the desired config (same hashes)."""
    recorded = ctx.catalog.execute("SELECT seq, name, sha256, sql FROM shardctl.schema_steps WHERE database = %s"
                                   " ORDER BY seq", (database,)).fetchall()
    desired = ctx.fleet.desired.databases.get(database)
    by_hash = {s.sha256: s.sql for s in desired.schema_steps} if desired else {}
    by_hash.update({r[2]: r[3] for r in recorded if r[3]})  # steps merged from branches live only here
    steps = []
    for seq, name, sha, _ in recorded:
        if sha not in by_hash:
            from engine.errors import UserError

            raise UserError(f"schema step {name} of {database} is no longer in the configuration",
                            "a new shard needs every step the others ran; restore it")
        steps.append(StepSpec(seq=seq, name=name, sha256=sha, sql=by_hash[sha]))
    return tuple(steps)


def resumed_flipped(ctx: ApplyContext, operation: int) -> bool:
    return ctx.catalog.execute(
        "SELECT EXISTS (SELECT 1 FROM shardctl.journal WHERE operation = %s AND step LIKE '%%: flip'"
        " AND status = 'done')", (operation,)).fetchone()[0]


def run(move: Move, on_flip: Callable[[], dict], flipped: bool = False) -> dict:
    """The whole sequence. Every step is safe to repeat, so a resumed operation runs it again
    from the top, except that an operation past its flip only finishes its cleanup: after the
    flip the targets take writes, and the source is no longer the truth."""
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        started = time.monotonic()
        result = fn()
        timings[name] = round(time.monotonic() - started, 3)
        return result

    if flipped:
        timed("cleanup", move.cleanup)
        return {"timings": timings, "verification": {}}
    timed("record", move.record)
    timed("targets", move.create_targets)
    timed("publish", move.publish)
    timed("subscribe", move.subscribe)
    timed("sync", move.sync)
    # from the fence to the flip the source refuses writes: a stop request (Ctrl-C, SIGTERM)
    # waits for the flip instead of parking the range read-only; before the fence, it parks
    if journal.stop_requested():
        raise journal.Interrupted("stopped before the fence; apply again to continue")
    with journal.until_done():
        fence_lsn = timed("fence", move.fence)
        try:
            timed("catch_up", lambda: move.catch_up(fence_lsn))
            timed("sequences", move.sequences)
        except (MoveFailed, psycopg.Error):
            move.lift_fence()  # rollback path: the source takes writes again; apply resumes later
            raise
        try:
            figures = timed("verify", move.verify)
        except MoveFailed:
            move.abort(state="failed")  # the copy is wrong: remove it all, the source as it was
            raise
        timed("flip", lambda: move.flip({**on_flip(), "timings": timings, "verification": figures,
                                         "fence_ms": round(getattr(move, "fence_ms", 0.0), 1),
                                         "actor": move.ctx.actor}))
    timed("cleanup", move.cleanup)
    return {"timings": timings, "verification": figures}
