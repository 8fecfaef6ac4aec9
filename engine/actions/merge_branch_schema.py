"""Merge a branch's schema change into every shard of its parent, as a new schema step.

Each shard runs the statements and its ledger row in one transaction with lock_timeout (the
same path as declared schema steps, so a rerun after a crash skips shards that have it). The
step is recorded in the catalog with its SQL, so shards made later by splits get it too, and
the branch's base becomes its current schema.
"""

from __future__ import annotations

import hashlib

from psycopg.types.json import Jsonb

from engine.actions import reference
from engine.actions.base import ApplyContext, Timer, apply_steps, record_schema
from engine.catalog import store
from engine.observe import introspect
from engine.plan.models import MergeBranchSchema, StepSpec
from engine.rows import one


def execute(action: MergeBranchSchema, ctx: ApplyContext) -> None:
    timer = Timer()
    ctx.say(f"{action.address}: Merging into {len(action.shards)} shards...")
    sql_text = "\n".join(action.statements) + "\n"
    # the catalog records the step only at the end, so a resumed merge gets the same number and
    # every shard that ran it already skips it (its ledger has that number and hash)
    seq = one(ctx.catalog.execute("SELECT coalesce(max(seq), 0) + 1 FROM shardctl.schema_steps WHERE database = %s",
                                  (action.database,)))[0]
    step = StepSpec(seq=seq, name=f"branch:{action.branch}:{action.branch_schema_sha256[:12]}",
                    sha256=hashlib.sha256(sql_text.encode()).hexdigest(), sql=sql_text)
    op = ctx.resume_or_begin(action)
    for shard in action.shards:
        with op.step(f"schema {action.database}/{shard.name}", server=shard.server):
            apply_steps(ctx, shard, (step,))
            record_schema(ctx, action.database, shard)
    tables = reference.tables_of(ctx, action.database)
    if tables:  # the reference source runs every step the shards run, after them
        with op.step(f"schema {action.database} reference source"):
            reference.ensure_source(ctx, action.database, tables, (step,))
    branch = one(ctx.catalog.execute("SELECT server, dbname FROM shardctl.branches WHERE name = %s",
                                     (action.branch,)))
    with ctx.fleet.servers[branch[0]].connect(branch[1]) as conn:
        new_base = introspect.snapshot(conn)
    with op.step(f"record {action.branch} schema", step=step.name), ctx.catalog.transaction():
        store.record_steps(ctx.catalog, action.database, [(step.seq, step.name, step.sha256, step.sql)])
        ctx.catalog.execute("UPDATE shardctl.branches SET base_schema = %s WHERE name = %s",
                            (Jsonb(new_base), action.branch))
        store.bump_serial(ctx.catalog)
        store.add_history(ctx.catalog, "merge_branch_schema", action.address,
                          {"statements": list(action.statements), "findings": [list(f) for f in action.findings]})
        op.finish()  # in the same transaction: never recorded twice, never left 'running' once recorded
    ctx.counts["changed"] += 1
    ctx.say(f"{action.address}: Merge complete after {timer} [{len(action.shards)} shards]")
