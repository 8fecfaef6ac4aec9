"""The plan as something to read: one block per action, built from the plan model alone.

Every renderer (text, markdown) lays out these blocks with a jinja2 template; this module only
decides what each kind of action shows. It never imports the database layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.observe.metrics import UNITS
from engine.plan.models import (
    ApplySchema,
    CreateBranch,
    CreateDatabase,
    DeleteBranch,
    DestroyDatabase,
    DropRetiredShard,
    MergeBranchSchema,
    MergeShards,
    MoveShard,
    Plan,
    RecreateShard,
    RenameDatabase,
    ResetBranch,
    SplitShard,
    UpdateBranch,
    UpdateDatabase,
    size_text,
)

SIGNS = {"create": "+", "update": "~", "delete": "-", "replace": "-/+"}
VERBS = {"create": "created", "update": "updated in-place", "delete": "destroyed", "replace": "replaced"}
LEGEND = {
    "create": "create",
    "update": "update in-place",
    "delete": "destroy",
    "replace": "destroy and then create replacement",
}
KIND_WORDS = {
    "create_database": ("database to create", "databases to create"),
    "destroy_database": ("database to destroy", "databases to destroy"),
    "apply_schema": ("schema change", "schema changes"),
    "update_database": ("settings update", "settings updates"),
    "recreate_shard": ("shard to recreate", "shards to recreate"),
    "split_shard": ("split", "splits"),
    "merge_shards": ("merge", "merges"),
    "move_shard": ("move", "moves"),
    "drop_retired_shard": ("retired shard to drop", "retired shards to drop"),
    "create_branch": ("branch to create", "branches to create"),
    "delete_branch": ("branch to delete", "branches to delete"),
    "merge_branch_schema": ("branch schema merge", "branch schema merges"),
    "rename_database": ("database to rename", "databases to rename"),
    "reset_branch": ("branch to reset", "branches to reset"),
    "update_branch": ("branch settings update", "branch settings updates"),
}
WHAT_IF_WORDS = {"now_split": "would now be split", "no_longer_split": "would no longer be split",
                 "now_merge": "would now be a merge candidate",
                 "no_longer_merge": "would no longer be a merge candidate"}
VERBS_BY_KIND = {"split_shard": "split", "merge_shards": "merged", "move_shard": "moved", "reset_branch": "reset"}


@dataclass
class Line:
    sign: str
    text: str


@dataclass
class Block:
    address: str
    symbol: str
    sign: str
    verb: str
    title: str
    reason: str
    cause: str
    lines: list[Line] = field(default_factory=list)
    hidden: int = 0


def _value(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _shard_lines(sign: str, shards) -> list[Line]:
    width = max((len(s.name) for s in shards), default=0) + 2
    return [Line(sign, f"shard {json.dumps(s.name).ljust(width)} on {s.server} ({s.dbname})") for s in shards]


def _step_lines(sign: str, steps) -> list[Line]:
    return [Line(sign, f"schema step {s.seq}: {s.name} (sha256 {s.sha256[:12]})") for s in steps]


def _create_database(a: CreateDatabase) -> list[Line]:
    lines = [Line("+", f"shard_key = {a.key_column} ({a.key_type})"), Line("+", f"shards    = {len(a.shards)}")]
    lines += _shard_lines("+", a.shards)
    lines += _step_lines("+", a.steps)
    lines += [
        Line("+", f"policy    = {a.settings.policy_name}"),
        Line("+", f"protect   = {_value(a.settings.protect)}"),
    ]
    return lines


def _destroy_database(a: DestroyDatabase) -> list[Line]:
    lines = _shard_lines("-", a.shards)
    if a.holdings:
        lines = [
            Line(line.sign, f"{line.text}: {a.holdings[s.name].describe()}" if s.name in a.holdings else line.text)
            for line, s in zip(lines, a.shards, strict=False)
        ]
    return lines


def _rename_database(a: RenameDatabase) -> list[Line]:
    return [Line("~", f"name = {json.dumps(a.from_name)} -> {json.dumps(a.database)}"),
            Line(" ", f"{len(a.shards)} shard{'s' if len(a.shards) != 1 else ''} keep their databases and rows"
                 f" ({', '.join(s.dbname for s in a.shards)})")]


def _apply_schema(a: ApplySchema) -> list[Line]:
    lines = _step_lines("+", a.steps)
    for step in a.steps:
        for sql_line in step.sql.strip().splitlines():
            lines.append(Line(" ", "    " + sql_line.rstrip()))
    lines.append(Line(" ", f"on {len(a.shards)} shard{'s' if len(a.shards) != 1 else ''}, one transaction each"))
    return lines


def _update_database(a: UpdateDatabase) -> list[Line]:
    width = max(len(c.path) for c in a.changes)
    return [Line("~", f"{c.path.ljust(width)} = {_value(c.before)} -> {_value(c.after)}") for c in a.changes]


def _recreate_shard(a: RecreateShard) -> list[Line]:
    return _shard_lines("+", [a.shard]) + _step_lines("+", a.steps)


def _evidence_lines(evidence) -> list[Line]:
    return [Line("#", e.describe()) for e in evidence]


def _split_shard(a: SplitShard) -> list[Line]:
    lines = [
        Line("-", f"shard {json.dumps(a.source.name)} on {a.source.server} ({a.source.dbname}), retired after cutover")
    ]
    lines += _shard_lines("+", a.targets)
    lines.append(Line(" ", "automatic = " + ("true (the daemon may apply it on its own)" if a.automatic
                                             else "false (needs a person's apply)")))
    return lines + _evidence_lines(a.evidence) + _forecast_lines(a)


def _forecast_lines(a: SplitShard) -> list[Line]:
    """A forecast split's case: the forecast, its band, the crossing, the history it was fitted
    on, the hourly values ahead, and the lead time."""
    f = a.forecast
    if f is None:
        return []
    lines = []
    if f.threshold is not None:
        told = f.describe(f.threshold, UNITS.get(f.metric, ""), f.judged_at or f.start)
        lines.append(Line("#", f"{f.shard}: {told}"))
    ahead = ", ".join(f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" for v in f.values[:24])
    lines.append(Line("#", f"next {min(24, len(f.values))} hours from {f.start.strftime('%Y-%m-%dT%H:%MZ')}:"
                           f" {ahead} (+- {f.band:.3g})"))
    if a.lead_time:
        lines.append(Line("#", f"lead time: {a.lead_time}"))
    return lines


def _merge_shards(a: MergeShards) -> list[Line]:
    lines = [
        Line("-", f"shard {json.dumps(s.name)} on {s.server} ({s.dbname}), retired after cutover") for s in a.sources
    ]
    lines += _shard_lines("+", [a.target])
    lines.append(Line(" ", "automatic = " + ("true (the daemon may apply it on its own)" if a.automatic
                                             else "false (needs a person's apply)")))
    return lines + _evidence_lines(a.evidence)


def _branch_data(a: CreateBranch | ResetBranch) -> str:
    if a.data == "backup":
        servers = ", ".join(sorted({s.server for s in a.shards}))
        return f"backup at {a.at}: its shards then, restored by Barman from the backups of {servers}"
    return f"sample of {a.sample_percent:g}% of shard keys" if a.data == "sample" else a.data


def _move_shard(a: MoveShard) -> list[Line]:
    lines = [Line("~", f"server = {a.source.server} -> {a.target.server} ({a.target.dbname})"),
             Line(" ", f"the copy on {a.source.server} is retired after cutover")]
    return lines + [Line("#", f"{b.server}: {size_text(b.before_bytes)} in {b.before_shards} shards ->"
                              f" {size_text(b.after_bytes)} in {b.after_shards} (target {size_text(b.target_bytes)})")
                    for b in a.balance]


def _create_branch(a: CreateBranch) -> list[Line]:
    days = a.ttl_seconds / 86400
    ttl = f"{days:g} days" if days >= 1 else f"{a.ttl_seconds:g}s"
    return [Line("+", f"from      = {a.database} ({len(a.shards)} shards)"),
            Line("+", f"data      = {_branch_data(a)}"), Line("+", f"server    = {a.server} ({a.dbname})"),
            Line("+", f"ttl       = {ttl}" + ("" if a.ttl_declared else " (the default: no ttl declared)"))]


def _reset_branch(a: ResetBranch) -> list[Line]:
    return [Line("~", f"data      = {_branch_data(a)}, made again from {a.database} ({len(a.shards)} shards)"),
            Line(" ", f"server    = {a.server} ({a.dbname}): same name, connection string and expiry"),
            Line("-", "the branch's own rows and schema changes")]


def _merge_branch_schema(a: MergeBranchSchema) -> list[Line]:
    lines = [Line("+", s) for s in a.statements]
    lines += [Line("#", f"lint ({severity}): {finding}: {statement}") for severity, statement, finding in a.findings]
    lines.append(Line(" ", f"on {len(a.shards)} shards of {a.database}, one transaction each"))
    return lines


def _delete_branch(a: DeleteBranch) -> list[Line]:
    lines = [Line("-", f"server    = {a.server} ({a.dbname})")]
    if a.holding is not None and a.holding.may_hold_rows:
        lines.append(Line("-", f"data      = {a.holding.describe()}"))
    return lines


def _drop_retired(a: DropRetiredShard) -> list[Line]:
    return _shard_lines("-", [a.shard])


_TITLES: dict[type, Callable[[Any], str]] = {
    CreateDatabase: lambda a: f'database "{a.database}"',
    DestroyDatabase: lambda a: f'database "{a.database}"',
    ApplySchema: lambda a: f'schema "{a.database}"',
    UpdateDatabase: lambda a: f'database "{a.database}"',
    RecreateShard: lambda a: f'shard "{a.database}/{a.shard.name}"',
    SplitShard: lambda a: f'shard "{a.database}/{a.source.name}"',
    MergeShards: lambda a: f'shards "{a.database}/{a.sources[0].name}" + "{a.database}/{a.sources[-1].name}"',
    MoveShard: lambda a: f'shard "{a.database}/{a.source.name}"',
    DropRetiredShard: lambda a: f'retired shard "{a.database}/{a.shard.name}"',
    CreateBranch: lambda a: f'branch "{a.branch}"',
    ResetBranch: lambda a: f'branch "{a.branch}"',
    DeleteBranch: lambda a: f'branch "{a.branch}"',
    UpdateBranch: lambda a: f'branch "{a.branch}"',
    MergeBranchSchema: lambda a: f'schema of branch "{a.branch}" into "{a.database}"',
    RenameDatabase: lambda a: f'database "{a.database}"',
}
_LINES: dict[type, Callable[[Any], list[Line]]] = {
    CreateDatabase: _create_database,
    DestroyDatabase: _destroy_database,
    ApplySchema: _apply_schema,
    UpdateDatabase: _update_database,
    RecreateShard: _recreate_shard,
    SplitShard: _split_shard,
    MergeShards: _merge_shards,
    MoveShard: _move_shard,
    DropRetiredShard: _drop_retired,
    CreateBranch: _create_branch,
    ResetBranch: _reset_branch,
    DeleteBranch: _delete_branch,
    UpdateBranch: _update_database,  # the same `~ path = a -> b` lines
    MergeBranchSchema: _merge_branch_schema,
    RenameDatabase: _rename_database,
}


def block(action) -> Block:
    kind = type(action)
    if kind not in _LINES:
        raise TypeError(f"no renderer for action kind {kind.__name__}")
    hidden = 0
    if isinstance(action, UpdateDatabase):
        hidden = max(0, _setting_count(action) - len(action.changes))
    return Block(address=action.address, symbol=action.symbol, sign=SIGNS[action.symbol],
                 verb=VERBS_BY_KIND.get(action.kind, VERBS[action.symbol]), title=_TITLES[kind](action),
                 reason=action.reason.text,
                 cause=action.reason.cause, lines=_LINES[kind](action), hidden=hidden)


def _setting_count(action: UpdateDatabase) -> int:
    def leaves(v: Any) -> int:
        return sum(leaves(x) for x in v.values()) if isinstance(v, dict) else 1

    return leaves(action.settings.model_dump(mode="json"))


@dataclass
class PlanView:
    blocks: list[Block]
    legend: list[tuple[str, str]]
    summary_line: str
    headline: str
    plan: Plan
    what_if: list[Block] = field(default_factory=list)
    what_if_title: str = ""
    what_if_footer: str = ""
    what_if_backtest: tuple[str, ...] = ()
    detail_blocks: list[Block] | None = None  # markdown may show fewer sections than blocks
    row_blocks: list[Block] | None = None
    omitted: str = ""


def _what_if(plan: Plan) -> tuple[list[Block], str, str]:
    w = plan.what_if
    if w is None:
        return [], "", ""
    title = f"Policy what-if: the same load ({w.metrics_source}) judged under {w.baseline} and under this configuration"
    blocks = [
        Block(
            address=c.address,
            symbol="create" if c.change.startswith("now") else "delete",
            sign="+" if c.change.startswith("now") else "-",
            verb=WHAT_IF_WORDS[c.change],
            title="",
            reason=f"under the {'proposed' if c.under == 'proposed' else 'baseline'} policy",
            cause="load",
            lines=_evidence_lines(c.evidence),
        )
        for c in w.changes
    ]
    footer = (
        f"{len(w.changes)} shard verdict{'s' if len(w.changes) != 1 else ''} change; {w.hot_both} shard"
        f"{'s' if w.hot_both != 1 else ''} hot and {w.cold_both} cold under both"
    )
    return blocks, title, footer


def view(plan: Plan) -> PlanView:
    blocks = [block(a) for a in plan.actions]
    used = []
    for symbol in ("create", "update", "delete", "replace"):
        if any(b.symbol == symbol for b in blocks):
            meaning = LEGEND[symbol]
            if symbol == "replace":
                meaning = "replace (split or merge: new shards take over the range, then the old ones retire)"
            used.append((SIGNS[symbol], meaning))
    s = plan.summary
    summary_line = f"Plan: {s.add} to add, {s.change} to change, {s.destroy} to destroy."
    parts = []
    for kind in ("destroy_database", "delete_branch", "drop_retired_shard", "merge_shards", "split_shard",
                 "move_shard", "recreate_shard", "create_database", "apply_schema", "merge_branch_schema",
                 "update_database", "create_branch", "reset_branch", "rename_database"):
        n = s.by_kind.get(kind, 0)
        if n:
            one, many = KIND_WORDS[kind]
            parts.append(f"{n} {one if n == 1 else many}")
    headline = ", ".join(parts)
    what_if, title, footer = _what_if(plan)
    return PlanView(blocks=blocks, legend=used, summary_line=summary_line, headline=headline, plan=plan,
                    what_if=what_if, what_if_title=title, what_if_footer=footer,
                    what_if_backtest=plan.what_if.backtest if plan.what_if else ())
