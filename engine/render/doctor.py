"""The doctor's report as text or JSON, from the checks alone (no database here)."""

from __future__ import annotations

import json

from engine.plan.checks import Check

PURPOSES = {  # what each purpose of engine/plan/checks.py is, as engine/plan/needs.py declares them
    "shard": "new shards and branches",
    "move_source": "splits, merges and moves (as their source)",
    "move_target": "splits, merges and moves (as their target)",
    "replica_source": "replicas (on each shard's server)",
    "replica_target": "replicas (on the replica's server)",
    "replica_follow": "replicas following splits, merges and moves",
    "replica_unlink": "deleting a replica (its slots on the shards' servers)",
}
MARKS = {"ok": "✓", "warn": "!", "FAIL": "✗"}


def failed(report: dict[str, list[Check]]) -> int:
    return sum(1 for checks in report.values() for c in checks if c.mark == "FAIL")


def text(report: dict[str, list[Check]]) -> str:
    lines = []
    warnings = 0
    for server, checks in sorted(report.items()):
        lines.append(f"server {server}")
        width = max(len(c.name) for c in checks)
        for c in checks:
            lines.append(f"  {MARKS[c.mark]} {c.name:<{width}}  {c.found}")
            if c.mark != "ok":
                warnings += c.mark == "warn"
                if c.fix:
                    lines.append(f"    {' ' * width}  fix: {c.fix}")
                if c.needed_by:
                    lines.append(f"    {' ' * width}  needed by: {', '.join(PURPOSES[p] for p in c.needed_by)}")
        lines.append("")
    bad = failed(report)
    lines.append(f"Doctor: {bad} check{'s' if bad != 1 else ''} failed,"
                 f" {warnings} warning{'s' if warnings != 1 else ''}"
                 f" on {len(report)} server{'s' if len(report) != 1 else ''}."
                 + (" Plans refuse the actions that need a failed check." if bad else ""))
    return "\n".join(lines) + "\n"


def as_json(report: dict[str, list[Check]]) -> str:
    return json.dumps({"servers": {name: [c.model_dump(mode="json") | {"mark": c.mark} for c in checks]
                                   for name, checks in sorted(report.items())},
                       "failed": failed(report)}, indent=2, sort_keys=True) + "\n"
