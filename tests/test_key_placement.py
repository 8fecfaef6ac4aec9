"""Which shard holds a changed key, as a split's or a merge's comparison decides it
(engine/actions/move/compare.py `placed`): from each key's position as the server computes it
(engine/observe/strays.py `key_positions`), every key goes to exactly the shard whose range
filter selects it on the server, for bigint and text keys, at the keyspace's edges too."""

from __future__ import annotations

import itertools
import random

import pytest
from psycopg import sql

from engine.actions.move.compare import placed
from engine.client import hashint8extended
from engine.observe.strays import key_positions, outside
from engine.plan.models import ShardSpec

EDGES = [-(2**63), -(2**62), -1, 0, 1, 2**62, 2**63 - 1]


def _quarters() -> list[ShardSpec]:
    cuts = [None, -(2**62), 0, 2**62, None]
    return [ShardSpec(name=f"q{i}", lo=lo, hi=hi, server="a", dbname="d")
            for i, (lo, hi) in enumerate(itertools.pairwise(cuts))]


def _selected_on_server(conn, key_type: str, keys: set, shard: ShardSpec) -> set:
    array = sql.SQL("%s::bigint[]" if key_type == "bigint" else "%s::text[]")
    query = sql.SQL("SELECT k FROM unnest({}) AS u(k) WHERE NOT ({})").format(
        array, outside("k", key_type, shard.lo, shard.hi))
    return {row[0] for row in conn.execute(query, (sorted(keys),))}


@pytest.mark.parametrize("key_type", ["bigint", "text"])
def test_every_changed_key_is_compared_on_exactly_the_shard_whose_range_holds_it(applied_fleet, key_type):
    rng = random.Random(7)
    if key_type == "bigint":
        keys: set = {rng.randrange(-(2**63), 2**63) for _ in range(3000)} | set(EDGES)
    else:
        odd = {"", "it's", 'a "b"', "a,b", "{c}", "ключ", "x" * 300}  # quotes, a comma, braces: the array's syntax
        keys = {f"customer-{rng.randrange(10**9)}" for _ in range(2000)} | odd
    shards = _quarters()
    with applied_fleet.connect("a") as conn:
        positions = key_positions(conn, "k", key_type, keys)
        expected = {shard.name: _selected_on_server(conn, key_type, keys, shard) for shard in shards}

    assert set(positions) == keys
    chosen = {shard.name: placed(shard, keys, positions) for shard in shards}
    assert chosen == expected
    assert sum(len(v) for v in chosen.values()) == len(keys)  # each key on one shard, none lost
    assert all(chosen.values())  # every quarter got some: the test is not vacuous
    if key_type == "bigint":  # the router's hash (engine.client) agrees with the server's
        assert all(positions[k] == hashint8extended(k) for k in keys)


def test_a_key_without_a_known_position_is_compared_everywhere():
    shards = _quarters()
    assert all(placed(shard, {1, 2}, {1: 0}) >= {2} for shard in shards)
    assert placed(shards[0], {1, 2}, {}) == {1, 2}  # a plain move learns no positions
