"""When the last key rounds before the fence stop (engine/actions/move/compare.py fence_now): once
few keys are left, or once the rounds stop improving; after a round that left far more keys than
the fewest before it, one more round first, once."""

from engine.actions.move.compare import FENCE_KEYS, SPIKE, fence_now


def test_few_keys_left_fence_at_once_even_after_the_first_round():
    assert fence_now([FENCE_KEYS])
    assert fence_now([5_000, 40])
    assert fence_now([5_000, 0])


def test_the_first_round_alone_never_decides():
    assert not fence_now([FENCE_KEYS + 1])
    assert not fence_now([9_000])


def test_rounds_go_on_while_each_improves_by_a_fifth():
    assert not fence_now([4_000, 3_000])
    assert not fence_now([4_000, 3_000, 2_000])
    assert not fence_now([4_000, 3_199])


def test_rounds_that_stopped_improving_fence():
    assert fence_now([4_000, 3_200])  # exactly 80% of the fewest: no longer improving
    assert fence_now([4_000, 3_500])
    assert fence_now([4_000, 3_000, 3_100])
    assert fence_now([2_000, 2_400])  # a little worse: still the plateau's level
    assert fence_now([2_000, int(2_000 * SPIKE)])  # at the bound itself


def test_a_round_that_left_far_more_than_the_fewest_is_followed_by_another():
    # the merge whose last round left 6,756 keys after one that left 2,753 (a 307 ms pause)
    assert not fence_now([3_100, 2_753, 6_756])
    # the next round back near the fewest: fence then
    assert fence_now([3_100, 2_753, 6_756, 2_900])


def test_rounds_that_keep_falling_behind_fence_one_round_after_the_first_spike():
    # an apply short of CPU: each round leaves more than the last; the fence does not wait for
    # the round limit, it goes after the second spike in a row
    assert not fence_now([3_000, 3_800])
    assert fence_now([3_000, 3_800, 4_800])
