"""A branch restored from backups (`data: backup`): the parent as it was at `at:`, copied into an
ordinary database like a full branch.

The shard map of that moment (a restore point's own, or the catalog's history for a time) names
the shard databases and the servers that held the parent's ranges then. Each of those servers is
restored by Barman (`barman recover --target-name` / `--target-time`) into a scratch server
(engine/servers/scratch.py), started and promoted; the branch is then filled from the restored
shard databases by the same journaled steps as a full branch (pre-data, a binary COPY per shard,
post-data), and the scratch servers are removed. `at: latest` first places a restore point on
every server at once (engine/backups.py), so the branch is one consistent moment of the fleet.

What it costs: each restored server is a whole copy of that server (every database on it, not
only the parent's shards) in .shardctl/scratch for the duration of the build, plus the WAL
replayed from the base backup to the moment; then the rows are copied once more into the branch.
Journaled steps: `point` (latest only), `restore NAME SERVER` per server, then the full branch's
steps, then `scratch NAME`. A kill anywhere is rebuilt from the top by the next apply (what an
earlier try restored is removed first), or `shardctl abort` removes it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

from psycopg import sql

from engine import backups
from engine.actions.base import ApplyContext
from engine.actions.fence import GUARD_TRIGGERS
from engine.catalog import backups as catalog
from engine.catalog.journal import Operation
from engine.errors import UserError
from engine.plan.models import CreateBranch, ResetBranch, ShardSpec
from engine.servers import scratch
from engine.servers.barman import Barman
from engine.servers.connect import ServerHandle


def restored_name(server: str) -> str:
    """The key of a restored copy of SERVER among the fleet's servers during a build."""
    return f"{server} (restored)"


@contextmanager
def restored(ctx: ApplyContext, op: Operation, action: CreateBranch | ResetBranch
             ) -> Iterator[tuple[ApplyContext, CreateBranch | ResetBranch]]:
    """The parent's shards at `action.at`, restored into scratch servers: a context whose fleet
    reaches them too, and the action with its shards on them. They are removed afterwards."""
    desired = ctx.fleet.desired
    missing = sorted({s.server for s in action.shards} - set(desired.backups))
    if missing:
        raise UserError(f"{action.address}: server {missing[0]} held shards of {action.database} then, and it is not"
                        " backed up", "declare backups for it (`backups:`), or restore a branch of a later moment")
    barman = Barman(desired)
    barman.write_config()
    scratch.remove_for_operation(desired.directory, op.id)  # what an earlier try restored
    target, shards = _target(ctx, op, action, barman)
    servers = sorted({s.server for s in shards})
    handles: dict[str, ServerHandle] = {}
    try:
        def one(server: str) -> None:
            with op.step(f"restore {action.branch} {server}", moment=target.describe()):
                _, handle = backups.restore(barman, ctx.fleet, server, target, f"op{op.id}-{server}", op.id,
                                            ctx.say)
                handles[server] = handle
        with ThreadPoolExecutor(max_workers=min(2, len(servers))) as pool:
            for job in [pool.submit(one, s) for s in servers]:
                job.result()
        view = copy.copy(ctx.fleet)
        view.servers = {**ctx.fleet.servers, **{restored_name(s): h for s, h in handles.items()}}
        moved = tuple(s.model_copy(update={"server": restored_name(s.server)}) for s in shards)
        for shard in moved:
            _unfence(view.servers[shard.server], shard.dbname)
        yield replace(ctx, fleet=view), action.model_copy(update={"shards": moved})
        with op.step(f"scratch {action.branch}", servers=",".join(servers)):
            scratch.remove_for_operation(desired.directory, op.id)
    finally:
        scratch.remove_for_operation(desired.directory, op.id)  # a failed build is rebuilt from the top


def _target(ctx: ApplyContext, op: Operation, action: CreateBranch | ResetBranch,
            barman: Barman) -> tuple[backups.Target, tuple[ShardSpec, ...]]:
    """The moment to restore to and the shards that held the parent then."""
    at = action.at or catalog.LATEST
    fleet = ctx.fleet
    if at == catalog.LATEST:
        name = backups.point_name(ctx.catalog, f"branch-{action.branch}-op{op.id}", op)
        with op.step(f"point {action.branch}"):
            point = catalog.point_of_operation(ctx.catalog, op.id)  # an earlier try placed it
            if point is None:
                point = backups.place_point(fleet, ctx.catalog, barman.servers(), name, "branch", op.id, False,
                                            ctx.say)
            for server in sorted(point.servers):
                backups.switch_and_archive(barman, fleet.servers[server], point.servers[server]["wal"])
        shards = tuple(ShardSpec(**s.model_dump()) for s in point.shard_map.get(action.database, ()))
        return backups.Target(point=point), shards or action.shards
    when = catalog.parse_at(at)
    if when is None:
        point = catalog.point(ctx.catalog, at)
        if point is None:
            raise UserError(f"{action.address}: there is no restore point {at!r}", "`shardctl backups list` shows them")
        return backups.Target(point=point), action.shards
    for server in sorted({s.server for s in action.shards}):
        # the WAL of the moment may still be in the segment being written: close it, where the server answers
        try:
            backups.switch_and_archive(barman, fleet.servers[server])
        except UserError as exc:
            ctx.say(f"{action.address}: server {server}: {exc.summary}; restoring from the WAL its backups hold")
    return backups.Target(time=when), action.shards


def _unfence(handle: ServerHandle, dbname: str) -> None:
    """A moment inside a move's cutover finds its source fenced: a restored copy is nobody's
    source, and the fence (a trigger on each table) must not reach the branch."""
    with handle.connect(dbname) as conn:
        for schema_name, table in conn.execute(
                "SELECT n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = ANY(%s)",
                (list(GUARD_TRIGGERS),)).fetchall():
            for trigger in GUARD_TRIGGERS:
                conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}.{}").format(
                    sql.Identifier(trigger), sql.Identifier(schema_name), sql.Identifier(table)))
