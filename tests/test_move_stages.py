"""The move as stages: the plan of stages is data read from the journal, the evaluator visits
each by kind and refuses one it does not know, the pause is handed on as new values, and no
module of the move imports one that imports it back (compare.py and move.py once did).

The stages themselves run against real servers in the move tests (test_split_merge.py,
test_server_crash.py kills an apply at each of their journal steps, test_fence_*.py)."""

import pytest

from engine.actions.move import stages
from engine.actions.move.spec import Pause
from test_layering import _full_module_graph


def test_before_the_cutover_every_stage_runs_again_from_the_top_after_it_only_hand_over_and_cleanup():
    fresh = [s.kind for s in stages.stages_for(stages.Recorded(operation=7, cut_over=False))]
    assert fresh == ["record", "targets", "publish", "subscribe", "guard", "follow", "hold", "sync", "compare",
                     "converge", "schemas", "last rounds", "bound", "fence", "catch up", "verify", "flip", "pause",
                     "release", "hand over", "cleanup"]
    flipped = [s.kind for s in stages.stages_for(stages.Recorded(operation=7, cut_over=True))]
    assert flipped == ["hand over", "cleanup"]


def test_what_a_failure_undoes_is_data_on_each_stage():
    by_kind = {s.kind: s.guard for s in stages.stages_for(stages.Recorded(operation=1, cut_over=False))}
    assert {k for k, g in by_kind.items() if g == "fenced"} == {"fence", "catch up", "verify"}
    assert {k for k, g in by_kind.items() if g == "undo"} == {"sync", "compare", "converge", "last rounds"}
    assert by_kind["flip"] == "flip"
    assert by_kind["record"] == by_kind["cleanup"] == ""


def test_every_planned_stage_has_a_visitor_and_an_unknown_kind_raises():
    evaluator = stages.Evaluator(live=None, on_flip=dict)  # type: ignore[arg-type]  # no stage is visited
    planned = stages.stages_for(stages.Recorded(operation=1, cut_over=False))
    assert {s.kind for s in planned} <= set(evaluator._visitors)
    with pytest.raises(stages.UnknownStage, match="'teleport'"):
        evaluator.visit(stages.Stage("teleport"), stages.Carried())


def test_a_stage_that_needs_an_earlier_one_refuses_to_run_without_it():
    evaluator = stages.Evaluator(live=None, on_flip=dict)  # type: ignore[arg-type]
    with pytest.raises(stages.StagesOutOfOrder, match="before the stage whose result it needs"):
        evaluator.visit(stages.Stage("last rounds"), stages.Carried())


def test_the_pause_is_handed_on_as_new_values():
    unfenced = Pause()
    assert unfenced.marked("armed", 5.0) is unfenced  # nothing is noted before the fence is armed
    armed = Pause(since=10.0).marked("armed", 10.002)
    drained = armed.marked("drained", 10.0105)
    assert armed.marks == (("armed", 2.0),)
    assert drained.marks == (("armed", 2.0), ("drained", 10.5))
    assert drained.ms(10.25) == 250.0 and unfenced.ms(99.0) == 0.0
    again = drained.marked("armed", 10.003)  # a point reached again keeps its place, with its new time
    assert again.marks == (("armed", 3.0), ("drained", 10.5))
    inherited = Pause(since=1.0, inherited=True).marked("marked", 2.0)
    assert inherited.inherited


def test_no_module_of_the_move_imports_one_that_imports_it_back():
    graph = _full_module_graph()
    actions = {name for name in graph if name.startswith("engine.actions")}
    assert "engine.actions.move.compare" in actions and "engine.actions.compare" not in actions
    pairs = sorted((a, b) for a in actions for b in graph[a] if a < b and a in graph.get(b, set()))
    assert pairs == [], pairs
