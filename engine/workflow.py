"""The pipeline the commands share: load -> observe -> plan, and lock -> re-check -> execute.

The CLI (and later the daemon) call these; they print nothing themselves but through `say`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.catalog import journal, schema, store
from engine.catalog.lock import apply_lock
from engine.collect import history
from engine.collect.early import EarlyConnections
from engine.collect.observer import inspect_shards, observe
from engine.collect.sampling import LiveSampler
from engine.collect.sql_cache import CleanSql
from engine.collect.yaml_cache import ParsedYaml
from engine.config import loader
from engine.config.loader import Desired
from engine.config.models import Policy
from engine.detect.detector import premise_holds
from engine.detect.forecast import STORAGE_HORIZON, LoadForecast, outlook
from engine.durations import span
from engine.errors import ConfigError, UserError
from engine.observe import strays
from engine.observe.models import Observation
from engine.observe.recorded import Recording
from engine.plan import identity, planner
from engine.plan.forecast import lineages
from engine.plan.models import LOAD_CAUSES, LOAD_KINDS, MergeShards, Plan, ShardSpec, SplitShard
from engine.plan.reshard import Requests
from engine.servers import adoption
from engine.servers.fleet import Fleet

if TYPE_CHECKING:
    from engine.actions.base import ApplyContext

# The actions (and what they bring: pglast's parser, Barman's wrapper) are imported where an
# apply runs them: `plan` never does, and its start-up time is paid by every command that plans.

Say = Callable[[str], None]


class StalePlan(UserError):
    def __init__(self, planned: int, current: int):
        super().__init__(
            "Saved plan is stale",
            "The given plan file can no longer be applied because the state was changed by another\n"
            f"operation after the plan was created (plan based on serial {planned}, catalog now at {current}).\n"
            "Nothing was changed. Run `shardctl plan -out FILE` again and review the new plan.",
        )


class PremiseFailed(UserError):
    def __init__(self, failures: list[str]):
        super().__init__(
            "A premise of the saved plan no longer holds",
            "The plan was made because of the load below, and the load has changed since (beyond the\n"
            "tolerance band). Nothing was changed. Plan again to see what the fleet needs now.\n\n"
            + "\n".join(f"  - {f}" for f in failures),
        )


def check_premises(desired: Desired, plan: Plan, observation: Observation) -> None:
    """Re-measure the load a saved plan was based on; refuse it when a premise has gone."""
    failures = []
    for action in plan.actions:
        if not isinstance(action, (SplitShard, MergeShards)) or action.reason.cause not in LOAD_CAUSES:
            continue
        db = desired.databases.get(action.database)
        if db is None:
            failures.append(f"{action.address}: database {action.database} is no longer declared")
            continue
        if isinstance(action, SplitShard) and action.forecast is not None:
            failures += _forecast_premise(action.forecast, db.effective_policy, observation)
            continue
        for evidence in action.evidence:
            held, why = premise_holds(evidence, observation.metrics.get(evidence.shard, ()), db.effective_policy,
                                      at=observation.metrics_at or observation.taken_at)
            if not held:
                failures.append(f"shard.{evidence.shard}: {why}")
    if failures:
        raise PremiseFailed(sorted(set(failures)))


def _forecast_premise(forecast: LoadForecast, policy: Policy, observation: Observation) -> list[str]:
    """A forecast split's premise: the shard's forecast, refitted now, still crosses the threshold."""
    threshold = forecast.threshold if forecast.threshold is not None else getattr(policy.hot, forecast.metric)
    if threshold is None:
        return [f"shard.{forecast.shard}: {forecast.metric} no longer has a hot threshold"]
    horizon = STORAGE_HORIZON if forecast.metric == "storage_percent" else None
    found = outlook(forecast.shard, forecast.metric, observation.hourly.get(forecast.shard, ()), threshold,
                    observation.metrics_at or observation.now(), policy, horizon,
                    lineages(observation).get(forecast.shard))
    if found is None or found[1] is None:
        return [f"shard.{forecast.shard}: {forecast.metric} is no longer forecast to cross {threshold:g}"
                f" within {span(policy.forecast.horizon)}"]
    return []


class Cancelled(UserError):
    def __init__(self) -> None:
        super().__init__("Apply cancelled.")

    def render(self) -> str:
        return "Apply cancelled."


@dataclass(frozen=True)
class Planned:
    desired: Desired
    observation: Observation
    plan: Plan


def load(config_dir: str) -> Desired:
    """The config as plan and apply see it: a schema without the shard key is refused by the
    planner, which then also names what a shard-key change would destroy. The schema SQL that
    was found clean before is not parsed again (engine.collect.sql_cache), nor the YAML of files
    parsed before (engine.collect.yaml_cache)."""
    known_clean = CleanSql.for_config(Path(config_dir).resolve())
    parsed = ParsedYaml.for_config(Path(config_dir).resolve())
    desired = loader.load(config_dir, defer_key_checks=True, known_clean=known_clean, parsed=parsed)
    known_clean.save()
    parsed.save()
    catalog = desired.servers.get(desired.catalog_server or "")
    never_applied = catalog is not None and catalog.embedded and not (desired.directory / ".shardctl").exists()
    if desired.key_problems and never_applied:
        raise ConfigError(list(desired.key_problems))  # nothing exists that a key change could destroy
    return desired


def make_plan(desired: Desired, say: Say = lambda _: None, metrics_file: str | Recording | None = None,
              wait_for_apply: float | None = None, baseline: tuple[Desired, str] | None = None,
              requests: Requests | None = None, early: EarlyConnections | None = None) -> Planned:
    """Observe and plan. With `wait_for_apply` (seconds), first wait for the apply lock, so that
    an apply in flight is not seen half done (drift checks). `requests`: splits and merges asked
    for by hand; `early`: the shards' connections opened while the command started."""
    fleet = Fleet(desired)
    fleet.start_embedded(say)
    with fleet.catalog(create=False) as conn:
        if conn is not None and wait_for_apply is not None and schema.installed_version(conn):
            with apply_lock(conn, "drift check", timeout=wait_for_apply,
                            on_wait=lambda: say("Waiting for an apply in flight to finish...")):
                observation = observe_all(desired, fleet, conn, metrics_file, early)
        else:
            observation = observe_all(desired, fleet, conn, metrics_file, early)
    observation, plan = plan_with_strays(desired, fleet, observation, requests)
    if baseline is not None:
        from engine.plan import whatif

        plan = plan.model_copy(update={"what_if": whatif.compare(baseline[0], desired, observation, baseline[1])})
    return Planned(desired, observation, plan)


def plan_with_strays(desired: Desired, fleet: Fleet, observation: Observation,
                     requests: Requests | None = None) -> tuple[Observation, Plan]:
    """Plan; when the sources of its splits and merges hold stray rows, plan again with them
    observed: they show as drift, and those moves are held back until they are dealt with."""
    plan = planner.plan(desired, observation, requests)
    found = count_strays(fleet, plan)
    if not found:
        return observation, plan
    observation = observation.model_copy(update={"strays": found})
    return observation, planner.plan(desired, observation, requests)


def count_strays(fleet: Fleet, plan: Plan) -> dict[str, dict[str, int]]:
    """Stray rows in the sources of the plan's splits and merges (the only shards worth a full
    read): address -> table -> rows."""
    found: dict[str, dict[str, int]] = {}
    for action in plan.actions:
        if action.kind not in ("split_shard", "merge_shards", "move_shard") or action.operation is not None:
            continue
        sources = list(action.sources) if action.kind == "merge_shards" else [action.source]
        settings = action.settings  # the catalog's shard key, which the move runs with
        assert settings is not None, "a new move carries its settings (planner._with_move_settings)"
        for source in sources:
            with fleet.servers[source.server].connect(source.dbname) as conn:
                counts = strays.count(conn, settings.key_column, settings.key_type, source.lo, source.hi)
            if counts:
                found[f"{action.database}/{source.name}"] = counts
    return found


def observe_all(desired: Desired, fleet: Fleet, conn, metrics_file: str | Recording | None = None,
                early: EarlyConnections | None = None) -> Observation:
    """Catalog and servers, then load and the shards' schemas, on one connection per server
    (kept by the metric sampler) and one per shard. The load's two readings, where the catalog
    has no fresh sample, are taken around the shards' inspection, whose own statements are left
    out of the shards' rates (history.LiveMetrics)."""
    with LiveSampler(fleet, deadline=history.deadline(desired)) as sampler:
        observation = observe(fleet, conn, inspect_schemas=False, sampler=sampler)
        live = history.LiveMetrics(desired, fleet, conn, observation, metrics_file, sampler)
        live.settle()
        spent: dict[str, tuple[int, float]] = {}
        observation = inspect_shards(fleet, observation, spent=spent, early=early)
        return live.finish(observation, spent)


@dataclass
class ApplyResult:
    plan: Plan
    counts: dict[str, int]


def apply(desired: Desired, saved: Plan | None, *, lock_timeout: float = 0.0,
          metrics_file: str | Recording | None = None, confirm: Callable[[Plan], None] = lambda _: None,
          say: Say = lambda _: None,
          show: Callable[[Plan], None] = lambda _: None, actor: str = "apply",
          start_servers: bool = True, own_signals: bool = True,
          progress: Callable[[dict], None] = lambda _: None, notice: Say | None = None,
          requests: Requests | None = None) -> ApplyResult:
    """Apply a saved plan exactly, or plan now and (after `confirm`) apply that.

    The lock is held from before the observation to the end, prompt included, so what was
    shown is what runs. `notice` (default: `say`) tells of embedded servers being started.
    `requests` (splits and merges by hand) are planned with it; a saved plan carries its own.
    """
    if saved is not None and requests:
        raise UserError("-split and -merge plan new changes, and a saved plan runs only what it holds",
                        "plan them with `shardctl plan -split ADDR -out FILE`, then apply that file")
    if saved is not None:
        # before anything is started or written: every server, database, branch and setting the
        # plan acts on is still declared as it was when it was made
        identity.check_declared(saved.fleet, saved.actions, desired)
    fleet = Fleet(desired)
    if start_servers:
        fleet.start_embedded(notice or say)
    # a saved plan made with a catalog runs only on that catalog: none is created for it
    with fleet.catalog(create=saved is None or not saved.catalog_exists) as conn:
        where = f"database {desired.catalog_database} on server {desired.catalog_server}"
        if conn is None:
            raise identity.ForeignPlan(f"it was made for a fleet whose catalog exists, and this fleet has none"
                                       f" ({where} does not exist)")
        if saved is not None:
            identity.check_fleet(saved.fleet, store.fleet_id(conn), where)
        if not schema.migrate(conn):
            adoption.settle(fleet, conn)  # a catalog made now: it records the directory it belongs to
        with apply_lock(conn, "apply", timeout=lock_timeout,
                        on_wait=lambda: (notice or say)("Acquiring state lock. This may take a few moments...")):
            current = store.current_serial(conn)
            if saved is not None:
                if saved.based_on_serial != current:
                    raise StalePlan(saved.based_on_serial, current)
                plan = saved
                _consented(desired, plan)
                if any(a.kind in LOAD_KINDS and a.reason.cause in LOAD_CAUSES for a in plan.actions):
                    say("Re-measuring the load premises of the saved plan...")
                    observation = observe(fleet, conn, inspect_schemas=False)
                    observation = history.with_metrics(desired, fleet, conn, observation, metrics_file)
                    check_premises(desired, plan, observation)
            else:
                observation = observe_all(desired, fleet, conn, metrics_file)
                observation, plan = plan_with_strays(desired, fleet, observation, requests)
                show(plan)
                if plan.has_changes:
                    confirm(plan)
            from engine.actions import parallel
            from engine.actions.base import ApplyContext

            journal.close_interrupted(conn)
            ctx = ApplyContext(fleet=fleet, catalog=conn, plan_serial=plan.based_on_serial, say=say, actor=actor,
                               progress=progress)
            # a daemon handles its signals itself (stopping it stops its apply at a safe step)
            with _graceful_interrupts(say) if own_signals else nullcontext():
                parallel.execute_all(plan.actions, ctx)
            return ApplyResult(plan, ctx.counts)


def _consented(desired: Desired, plan: Plan) -> None:
    """A saved plan that destroys rows runs only while the YAML still acknowledges each
    destruction (`allow_destroy`): consent taken back after planning is consent refused."""
    missing = []
    for action in plan.actions:
        if action.kind == "destroy_database":
            at_risk = not action.holdings or any(h.may_hold_rows for h in action.holdings.values())
            key = ("database", action.database)
        elif action.kind == "delete_branch" and not action.expired:
            at_risk = action.holding is None or action.holding.may_hold_rows
            key = ("branch", action.branch)
        else:
            continue
        if at_risk and key not in desired.allow_destroy:
            missing.append(f"{key[0]} {key[1]}")
    if missing:
        raise UserError(f"the saved plan destroys rows of {', '.join(missing)}, and allow_destroy no longer names"
                        f" {'it' if len(missing) == 1 else 'them'}",
                        "add it back to allow_destroy to apply this plan, or plan again")


@contextmanager
def _graceful_interrupts(say: Say) -> Iterator[None]:
    """First Ctrl-C: finish the running step, then stop (the journal lets a rerun continue).
    Second Ctrl-C: stop at once."""
    state = {"count": 0}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        state["count"] += 1
        if state["count"] == 1:
            say("Interrupt received.\nPlease wait for shardctl to exit or data loss may occur.\n"
                "Gracefully shutting down...")
            journal.request_stop()
        else:
            raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        journal.clear_stop()


def adopt(desired: Desired, say: Say = lambda _: None) -> None:
    """`shardctl adopt`: a config directory copied with its .shardctl/ becomes a fleet of its own.
    Its servers start without logical replication workers, its catalog takes a new identity and
    this directory, its subscriptions and connections are pointed at its own servers; then the
    servers restart as usual (engine/servers/adoption.py)."""
    fleet = Fleet(desired, adopting=True)
    fleet.start_embedded(say)
    with fleet.catalog(create=False) as conn:
        if conn is None:
            raise UserError("there is no catalog here to adopt", "`shardctl apply` makes one")
        fleet_id = store.fleet_id(conn)
    for _, handle in sorted(fleet.servers.items()):
        if handle.embedded is not None:
            handle.embedded.stop()
            handle.embedded.start(say)
    say(f"This directory's fleet is its own now (fleet {fleet_id}): its catalog, replication and clients reach"
        f" only the servers under {desired.directory.resolve() / '.shardctl'}.")


def abort(desired: Desired, operation: int, *, lock_timeout: float = 0.0, say: Say = lambda _: None,
          notice: Say | None = None) -> None:
    """Roll back a split or merge that has not passed its cutover: its subscriptions, slots,
    publications, fence and target databases go; the sources are left as they were."""
    from engine.actions.base import ApplyContext
    from engine.actions.move import cleanup, start
    from engine.catalog.journal import Operation

    fleet = Fleet(desired)
    fleet.start_embedded(notice or say)
    with fleet.catalog(create=False) as conn:
        if conn is None:
            raise UserError("there is no catalog yet, so no operation to abort")
        schema.migrate(conn)  # what it drops is checked against the databases shardctl made (V10_OWNERSHIP)
        with apply_lock(conn, "abort", timeout=lock_timeout,
                        on_wait=lambda: (notice or say)("Acquiring state lock. This may take a few moments...")):
            unfinished_branch = {p.operation: p for p in store.pending_moves(conn, store.BRANCH_KINDS)}
            if operation in unfinished_branch:
                ctx = ApplyContext(fleet=fleet, catalog=conn, plan_serial=store.current_serial(conn), say=say)
                abort_branch(ctx, unfinished_branch[operation])
                return
            pending = {p.operation: p for p in store.pending_moves(conn)}
            if operation not in pending:
                raise UserError(f"operation {operation} is not an unfinished split or merge",
                                "`shardctl status` lists interrupted operations")
            p = pending[operation]
            action = planner.resume_move(p)
            if p.flipped:  # read from the routing: the targets own the range
                raise UserError(f"operation {operation} ({p.kind} {action.address}) has passed its cutover and cannot"
                                " be aborted: its targets own the range and hold the writes made since",
                                "`shardctl apply` finishes it (only its hand-over and cleanup are left). To go"
                                f" back, move the range again with a new operation: {move_back(action)}")
            ctx = ApplyContext(fleet=fleet, catalog=conn, plan_serial=store.current_serial(conn), say=say)
            live = start.live_for(ctx, action, Operation(conn, operation), label=f"abort {operation}")
            say(f"Aborting operation {operation} ({p.kind} {action.address}, stopped at {p.last_step!r})...")
            cleanup.abort(live)
            store.add_history(conn, "abort", action.address, {"operation": operation, "last_step": p.last_step})
            say(f"Operation {operation} aborted: replication objects, fence and targets removed;"
                " the source is as it was.")



def move_back(action) -> str:
    """How to undo a move past its cutover: another move, the other way."""
    if action.kind == "split_shard":
        return (f"`shardctl apply -merge {','.join(f'{action.database}/{t.name}' for t in action.targets)}`"
                " (once the retired source is dropped, after autosplit.retire_after)")
    if action.kind == "merge_shards":
        return (f"`shardctl apply -split {action.database}/{action.target.name}`"
                " (once the retired sources are dropped, after autosplit.retire_after)")
    return f"place {action.database}/{action.source.name} on server {action.source.server} again in the YAML"


def reset_branch(desired: Desired, name: str, *, lock_timeout: float = 0.0, say: Say = lambda _: None,
                 notice: Say | None = None) -> None:
    """`shardctl branches reset NAME`: make an active branch again from its parent's current
    data, under the apply lock, with the same journaled steps a declared reset runs."""
    from engine.actions import dispatch
    from engine.actions.base import ApplyContext
    from engine.plan.models import Reason, ResetBranch

    fleet = Fleet(desired)
    fleet.start_embedded(notice or say)
    with fleet.catalog(create=False) as conn:
        if conn is None or schema.installed_version(conn) < 3:
            raise UserError(f"there is no branch {name!r}: nothing has been applied yet")
        schema.migrate(conn)
        with apply_lock(conn, "branches reset", timeout=lock_timeout,
                        on_wait=lambda: (notice or say)("Acquiring state lock. This may take a few moments...")):
            have = store.read_branches(conn).get(name)
            if have is None or have.state == "expired":
                known = ", ".join(sorted(n for n, b in store.read_branches(conn).items() if b.state != "expired"))
                raise UserError(f"there is no branch {name!r}" + (" (it expired)" if have else ""),
                                f"branches: {known or 'none'}; `shardctl branches` lists them")
            unfinished = [p for p in store.pending_moves(conn, store.BRANCH_KINDS) if p.action.get("branch") == name]
            if unfinished or have.state != "active":
                op = f"operation {unfinished[0].operation}" if unfinished else "an earlier apply"
                raise UserError(f"branch {name!r} is {have.state}: {op} did not finish with it",
                                "run `shardctl apply` to finish it first (`shardctl status` shows the operation)")
            parent = store.read(conn).databases.get(have.parent)
            if parent is None or parent.state != "active":
                raise UserError(f"branch {name!r} cannot be reset: its parent {have.parent!r} does not exist now")
            declared = desired.branches.get(name)
            clone_of = None
            if declared is not None and declared.from_ in desired.branches and declared.from_ not in desired.databases:
                replica = store.read_branches(conn).get(declared.from_)  # an instant branch: cloned again
                if replica is None or replica.state != "active":
                    raise UserError(f"branch {name!r} cannot be reset: replica {declared.from_!r} is not active now",
                                    "run `shardctl apply` to make the replica first")
                clone_of = ShardSpec(name=replica.name, lo=None, hi=None, server=replica.server, dbname=replica.dbname)
            shards = tuple(ShardSpec(name=s.name, lo=s.lo, hi=s.hi, server=s.server, dbname=s.dbname)
                           for s in parent.shards if s.state == "active")
            if have.data == "backup":  # restored again to the same moment, from the shards of that moment
                shards = _restored_shards(conn, have, store.read(conn))
            action = ResetBranch(
                clone_of=clone_of, at=have.source_at if have.data == "backup" else None,
                database=have.parent, branch=name, data=have.data,  # type: ignore[arg-type]
                sample_percent=have.sample_percent, server=have.server, dbname=have.dbname,
                shards=shards,
                reset_token=have.reset_token,  # a declared reset value stays acted on
                reason=Reason(cause="config", text="reset by `shardctl branches reset`"))
            ctx = ApplyContext(fleet=fleet, catalog=conn, plan_serial=store.current_serial(conn), say=say,
                               actor="branches reset")
            journal.close_interrupted(conn)
            with _graceful_interrupts(say):
                dispatch.execute(action, ctx)


def _restored_shards(conn, have, state) -> tuple[ShardSpec, ...]:
    """The shards a `data: backup` branch is restored from: the shard map of its moment."""
    from engine.catalog import backups as backup_catalog
    from engine.clock import system_clock
    from engine.config.models import Branch

    declared = Branch.model_validate({"from": have.parent, "data": "backup", "at": have.source_at or "latest",
                                      "server": have.server})
    source = backup_catalog.sources(conn, {have.name: declared}, state, system_clock())[have.name]
    if source.problem:
        raise UserError(f"branch {have.name!r} cannot be restored again: {source.problem}")
    return tuple(ShardSpec(name=s.name, lo=s.lo, hi=s.hi, server=s.server, dbname=s.dbname) for s in source.shards)


def abort_branch(ctx: ApplyContext, pending) -> None:
    """Clean up after a branch's creation or reset that did not finish: its half-built database
    is dropped and its catalog row removed (a declared branch is then planned afresh). A reset
    stopped before its database was touched is called off instead: the branch keeps its data.
    A schema merge is not undone (shards that ran it keep it): apply finishes it."""
    from engine.actions import replica
    from engine.actions.base import drop_database
    from engine.catalog.journal import Operation
    from engine.servers import scratch

    action, op = pending.action, Operation(ctx.catalog, pending.operation)
    address = f"branch.{action['branch']}"
    if pending.kind == "merge_branch_schema":
        raise UserError(f"operation {pending.operation} merges a branch's schema into the shards of"
                        f" {action['database']}; some may have run it already, so it cannot be aborted",
                        "run `shardctl apply` to finish it on the shards that lack it")
    touched = ctx.catalog.execute("SELECT EXISTS (SELECT 1 FROM shardctl.journal WHERE operation = %s"
                                  " AND step = %s)", (pending.operation, f"database {action['branch']}")).fetchone()
    ctx.say(f"Aborting operation {pending.operation} ({pending.kind} {address}, stopped at {pending.last_step!r})...")
    def close(statement: str) -> None:
        with ctx.catalog.transaction():
            ctx.catalog.execute(statement, (action["branch"],))
            op.finish("aborted")
            store.bump_serial(ctx.catalog)
            store.add_history(ctx.catalog, "abort", address, {"operation": pending.operation,
                                                              "last_step": pending.last_step})

    if pending.kind == "reset_branch" and touched is not None and not touched[0]:
        close("UPDATE shardctl.branches SET state = 'active' WHERE name = %s AND state = 'resetting'")
        ctx.say(f"Operation {pending.operation} aborted before the reset touched {address}: it keeps its data.")
        return
    row = ctx.catalog.execute("SELECT server, dbname FROM shardctl.branches WHERE name = %s"
                              " AND state IN ('creating', 'resetting')", (action["branch"],)).fetchone()
    for server, dbname in {(action["server"], action["dbname"]), *([tuple(row)] if row else [])}:
        if server in ctx.fleet.servers:
            half = ShardSpec(name=action["branch"], lo=None, hi=None, server=server, dbname=dbname)
            replica.detach_recorded(ctx, action["branch"], half, action["database"], action.get("data"))
            if action.get("clone_of"):  # a clone interrupted while its replica was paused
                replica.resume(ctx, ShardSpec.model_validate(action["clone_of"]))
            drop_database(ctx, half)
    scratch.remove_for_operation(ctx.fleet.desired.directory, pending.operation)  # servers it restored
    close("DELETE FROM shardctl.branches WHERE name = %s AND state IN ('creating', 'resetting')")
    ctx.say(f"Operation {pending.operation} aborted: the half-built database of {address} was dropped;"
            " a branch still declared is created afresh by the next apply.")


def stray_rows(desired: Desired, address: str, move: bool, say: Say = lambda _: None,
               notice: Say | None = None) -> int:
    """List the stray rows of one shard, or move them to the shards that own them. Returns how
    many stray rows are left."""
    from engine.actions.relocate_strays import owners_of, relocate

    database, _, name = address.partition("/")
    fleet = Fleet(desired)
    fleet.start_embedded(notice or say)
    with fleet.catalog(create=False) as conn:
        if conn is None or database not in desired.databases:
            raise UserError(f"no sharded database {database!r} is declared and applied",
                            "name a shard as DATABASE/RANGE, e.g. orders/40-80 (see `shardctl status`)")
        rows = conn.execute("SELECT name, lo, hi, server, dbname, state FROM shardctl.shards WHERE database = %s"
                            " ORDER BY lo NULLS FIRST", (database,)).fetchall()
        # the shard key the shards were made with, as moves use it (the YAML's may have changed since)
        key_row = conn.execute("SELECT key_column, key_type FROM shardctl.databases WHERE name = %s",
                               (database,)).fetchone()
        if key_row is None:
            raise UserError(f"no sharded database {database!r} is applied yet", "`shardctl status` lists them")
        key_column, key_type = key_row
        shard = next((r for r in rows if r[0] == name and r[5] in ("active", "retired")), None)
        if shard is None:
            raise UserError(f"{address} is not a shard of {database}",
                            f"its shards: {', '.join(database + '/' + r[0] for r in rows if r[5] == 'active')}")
        spec = owners_of([shard[:5]])[0]
        with fleet.servers[spec.server].connect(spec.dbname) as shard_conn:
            counts = strays.count(shard_conn, key_column, key_type, spec.lo, spec.hi)
        if not counts:
            say(f"{address}: no stray rows: every row's key hashes inside its range.")
            return 0
        say(f"{address}: {strays.describe(counts)}")
        if not move:
            say("Run again with --move to copy them to the shards that own their keys and delete them here.")
            return sum(counts.values())
        with apply_lock(conn, "strays --move", timeout=0):
            owners = owners_of([r[:5] for r in rows if r[5] == "active"])
            for result in relocate(fleet, key_column, key_type, spec, owners):
                conflict = (f"; {result.conflicting} left here: the owner holds other values under the same key"
                            if result.conflicting else "")
                say(f"  {result.table}: {result.moved} moved to {database}/{result.owner}{conflict}")
            with fleet.servers[spec.server].connect(spec.dbname) as shard_conn:
                left = strays.count(shard_conn, key_column, key_type, spec.lo, spec.hi)
        say(f"{address}: {strays.describe(left)} left." if left else f"{address}: every stray row moved.")
        return sum(left.values())


def orphans(desired: Desired, remove: bool, *, lock_timeout: float = 0.0, say: Say = lambda _: None,
            notice: Say | None = None) -> int:
    """`shardctl orphans`: list shardctl's replication objects that no running operation owns
    (slots with the WAL they retain, subscriptions, publications); with REMOVE, drop them under
    the apply lock, each a journaled step. Returns how many are left."""
    from engine.actions import leftovers
    from engine.actions.base import ApplyContext
    from engine.collect.observer import inspect_servers
    from engine.observe import replication

    fleet = Fleet(desired)
    fleet.start_embedded(notice or say)
    with fleet.catalog(create=False) as conn:
        if conn is None or not schema.installed_version(conn):
            raise UserError("there is no catalog yet, so nothing of shardctl's to look for",
                            "run `shardctl apply` first")

        def find():
            servers = inspect_servers(fleet, sorted(fleet.servers))
            state = store.read(conn)
            found = replication.orphans(state, servers)
            ctx = ApplyContext(fleet=fleet, catalog=conn, plan_serial=state.serial, say=say, actor="orphans --remove")
            return ctx, servers, found, leftovers.orphaned_publications(ctx, state, servers, found)

        ctx, servers, found, publications = find()
        silent = sorted(name for name, live in servers.items() if not live.reachable)
        for orphan in found:
            say(orphan.text)
        for server, dbname, name in publications:
            say(f"publication {name} on server {server} (database {dbname}): no running operation owns it")
        for name in silent:
            say(f"server {name} did not answer: what it holds is unknown ({servers[name].error})")
        if not found and not publications:
            say("No leftover replication" + (" on the servers that answered" if silent else "") + ": every slot,"
                " subscription and publication of shardctl's belongs to a running operation or a replica.")
            return 0
        if not remove:
            say("Run again with --remove to drop them (under the apply lock, journaled).")
            return len(found) + len(publications)
        with apply_lock(conn, "orphans --remove", timeout=lock_timeout,
                        on_wait=lambda: (notice or say)("Acquiring state lock. This may take a few moments...")):
            ctx, servers, found, publications = find()  # again under the lock: an apply may have finished
            removed = leftovers.remove(ctx, found, publications)
        say(f"Removed {removed} object{'s' if removed != 1 else ''}.")
        return 0

