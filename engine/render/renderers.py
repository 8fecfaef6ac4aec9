"""Render a plan as text, markdown or JSON. Same plan in, same bytes out.

Text and markdown are jinja2 templates over `render.view`; JSON is the plan model itself plus
a computed summary, with sorted keys. Colour is ANSI, on when asked and NO_COLOR is unset.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2

from engine.plan.models import Plan
from engine.render.view import view

_ANSI = {"bold": "1", "green": "32", "yellow": "33", "red": "31", "cyan": "36"}
_SIGN_COLOURS = {"+": "green", "~": "yellow", "-": "red", "-/+": "red"}


def _environment(colour: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
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


def render_markdown(plan: Plan) -> str:
    out = _environment(False).get_template("plan.md.j2").render(v=view(plan))
    return out.strip("\n") + "\n"


def plan_document(plan: Plan) -> dict:
    doc = plan.model_dump(mode="json")
    doc["summary"] = plan.summary.model_dump(mode="json")
    doc["has_changes"] = plan.has_changes
    for action, model in zip(doc["actions"], plan.actions):
        action["address"] = model.address
    return doc


def render_json(plan: Plan) -> str:
    return json.dumps(plan_document(plan), indent=2, sort_keys=True) + "\n"


def render(plan: Plan, fmt: str, colour: bool = False) -> str:
    if fmt == "text":
        return render_text(plan, colour)
    if fmt == "markdown":
        return render_markdown(plan)
    if fmt == "json":
        return render_json(plan)
    raise ValueError(f"unknown format {fmt!r}")
