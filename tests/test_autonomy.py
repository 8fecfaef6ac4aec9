"""What the daemon may apply on its own, kind by kind, and what waits for a person."""

import pytest
from pydantic import BaseModel

from engine import __version__
from engine.plan.models import (
    ApplySchema,
    CreateBranch,
    DeleteBranch,
    MergeShards,
    Plan,
    Reason,
    ShardSpec,
    SplitShard,
    StepSpec,
)
from engine.watch.autonomy import decide, why_not

LOAD = Reason(cause="load", text="hot")


def _shard(name: str, lo=None, hi=None) -> ShardSpec:
    return ShardSpec(name=name, lo=lo, hi=hi, server="a", dbname=f"orders_{name}")


def _split(automatic: bool = True, operation: int | None = None, cause: str = "load") -> SplitShard:
    return SplitShard(database="orders", reason=Reason(cause=cause, text="x"), source=_shard("40-80"),
                      targets=(_shard("40-60"), _shard("60-80")), evidence=(), automatic=automatic,
                      operation=operation)


def _merge(automatic: bool) -> MergeShards:
    return MergeShards(database="orders", reason=LOAD, sources=(_shard("-40"), _shard("40-80")),
                       target=_shard("-80"), evidence=(), automatic=automatic)


def _delete_branch(expired: bool) -> DeleteBranch:
    return DeleteBranch(database="orders", reason=Reason(cause="config", text="x"), branch="dev", server="a",
                        dbname="orders_dev", expired=expired)


def _schema() -> ApplySchema:
    return ApplySchema(database="orders", reason=Reason(cause="config", text="x"),
                       steps=(StepSpec(seq=2, name="002", sha256="0" * 64, sql="SELECT 1"),), shards=())


def _plan(*actions) -> Plan:
    return Plan(shardctl_version=__version__, based_on_serial=1, catalog_exists=True, actions=actions)


def test_policy_decides_load_driven_moves():
    assert why_not(_split(automatic=True)) is None
    assert "autosplit.enabled is false" in why_not(_split(automatic=False))
    assert why_not(_merge(automatic=True)) is None
    assert "automerge.enabled is false" in why_not(_merge(automatic=False))


def test_an_interrupted_move_is_resumed_whatever_the_policy_says():
    assert why_not(_split(automatic=False, operation=7, cause="resume")) is None


def test_an_expired_branch_goes_automatically_a_removed_one_waits_for_a_person():
    assert why_not(_delete_branch(expired=True)) is None
    assert "removed from the config" in why_not(_delete_branch(expired=False))


def test_config_changes_wait_for_a_person_and_hold_back_automation_on_that_database():
    decision = decide(_plan(_schema(), _split()), paused=False)
    assert decision.autonomous == ()
    assert [(p.kind, p.why.split(":")[0]) for p in decision.pending] == [
        ("apply_schema", "apply schema"),
        ("split_shard", "a person's change to orders is pending; automation waits for it")]
    # but an interrupted move is finished even then: DDL waits for it, not the other way round
    resumed = _split(operation=3, cause="resume")
    assert decide(_plan(_schema(), resumed), paused=False).autonomous == (resumed,)


def test_paused_nothing_is_autonomous_and_every_action_says_why():
    decision = decide(_plan(_split(), _delete_branch(expired=True)), paused=True)
    assert decision.autonomous == () and decision.paused
    assert all("paused" in p.why for p in decision.pending)


def test_a_kind_without_a_rule_is_refused_loudly():
    class NewKind(BaseModel):
        database: str = "orders"

    with pytest.raises(TypeError, match="no autonomy rule for action kind NewKind"):
        why_not(NewKind())


def test_every_action_kind_has_a_rule():
    from typing import get_args

    from engine.plan.models import Action
    from engine.watch.autonomy import RULES

    union = get_args(Action)[0] if get_args(get_args(Action)[0]) else Action
    kinds = set(get_args(union))
    assert kinds and kinds <= set(RULES), sorted(k.__name__ for k in kinds - set(RULES))
    assert CreateBranch in RULES
