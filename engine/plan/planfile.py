"""Saved plans: `plan -out FILE` writes the plan as its versioned JSON; `apply FILE` reads it."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from engine.errors import UserError
from engine.plan.models import FORMAT_VERSION, Plan


def save(plan: Plan, path: str | Path) -> None:
    Path(path).write_text(plan.model_dump_json(indent=2) + "\n", encoding="utf-8")


def load(path: str | Path) -> Plan:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no plan file at {path}", "create one with `shardctl plan -out FILE`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a shardctl plan file: {exc}") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a shardctl plan file of format version {FORMAT_VERSION}",
                        "plan again with this version of shardctl")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path} is not a valid shardctl plan file",
                        "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:10])) from None
