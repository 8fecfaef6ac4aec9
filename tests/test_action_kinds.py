"""Every kind of action the plan can hold has a renderer and an executor; unknown kinds raise."""

import typing

import pytest

from engine.actions import dispatch
from engine.plan import models
from engine.render import view

KINDS = typing.get_args(typing.get_args(models.Action)[0])


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_each_action_kind_has_a_renderer_an_executor_and_an_order(kind):
    assert kind in dispatch.EXECUTORS
    assert kind in view._LINES and kind in view._TITLES
    assert kind.model_fields["kind"].default in models.ORDER
    assert kind.model_fields["kind"].default in view.KIND_WORDS


def test_unknown_kinds_raise():
    class Strange:
        pass

    with pytest.raises(TypeError):
        dispatch.execute(Strange(), None)
    with pytest.raises(TypeError):
        view.block(Strange())
