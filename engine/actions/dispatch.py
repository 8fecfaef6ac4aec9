"""Dispatch an action to its executor by type. An unknown kind is a bug and raises."""

from __future__ import annotations

from collections.abc import Callable

from engine.actions import (
    apply_schema,
    create_branch,
    create_database,
    delete_branch,
    destroy_database,
    drop_retired_shard,
    merge_branch_schema,
    merge_shards,
    move_shard,
    recreate_shard,
    rename_database,
    reset_branch,
    split_shard,
    update_branch,
    update_database,
)
from engine.actions.base import ApplyContext
from engine.plan import models

EXECUTORS: dict[type, Callable] = {
    models.CreateDatabase: create_database.execute,
    models.DestroyDatabase: destroy_database.execute,
    models.ApplySchema: apply_schema.execute,
    models.UpdateDatabase: update_database.execute,
    models.RecreateShard: recreate_shard.execute,
    models.SplitShard: split_shard.execute,
    models.MergeShards: merge_shards.execute,
    models.MoveShard: move_shard.execute,
    models.DropRetiredShard: drop_retired_shard.execute,
    models.CreateBranch: create_branch.execute,
    models.DeleteBranch: delete_branch.execute,
    models.UpdateBranch: update_branch.execute,
    models.MergeBranchSchema: merge_branch_schema.execute,
    models.ResetBranch: reset_branch.execute,
    models.RenameDatabase: rename_database.execute,
}


def execute(action, ctx: ApplyContext) -> None:
    executor = EXECUTORS.get(type(action))
    if executor is None:
        raise TypeError(f"no executor for action kind {type(action).__name__}")
    executor(action, ctx)
