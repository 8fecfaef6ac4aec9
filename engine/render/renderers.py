"""Render a plan as text, markdown or JSON. Same plan in, same bytes out.

Text and markdown are jinja2 templates over `render.view`; JSON is the plan model itself plus
a computed summary, with sorted keys. Colour is ANSI, on when asked and NO_COLOR is unset.
"""

from __future__ import annotations

import contextlib
import json
from functools import cache
from pathlib import Path

import jinja2

from engine.plan.models import Plan
from engine.render.view import view

_ANSI = {"bold": "1", "green": "32", "yellow": "33", "red": "31", "cyan": "36"}
_SIGN_COLOURS = {"+": "green", "~": "yellow", "-": "red", "-/+": "red"}


class _CompiledTemplates(jinja2.FileSystemBytecodeCache):
    """Templates compiled once and kept between runs, in jinja2's own per-user cache directory
    (mode 0700, its owner checked; an entry is used only for the same template source): every
    `plan` would otherwise parse and compile them again at start-up. A cache that cannot be
    written is no cache, never an error."""

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        with contextlib.suppress(OSError):
            super().dump_bytecode(bucket)


@cache
def _compiled() -> jinja2.BytecodeCache | None:
    try:
        return _CompiledTemplates()
    except (OSError, RuntimeError):  # no safe directory of this user's: compile every time
        return None


def _environment(colour: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
        bytecode_cache=_compiled(),
    )

    def paint(text: str, name: str) -> str:
        return f"\x1b[{_ANSI[name]}m{text}\x1b[0m" if colour else text

    for name in _ANSI:
        env.filters[name] = lambda text, _n=name: paint(str(text), _n)
    env.filters["sign"] = lambda s: paint(s, _SIGN_COLOURS[s]) if s in _SIGN_COLOURS else s
    env.filters["mdcell"] = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    return env


def render_text(plan: Plan, colour: bool = False) -> str:
    out = _environment(colour).get_template("plan.txt.j2").render(v=view(plan))
    return out.strip("\n") + "\n"


GITHUB_COMMENT_LIMIT = 65_535  # bytes GitHub accepts in one comment


def render_markdown(plan: Plan, limit: int = GITHUB_COMMENT_LIMIT) -> str:
    """A pull-request comment. When the whole plan would not fit in `limit` bytes, the detail
    sections go first (from the end, so destructive ones stay), then summary rows, and a note
    says what was left out and how to see it all."""
    template = _environment(False).get_template("plan.md.j2")
    full = view(plan)

    def render_with(details: int, rows: int) -> str:
        v = view(plan)
        v.detail_blocks = full.blocks[:details]
        v.row_blocks = full.blocks[:rows]
        left = len(full.blocks) - details
        cut_rows = len(full.blocks) - rows
        if left or cut_rows:
            v.omitted = (f"This comment is cut to fit GitHub's {limit:,}-byte limit: {left} of {len(full.blocks)}"
                         f" action details" + (f" and {cut_rows} summary rows" if cut_rows else "") +
                         " are left out. Run `shardctl plan` (or `shardctl show` on the saved plan) for all of it.")
        return template.render(v=v).strip("\n") + "\n"

    n = len(full.blocks)
    text = render_with(n, n)
    if len(text.encode()) <= limit:
        return text
    lo, hi = 0, n  # the most detail sections that fit with every summary row
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render_with(mid, n).encode()) <= limit:
            lo = mid
        else:
            hi = mid - 1
    if len(render_with(lo, n).encode()) <= limit:
        return render_with(lo, n)
    lo_rows, hi_rows = 0, n
    while lo_rows < hi_rows:
        mid = (lo_rows + hi_rows + 1) // 2
        if len(render_with(0, mid).encode()) <= limit:
            lo_rows = mid
        else:
            hi_rows = mid - 1
    return render_with(0, lo_rows)


def plan_document(plan: Plan) -> dict:
    doc = plan.model_dump(mode="json")
    doc["summary"] = plan.summary.model_dump(mode="json")
    doc["has_changes"] = plan.has_changes
    for action, model in zip(doc["actions"], plan.actions, strict=True):
        action["address"] = model.address
    return doc


def render_json(plan: Plan) -> str:
    # strict JSON: samples are cleaned of NaN and infinities on the way in, and config refuses them,
    # so a non-finite number here is a bug to see, not a document to hand to a strict parser
    return json.dumps(plan_document(plan), indent=2, sort_keys=True, allow_nan=False) + "\n"


def render(plan: Plan, fmt: str, colour: bool = False) -> str:
    if fmt == "text":
        return render_text(plan, colour)
    if fmt == "markdown":
        return render_markdown(plan)
    if fmt == "json":
        return render_json(plan)
    raise ValueError(f"unknown format {fmt!r}")


def render_markdown_error(error) -> str:
    """A refused plan, as the same pull-request comment (same marker, so it replaces the last)."""
    body = error.render().replace("```", "'''")
    return ("<!-- shardctl-plan -->\n### shardctl plan: refused\n\n"
            "The plan could not be made, so nothing would be changed:\n\n"
            f"```text\n{body}\n```\n")
