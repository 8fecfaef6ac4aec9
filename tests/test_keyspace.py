"""The keyspace is divided without gaps or overlaps, and names round-trip."""

from itertools import pairwise

import pytest

from engine.keyspace import SIGNED_MIN, KeyRange, even_ranges, parse_name


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5, 7, 16, 100, 256])
def test_even_ranges_cover_the_keyspace_exactly_once(parts):
    ranges = even_ranges(parts)
    assert len(ranges) == parts
    assert ranges[0].lo is None and ranges[-1].hi is None
    for left, right in pairwise(ranges):
        assert left.hi == right.lo
    widths = [r.hi_unsigned - r.lo_unsigned for r in ranges]
    assert max(widths) - min(widths) <= 2**64 // parts // 8  # even, within the byte rounding


def test_vitess_style_names():
    assert [r.name for r in even_ranges(4)] == ["-40", "40-80", "80-c0", "c0-"]
    assert [r.slug for r in even_ranges(2)] == ["min_80", "80_max"]
    assert even_ranges(1)[0].name == "-"


@pytest.mark.parametrize("name", ["-40", "40-80", "c0-", "-", "55-aa", "8000000000000001-"])
def test_names_round_trip(name):
    assert parse_name(name).name == name


@pytest.mark.parametrize("bad", ["40", "4-80", "zz-", "40-80-c0", "-123456789abcdef012"])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError):
        parse_name(bad)


def test_contains_uses_the_signed_hash():
    low, high = even_ranges(2)
    assert low.contains(SIGNED_MIN) and low.contains(-1) and not low.contains(0)
    assert high.contains(0) and high.contains(2**63 - 1)


def test_a_split_divides_a_range_in_place():
    middle = parse_name("40-80")
    assert [r.name for r in middle.split(2)] == ["40-60", "60-80"]
    with pytest.raises(ValueError):
        KeyRange(5, 5)
