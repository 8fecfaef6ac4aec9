"""Saved plans: `plan -out FILE` writes the plan as its versioned JSON; `apply FILE` reads it.

The file is written atomically (engine.files) and read bounded: a regular file of at most
MAX_PLAN_BYTES, nested at most MAX_JSON_DEPTH levels. A plan of another format version is
refused with the hint to plan again: what it records (since version 3, the fleet it was made
for) is what apply checks before anything runs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from engine.errors import UserError
from engine.files import MAX_PLAN_BYTES, load_json, write_atomically
from engine.plan.models import FORMAT_VERSION, Plan


def save(plan: Plan, path: str | Path) -> None:
    write_atomically(path, plan.model_dump_json(indent=2) + "\n", "plan")


def load(path: str | Path) -> Plan:
    if not Path(path).exists() and not Path(path).is_symlink():
        raise UserError(f"no plan file at {path}", "create one with `shardctl plan -out FILE`")
    data = load_json(path, "plan file", MAX_PLAN_BYTES)
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{path} is not a shardctl plan file", "create one with `shardctl plan -out FILE`")
    if version != FORMAT_VERSION:
        older = version < FORMAT_VERSION
        raise UserError(f"{path} is a plan of format version {version}; this shardctl applies version"
                        f" {FORMAT_VERSION} only",
                        "plan again with this version of shardctl (`shardctl plan -out FILE`)" if older else
                        "it was saved by a newer shardctl: apply it with that version, or plan again with this one")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path} is not a valid shardctl plan file",
                        "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:10])) from None
