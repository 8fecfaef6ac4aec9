"""What a saved plan was made for, and its refusal anywhere else or after the YAML changed.

A plan records (engine.plan.models.PlanFleet):

- the fleet: the catalog's identity, a UUID its first migration to V10_OWNERSHIP made. Two fleets
  planned from one repository (staging/ and prod/) can share every name and even the serial;
  they never share it. This is Terraform's state lineage.
- how the YAML declared everything the plan acts on: the catalog's place, every server an
  action touches (how it is reached: embedded, a dsn_env variable, a service by digest), every
  database it acts on (shard key, schema steps, placement, protection, the effective policy
  with its moves settings and retire grace) and every branch. A thing the plan removes is
  recorded as not declared. `config_digest` sums them up.

`apply FILE` checks both before it starts or writes anything (`check_declared` before the
servers are started, `check_fleet` once the catalog is open, before it is migrated) and
refuses, naming each difference: a server since removed (the plan would die halfway through),
a setting since changed (the plan would run with values nobody reviewed), another fleet's
catalog. Planning again shows what applies now.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from engine.config import models
from engine.config.loader import Desired
from engine.errors import UserError
from engine.plan.models import Declared, PlanFleet


class ForeignPlan(UserError):
    """The plan was made for another fleet (another catalog)."""

    def __init__(self, detail: str):
        super().__init__(
            "Saved plan does not match this fleet",
            "The given plan file can not be applied because it was made for another fleet: " + detail + ".\n"
            "Nothing was changed. Plan this fleet (`shardctl -C DIR plan -out FILE`) and apply that plan.")


class ChangedSincePlanned(UserError):
    """The YAML no longer declares what the plan acts on as it did when the plan was made."""

    def __init__(self, differences: list[str]):
        super().__init__(
            "Saved plan does not match the configuration",
            "The given plan file can no longer be applied because the configuration changed after the plan\n"
            "was created: what the plan acts on is not declared as it was.\n\n"
            + "\n".join(f"  - {d}" for d in differences)
            + "\n\nNothing was changed. Run `shardctl plan -out FILE` again and review the new plan.")


# ---------------------------------------------------------------------------- what the YAML declares


def server_declaration(spec: models.Server) -> dict[str, Any]:
    """How a server is reached, without a secret (a service name may be a pasted DSN: digested)."""
    if spec.embedded:
        return {"embedded": True}
    if spec.dsn_env is not None:
        return {"dsn_env": spec.dsn_env}
    return {"service": "sha256:" + hashlib.sha256((spec.service or "").encode()).hexdigest()[:16]}


def database_declaration(desired: Desired, name: str) -> dict[str, Any] | None:
    db = desired.databases.get(name)
    if db is None:
        return None
    return {
        "shard_key": {"column": db.spec.shard_key.column, "type": db.spec.shard_key.type},
        "schema": [{"name": s.name, "sha256": s.sha256} for s in db.schema_steps],
        "shards": db.spec.shards,
        "placement": list(db.spec.placement),
        "protect": db.spec.protect,
        "policy_name": db.policy_name,
        "policy": db.effective_policy.model_dump(mode="json"),
    }


def _declaration(desired: Desired, kind: str, name: str) -> dict[str, Any] | None:
    if kind == "catalog":
        return {"server": desired.catalog_server, "database": desired.catalog_database}
    if kind == "server":
        spec = desired.servers.get(name)
        return server_declaration(spec) if spec is not None else None
    if kind == "database":
        return database_declaration(desired, name)
    branch = desired.branches.get(name)
    return branch.model_dump(mode="json", by_alias=True) if branch is not None else None


def _servers_in(value: Any, found: set[str]) -> None:
    """Every `server` named anywhere in an action (its shards, targets, branch, replica)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "server" and isinstance(item, str):
                found.add(item)
            else:
                _servers_in(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _servers_in(item, found)


def acted_on(actions) -> set[tuple[str, str]]:
    """(kind, name) of every server, database and branch the actions touch."""
    servers: set[str] = set()
    out: set[tuple[str, str]] = set()
    for action in actions:
        _servers_in(action.model_dump(mode="json"), servers)
        out.add(("database", action.database))
        for attr, kind in (("from_name", "database"), ("branch", "branch")):
            if getattr(action, attr, None):
                out.add((kind, getattr(action, attr)))
    return out | {("server", s) for s in servers}


def digest(declared: tuple[Declared, ...]) -> str:
    text = json.dumps([d.model_dump(mode="json") for d in declared], sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def record(desired: Desired, fleet_id: str | None, actions) -> PlanFleet:
    """What a plan of these actions depends on, as `desired` declares it now."""
    keys = sorted({("catalog", "catalog"), *acted_on(actions)})
    declared = tuple(Declared(kind=kind, name=name, value=_declaration(desired, kind, name))  # type: ignore[arg-type]
                     for kind, name in keys)
    return PlanFleet(fleet_id=fleet_id, config_digest=digest(declared), declared=declared)


# ---------------------------------------------------------------------------- the checks at apply


def check_declared(fleet: PlanFleet | None, actions, desired: Desired) -> None:
    """Refuse a plan whose servers, databases, branches or settings the YAML no longer declares
    as they were when it was planned, naming each difference. Runs before anything is started."""
    if fleet is None:
        raise UserError("the saved plan does not say which fleet it was made for",
                        "plan again with this version of shardctl (`shardctl plan -out FILE`)")
    recorded = {(d.kind, d.name): d.value for d in fleet.declared}
    differences = []
    for kind, name in sorted(acted_on(actions) - set(recorded)):
        # only a file changed after it was saved names what its own record does not
        differences.append(f"{kind} {name}: an action of the plan names it, but the plan does not record how it was"
                           " declared (was the file edited?)" + ("" if _declaration(desired, kind, name) is not None
                                                                  else "; it is not declared now either"))
    if fleet.config_digest != digest(fleet.declared):
        differences.append("the plan's record of the configuration does not match its digest (was the file edited?)")
    for (kind, name), before in sorted(recorded.items()):
        now = _declaration(desired, kind, name)
        if now == before:
            continue
        label = "catalog" if kind == "catalog" else f"{kind} {name}"
        where = _where(desired, kind, name)
        if now is None:
            differences.append(f"{label}: no longer declared; the plan acts on it")
        elif before is None:
            differences.append(f"{label}: declared now{where}, and was not when the plan was made (the plan"
                               " removes it)")
        else:
            changes = _differences(before, now)
            shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            differences.append(f"{label}{where}: {shown}")
    if differences:
        raise ChangedSincePlanned(differences)


def check_fleet(fleet: PlanFleet | None, found_id: str | None, catalog: str) -> None:
    """Refuse a plan made for another fleet: its catalog's identity is not this catalog's.
    A plan made before its fleet's catalog had an identity (none yet, or one made by an older
    shardctl) records none; the serial check then stands alone, as before."""
    if fleet is None:
        raise UserError("the saved plan does not say which fleet it was made for",
                        "plan again with this version of shardctl (`shardctl plan -out FILE`)")
    if fleet.fleet_id is not None and fleet.fleet_id != found_id:
        raise ForeignPlan(f"it belongs to fleet {fleet.fleet_id}, and this fleet's catalog ({catalog}) is "
                          + (f"fleet {found_id}" if found_id else "no fleet's yet (never applied by this shardctl)"))


def _where(desired: Desired, kind: str, name: str) -> str:
    at = (desired.where("catalog") if kind == "catalog" else
          desired.where({"server": "servers", "database": "databases", "branch": "branches"}[kind], name))
    return f" ({at})" if at else ""


def _differences(before: Any, after: Any, path: str = "") -> list[str]:
    """Leaf by leaf: `policy.moves.copy_streams: 1 when planned, 4 now`."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in after:
                out.append(f"{sub}: {_shown(before[key])} when planned, not declared now")
            elif key not in before:
                out.append(f"{sub}: not in the plan, {_shown(after[key])} now")
            elif before[key] != after[key]:
                out.extend(_differences(before[key], after[key], sub))
        return out
    return [f"{path or 'declaration'}: {_shown(before)} when planned, {_shown(after)} now"]


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
