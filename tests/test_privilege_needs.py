"""Privileges planned, not discovered: every kind of action declares what it needs of which server
(engine/plan/needs.py), each purpose names its checks (engine/plan/checks.py), and doctor
describes every purpose. A replica needs a publication and a slot on each shard's server
(REPLICATION) and subscriptions on its own (pg_create_subscription, or superuser before 16); a move
of a replicated database needs the same of the new shards' servers and the replica's. The
end-to-end refusals run against real servers in tests/test_real_servers.py."""

from __future__ import annotations

import typing
from datetime import UTC, datetime

import pytest

from engine.observe.models import (
    Capabilities,
    CatalogBranch,
    CatalogDatabase,
    CatalogShard,
    CatalogState,
    LiveServer,
    Observation,
)
from engine.plan import checks, models
from engine.plan.needs import NEEDS, needs
from engine.render.doctor import PURPOSES

WHEN = datetime(2030, 1, 1, tzinfo=UTC)
REASON = models.Reason(cause="config", text="declared")
SHARDS = (models.ShardSpec(name="-80", lo=None, hi=0, server="a", dbname="orders_min_80"),
          models.ShardSpec(name="80-", lo=0, hi=None, server="b", dbname="orders_80_max"))


def caps(**kw) -> Capabilities:
    base = dict(version_num=180001, superuser=False, createdb=True, replication=True, monitor=True,
                create_subscription=True, origin_progress=False, wal_level="logical", max_replication_slots=10,
                used_replication_slots=0, max_wal_senders=10, used_wal_senders=0, max_worker_processes=8,
                max_logical_replication_workers=4, max_slot_wal_keep_size_bytes=-1, stat_statements_loaded=True,
                stat_statements_created=True, buffercache_created=True, stat_statements_track="top",
                max_connections=100, reserved_connections=3, connections=5, role_connection_limit=-1,
                role="shardctl", clock_offset_s=0.0)
    return Capabilities(**{**base, **kw})


def live(name: str, **kw) -> LiveServer:
    return LiveServer(name=name, reachable=True, version="x", wal_level="logical", capabilities=caps(**kw))


def observation(replica_on: str | None = None) -> Observation:
    shards = tuple(CatalogShard(database="orders", name=s.name, lo=s.lo, hi=s.hi, server=s.server, dbname=s.dbname,
                                state="active") for s in SHARDS)
    database = CatalogDatabase(name="orders", key_column="customer_id", key_type="bigint", protect=False,
                               policy_name="default", policy={}, placement=("a", "b"), state="active",
                               schema_steps=(), shards=shards)
    branches = {}
    if replica_on:
        branches["mirror"] = CatalogBranch(name="mirror", parent="orders", data="replica", sample_percent=None,
                                           server=replica_on, dbname="branch_mirror", state="active",
                                           created_at=WHEN, expires_at=WHEN)
    return Observation(catalog=CatalogState(exists=True, databases={"orders": database}, branches=branches),
                       servers={}, shards={})


def replica_branch(server: str = "c") -> models.CreateBranch:
    return models.CreateBranch(database="orders", reason=REASON, branch="mirror", data="replica", sample_percent=None,
                               server=server, dbname="branch_mirror", shards=SHARDS, ttl_seconds=86400)


def test_every_kind_of_action_declares_its_needs_and_an_unknown_kind_is_refused():
    union = typing.get_args(typing.get_args(models.Action)[0])
    kinds = {cls.model_fields["kind"].default for cls in union}
    assert kinds == set(NEEDS), kinds ^ set(NEEDS)

    class Unknown:
        kind = "teleport_shard"

    with pytest.raises(ValueError, match="unknown action kind 'teleport_shard'"):
        needs(Unknown(), observation())


def test_every_purpose_has_checks_and_a_description_doctor_prints():
    every_check = [*checks.server_checks(live("s", version_num=150000)), checks.origin_check(live("s"))]
    checked = {purpose for check in every_check if check is not None for purpose in check.needed_by}
    declared = set()
    split = models.SplitShard(database="orders", reason=REASON, source=SHARDS[0], targets=SHARDS, evidence=(),
                              automatic=False)
    delete = models.DeleteBranch(database="orders", reason=REASON, branch="mirror", server="c",
                                 dbname="branch_mirror", expired=False)
    for action in (replica_branch(), split, delete):
        declared |= {purpose for _, purpose in needs(action, observation(replica_on="c"))}
    assert declared == checked == set(PURPOSES), (declared, checked, set(PURPOSES))


def test_a_replica_needs_replication_on_each_shards_server_and_subscriptions_on_its_own():
    assert needs(replica_branch(), observation()) == [
        ("c", "shard"), ("c", "replica_target"), ("a", "replica_source"), ("b", "replica_source")]
    no_replication = checks.why_not(live("a", replication=False), "replica_source")
    assert no_replication is not None and "'REPLICATION'" in no_replication
    assert "ALTER ROLE shardctl REPLICATION" in no_replication
    no_grant = checks.why_not(live("c", create_subscription=False), "replica_target")
    assert no_grant is not None and "GRANT pg_create_subscription TO shardctl" in no_grant
    on_15 = checks.why_not(live("c", version_num=150010, create_subscription=False), "replica_target")
    assert on_15 is not None and "PostgreSQL 15 lets only a superuser create subscriptions" in on_15
    assert checks.why_not(live("c", version_num=150010, superuser=True), "replica_target") is None
    # an instant branch only clones its replica on the replica's server
    clone = replica_branch().model_copy(update={"data": "full", "clone_of": SHARDS[0]})
    assert needs(clone, observation()) == [("c", "shard")]


def test_a_move_of_a_replicated_database_needs_what_the_replica_follows_it_with():
    split = models.SplitShard(database="orders", reason=REASON, source=SHARDS[0],
                              targets=(SHARDS[0].model_copy(update={"server": "d"}),), evidence=(), automatic=True)
    assert needs(split, observation()) == [("a", "move_source"), ("d", "shard"), ("d", "move_target")]
    followed = needs(split, observation(replica_on="c"))
    assert followed == [("a", "move_source"), ("d", "shard"), ("d", "move_target"), ("c", "replica_target"),
                        ("c", "replica_follow"), ("d", "replica_source"), ("d", "replica_follow")]
    assert needs(split, observation(replica_on="c"), leaving=frozenset({"mirror"})) == needs(split, observation())
    delete = models.DeleteBranch(database="orders", reason=REASON, branch="mirror", server="c",
                                 dbname="branch_mirror", expired=True)
    assert needs(delete, observation(replica_on="c")) == [("a", "replica_unlink"), ("b", "replica_unlink")]
    assert needs(delete, observation()) == []  # not a replica: nothing of the shards'


def test_doctor_names_the_purposes_of_a_failed_check():
    from engine.render.doctor import text

    report = {"c": checks.server_checks(live("c", version_num=150010, create_subscription=False))}
    out = text(report)
    assert "✗ CREATE SUBSCRIPTION" in out
    assert ("needed by: splits, merges and moves (as their target), replicas (on the replica's server)" in out), out
