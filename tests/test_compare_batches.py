"""The buckets that differ in a full round are compared row by row in batches of bounded size
(engine/actions/move/compare.py ROWS_AT_ONCE), not refused past a fixed total."""

from engine.actions.move.compare import _batches


def test_buckets_are_cut_into_batches_of_at_most_the_rows_given_in_order():
    rows = {5: 10, 1: 30, 2: 30, 3: 50, 4: 100, 6: 40}
    assert _batches(rows, 100) == [[1, 2], [3], [4], [5, 6]]
    assert [b for batch in _batches(rows, 100) for b in batch] == sorted(rows)


def test_a_bucket_larger_than_a_batch_is_a_batch_of_its_own():
    assert _batches({1: 500, 2: 1, 3: 1}, 100) == [[1], [2, 3]]
    assert _batches({}, 100) == []
