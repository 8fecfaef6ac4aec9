"""The move's stages as plain data, which of them run next as the journal says, and the
evaluator that visits each by kind (an unknown kind raises).

A stage is a frozen value: its kind, the key its duration is kept under in the history's
`timings`, and what a failure inside it undoes (`guard`). What one stage hands to the next is
a frozen `Carried`, replaced (never changed) by each visit: the comparison, the targets'
schemas, the fence's marks, the catch-up's decoded changes, the verification's figures, the
flip's history row, each with the pause as it stands. The live connections stay on the
evaluator's `Live` (engine/actions/move/live.py), opened by the `hold` stage and closed by
`release`; the fence's bounds (a stop request waits, statements time out) by `bound` and
`pause`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import psycopg

from engine.actions.base import ApplyContext
from engine.actions.move import cleanup, cutover, fencing, prepare, sync
from engine.actions.move.compare import Comparison, compare
from engine.actions.move.cutover import CaughtUp, Flipped, TargetSchemas, Verified
from engine.actions.move.errors import VerificationFailed
from engine.actions.move.fencing import Fenced
from engine.actions.move.live import Live
from engine.catalog import journal

# what a failure inside a stage undoes: "undo" the copy is wrong, remove it all (the source never
# stopped); "fenced" besides, any other failure lifts the fence; "flip" a flip that did not
# commit lifts the fence, one whose outcome the catalog cannot tell keeps it
Guard = Literal["", "undo", "fenced", "flip"]


@dataclass(frozen=True)
class Stage:
    kind: str
    timing: str | None = None  # its duration's key in the history's timings (None: not timed)
    guard: Guard = ""


BEFORE_COPY = (Stage("record", "record"), Stage("targets", "targets"), Stage("publish", "publish"),
               Stage("subscribe", "subscribe"), Stage("guard", "guard"), Stage("follow", "follow"))
COPY_TO_FLIP = (
    Stage("hold"),  # the held connections, from the copy to the flip
    Stage("sync", "sync", "undo"),  # a copy that can never finish (CopyLost) is undone like a wrong one
    Stage("compare", "compare", "undo"),
    Stage("converge", "converge", "undo"),  # the comparison took time: lag small again
    # a stop request parks the move here; what the flip records and the fence needs, read
    # before the last rounds (nothing but the fence's check for long writers after them)
    Stage("schemas"),
    Stage("last rounds", None, "undo"),  # what changed while it converged: fewer keys behind the fence
    Stage("bound"),  # from here to the flip a stop request waits, every statement is bounded
    Stage("fence", "fence", "fenced"),
    Stage("catch up", "catch_up", "fenced"),
    Stage("verify", "verify", "fenced"),
    Stage("flip", "flip", "flip"),
    Stage("pause"),  # the bounds lifted; the pause recorded and said
    Stage("release"),
)
AFTER_FLIP = (Stage("hand over", "hand_over"), Stage("cleanup", "cleanup"))


@dataclass(frozen=True)
class Recorded:
    """What the journal says of an operation, as far as the stages care: whether it is past its
    cutover (its flip's row, or the routing itself: journal.CUT_OVER)."""

    operation: int
    cut_over: bool


def recorded(ctx: ApplyContext, operation: int) -> Recorded:
    return Recorded(operation, journal.cut_over(ctx.catalog, operation))


def stages_for(state: Recorded) -> tuple[Stage, ...]:
    """Past the flip only the hand-over and the cleanup are left: the targets take writes, the
    source is no longer the truth. Before it every stage runs again from the top: each finds
    what it made already, and the comparison starts afresh (package docstring)."""
    if state.cut_over:
        return AFTER_FLIP
    return BEFORE_COPY + COPY_TO_FLIP + AFTER_FLIP


@dataclass(frozen=True)
class Carried:
    """What the stages hand on, each a new value."""

    comparison: Comparison | None = None
    schemas: TargetSchemas | None = None
    ready: fencing.Ready | None = None
    fenced: Fenced | None = None
    caught_up: CaughtUp | None = None
    verified: Verified | None = None
    flipped: Flipped | None = None


T = TypeVar("T")


class UnknownStage(Exception):
    """A stage of a kind the evaluator has no visitor for."""


class StagesOutOfOrder(Exception):
    """A stage ran before the stage whose result it needs."""


def run(live: Live, on_flip: Callable[[], dict]) -> dict:
    """The stages the journal says are left, evaluated in order. ON_FLIP: the history row's
    own fields (the event, its address, why). Returns the timings and the verification's figures."""
    return Evaluator(live, on_flip).evaluate(stages_for(recorded(live.ctx, live.spec.operation)))


class Evaluator:
    """Visits each stage by its kind, times it, and applies its guard."""

    def __init__(self, live: Live, on_flip: Callable[[], dict]):
        self.live = live
        self.on_flip = on_flip
        self.timings: dict[str, float] = {}
        self._held = ExitStack()
        self._bounds = ExitStack()
        self._visitors: dict[str, Callable[[Carried], Carried]] = {
            "record": self._plain(prepare.record), "targets": self._plain(prepare.targets),
            "publish": self._plain(prepare.publish), "subscribe": self._plain(prepare.subscribe),
            "guard": self._plain(prepare.guard), "follow": self._plain(prepare.follow),
            "hold": self._hold, "sync": self._plain(sync.sync), "compare": self._compare,
            "converge": self._plain(lambda live: sync.sync(live, final=True)), "last rounds": self._last_rounds,
            "schemas": self._schemas, "bound": self._bound, "fence": self._fence, "catch up": self._catch_up,
            "verify": self._verify, "flip": self._flip, "pause": self._pause, "release": self._release,
            "hand over": self._plain(cleanup.hand_over), "cleanup": self._plain(cleanup.cleanup),
        }

    def evaluate(self, stages: tuple[Stage, ...]) -> dict:
        carried = Carried()
        with self._held, self._bounds:
            for stage in stages:
                carried = self.visit(stage, carried)
        return {"timings": self.timings, "verification": carried.verified.figures if carried.verified else {}}

    def visit(self, stage: Stage, carried: Carried) -> Carried:
        visitor = self._visitors.get(stage.kind)
        if visitor is None:
            raise UnknownStage(f"no visitor for a move's stage of kind {stage.kind!r}")
        started = time.monotonic()
        with self._guarded(stage.guard):
            out = visitor(carried)
        if stage.timing is not None:
            self.timings[stage.timing] = round(time.monotonic() - started, 3)
        return out

    # ------------------------------------------------------------------ guards

    @contextmanager
    def _guarded(self, guard: Guard) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, VerificationFailed) and guard in ("undo", "fenced"):
                self.live.release()
                cleanup.abort(self.live, state="failed")  # the copy is wrong: remove it all, the source as it was
            elif guard == "fenced" or (guard == "flip" and not self._cut_over_or_unknown()):
                # whatever went wrong behind the fence (an overrun, a database condition, or a
                # bug: never leave a range read-only), the source takes writes again; apply
                # resumes later
                fencing.lift_after_failure(self.live)
            raise

    def _cut_over_or_unknown(self) -> bool:
        """A flip that did not commit (its transaction rolled back: a statement timeout, a catalog
        lock) lifts the fence; one whose outcome the catalog cannot tell keeps it."""
        try:
            return journal.cut_over(self.live.ctx.catalog, self.live.spec.operation)
        except psycopg.Error:
            return True

    # ------------------------------------------------------------------ visitors

    def _plain(self, stage: Callable[[Live], None]) -> Callable[[Carried], Carried]:
        def visit(carried: Carried) -> Carried:
            stage(self.live)
            return carried
        return visit

    def _hold(self, carried: Carried) -> Carried:
        self._held.enter_context(self.live.holding())
        return carried

    def _compare(self, carried: Carried) -> Carried:
        return replace(carried, comparison=compare(self.live))

    def _last_rounds(self, carried: Carried) -> Carried:
        comparison = _need(carried.comparison)
        # from here to the flip the slots are read as they are written (decoding.py says why)
        self._held.enter_context(comparison.decoding())
        comparison.last_rounds()
        return carried

    def _schemas(self, carried: Carried) -> Carried:
        # from the fence to the flip the source refuses writes: a stop request (Ctrl-C, SIGTERM)
        # waits for the flip instead of parking the range read-only; before the fence, it parks
        if journal.stop_requested():
            raise journal.Interrupted("stopped before the fence; apply again to continue")
        return replace(carried, schemas=cutover.target_schemas(self.live), ready=fencing.ready(self.live))

    def _bound(self, carried: Carried) -> Carried:
        self._bounds.enter_context(journal.until_done())
        self._bounds.enter_context(self.live.bounded())
        return carried

    def _fence(self, carried: Carried) -> Carried:
        comparison = _need(carried.comparison)
        fenced = fencing.fence_stage(self.live, _need(carried.ready), comparison)
        return replace(carried, fenced=replace(fenced, pause=fenced.pause.marked("fence recorded", time.monotonic())))

    def _catch_up(self, carried: Carried) -> Carried:
        caught_up = cutover.catch_up(self.live, _need(carried.fenced), _need(carried.comparison))
        pause = caught_up.pause.marked("catch up recorded", time.monotonic())
        return replace(carried, caught_up=replace(caught_up, pause=pause))

    def _verify(self, carried: Carried) -> Carried:
        verified = cutover.verify(self.live, _need(carried.comparison), _need(carried.caught_up))
        self.timings["sequences"] = verified.sequences_s
        pause = verified.pause.marked("verify recorded", time.monotonic())
        return replace(carried, verified=replace(verified, pause=pause))

    def _flip(self, carried: Carried) -> Carried:
        verified, fenced, comparison = _need(carried.verified), _need(carried.fenced), _need(carried.comparison)
        history = {**self.on_flip(), "timings": self.timings, "verification": verified.figures,
                   "verified_changed_keys": verified.keys, "key_rounds": comparison.log[-6:],
                   "fence": fenced.figures, "pause_ms": verified.pause.ms(time.monotonic()),
                   "actor": self.live.ctx.actor}
        return replace(carried, flipped=cutover.flip(self.live, _need(carried.schemas), verified.pause, history))

    def _pause(self, carried: Carried) -> Carried:
        self._bounds.close()
        flipped = _need(carried.flipped)
        pause = cutover.record_pause(self.live, flipped, self.timings["flip"])
        self.live.say(f"writes to the range paused for {pause:.1f} ms (fence to flip committed"
                      + (", from the fence an interrupted run left)" if flipped.pause.inherited else ")"))
        return carried

    def _release(self, carried: Carried) -> Carried:
        self._held.close()
        return carried


def _need(value: T | None) -> T:
    """What an earlier stage handed on; its absence means the stages are out of order."""
    if value is None:
        raise StagesOutOfOrder("a move's stage ran before the stage whose result it needs")
    return value
