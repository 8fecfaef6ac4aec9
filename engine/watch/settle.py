"""When the daemon reports a changed plan. A person's change (config, drift, anything not
load-driven) is reported at once; a change in the load-driven actions only once the same change
has been seen at two checks in a row, so a verdict that flips back within a check is never
reported and one that holds is reported once. Pure: the last state and a plan in, the next out."""

from __future__ import annotations

from dataclasses import dataclass

from engine.plan.models import LOAD_CAUSES, Plan

Key = tuple[tuple, tuple]  # (what a person changed, what load changed)


@dataclass(frozen=True)
class Reported:
    shown: Key | None = None  # the plan last reported
    seen_once: Key | None = None  # a load-driven change seen at one check, not reported yet


def plan_key(plan: Plan) -> Key:
    load = tuple(sorted((a.kind, a.address) for a in plan.actions if a.reason.cause in LOAD_CAUSES))
    person = (tuple(sorted((a.kind, a.address, a.reason.cause) for a in plan.actions
                           if a.reason.cause not in LOAD_CAUSES)),
              tuple(sorted((d.kind, d.address) for d in plan.drift)))
    return person, load


def settle(state: Reported, plan: Plan) -> tuple[Reported, bool]:
    """The next state, and whether to report this plan now."""
    key = plan_key(plan)
    if state.shown is None or key[0] != state.shown[0]:
        return Reported(shown=key), True
    if key == state.shown:
        return Reported(shown=state.shown), False  # back where it was: a flip, never reported
    if key == state.seen_once:
        return Reported(shown=key), True  # the same change held for a check
    return Reported(shown=state.shown, seen_once=key), False
