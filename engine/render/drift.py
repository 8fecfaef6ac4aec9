"""A drift report: the plan's findings sorted by cause, for CI checks; built from the plan alone.

Causes, kept apart: the configuration changed (the YAML says something the fleet is not), what
the configuration asks for and waits (a grace period, a cooldown: the fleet does not match it
yet, and a later plan does it), the fleet changed outside shardctl (shards dropped or altered
by hand, look-alike databases, unreachable servers), and load-driven actions pending (hot or
cold shards, storage grown unevenly). All but the last are drift; the last is reported but is
not drift, since no one changed anything.
"""

from __future__ import annotations

import json
from typing import Literal

from engine.frozen import Frozen
from engine.plan.models import LOAD_CAUSES, Plan
from engine.render.view import VERBS, VERBS_BY_KIND


class Finding(Frozen):
    address: str
    summary: str


class DriftReport(Frozen):
    format_version: int = 1
    status: Literal["ok", "drifted"]
    config: tuple[Finding, ...]
    outside: tuple[Finding, ...]
    load: tuple[Finding, ...]
    interrupted: tuple[Finding, ...]
    based_on_serial: int
    waiting: tuple[Finding, ...] = ()

    @property
    def drifted(self) -> bool:
        return self.status == "drifted"


def report(plan: Plan) -> DriftReport:
    def finding(action) -> Finding:
        verb = VERBS_BY_KIND.get(action.kind, VERBS[action.symbol])
        return Finding(address=action.address, summary=f"will be {verb}: {action.reason.text}")

    config = tuple(finding(a) for a in plan.actions if a.reason.cause == "config")
    load = tuple(finding(a) for a in plan.actions if a.reason.cause in LOAD_CAUSES)
    interrupted = tuple(finding(a) for a in plan.actions if a.reason.cause == "resume")
    outside = tuple(Finding(address=d.address, summary=d.summary + ("".join(f"; {x}" for x in d.details)))
                    for d in plan.drift)
    waiting = tuple(Finding(address=w.address, summary=(f"waits until {w.until.strftime('%Y-%m-%dT%H:%M:%SZ')}: "
                                                         if w.until else "waits: ") + w.reason)
                    for w in plan.waiting)
    drifted = bool(config or outside or interrupted or waiting)
    return DriftReport(status="drifted" if drifted else "ok", config=config, outside=outside, load=load,
                       interrupted=interrupted, based_on_serial=plan.based_on_serial, waiting=waiting)


def render_text(r: DriftReport) -> str:
    lines = [f"Drift Status: {'DRIFTED' if r.drifted else 'OK'}", ""]
    sections = [
        ("The configuration changed (apply would change the fleet)", r.config),
        ("The configuration is not reached yet (a later plan does it)", r.waiting),
        ("The fleet changed outside shardctl", r.outside),
        ("Interrupted operations (apply finishes them)", r.interrupted),
        ("Load-driven actions pending (not drift)", r.load),
    ]
    for title, findings in sections:
        lines.append(f"{title}: {len(findings)}")
        lines += [f"  # {f.address} {f.summary}" for f in findings]
    return "\n".join(lines) + "\n"


def render_json(r: DriftReport) -> str:
    doc = r.model_dump(mode="json")
    doc["counts"] = {k: len(doc[k]) for k in ("config", "waiting", "outside", "interrupted", "load")}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
