"""The diff: (desired, observation) -> Plan. No side effects, no I/O.

Compare, then emit one op per kind of change, as Alembic's autogenerate does. Anything that
cannot be planned safely (destroying a protected database, an edited schema step that shards
already ran) fails the whole plan with the location of the cause, as Terraform's
prevent_destroy does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydantic import ValidationError

import engine
from engine.config import models
from engine.config.loader import Desired, DesiredDatabase
from engine.config.names import qualified
from engine.durations import span
from engine.errors import ConfigError, Diagnostic, Location
from engine.keyspace import even_ranges, physical_name
from engine.observe import replication
from engine.observe.models import CatalogDatabase, Observation
from engine.observe.replica_links import broken_text, replica_links
from engine.plan import budget, checks, identity, rightsizing
from engine.plan.forecast import forecast_actions
from engine.plan.load_rules import load_actions
from engine.plan.models import (
    MOVE_KINDS,
    ApplySchema,
    AttributeChange,
    Cause,
    CreateBranch,
    CreateDatabase,
    DatabaseSettings,
    DeleteBranch,
    DestroyDatabase,
    Drift,
    DropRetiredShard,
    Holding,
    MergeBranchSchema,
    MergeShards,
    MoveSettings,
    MoveShard,
    Plan,
    Reason,
    RecreateShard,
    RenameDatabase,
    ResetBranch,
    ShardSpec,
    SplitShard,
    StepSpec,
    UpdateBranch,
    UpdateDatabase,
    Waiting,
    sort_actions,
)
from engine.plan.needs import needs
from engine.plan.relocate import rebalance, relocations
from engine.plan.reshard import Requests, declared_actions, manual_actions, recorded_count

BRANCH_STEP_PREFIX = "branch:"


def settings_of(db: DesiredDatabase) -> DatabaseSettings:
    return DatabaseSettings(
        protect=db.spec.protect, policy_name=db.policy_name,
        policy=db.effective_policy.model_dump(mode="json"), placement=tuple(db.spec.placement),
        shards=db.spec.shards, reference_tables=tuple(sorted({qualified(t) for t in db.spec.reference_tables})),
    )


def _recorded_settings(db: CatalogDatabase) -> DatabaseSettings:
    return DatabaseSettings(protect=db.protect, policy_name=db.policy_name, policy=_with_defaults(db.policy),
                            placement=db.placement, reference_tables=db.reference_tables)


def _recorded_policy(db: CatalogDatabase) -> models.Policy:
    """The policy recorded at a database's last apply (the defaults where it cannot be read)."""
    try:
        return models.Policy.model_validate(db.policy)
    except ValidationError:
        return models.Policy()


def _with_defaults(policy: dict[str, Any]) -> dict[str, Any]:
    """A recorded policy with the settings added to shardctl since it was recorded at their
    defaults: upgrading shardctl alone plans no change. One it cannot read is compared as is."""
    try:
        return models.Policy.model_validate(policy).model_dump(mode="json")
    except ValidationError:
        return policy


def _steps(db: DesiredDatabase) -> tuple[StepSpec, ...]:
    return tuple(StepSpec(seq=i + 1, name=s.name, sha256=s.sha256, sql=s.sql) for i, s in enumerate(db.schema_steps))


def _recorded_steps(recorded, declared: tuple[StepSpec, ...]) -> tuple[StepSpec, ...]:
    """Every step the other shards ran, in their order: the declared ones with the YAML's SQL,
    the ones merged from branches with the SQL the catalog kept. Nothing recorded yet: the
    declared steps."""
    if not recorded.schema_steps:
        return declared
    by_hash = {s.sha256: s.sql for s in declared}
    return tuple(StepSpec(seq=s.seq, name=s.name, sha256=s.sha256, sql=s.sql or by_hash.get(s.sha256, ""))
                 for s in recorded.schema_steps if s.sql or s.sha256 in by_hash)


def _shard_spec(shard) -> ShardSpec:
    return ShardSpec(name=shard.name, lo=shard.lo, hi=shard.hi, server=shard.server, dbname=shard.dbname)


def _where(desired: Desired, db: str, *path: Any) -> Location:
    return desired.where("databases", db, *path) or desired.databases[db].location


def _step_location(desired: Desired, db: str, index: int) -> Location:
    steps = desired.databases[db].schema_steps
    return steps[index].location if index < len(steps) else _where(desired, db, "schema")


@dataclass
class _Planning:
    """What a plan collects as its stages run: actions, drift, warnings and problems, and the
    destructions the YAML consented to (a consent no destruction used is itself a warning)."""

    desired: Desired
    observation: Observation
    actions: list = field(default_factory=list)
    drift: list[Drift] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)  # what the configuration needs and a later plan does
    problems: list[Diagnostic] = field(default_factory=list)
    consented: set[tuple[str, str]] = field(default_factory=set)
    renamed_from: set[str] = field(default_factory=set)
    by_hand: set[str] = field(default_factory=set)  # databases with a split or merge asked for by hand


def plan(desired: Desired, observation: Observation, requests: Requests | None = None) -> Plan:
    """The diff of the YAML against what was observed, in stages a reader can follow: splits
    and merges asked for by hand (`requests`), each declared database (create, rename, resume,
    re-key, schema, settings, declared shard count, drift of its shards), each recorded database
    no longer declared, interrupted operations and retired shards, branches, load-driven splits
    and merges, then fleet-wide drift. Problems refuse the plan."""
    p = _Planning(desired, observation, problems=list(desired.key_problems))
    if requests:
        by_hand = manual_actions(desired, observation, requests)
        p.actions.extend(by_hand)
        p.by_hand = {a.database for a in by_hand}
    for name, db in desired.databases.items():
        _plan_declared_database(p, name, db)
    _plan_undeclared_databases(p)
    p.problems.extend(_servers_still_holding(desired, observation))
    _plan_operations(p)
    busy = _plan_branches(p)
    _plan_load(p, busy)
    _plan_rebalance(p)
    _replicas_and_moves(p)
    _within_budgets(p)
    _observe_fleet_drift(p)
    p.warnings.extend(observation.inventory_notes)  # shards that could not be looked into, and why
    p.warnings.extend(_unknown_metrics(desired, observation))
    p.warnings.extend(a.describe() for a in rightsizing.fleet_advice(desired, observation))
    p.problems.extend(_unreachable_targets(desired, observation, p.actions))
    p.problems.extend(_failing_checks(desired, observation, p.actions))
    p.problems.extend(_taken_names(desired, observation, p.actions))
    _with_move_settings(p)
    if p.problems:
        raise ConfigError(p.problems, "found while planning")
    actions = sort_actions(p.actions)
    return Plan(
        shardctl_version=engine.__version__, based_on_serial=observation.serial,
        metrics_source=observation.metrics_source,
        catalog_exists=observation.catalog.exists, actions=actions,
        drift=tuple(sorted(p.drift, key=lambda d: (d.address, d.kind))), warnings=tuple(sorted(set(p.warnings))),
        waiting=tuple(sorted(set(p.waiting), key=lambda w: (w.address, w.reason))),
        fleet=identity.record(desired, observation.catalog.fleet_id, actions),
    )


def _with_move_settings(p: _Planning) -> None:
    """Each new split, merge and move carries what it will run with, so apply reads the plan and
    never the YAML (and an interrupted one, resumed or aborted, reads its recorded action): the
    shard key and every schema step as the catalog records them, and the database's moves
    settings and retire grace as declared. A resumed one keeps what it was started with."""
    for index, action in enumerate(p.actions):
        if action.kind not in MOVE_KINDS or action.operation is not None or action.settings is not None:
            continue
        recorded = p.observation.catalog.databases[action.database]
        db = p.desired.databases.get(action.database)
        policy = db.effective_policy if db is not None else _recorded_policy(recorded)
        declared = {s.sha256: s.sql for s in db.schema_steps} if db is not None else {}
        missing = [s.name for s in recorded.schema_steps if not s.sql and s.sha256 not in declared]
        if missing:
            where = db.location if db is not None else Location(p.desired.files[0])
            p.problems.append(Diagnostic(where, f"{action.address}: schema step {missing[0]} of {action.database}"
                                                " is no longer in the configuration, and the new shard needs every"
                                                " step the others ran", "restore it (steps are append-only)"))
            continue
        moves = policy.moves
        p.actions[index] = action.model_copy(update={"settings": MoveSettings(
            key_column=recorded.key_column, key_type=recorded.key_type,  # type: ignore[arg-type]
            steps=tuple(StepSpec(seq=s.seq, name=s.name, sha256=s.sha256, sql=s.sql or declared[s.sha256])
                        for s in recorded.schema_steps),
            converge_timeout=moves.converge_timeout, pause_budget=moves.pause_budget,
            fence_timeout=moves.fence_timeout, copy_streams=moves.copy_streams, parallel=moves.parallel,
            retire_after=policy.autosplit.retire_after)})


def _plan_declared_database(p: _Planning, name: str, db: DesiredDatabase) -> None:
    """One declared database: created, renamed, resumed or re-keyed as a whole; otherwise its
    new schema steps, its changed settings and the drift of its shards."""
    desired, catalog = p.desired, p.observation.catalog
    recorded = catalog.databases.get(name)
    where = desired.databases[name].location
    if recorded is None and name in desired.moved and desired.moved[name][0] in catalog.databases:
        _plan_rename(p, name, db)
        return
    if recorded is None:
        p.actions.append(_create(db, f"{name} is declared at {where} and does not exist yet", "config"))
        return
    if name in desired.moved and desired.moved[name][0] in catalog.databases:
        old, moved_at = desired.moved[name]
        p.problems.append(Diagnostic(moved_at, f"cannot rename {old!r} to {name!r}: both exist in the catalog",
                                     f"remove the `moved` entry, or destroy {name!r} first"))
        p.renamed_from.add(old)
        return
    if recorded.state == "creating" or any(s.state == "creating" for s in recorded.shards):
        p.actions.append(_resume_create(db, recorded))
        return
    if recorded.state == "destroying":
        p.problems.append(Diagnostic(where, f"database {name!r} was being destroyed when an apply was interrupted",
                                     "remove it from the configuration and apply to finish destroying it"))
        return
    if (recorded.key_column, recorded.key_type) != (db.spec.shard_key.column, db.spec.shard_key.type):
        _plan_key_change(p, name, db, recorded)
        return
    _plan_schema_steps(p, name, db, recorded)
    _plan_settings(p, name, db, recorded)
    _plan_shard_count(p, name, db, recorded)
    _observe_shard_drift(p, name, recorded, _steps(db))
    _plan_placement(p, name, db, recorded)


def _plan_rename(p: _Planning, name: str, db: DesiredDatabase) -> None:
    catalog = p.observation.catalog
    old, moved_at = p.desired.moved[name]
    p.renamed_from.add(old)
    rename, problem = _rename(db, catalog.databases[old], moved_at, catalog)
    if problem:
        p.problems.append(problem)
        return
    p.actions.append(rename)
    if _recorded_settings(catalog.databases[old]) != settings_of(db):
        p.warnings.append(f"database.{name}: its other changes are planned once the rename is applied"
                          " (plan again after this apply)")


def _plan_key_change(p: _Planning, name: str, db: DesiredDatabase, recorded: CatalogDatabase) -> None:
    """A new shard key replaces every shard: refused when protected or without consent."""
    desired = p.desired
    if recorded.protect or db.spec.protect:
        p.problems.append(Diagnostic(
            _where(desired, name, "shard_key"),
            f"database {name!r} cannot be destroyed: changing its shard key replaces every shard",
            "it is protected (protect: true); keep the shard key, or remove protection in a separate apply first",
        ))
        return
    why = (f"shard key changed from {recorded.key_column} ({recorded.key_type}) to "
           f"{db.spec.shard_key.column} ({db.spec.shard_key.type}); resharding by a new key replaces every shard")
    holdings = _holdings(p.observation, recorded.shards)
    refusal = _without_consent(
        desired, "database", name, holdings, _where(desired, name, "shard_key"),
        f"changing the shard key of {name!r} from {recorded.key_column} ({recorded.key_type}) to "
        f"{db.spec.shard_key.column} ({db.spec.shard_key.type}) replaces every shard",
        f"if this is a typo, restore `shard_key: {{column: {recorded.key_column}, type: {recorded.key_type}}}`;"
        " to re-key the rows, declare a new database with the new key and copy them into it; to discard"
        f" them, add `allow_destroy: {{databases: [{name}]}}` to the YAML", p.consented)
    if refusal:
        p.problems.append(refusal)
        return
    p.actions.append(DestroyDatabase(database=name, shards=tuple(_shard_spec(s) for s in recorded.shards),
                                     holdings=holdings, reason=Reason(cause="config", text=why)))
    p.actions.append(_create(db, why, "config"))


def _plan_schema_steps(p: _Planning, name: str, db: DesiredDatabase, recorded: CatalogDatabase) -> None:
    """Schema steps are append-only: an applied step edited or removed is a problem at its line;
    new steps are applied to every active shard (after an interrupted move, not during it)."""
    desired = p.desired
    active = [s for s in recorded.shards if s.state == "active"]
    desired_steps = _steps(db)
    # steps merged from branches live in the catalog, not in the YAML: compare the declared ones
    applied = tuple(s for s in recorded.schema_steps if not s.name.startswith(BRANCH_STEP_PREFIX))
    next_seq = max((s.seq for s in recorded.schema_steps), default=0) + 1
    for i, step in enumerate(applied):
        if i >= len(desired_steps) or desired_steps[i].sha256 != step.sha256:
            loc = db.schema_steps[i].location if i < len(db.schema_steps) else _where(desired, name, "schema")
            changed = "changed" if i < len(desired_steps) else "removed"
            what = f"schema step {step.name!r} was {changed} after it was applied to {name}"
            p.problems.append(Diagnostic(loc, what, "schema steps are append-only: restore it and add a new step"))
            return
    new_steps = tuple(s.model_copy(update={"seq": next_seq + k}) for k, s in enumerate(desired_steps[len(applied) :]))
    if not new_steps:
        return
    if any(m.database == name for m in p.observation.catalog.pending_moves):
        # DDL is not replicated: a schema change waits until the split or merge is done
        p.warnings.append(
            f"schema.{name}: new schema steps wait until the interrupted split or merge of"
            f" {name} is finished (apply, or `shardctl abort`)"
        )
        return
    # each step's own line, where a reviewer reads it (not the `schema:` key above them)
    declared = [
        f"{step.name} declared at {_step_location(desired, name, len(applied) + k)}" for k, step in enumerate(new_steps)
    ]
    p.actions.append(
        ApplySchema(
            database=name,
            steps=new_steps,
            shards=tuple(_shard_spec(s) for s in active),
            reason=Reason(
                cause="config", text=f"new schema step{'s' if len(new_steps) > 1 else ''} " + ", ".join(declared)
            ),
        )
    )


def _plan_settings(p: _Planning, name: str, db: DesiredDatabase, recorded: CatalogDatabase) -> None:
    desired = p.desired
    new_settings = settings_of(db)
    old_settings = _recorded_settings(recorded).model_copy(update={"shards": recorded_count(recorded, db.spec.shards)})
    changes = _changes(old_settings, new_settings)
    if changes:
        places = sorted(
            {
                f"{c.path.split('.')[0] if not c.path.startswith('policy.') else c.path} at "
                f"{_change_location(desired, name, c.path)}"
                for c in changes
            }
        )
        p.actions.append(
            UpdateDatabase(
                database=name,
                settings=new_settings,
                changes=changes,
                reason=Reason(cause="config", text="changed: " + "; ".join(places)),
            )
        )
        if old_settings.placement != new_settings.placement:
            p.warnings.append(
                f"database.{name}: placement changed; shards on servers no longer in it move onto it, and its"
                " servers are rebalanced by storage within the policy's `rebalance` limits"
            )


def _plan_shard_count(p: _Planning, name: str, db: DesiredDatabase, recorded: CatalogDatabase) -> None:
    """`shards:` raised: splits up to it; lowered: merges down to it (engine/plan/reshard.py)."""
    where = str(_where(p.desired, name, "shards"))
    if name in p.by_hand:
        active = len([s for s in recorded.shards if s.state == "active"])
        if active != db.spec.shards:
            p.waiting.append(Waiting(address=f"database.{name}", reason=(
                f"`shards: {db.spec.shards}` at {where}: {name} has {active} active shards; the resharding it needs"
                " is planned once the split or merge asked for by hand is applied (plan again then)")))
        return
    actions, waits = declared_actions(db, recorded, p.observation, where)
    p.actions.extend(actions)
    p.waiting.extend(waits)


def _plan_placement(p: _Planning, name: str, db: DesiredDatabase, recorded: CatalogDatabase) -> None:
    """Shards on servers outside the declared placement move onto it (engine/plan/relocate.py)."""
    if any(a.database == name and a.kind in ("split_shard", "merge_shards") for a in p.actions):
        if relocations(db, recorded, p.observation, "")[0]:
            p.warnings.append(f"database.{name}: shards move to match the placement once this plan's splits and"
                              " merges are applied (plan again then)")
        return
    actions, notes = relocations(db, recorded, p.observation, str(_where(p.desired, name, "placement")))
    p.actions.extend(actions)
    p.warnings.extend(notes)


def _plan_rebalance(p: _Planning) -> None:
    """Storage evened out over each database's placement (engine/plan/relocate.py), after the
    load stage: a database with any other change in this plan (a hot shard's split above all)
    has that applied first; a settings update goes with it."""
    capacity = {s: spec.capacity.storage for s, spec in p.desired.servers.items()}
    for name, db in p.desired.databases.items():
        recorded = p.observation.catalog.databases.get(name)
        if recorded is None or recorded.state != "active":
            continue
        if any(a.database == name and a.kind != "update_database" for a in p.actions):
            continue
        actions, notes = rebalance(db, recorded, p.observation, capacity, str(_where(p.desired, name, "placement")))
        placed = any(a.kind == "update_database" and a.database == name and any(c.path == "placement"
                                                                                 for c in a.changes)
                     for a in p.actions)
        empty = set(db.spec.placement) - {s.server for s in recorded.shards if s.state == "active"}
        if not placed and not empty:  # every server has shards: the data grew unevenly (load, not the YAML)
            actions = [a.model_copy(update={"reason": Reason(
                cause="load", text="the storage grew unevenly, not the configuration: " + a.reason.text)})
                for a in actions]
        p.actions.extend(actions)
        p.warnings.extend(notes)


def _servers_still_holding(desired: Desired, observation: Observation) -> list[Diagnostic]:
    """A server removed from the YAML while the catalog still has shards on it is refused:
    shardctl could not reach it to move or drop them."""
    held: dict[str, list[str]] = {}
    for db in observation.catalog.databases.values():
        for shard in db.shards:
            if shard.server not in desired.servers:
                held.setdefault(shard.server, []).append(f"{shard.address} ({shard.state})")
    where = desired.where("servers") or Location(desired.files[0] if desired.files else str(desired.directory))
    return [Diagnostic(where, f"server {server!r} is no longer declared, and it still holds shards: "
                              + ", ".join(sorted(shards)),
                       f"declare {server} again and remove it from every database's placement; apply moves its"
                       " shards away (retired copies are dropped after autosplit.retire_after); then remove it")
            for server, shards in sorted(held.items())]


def _observe_shard_drift(p: _Planning, name: str, recorded: CatalogDatabase, desired_steps: tuple) -> None:
    """Active shards changed outside shardctl: dropped (recreated empty, said plainly) or altered."""
    observation = p.observation
    for shard in recorded.shards:
        if shard.state != "active":
            continue  # moving targets and retired sources belong to their operation
        live = observation.shards.get(shard.address)
        server = observation.servers.get(shard.server)
        if server is None or not server.reachable:
            p.drift.append(
                Drift(
                    address=f"shard.{shard.address}",
                    kind="unreachable",
                    summary=f"could not be checked: server {shard.server} is unreachable",
                )
            )
            continue
        if live is None:
            continue
        if not live.exists:
            p.drift.append(
                Drift(
                    address=f"shard.{shard.address}",
                    kind="deleted",
                    summary=f"has been deleted (database {shard.dbname} on server {shard.server})",
                )
            )
            p.actions.append(
                RecreateShard(
                    database=name,
                    shard=_shard_spec(shard),
                    steps=_recorded_steps(recorded, desired_steps),
                    reason=Reason(
                        cause="drift",
                        text=f"database {shard.dbname} was dropped outside shardctl; "
                        "it will be recreated empty with its schema, so restore its rows from a backup",
                    ),
                )
            )
        elif shard.schema_fingerprint and live.schema_fingerprint != shard.schema_fingerprint:
            p.drift.append(
                Drift(
                    address=f"shard.{shard.address}",
                    kind="schema_changed",
                    summary="has changed outside shardctl (schema)",
                    details=_schema_diff(shard.schema_snapshot or {}, live.schema_snapshot or {}),
                )
            )


def _plan_undeclared_databases(p: _Planning) -> None:
    """Databases the catalog records and the YAML no longer declares: destroyed, unless
    protected or holding rows without consent."""
    desired, observation = p.desired, p.observation
    anywhere = Location(desired.files[0] if desired.files else str(desired.directory))
    for name, recorded in observation.catalog.databases.items():
        if name in desired.databases or name in p.renamed_from:
            continue
        if recorded.protect:
            p.problems.append(
                Diagnostic(
                    anywhere,
                    f"database {name!r} cannot be destroyed: it is protected (protect: true when last applied)",
                    f"to destroy it, first apply with `protect: false` on {name}, then remove it",
                )
            )
            continue
        holdings = _holdings(observation, recorded.shards)
        refusal = _without_consent(
            desired,
            "database",
            name,
            holdings,
            anywhere,
            f"database {name!r} is not in the configuration, and destroying it",
            f"if it was renamed, declare `moved: [{{from: {name}, to: NEW_NAME}}]`; if it was removed by mistake,"
            f" declare it again; to destroy it with its rows, add `allow_destroy: {{databases: [{name}]}}`",
            p.consented,
        )
        if refusal:
            p.problems.append(refusal)
            continue
        p.actions.append(
            DestroyDatabase(
                database=name,
                shards=tuple(_shard_spec(s) for s in recorded.shards),
                holdings=holdings,
                reason=Reason(cause="config", text=f"{name} is not in the configuration"),
            )
        )


def _plan_operations(p: _Planning) -> None:
    """Interrupted splits and merges are finished; retired shards past their grace are dropped."""
    catalog = p.observation.catalog
    for pending in catalog.pending_moves:
        p.actions.append(resume_move(pending, catalog.apply_in_flight))
    p.actions.extend(_retired_drops(p.desired, p.observation))


def _plan_branches(p: _Planning) -> set[str]:
    """Branch actions (a deletion with rows needs consent), then the consents no action used.
    Returns the databases this plan already changes, which hold load-driven moves back."""
    desired = p.desired
    branch_actions, branch_notes = _branches(desired, p.observation)
    p.waiting.extend(n for n in branch_notes if isinstance(n, Waiting))  # type: ignore[misc]
    p.warnings.extend(n for n in branch_notes if isinstance(n, str))
    for action in list(branch_actions):
        if isinstance(action, DeleteBranch) and not action.expired:
            refusal = _without_consent(
                desired, "branch", action.branch, {action.branch: action.holding or Holding()},
                Location(desired.files[0] if desired.files else str(desired.directory)),
                f"branch {action.branch!r} is not in the configuration, and deleting it",
                f"declare it again to keep it, or add `allow_destroy: {{branches: [{action.branch}]}}` to delete"
                " it with its rows",
                p.consented,
            )
            if refusal:
                p.problems.append(refusal)
                branch_actions.remove(action)
    for (kind, name), at in sorted(desired.allow_destroy.items()):
        if (kind, name) not in p.consented:
            p.warnings.append(
                f"allow_destroy ({at}): this plan destroys no rows of {kind} {name}; remove the"
                " acknowledgement so that it cannot approve a later destruction"
            )
    # branches only read their parent and do not hold moves back; a schema merge does
    busy = {a.database for a in p.actions} | {a.database for a in branch_actions if a.kind == "merge_branch_schema"}
    p.actions.extend(branch_actions)
    return busy


def _plan_load(p: _Planning, busy: set[str]) -> None:
    """Splits of hot shards and merges of cold neighbours, unless the plan already changes that database."""
    load, notes = load_actions(p.desired, p.observation)
    p.warnings.extend(notes)
    ahead, ahead_notes = forecast_actions(p.desired, p.observation, [a for a in load if a.database not in busy])
    p.warnings.extend(ahead_notes)
    load = load + ahead
    for action in load:
        if action.database in busy:
            p.warnings.append(
                f"{action.address}: {action.kind.replace('_', ' ')} waits until the other changes"
                f" to {action.database} in this plan are applied"
            )
        else:
            p.actions.append(action)


def _replicated(desired: Desired, observation: Observation) -> dict[str, list[str]]:
    """The databases that have a replica (declared, or recorded and not yet deleted), and its names."""
    out: dict[str, list[str]] = {}
    for name, branch in desired.branches.items():
        if branch.data == "replica":
            out.setdefault(branch.from_, []).append(name)
    for name, have in observation.catalog.branches.items():
        if have.data == "replica" and have.state != "expired" and name not in desired.branches:
            out.setdefault(have.parent, []).append(name)
    return out


def _major(version: str | None) -> int | None:
    found = re.match(r"\s*(\d+)", version or "")
    return int(found.group(1)) if found else None


def _replicas_and_moves(p: _Planning) -> None:
    """A replica follows its parent through splits, merges and moves (engine/actions/replica.py),
    with two exceptions that hold a new move back, saying why: a replica, or the move's target,
    on a server older than PostgreSQL 16 (a replica's link to a target must skip the rows the
    move copies, by their replication origin, which 16 introduced), and a replica whose server
    does not answer (its links could not be made). A replica's build or reset waits while this
    plan moves its parent's shards: it is made from the shards active when the plan was made.
    A destroy or rename of a replicated database waits until the replica is deleted."""
    _hold_what_replicas_cannot_follow(p)
    _replicas_wait_for_moves(p)


def _hold_what_replicas_cannot_follow(p: _Planning) -> None:
    """New moves a replica could not follow, and destroys or renames of a replicated database."""
    replicated = _replicated(p.desired, p.observation)
    deleted = {a.branch for a in p.actions if a.kind == "delete_branch"}
    # the replicas a move links to: those active when it runs (one being built waits for the move)
    following: dict[str, list] = {}
    for branch in p.observation.catalog.branches.values():
        if branch.data == "replica" and branch.state == "active" and branch.name not in deleted:
            following.setdefault(branch.parent, []).append(branch)
    for action in list(p.actions):
        if getattr(action, "operation", None) is not None:
            continue
        if action.kind in MOVE_KINDS and action.database in following:
            why = _unfollowable(action, following[action.database], p.observation.servers)
            if why:
                p.actions.remove(action)
                p.warnings.append(f"{action.address}: {action.kind.replace('_', ' ')} held: {action.database} has"
                                  f" {why}")
        elif action.kind in ("destroy_database", "rename_database") and action.database in replicated:
            names = ", ".join(sorted(replicated[action.database]))
            # the shards' slots would stop DROP DATABASE, and the replica names its parent
            p.actions.remove(action)
            p.warnings.append(
                f"{action.address}: {action.kind.replace('_', ' ')} held: {action.database} has a replica ({names});"
                " delete the replica first (remove it from the configuration and apply)")


def _replicas_wait_for_moves(p: _Planning) -> None:
    """A replica's build or reset waits while this plan moves its parent's shards."""
    moving = {a.database: a for a in p.actions if a.kind in MOVE_KINDS}
    for action in list(p.actions):
        if action.kind in ("create_branch", "reset_branch") and action.data == "replica" \
                and action.database in moving and action.operation is None:
            p.actions.remove(action)
            move = moving[action.database]
            p.warnings.append(
                f"{action.address}: the replica waits for this plan's {move.kind.replace('_', ' ')} of"
                f" {move.address}: it is made from the shards that are active then (apply again after it)")


def _within_budgets(p: _Planning) -> None:
    """Moves and replica links queued within what each server's replication settings allow
    (engine/plan/budget.py): one that never could is refused, naming the setting and the number it
    needs; one that could once others' links are gone waits for a later plan, said so. An
    embedded server whose settings the declared fleet has outgrown is named, with the restart
    that raises them."""
    embedded = frozenset(n for n, s in p.desired.servers.items() if s.embedded)
    admission = budget.admit(p.actions, p.observation, embedded)
    p.actions[:] = admission.kept
    p.warnings.extend(admission.waiting)
    for server, message in admission.problems:
        p.problems.append(Diagnostic(p.desired.where("servers", server) or Location(p.desired.files[0]), message,
                                     "`shardctl doctor` compares every server's replication settings with what the"
                                     " fleet needs"))
    for name in sorted(embedded):
        live = p.observation.servers.get(name)
        caps = live.capabilities if live is not None else None
        pending = sorted(set(caps.pending_restart) & set(budget.EMBEDDED_SETTINGS)) if caps is not None else []
        if pending:
            p.warnings.append(f"server.{name}: {', '.join(pending)} {'were' if len(pending) > 1 else 'was'} raised for"
                              " the declared fleet and take effect when it restarts (`shardctl down`, then"
                              " `shardctl up`)")


def _unfollowable(action, replicas: list, servers: dict) -> str | None:
    """Why a replica of the moved database could not follow this move, or None."""
    targets = [action.target] if action.kind in ("merge_shards", "move_shard") else list(action.targets)
    for replica in sorted(replicas, key=lambda b: b.name):
        live = servers.get(replica.server)
        if live is None or not live.reachable:
            return (f"replica {replica.name}, whose server {replica.server} does not answer: its links to the new"
                    " shards could not be made; apply again once it does (or delete the replica)")
        if (_major(live.version) or 16) < 16:
            return (f"replica {replica.name} on PostgreSQL {_major(live.version)}: following a move takes PostgreSQL"
                    " 16 or later on the replica's server (its links skip the rows the move copies by their"
                    f" replication origin); make the replica on a newer server, or delete it, to let the move run")
        for target in targets:
            live = servers.get(target.server)
            major = _major(live.version) if live is not None else None
            if major is not None and major < 16:
                return (f"replica {replica.name}, and the new shard's server {target.server} runs PostgreSQL"
                        f" {major}: a replica follows a move only onto PostgreSQL 16 or later (its link skips"
                        " the rows the move copies by their replication origin); choose a newer server, or"
                        " delete the replica, to let the move run")
    return None


def _observe_fleet_drift(p: _Planning) -> None:
    """Unmanaged databases named like shards, stray rows, unreachable servers, wal_level."""
    observation = p.observation
    p.drift.extend(_unmanaged(p.desired, observation))
    p.drift.extend(_dropped_branches(p.desired, observation))
    for replica in replica_links(observation.catalog, observation.servers):
        if replica.missing:
            p.drift.append(Drift(
                address=f"branch.{replica.branch}", kind="replica_link",
                summary=f"lost its link to {len(replica.missing)} of {replica.parent}'s shards (a slot or"
                        f" publication was dropped outside shardctl): their writes no longer reach it; make it"
                        f" again with `shardctl branches reset {replica.branch}`",
                details=replica.missing))
        if replica.broken:
            p.drift.append(Drift(
                address=f"branch.{replica.branch}", kind="replica_link",
                summary=f"cannot reach {len(replica.broken)} of {replica.parent}'s shards: their writes no longer"
                        " reach it",
                details=tuple(f"{link.shard}: " + broken_text(replica.branch, replica.server, link.shard, link.server,
                                                             link.error) for link in replica.broken)))
    p.drift.extend(_leftover_replication(observation))
    for address, counts in sorted(observation.strays.items()):
        if counts:
            p.drift.append(
                Drift(
                    address=f"shard.{address}",
                    kind="strays",
                    summary=f"{sum(counts.values())} rows were written outside the shard's range"
                    " (straight into its database, past routing)",
                    details=tuple(f"{table}: {n} row{'s' if n != 1 else ''}" for table, n in sorted(counts.items())),
                )
            )
    for server in observation.servers.values():
        if not server.reachable:
            p.drift.append(
                Drift(address=f"server.{server.name}", kind="unreachable", summary=f"is unreachable: {server.error}")
            )
        elif server.wal_level != "logical":
            p.warnings.append(
                f"server.{server.name}: wal_level is {server.wal_level}; splits and merges will need"
                " wal_level = logical"
            )


def _leftover_replication(observation: Observation) -> list[Drift]:
    """Per server, the replication objects of shardctl's naming that no running operation owns
    (engine/observe/replication.py): a slot among them retains the server's WAL."""
    by_server: dict[str, list] = {}
    for orphan in replication.orphans(observation.catalog, observation.servers):
        by_server.setdefault(orphan.server, []).append(orphan)
    out = []
    for server, found in sorted(by_server.items()):
        kept = sum(o.object.retained_bytes or 0 for o in found)
        out.append(Drift(
            address=f"server.{server}", kind="leftover_replication",
            summary=f"holds {len(found)} replication object{'s' if len(found) != 1 else ''} of shardctl's that no"
                    f" running operation owns ({replication.size_text(kept)} of WAL retained);"
                    " `shardctl orphans --remove` drops them",
            details=tuple(f"{o.object.kind} {o.object.name} (database {o.object.database}):"
                          f" {replication.describe(o.object)}; {o.why}" for o in found)))
    return out


def resume_move(pending, in_flight: str | None = None) -> Any:
    """An interrupted split or merge is finished under its own operation (its names derive from it).
    With the apply lock held elsewhere (`in_flight`), it is not interrupted but running there."""
    data = {**pending.action, "operation": pending.operation}
    kinds: dict[str, Any] = {"split_shard": SplitShard, "merge_shards": MergeShards, "move_shard": MoveShard}
    kind = kinds[pending.kind]
    if in_flight:
        text = (f"operation {pending.operation} is in progress, at step {pending.last_step!r}, run by {in_flight}"
                " (it holds the apply lock); if that process dies, apply resumes it from here")
    else:
        where = ("past its cutover: only cleanup is left" if pending.flipped else
                 "with writes to its source fenced: resume it now, or `shardctl abort` it" if pending.fenced else
                 "before its cutover; the source took writes all along")
        text = f"operation {pending.operation} was interrupted at step {pending.last_step!r}, {where}"
    data["reason"] = {"cause": "resume", "text": text}
    return kind.model_validate(data)


def _branches(desired: Desired, observation: Observation) -> tuple[list, list[str]]:
    """Per declared branch: create it, finish (rebuild) or reset it, delete it past its ttl, or
    merge its schema; then delete the recorded ones no longer declared. A branch whose creation,
    reset or schema merge did not finish is never silent: it is resumed (or deleted) under the
    interrupted operation's number, and until then plan and drift show it."""
    actions: list = []
    notes: list[str] = []
    pending = {p.action.get("branch"): p for p in observation.catalog.pending_branches
               if p.kind in ("create_branch", "reset_branch")}
    merging = {p.action.get("branch"): p for p in observation.catalog.pending_branches
               if p.kind == "merge_branch_schema"}
    for name, branch in desired.branches.items():
        if name in merging:
            actions.append(_resume_schema_merge(merging[name]))  # finished before anything else happens to it
            continue
        action, note = _declared_branch(name, branch, pending.get(name), desired, observation)
        actions.extend([action] if action else [])
        notes.extend([note] if note else [])
    actions.extend(_undeclared_branches(desired, observation, pending, merging))
    return actions, notes


def _declared_branch(name: str, branch, unfinished, desired: Desired,
                     observation: Observation) -> tuple[Any, str | None]:
    have = observation.catalog.branches.get(name)
    where = desired.where("branches", name)
    if have is None or have.state in ("creating", "resetting") or unfinished is not None:
        return _build_branch(name, branch, have, unfinished, where, observation, desired)
    if have.state == "expired":
        return None, (f"branch.{name}: expired at {have.expires_at.strftime('%Y-%m-%dT%H:%M:%SZ')} and was"
                      " deleted; remove it from the configuration (or declare it under a new name)")
    # the ttl is the YAML's, from the branch's creation: an edited one moves the expiry
    expires = have.created_at + timedelta(seconds=branch.ttl)
    if min(expires, have.expires_at) <= observation.now():  # expiry is wall-clock time, never a recording's
        return _delete_branch(have.model_copy(update={"expires_at": min(expires, have.expires_at)}),
                              expired=True), None
    parent, data, _ = _source(desired, branch)
    moment = (branch.at or "latest") if data == "backup" else None
    if (have.parent, have.data, have.server, have.source_at) != (parent, data, branch.server, moment):
        changed = [f"{what} {before} -> {after}" for what, before, after in (
            ("from", have.parent, parent), ("data", have.data, data), ("server", have.server, branch.server),
            ("at", have.source_at, moment)) if before != after]
        return None, Waiting(address=f"branch.{name}", reason=(  # type: ignore[return-value]
            f"{', '.join(changed)} at {where}: a branch is not rebuilt in place (it may hold someone's work);"
            " declare a new branch (a new name) for the new settings, or restore them"))
    if branch.reset is not None and _token(branch.reset) != have.reset_token:
        return _build_branch(name, branch, have, None, where, observation, desired)
    if _branch_dropped(have, observation):
        action, note = _build_branch(name, branch, have, None, where, observation, desired)
        return (action.model_copy(update={"reason": Reason(cause="drift", text=(
            f"its database {have.dbname} was dropped outside shardctl: apply makes it again from its parent's"
            " current data (same name, server, connection string and expiry); remove the branch from the"
            " configuration to forget it instead"))}) if action is not None else None), note
    if abs((expires - have.expires_at).total_seconds()) >= 1:
        return _update_branch(have, branch, expires, where), None
    if branch.merge_schema:
        return _schema_merge(branch, have, observation)
    return None, None


def _branch_dropped(have, observation: Observation) -> bool:
    """An active branch whose database its server (answering) does not have: dropped by hand."""
    live = observation.servers.get(have.server)
    return have.state == "active" and live is not None and live.reachable and have.dbname not in live.databases


def _dropped_branches(desired: Desired, observation: Observation) -> list[Drift]:
    """Declared branches dropped by hand that apply makes again; one this plan deletes (its ttl ran
    out, or it left the YAML) is not drift: telling the user apply remakes it would be false."""
    def owed(b) -> bool:
        declared = desired.branches.get(b.name)
        return declared is not None and min(
            b.expires_at, b.created_at + timedelta(seconds=declared.ttl)) > observation.now()

    return [Drift(address=f"branch.{b.name}", kind="deleted",
                  summary=f"has been deleted (database {b.dbname} on server {b.server}): `shardctl apply` (or"
                          f" `shardctl branches reset {b.name}`) makes it again from its parent; remove it from the"
                          " configuration to forget it")
            for b in sorted(observation.catalog.branches.values(), key=lambda b: b.name)
            if _branch_dropped(b, observation) and owed(b)]


def _update_branch(have, branch, expires, where) -> UpdateBranch:
    """A branch's ttl edited after its creation: its expiry moves (from its creation), in place."""
    before = round((have.expires_at - have.created_at).total_seconds())
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    return UpdateBranch(
        database=have.parent, branch=have.name, server=have.server, dbname=have.dbname, expires_at=expires,
        changes=(AttributeChange(path="ttl", before=span(before), after=span(branch.ttl)),
                 AttributeChange(path="expires_at", before=have.expires_at.strftime(stamp),
                                 after=expires.strftime(stamp))),
        reason=Reason(cause="config", text=f"ttl changed at {where}: the branch now expires"
                                           f" {expires.strftime(stamp)}, {span(branch.ttl)} after its"
                                           f" creation"))


def _undeclared_branches(desired: Desired, observation: Observation, pending: dict, merging: dict) -> list:
    """Recorded branches no longer declared are deleted (one half-built needs no consent: it holds
    no one's work); an interrupted creation that recorded nothing yet has what it made removed."""
    now = observation.now()
    recorded = observation.catalog.branches
    actions: list = []
    for name, have in recorded.items():
        if have.state == "expired" or name in desired.branches:
            continue
        if name in merging:
            actions.append(_resume_schema_merge(merging[name]))
            continue
        unfinished_build = have.state in ("creating", "resetting")
        deletion = _delete_branch(
            have, expired=have.expires_at <= now and not unfinished_build,
            holding=Holding(rows=0) if unfinished_build else _branch_holding(have, observation),
            unfinished=unfinished_build, operation=pending[name].operation if name in pending else None)
        clone_of = pending[name].action.get("clone_of") if name in pending else None
        actions.append(deletion.model_copy(update={"resume_replica": ShardSpec.model_validate(clone_of)})
                       if clone_of else deletion)
    for name, p in pending.items():
        if name not in recorded and name not in desired.branches and isinstance(name, str):
            clone_of = p.action.get("clone_of")
            actions.append(DeleteBranch(
                database=p.database, branch=name, server=p.action["server"], dbname=p.action["dbname"],
                expired=False, holding=Holding(rows=0), unfinished=True, operation=p.operation,
                resume_replica=ShardSpec.model_validate(clone_of) if clone_of else None,
                reason=Reason(cause="resume", text=f"operation {p.operation} was interrupted at step"
                              f" {p.last_step!r} while creating branch {name}, which is no longer declared:"
                              " what it made is removed")))
    return actions


def _token(value: str | int | None) -> str | None:
    return None if value is None else str(value)


def _source(desired: Desired, branch) -> tuple[str, str, str | None]:
    """What a declared branch is made of: (the sharded database, its data, the replica branch it is
    cloned from). A branch `from:` a replica branch is an instant clone of it, with all its rows."""
    replica = desired.branches.get(branch.from_)
    if replica is not None and branch.from_ not in desired.databases:
        return replica.from_, "full", branch.from_
    return branch.from_, branch.data, None


def _build_branch(name: str, branch, have, unfinished, where, observation: Observation,
                  desired: Desired) -> tuple[Any, str | None]:
    """Create, finish or reset a branch from the parent's active shards, or as a clone of a
    replica. An unfinished build is rebuilt from the start with the declared settings (it holds
    no one's work yet), under the operation that was interrupted."""
    source, data, replica_name = _source(desired, branch)
    clone_of = None
    if replica_name is not None:
        replica = observation.catalog.branches.get(replica_name)
        if replica is None or replica.state != "active":
            return None, f"branch.{name}: waits until replica {replica_name} is made (the next apply clones it)"
        clone_of = ShardSpec(name=replica_name, lo=None, hi=None, server=replica.server, dbname=replica.dbname)
        branch = branch.model_copy(update={"from_": source, "data": data})
    found = _branch_shards(name, branch, have, unfinished, observation, desired)
    if isinstance(found, str):
        return None, found
    at, shards = found
    sample = branch.sample_percent if branch.data == "sample" else None
    if _resets(branch, have, unfinished):
        token = _token(branch.reset) if unfinished is None else unfinished.action.get("reset_token")
        return ResetBranch(
            database=branch.from_, branch=name, data=branch.data, sample_percent=sample, server=branch.server,
            dbname=have.dbname, shards=shards, reset_token=token,
            operation=unfinished.operation if unfinished else None,
            reason=_reset_reason(name, have, unfinished, token, where), clone_of=clone_of, at=at), None
    create = CreateBranch(
        database=branch.from_, branch=name, data=branch.data, sample_percent=sample, server=branch.server,
        dbname=f"branch_{name}", ttl_seconds=branch.ttl, ttl_declared=branch.ttl_declared, shards=shards,
        reset_token=_token(branch.reset), operation=unfinished.operation if unfinished else None, clone_of=clone_of,
        at=at, reason=Reason(cause="config", text=f"branch {name} is declared at {where} and does not exist yet"
                             + (f": an instant clone of replica {replica_name}" if replica_name else "")
                             + (f": restored from backups to {at}" if at else "")))
    if have is None and unfinished is None:
        return create, None
    return create.model_copy(update={"reason": _rebuild_reason(name, branch, have, unfinished)}), None


def _branch_shards(name: str, branch, have, unfinished, observation: Observation,
                   desired: Desired) -> tuple[str | None, tuple[ShardSpec, ...]] | str:
    """The branch's moment (a `data: backup` branch's, else None) and the parent's shards it is
    made from, or the note that says what it waits for."""
    parent = observation.catalog.databases.get(branch.from_)
    if parent is None or parent.state != "active":
        return (f"branch.{name}: waits until {branch.from_} exists" if have is None and unfinished is None
                else f"branch.{name}: was left half-built, and waits until {branch.from_} exists again")
    moving = [m for m in observation.catalog.pending_moves if m.database == branch.from_]
    if branch.data == "replica" and (moving or any(s.state in ("creating", "moving") for s in parent.shards)):
        what = f"operation {moving[0].operation} ({moving[0].kind})" if moving else "a move"
        return (f"branch.{name}: a replica waits until {what} of {branch.from_} is finished"
                " (run `shardctl apply` to finish it, or `shardctl abort` it)")
    if branch.data == "backup":
        return _restored_shards(name, branch, observation, desired)
    return None, tuple(_shard_spec(s) for s in parent.shards if s.state == "active")


def _resets(branch, have, unfinished) -> bool:
    """The branch exists (or was being reset) as declared: it is made again, not created."""
    resetting = (unfinished is not None and unfinished.kind == "reset_branch") or (
        have is not None and have.state in ("active", "resetting"))
    return resetting and have is not None and (have.parent, have.data, have.server) == (
        branch.from_, branch.data, branch.server)


def _reset_reason(name: str, have, unfinished, token: str | None, where) -> Reason:
    if unfinished is not None:
        return Reason(cause="resume", text=(
            f"operation {unfinished.operation} was interrupted while resetting branch {name} (its database"
            f" may be half-built): apply rebuilds it from the start (`shardctl abort {unfinished.operation}`"
            " drops it instead)"))
    if have.state == "resetting":
        return Reason(cause="resume", text=f"an earlier apply did not finish resetting branch {name}: apply"
                      " rebuilds it from the start")
    return Reason(cause="config", text=f"its declared reset value changed ({have.reset_token or 'none'} -> {token})"
                  f" at {where}: it is made again from the parent's current data")


def _rebuild_reason(name: str, branch, have, unfinished) -> Reason:
    """Why a half-built branch is built again from the start."""
    op = f"operation {unfinished.operation}" if unfinished else "an earlier apply"
    at = f" at step {unfinished.last_step!r}" if unfinished and unfinished.last_step else ""
    moved = have is not None and (have.server, have.dbname) != (branch.server, f"branch_{name}")
    text = (f"{op} did not finish building branch {name}{at} (its database may be half-built): apply rebuilds it"
            " from the start" + (f", on {branch.server}, and drops the half-built {have.dbname} on {have.server}"
                                 if moved and have else "")
            + "; removing the branch from the configuration deletes it instead"
            + (f" (`shardctl abort {unfinished.operation}` drops it now)" if unfinished else ""))
    return Reason(cause="resume", text=text)


def _restored_shards(name: str, branch, observation: Observation,
                     desired: Desired) -> tuple[str, tuple[ShardSpec, ...]] | str:
    """A `data: backup` branch: its moment and the shards that held its parent's ranges then
    (the shard map of that moment), or the note that says why it cannot be restored."""
    source = observation.backup_sources.get(name)
    prefix = f"branch.{name}: cannot be restored from backups at {branch.at or 'latest'}: "
    if source is None or source.problem or not source.shards:
        return prefix + (source.problem if source and source.problem else f"{branch.from_} had no shards then")
    missing = sorted({s.server for s in source.shards} - set(desired.backups))
    if missing:
        return prefix + (f"server {missing[0]} held shards of {branch.from_} then, and it is not backed up"
                         " (declare `backups:` for it)")
    return source.at, tuple(ShardSpec(name=s.name, lo=s.lo, hi=s.hi, server=s.server, dbname=s.dbname)
                            for s in source.shards)


def _resume_schema_merge(p) -> MergeBranchSchema:
    data = {**p.action, "operation": p.operation}
    data["reason"] = {"cause": "resume", "text": f"operation {p.operation} was interrupted at step {p.last_step!r}"
                      " while merging the branch's schema: apply finishes it on the shards that lack it (those"
                      " that ran it skip it)"}
    return MergeBranchSchema.model_validate(data)


def _schema_merge(branch, have, observation: Observation) -> tuple[MergeBranchSchema | None, str | None]:
    """Three-way: the change is diff(base -> branch); every parent shard must still equal the
    base, or the merge is refused naming the shards that drifted (a two-way diff would undo a
    hotfix made on a shard since the branch was made)."""
    import hashlib
    import json

    from engine.observe.introspect import fingerprint
    from engine.plan import schemadiff

    live = observation.branch_schemas.get(have.name)
    if live is None or have.base_schema is None:
        return None, f"branch.{have.name}: its schema could not be read; no schema merge planned"
    try:
        statements = schemadiff.diff(have.base_schema, live)
    except schemadiff.Unsupported as exc:
        return None, f"branch.{have.name}: schema merge refused: {exc}"
    if not statements:
        return None, None
    parent = observation.catalog.databases.get(have.parent)
    shards = [s for s in (parent.shards if parent else ()) if s.state == "active"]
    base = fingerprint(have.base_schema)
    drifted = [s.address for s in shards if (observation.shards.get(s.address) is None
                                             or observation.shards[s.address].schema_fingerprint != base)]
    if drifted:
        return None, (f"branch.{have.name}: schema merge refused: {', '.join(drifted)} no longer match the schema"
                      " the branch was made from (changed since); reconcile them first")
    findings = tuple(schemadiff.lint(statements))
    destructive = [f for f in findings if f[0] == schemadiff.DESTRUCTIVE]
    if destructive and not branch.allow_destructive:
        return None, (f"branch.{have.name}: schema merge refused: {destructive[0][2]} ({destructive[0][1]});"
                      " set allow_destructive: true on the branch to allow it")
    sha = hashlib.sha256(json.dumps(live, sort_keys=True).encode()).hexdigest()
    return MergeBranchSchema(
        database=have.parent, branch=have.name, statements=tuple(statements), findings=findings,
        shards=tuple(_shard_spec(s) for s in shards), branch_schema_sha256=sha,
        reason=Reason(cause="config", text=f"branch {have.name} has schema changes and merge_schema: true"),
    ), None


def _delete_branch(have, expired: bool, holding: Holding | None = None, unfinished: bool = False,
                   operation: int | None = None) -> DeleteBranch:
    why = (f"its ttl ran out at {have.expires_at.strftime('%Y-%m-%dT%H:%M:%SZ')}" if expired
           else f"branch {have.name} is not in the configuration"
           + (" and was left half-built (nothing of anyone's to keep)" if unfinished else ""))
    return DeleteBranch(database=have.parent, branch=have.name, server=have.server, dbname=have.dbname,
                        expired=expired, holding=holding, unfinished=unfinished, operation=operation,
                        reason=Reason(cause="resume" if unfinished else "config", text=why))


def _retired_drops(desired: Desired, observation: Observation) -> list[DropRetiredShard]:
    now = observation.now()  # a grace period is about real time, never a recording's
    out = []
    for name, recorded in observation.catalog.databases.items():
        db = desired.databases.get(name)
        grace = db.effective_policy.autosplit.retire_after if db else 0.0
        for shard in recorded.shards:
            if shard.state == "retired" and shard.retired_at and shard.retired_at + timedelta(seconds=grace) <= now:
                out.append(DropRetiredShard(
                    database=name, shard=_shard_spec(shard), retired_at=shard.retired_at,
                    reason=Reason(cause="config", text=f"retired by a split or merge at "
                                  f"{shard.retired_at.strftime('%Y-%m-%dT%H:%M:%SZ')}; its grace period"
                                  f" (autosplit.retire_after {grace:g}s) is over"),
                ))
    return out


def _holdings(observation: Observation, shards) -> dict[str, Holding]:
    """What each shard holds; unknown (rows None) when it could not be looked at."""
    out: dict[str, Holding] = {}
    for shard in shards:
        live = observation.shards.get(shard.address)
        if live is not None and not live.exists:
            out[shard.name] = Holding(rows=0)
        elif live is not None and live.holding is not None:
            # the size of an empty database is noise that would make plans differ run to run
            out[shard.name] = Holding(rows=live.holding.rows, exact=live.holding.exact,
                                      size_bytes=live.holding.size_bytes if live.holding.rows else None)
        else:
            out[shard.name] = Holding()
    return out


def _branch_holding(have, observation: Observation) -> Holding:
    server = observation.servers.get(have.server)
    if server is not None and server.reachable and have.dbname not in server.databases:
        return Holding(rows=0)
    live = observation.branch_holdings.get(have.name)
    if live is None:
        return Holding()  # not looked at: it may hold rows
    return Holding(rows=live.rows, exact=live.exact, size_bytes=live.size_bytes if live.rows else None)


def _without_consent(desired: Desired, kind: str, name: str, holdings: dict[str, Holding], where: Location,
                     what: str, hint: str, consented: set[tuple[str, str]]) -> Diagnostic | None:
    """A destruction of rows is refused unless `allow_destroy` names it (safe unless told)."""
    at_risk = {shard: h for shard, h in holdings.items() if h.may_hold_rows}
    if not at_risk:
        return None
    if (kind, name) in desired.allow_destroy:
        consented.add((kind, name))
        return None
    known = [h.rows for h in at_risk.values() if h.rows is not None]
    total = f"{sum(known):,} rows" + (" or more" if len(known) < len(at_risk) else "")
    listing = "; ".join(f"{name}/{shard}: {h.describe()}" if kind == "database" else h.describe()
                        for shard, h in sorted(at_risk.items()))
    return Diagnostic(where, f"{what} would destroy {total} ({listing})", hint)


def _rename(db: DesiredDatabase, old, where: Location, catalog) -> tuple[RenameDatabase | None, Diagnostic | None]:
    if (old.key_column, old.key_type) != (db.spec.shard_key.column, db.spec.shard_key.type):
        return None, Diagnostic(where, f"cannot rename {old.name!r} to {db.name!r} and change its shard key at once",
                                f"keep shard_key: {{column: {old.key_column}, type: {old.key_type}}} for the rename")
    if old.state != "active" or any(p.database == old.name for p in catalog.pending_moves):
        return None, Diagnostic(where, f"cannot rename {old.name!r} while an operation on it is unfinished",
                                "finish it first (apply, or `shardctl abort`), then rename")
    shards = tuple(_shard_spec(s) for s in old.shards)
    return RenameDatabase(database=db.name, from_name=old.name, shards=shards, reason=Reason(
        cause="config", text=f"`moved` at {where} renames {old.name} to {db.name}; no row is touched")), None


def _created(action) -> list[ShardSpec]:
    """The databases an action creates anew (a resumed one made its own already)."""
    if getattr(action, "operation", None) is not None or action.reason.cause == "resume":
        return []
    if isinstance(action, CreateDatabase):
        return list(action.shards)
    if isinstance(action, CreateBranch):
        return [ShardSpec(name=action.branch, lo=None, hi=None, server=action.server, dbname=action.dbname)]
    if isinstance(action, SplitShard):
        return list(action.targets)
    if isinstance(action, (MergeShards, MoveShard)):
        return [action.target]
    return []


def _freed(action) -> list[ShardSpec]:
    """The databases an action drops (earlier in the plan than any creation: engine.plan.models.ORDER)."""
    if isinstance(action, DestroyDatabase):
        return list(action.shards)
    if isinstance(action, DropRetiredShard):
        return [action.shard]
    if isinstance(action, DeleteBranch):
        return [ShardSpec(name=action.branch, lo=None, hi=None, server=action.server, dbname=action.dbname)]
    return []


def _taken_names(desired: Desired, observation: Observation, actions: list) -> list[Diagnostic]:
    """Nothing is created where a database exists already, whatever its kind of action: not
    another database's shard (after a rename), a retired copy, a branch, the catalog, nor a
    database made by hand, which shardctl would otherwise adopt, or drop to rebuild."""
    freed = {(s.server, s.dbname) for a in actions for s in _freed(a)}
    recorded = {(s.server, s.dbname): f"a shard of {d.name!r}" + (f", {s.state}" if s.state != "active" else "")
                for d in observation.catalog.databases.values() for s in d.shards}
    recorded.update({(b.server, b.dbname): f"branch {b.name!r}" for b in observation.catalog.branches.values()
                     if b.state != "expired"})
    if desired.catalog_server is not None:
        recorded[(desired.catalog_server, desired.catalog_database)] = "the control database"
    out = []
    for action in actions:
        for shard in _created(action):
            key = (shard.server, shard.dbname)
            live = observation.servers.get(shard.server)
            owner = recorded.get(key)
            if key in freed or (owner is None and (live is None or shard.dbname not in live.databases)):
                continue
            whose = owner or "a database shardctl does not manage"
            if isinstance(action, CreateDatabase):
                where, hint = desired.databases[action.database].location, "choose another name for the new database"
                what = f"database {action.database!r}"
            elif isinstance(action, CreateBranch):
                where = desired.where("branches", action.branch) or Location(desired.files[0])
                hint, what = "choose another name for the branch", f"branch {action.branch!r}"
            else:
                what = action.address
                where = desired.databases[action.database].location if action.database in desired.databases \
                    else Location(desired.files[0])
                hint = ("shardctl never replaces a database it did not create: rename or drop it yourself if it is"
                        " no one's")
            out.append(Diagnostic(where, f"{what} would create {shard.dbname} on server {shard.server},"
                                         f" which already exists ({whose})", hint))
            break
    return out


def _targets(action) -> set[str]:
    shards = list(getattr(action, "shards", None) or ())
    for attr in ("shard", "source", "target"):
        if getattr(action, attr, None) is not None:
            shards.append(getattr(action, attr))
    shards += list(getattr(action, "targets", None) or ()) + list(getattr(action, "sources", None) or ())
    return {s.server for s in shards}


def _unreachable_targets(desired: Desired, observation: Observation, actions: list) -> list[Diagnostic]:
    """A plan that would change a server it cannot see is refused, not guessed."""
    out = []
    for server in sorted(set().union(*(_targets(a) for a in actions)) if actions else set()):
        live = observation.servers.get(server)
        if live is not None and not live.reachable:
            where = desired.where("servers", server) or Location(desired.files[0])
            out.append(
                Diagnostic(
                    where,
                    f"server {server!r} is unreachable, and the plan would change it: {live.error}",
                    "start it (`shardctl up` for embedded servers) or fix its connection settings",
                )
            )
    return out


def _unknown_metrics(desired: Desired, observation: Observation) -> list[str]:
    """Metrics that stay unknown on a server holding shards, why, and what that means for the
    detector: unknown never makes a shard hot, and a shard whose policy has a cold threshold on
    that metric can never be judged cold (merge candidates need every cold metric known)."""
    hosted: dict[str, set[str]] = {}
    for db in observation.catalog.databases.values():
        for shard in db.shards:
            if shard.state == "active":
                hosted.setdefault(shard.server, set()).add(db.name)
    out = []
    for name in sorted(hosted):
        live, spec = observation.servers.get(name), desired.servers.get(name)
        if live is None or spec is None or not live.reachable:
            continue
        for metric, why in sorted(checks.metric_gaps(name, spec, live).items()):
            never_cold = sorted(d for d in hosted[name] if d in desired.databases
                                and getattr(desired.databases[d].effective_policy.cold, metric, None) is not None)
            out.append(f"server.{name}: {metric} is unknown for its shards: {why}. Unknown never makes a shard hot"
                       + (f"; {', '.join(never_cold)} (a cold threshold on {metric}) can never be cold there"
                          if never_cold else ""))
    return out


def _failing_checks(desired: Desired, observation: Observation, actions: list) -> list[Diagnostic]:
    """A plan whose action would fail on a server for want of a privilege or a setting is refused
    before anything changes, naming the check and its fix (`shardctl doctor` shows them all)."""
    out, seen = [], set()
    leaving = frozenset(a.branch for a in actions if a.kind == "delete_branch")
    for action in actions:
        for server, purpose in needs(action, observation, leaving):
            for check in checks.failing(observation.servers.get(server), purpose):
                if (action.address, server, check.name) in seen:
                    continue
                seen.add((action.address, server, check.name))
                where = desired.where("servers", server) or Location(desired.files[0])
                out.append(Diagnostic(where, f"{action.address}: server {server!r} fails the check"
                                             f" {check.name!r} ({check.found})", f"{check.fix}"
                                             " (`shardctl doctor` checks every server)"))
    return out


def _change_location(desired: Desired, name: str, path: str) -> Location:
    """Where in the YAML a changed setting comes from: the database's own key, its threshold
    override, or the line of the policy it inherits the value from."""
    parts = path.split(".")
    if parts[0] != "policy":
        return _where(desired, name, parts[0])
    rest = tuple(parts[1:])
    override = desired.where("databases", name, "thresholds", *rest)
    if override:
        return override
    policy = desired.databases[name].policy_name
    return (desired.where("policies", policy, *rest) or desired.where("policies", policy)
            or _where(desired, name, "policy"))


def _create(db: DesiredDatabase, why: str, cause: Cause) -> CreateDatabase:
    ranges = even_ranges(db.spec.shards)
    placement = db.spec.placement
    shards = tuple(
        ShardSpec(name=r.name, lo=r.lo, hi=r.hi, server=placement[i % len(placement)], dbname=physical_name(db.name, r))
        for i, r in enumerate(ranges)
    )
    return CreateDatabase(
        database=db.name, key_column=db.spec.shard_key.column, key_type=db.spec.shard_key.type,
        settings=settings_of(db), shards=shards, steps=_steps(db), reason=Reason(cause=cause, text=why),
    )


def _resume_create(db: DesiredDatabase, recorded: CatalogDatabase) -> CreateDatabase:
    """An interrupted create finishes with the layout it already recorded, not a new one."""
    return CreateDatabase(
        database=db.name, key_column=recorded.key_column, key_type=recorded.key_type,  # type: ignore[arg-type]
        settings=settings_of(db), shards=tuple(_shard_spec(s) for s in recorded.shards), steps=_steps(db),
        reason=Reason(cause="resume", text=f"an earlier apply was interrupted while creating {db.name}; "
                      "finishing it (each step checks what already exists)"),
    )


def _changes(before: DatabaseSettings, after: DatabaseSettings) -> tuple[AttributeChange, ...]:
    if before == after:
        return ()
    from deepdiff import DeepDiff  # a plan of no change never needs it: imported when settings changed

    diff = DeepDiff(before.model_dump(mode="json"), after.model_dump(mode="json"), ignore_order=False,
                    verbose_level=2)
    out: list[AttributeChange] = []
    for kind, entries in diff.items():
        for path, value in entries.items():
            dotted = _dotted(path)
            if kind == "values_changed" or kind == "type_changes":
                out.append(AttributeChange(path=dotted, before=value["old_value"], after=value["new_value"]))
            elif kind in ("dictionary_item_added", "iterable_item_added"):
                out.append(AttributeChange(path=dotted, before=None, after=value))
            elif kind in ("dictionary_item_removed", "iterable_item_removed"):
                out.append(AttributeChange(path=dotted, before=value, after=None))
    # list-valued settings read better whole than item by item
    for name in ("placement", "reference_tables"):
        if getattr(before, name) != getattr(after, name):
            out = [c for c in out if not c.path.startswith(name)]
            out.append(AttributeChange(path=name, before=list(getattr(before, name)), after=list(getattr(after, name))))
    return tuple(sorted(out, key=lambda c: c.path))


def _dotted(path: str) -> str:
    # root['policy']['hot']['queries_per_second'] -> policy.hot.queries_per_second
    parts = re.findall(r"\['([^']*)'\]|\[(\d+)\]", path)
    return ".".join(a if a else f"[{b}]" for a, b in parts).replace(".[", "[")


def _schema_diff(recorded: dict[str, Any], live: dict[str, Any]) -> tuple[str, ...]:
    from deepdiff import DeepDiff

    diff = DeepDiff(recorded, live, verbose_level=2)
    lines = []
    for kind, entries in diff.items():
        for path, value in entries.items():
            dotted = _dotted(path).removeprefix("tables.")
            if kind == "dictionary_item_added":
                lines.append(f"+ {dotted}" + (f": {value}" if isinstance(value, str) else ""))
            elif kind == "dictionary_item_removed":
                lines.append(f"- {dotted}" + (f": {value}" if isinstance(value, str) else ""))
            elif kind in ("values_changed", "type_changes"):
                lines.append(f"~ {dotted}: {value['old_value']} -> {value['new_value']}")
            else:
                lines.append(f"~ {dotted}")
    return tuple(sorted(lines))


_SLUG = re.compile(r"^(?P<db>[a-z][a-z0-9_]*)_(?P<lo>min|[0-9a-f]{2,16})_(?P<hi>max|[0-9a-f]{2,16})$")


def _unmanaged(desired: Desired, observation: Observation) -> list[Drift]:
    """Databases on our servers named like shards of a declared database, but not in the catalog."""
    known = {(s.server, s.dbname) for d in observation.catalog.databases.values() for s in d.shards}
    out = []
    for server in observation.servers.values():
        for dbname in server.databases:
            match = _SLUG.match(dbname)
            if not match or (server.name, dbname) in known:
                continue
            if match.group("db") in desired.databases or match.group("db") in observation.catalog.databases:
                out.append(Drift(address=f"server.{server.name}/{dbname}", kind="unmanaged",
                                 summary=f"looks like a shard of {match.group('db')} but is not in the catalog",
                                 details=("shardctl leaves it alone; drop it or move its rows by hand",)))
    return out
