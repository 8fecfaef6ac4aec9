"""Create a branch: one database holding the parent's schema and (a sample of) its rows.

Tables come from `pg_dump --section=pre-data` of one parent shard; rows are streamed with binary
COPY from a REPEATABLE READ, READ ONLY snapshot of every shard (shards in parallel, one
connection each); then `--section=post-data` builds primary keys, indexes and foreign keys,
and ANALYZE runs. A sample keeps the rows whose shard key hashes into the kept share (a hash
with another seed than routing's), the same predicate in every table, so related rows come
together and foreign keys hold. A table without the shard key is a reference table present
in every shard: it is copied once. The parent is only ever read.
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

import psycopg
from psycopg import pq, sql
from psycopg.types.json import Jsonb

from engine.actions import backup_branch, replica
from engine.actions.base import ApplyContext, Timer, drop_database, ensure_database
from engine.actions.fence import GUARD_TRIGGERS
from engine.catalog import store
from engine.catalog.journal import Operation
from engine.errors import UserError
from engine.observe import introspect
from engine.plan.models import CreateBranch, ResetBranch, ShardSpec
from engine.rows import one
from engine.servers.embedded import bin_dir

HASH = {"bigint": "hashint8extended", "text": "hashtextextended"}


def execute(action: CreateBranch, ctx: ApplyContext) -> None:
    timer = Timer()
    resumed = action.operation is not None
    ctx.say(f"{action.address}: {'Rebuilding (' + action.reason.text + ')' if resumed else 'Creating'}...")
    op = ctx.resume_or_begin(action)
    expires = ctx.now() + timedelta(seconds=action.ttl_seconds)  # from its (re)creation, as plan compares it
    with op.step(f"record {action.branch}"), ctx.catalog.transaction():
        # a resumed operation owns the row in whatever state it left it (a reset now declared elsewhere)
        left = ctx.catalog.execute("SELECT server, dbname FROM shardctl.branches WHERE name = %s"
                                   " AND (state = 'creating' OR %s)", (action.branch, resumed)).fetchone()
        if left and (left[0], left[1]) != (action.server, action.dbname) and left[0] in ctx.fleet.servers:
            # the half-built database of an earlier try elsewhere (another server): nobody's work
            drop_database(ctx, ShardSpec(name=action.branch, lo=None, hi=None, server=left[0], dbname=left[1]))
        ctx.catalog.execute(
            "INSERT INTO shardctl.branches (name, parent, data, sample_percent, server, dbname, state, created_at,"
            " expires_at, reset_token, source_at) VALUES (%s, %s, %s, %s, %s, %s, 'creating', %s, %s, %s, %s)"
            " ON CONFLICT (name)"
            " DO UPDATE SET parent = excluded.parent, data = excluded.data, sample_percent = excluded.sample_percent,"
            " server = excluded.server, dbname = excluded.dbname, created_at = excluded.created_at,"
            " expires_at = excluded.expires_at,"
            " reset_token = excluded.reset_token, source_at = excluded.source_at, state = 'creating'"
            " WHERE shardctl.branches.state = 'creating' OR %s",
            (action.branch, action.database, action.data, action.sample_percent, action.server, action.dbname,
             ctx.now(), expires, action.reset_token, action.at, resumed))  # the ttl runs from this creation
    rows, size, base = build(ctx, op, action)
    with op.step(f"activate {action.branch}"), ctx.catalog.transaction():
        ctx.catalog.execute("UPDATE shardctl.branches SET state = 'active', base_schema = %s, size_bytes = %s"
                            " WHERE name = %s", (Jsonb(base), size, action.branch))
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "create_branch", action.address,
                          {"rows": rows, "data": action.data, "resumed": action.operation})
        op.finish()  # with the activation: a kill between them cannot leave an active branch 'running'
    ctx.counts["added"] += 1
    ctx.say(f"{action.address}: Creation complete after {timer}")


def build(ctx: ApplyContext, op: Operation, action: CreateBranch | ResetBranch) -> tuple[dict[str, int], int, dict]:
    """The journaled steps that fill the branch's database from the parent's active shards, from
    an empty database up: each step may be killed, and the whole is redone from the top (the
    database is dropped first: a half-built branch holds no one's work). Returns the rows copied
    per table, the database's size, and the parent's schema it was made from (the merge base)."""
    target = ShardSpec(name=action.branch, lo=None, hi=None, server=action.server, dbname=action.dbname)
    key_column, key_type = one(ctx.catalog.execute(
        "SELECT key_column, key_type FROM shardctl.databases WHERE name = %s", (action.database,)))
    if action.clone_of is not None:
        return _clone(ctx, op, action, target, action.clone_of)
    if action.data == "backup":
        with backup_branch.restored(ctx, op, action) as (view, restored):
            return _from_shards(view, op, restored, target, key_column, key_type)
    return _from_shards(ctx, op, action, target, key_column, key_type)


def _from_shards(ctx: ApplyContext, op: Operation, action: CreateBranch | ResetBranch, target: ShardSpec,
                 key_column: str, key_type: str) -> tuple[dict[str, int], int, dict]:
    first = action.shards[0]
    with ThreadPoolExecutor(max_workers=2) as dumping:  # both dumps are read while the database is made
        dumps = {section: dumping.submit(_dump, ctx, first, section) for section in ("pre-data", "post-data")}
        with op.step(f"database {action.branch}"):
            # a replica's subscriptions and the shards' slots go first
            replica.detach_recorded(ctx, action.branch, target, action.database, action.data)
            drop_database(ctx, target)  # a branch interrupted midway holds no one's work yet: rebuild it
            ensure_database(ctx, target)
        return _fill(ctx, op, action, target, first, key_column, key_type, dumps)


def _clone(ctx: ApplyContext, op: Operation, action: CreateBranch | ResetBranch, target: ShardSpec,
           source: ShardSpec) -> tuple[dict[str, int], int, dict]:
    """An instant branch: the replica's database cloned (engine/actions/replica.py, `clone`)."""
    timer = Timer()
    with op.step(f"database {action.branch}"):
        drop_database(ctx, target)  # an interrupted clone holds no one's work yet
    try:
        with op.step(f"pause {source.name}", replica=source.dbname):
            replica.pause(ctx, source)
        with op.step(f"clone {action.branch}", replica=source.name):
            method = replica.clone(ctx, source, target)
    finally:
        # the replica follows its parent again whatever happened; killed before this, the rerun
        # (or the branch's deletion, or abort) resumes it
        with op.step(f"resume {source.name}", replica=source.dbname):
            replica.resume(ctx, source)
    with ctx.fleet.servers[target.server].connect(target.dbname) as conn:
        size = one(conn.execute("SELECT pg_database_size(current_database())"))[0]
        base = introspect.snapshot(conn)
    ctx.say(f"{action.address}: cloned replica {source.name} by {method} [{timer} elapsed]")
    return {}, size, base


def _fill(ctx: ApplyContext, op: Operation, action: CreateBranch | ResetBranch, target: ShardSpec, first: ShardSpec,
          key_column: str, key_type: str, dumps: dict[str, Future[str]]) -> tuple[dict[str, int], int, dict]:
    timer = Timer()
    with op.step(f"pre-data {action.branch}"):
        _run_sql(ctx, target, dumps["pre-data"].result())
    with ctx.fleet.servers[target.server].connect(target.dbname) as conn:
        tables = replica.tables_with_key(conn, key_column)
    rows: dict[str, int] = {}
    if action.data not in ("schema", "replica"):  # full, sample, and backup (all rows, from restored copies)
        with op.step(f"data {action.branch}", shards=len(action.shards)):
            filt = _sample_filter(key_column, key_type, action.sample_percent) if action.data == "sample" else None
            with ThreadPoolExecutor(max_workers=min(4, len(action.shards))) as pool:
                jobs = [pool.submit(_copy_shard, ctx, shard, target, tables, filt, index == 0)
                        for index, shard in enumerate(action.shards)]
                for job in jobs:
                    for table, count in job.result().items():
                        rows[table] = rows.get(table, 0) + count
            ctx.say(f"{action.address}: copied {sum(rows.values()):,} rows from {len(action.shards)} shards"
                    f" [{timer} elapsed]")
    with op.step(f"post-data {action.branch}"):
        _post_data(ctx, target, dumps["post-data"].result())
        with ctx.fleet.servers[target.server].connect(target.dbname) as conn:
            conn.execute("ANALYZE")
            size = one(conn.execute("SELECT pg_database_size(current_database())"))[0]
    if action.data == "replica":
        names = []
        with op.step(f"link {action.branch} reference"):
            name = replica.reference_link(ctx, action.branch, target, action.database, tables)
        if name is not None:
            names.append(name)  # the reference tables follow their source, not the first shard
        for index, shard in enumerate(action.shards):
            with op.step(f"link {action.branch} {shard.name}", dbname=shard.dbname):
                names.append(replica.attach(ctx, action.branch, target, shard, tables,
                                            first=index == 0 and name is None))
        with op.step(f"sync {action.branch}"):
            replica.wait_synced(ctx, target, names, ctx.say)
            with ctx.fleet.servers[target.server].connect() as conn:
                # read-only for its readers; the subscriptions' apply workers write all the same
                conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                    sql.Identifier(target.dbname)))
            with ctx.fleet.servers[target.server].connect(target.dbname) as conn:
                size = one(conn.execute("SELECT pg_database_size(current_database())"))[0]
            ctx.say(f"{action.address}: replica in sync with {len(action.shards)} shards [{timer} elapsed]")
    with ctx.fleet.servers[first.server].connect(first.dbname) as conn:
        base = introspect.snapshot(conn)
    return rows, size, base


def _sample_filter(key_column: str, key_type: str, percent: float | None) -> sql.Composable:
    per_million = round((percent or 100.0) * 10000)
    return sql.SQL("abs({}({}, 1) % 1000000) < {}").format(
        sql.SQL(HASH[key_type]), sql.Identifier(key_column), sql.Literal(per_million))


def _copy_shard(ctx: ApplyContext, shard: ShardSpec, target: ShardSpec, tables, filt, copy_reference: bool):
    counts = {}
    with ctx.fleet.servers[shard.server].connect(shard.dbname, autocommit=False) as src, \
            ctx.fleet.servers[target.server].connect(target.dbname, autocommit=False) as dst:
        src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")  # one snapshot; never writes
        for schema, table, has_key in tables:
            if not has_key and not copy_reference:
                continue  # a reference table: the first shard's copy is enough
            qualified = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            where = filt if (filt is not None and has_key) else sql.SQL("true")
            into_cursor = dst.cursor()
            with src.cursor().copy(sql.SQL("COPY (SELECT * FROM {} WHERE {}) TO STDOUT (FORMAT binary)").format(
                    qualified, where)) as out, \
                    into_cursor.copy(sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(qualified)) as into:
                for chunk in out:
                    into.write(chunk)
            counts[f"{schema}.{table}"] = max(into_cursor.rowcount, 0)
        dst.commit()
        src.rollback()
    return counts


def _dump(ctx: ApplyContext, shard: ShardSpec, section: str) -> str:
    params = ctx.fleet.servers[shard.server].params(shard.dbname)
    # libpq's own environment variables as shardctl's connections see them (PGSERVICEFILE,
    # PGPASSFILE, PGSSLROOTCERT...), overlaid with the server's parameters, each through its
    # variable (sslmode, sslrootcert, service... all of them): the password travels in the
    # environment, never on argv
    env = dict(os.environ)
    mapping = {o.keyword.decode(): o.envvar.decode() for o in pq.Conninfo.get_defaults() if o.envvar}
    for key, value in params.items():
        if key in mapping:
            env[mapping[key]] = str(value)
    # a shard's publications and subscriptions (of a move or a replica) are shardctl's, not the branch's
    proc = subprocess.run([str(bin_dir() / "pg_dump"), "--schema-only", f"--section={section}", "--no-owner",
                           "--no-privileges", "--no-publications", "--no-subscriptions", "--exclude-schema=_shardctl"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise UserError(f"pg_dump of {shard.dbname} failed", proc.stderr.strip())
    # plain dumps of PostgreSQL 17.6+ carry psql meta-commands (\restrict); they are not SQL
    return without_fence("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("\\")))


def without_fence(text: str) -> str:
    """A dump without a move's guard triggers (engine/actions/fence.py): a shard being moved
    carries them, their function lives in the _shardctl schema the dump leaves out, and a
    branch is nobody's source."""
    starts = [m.start() for m in _TOC.finditer(text)]
    if not starts:
        return text
    kept = [text[:starts[0]]]
    for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
        entry = text[begin:end]
        first = entry.split("\n", 1)[0]
        if "; Type: TRIGGER;" in first and any(f" {name};" in first for name in GUARD_TRIGGERS):
            continue
        kept.append(entry)
    return "".join(kept)


_SETTING = re.compile(r"^SET\s+(\w+)\s*=|^SELECT pg_catalog\.set_config\('(\w+)'")


def portable(conn: psycopg.Connection, text: str) -> str:
    """A dump made by one major version's pg_dump, made fit for the server it is restored on:
    the session settings of its header that this server does not know are left out (pg_dump 18
    writes `SET transaction_timeout = 0`, unknown before 17). Settings only: a dump's DDL that
    an older server cannot run is still an error, with its message."""
    out = []
    for line in text.splitlines():
        match = _SETTING.match(line)
        if match:
            name = match.group(1) or match.group(2)
            if not conn.execute("SELECT 1 FROM pg_settings WHERE name = %s", (name,)).fetchone():
                continue
        out.append(line)
    return "\n".join(out)


# pg_dump's table of contents: each object's statements follow a "-- Name: ...; Type: ...;" comment
_TOC = re.compile(r"^-- Name: .*; Type: (?P<type>[A-Z ]+);", re.MULTILINE)
INDEX_BUILDERS = 2  # index builds at once: pg_restore -j2's parallelism, one per core here
INDEX_MEMORY = "256MB"  # maintenance_work_mem of each build: sorts in memory, not in temporary files


def _post_data(ctx: ApplyContext, target: ShardSpec, text: str) -> None:
    """Primary keys, unique constraints and indexes are built INDEX_BUILDERS at a time (as
    pg_restore -j does), each with INDEX_MEMORY; then the rest in the dump's order (foreign
    keys, which need the referenced keys, triggers, ...)."""
    starts = [m.start() for m in _TOC.finditer(text)]
    if not starts:
        _run_sql(ctx, target, text)
        return
    header = text[:starts[0]]
    entries = [(m.group("type"), text[m.start():end]) for m, end in zip(_TOC.finditer(text), [*starts[1:], len(text)],
                                                                        strict=True)]
    # the triggers that guard a shard's copy of a reference table call shardctl's own functions,
    # which the dump leaves out: the branch's copy is its own to write
    entries = [(kind, body) for kind, body in entries if not (kind == "TRIGGER" and "_shardctl." in body)]
    indexes = [body for kind, body in entries if kind in ("CONSTRAINT", "INDEX")]
    rest = [body for kind, body in entries if kind not in ("CONSTRAINT", "INDEX")]
    setting = f"SET maintenance_work_mem = '{INDEX_MEMORY}';\n"
    with ThreadPoolExecutor(max_workers=INDEX_BUILDERS) as pool:
        for job in [pool.submit(_run_sql, ctx, target, header + setting + body) for body in indexes]:
            job.result()
    if rest:
        _run_sql(ctx, target, header + setting + "".join(rest))


def _run_sql(ctx: ApplyContext, target: ShardSpec, text: str) -> None:
    with ctx.fleet.servers[target.server].connect(target.dbname) as conn:
        try:
            conn.execute(portable(conn, text))
        except psycopg.Error as exc:
            raise UserError(f"building branch database {target.dbname} failed: {str(exc).splitlines()[0]}") from None
