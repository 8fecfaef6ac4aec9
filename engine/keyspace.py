"""The 64-bit keyspace of a shard key, its ranges, and their Vitess-style names.

PostgreSQL's `hashint8extended(key, 0)` / `hashtextextended(key, 0)` return a signed bigint.
Names use the unsigned view of the same space (signed + 2^63), as Vitess does, so `-80` is the
lower half and `80-` the upper half. A range is half-open [lo, hi); `None` stands for the open
end at either side (2^63 does not fit in a bigint, so the top has no upper bound).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

SIGNED_MIN = -(2**63)
SPACE = 2**64


@dataclass(frozen=True, order=True)
class KeyRange:
    """[lo, hi) in the signed hash space; lo None = bottom, hi None = top."""

    lo: int | None
    hi: int | None

    def __post_init__(self) -> None:
        if self.lo is not None and self.hi is not None and self.lo >= self.hi:
            raise ValueError(f"empty key range [{self.lo}, {self.hi})")

    @property
    def lo_unsigned(self) -> int:
        return 0 if self.lo is None else self.lo - SIGNED_MIN

    @property
    def hi_unsigned(self) -> int:
        return SPACE if self.hi is None else self.hi - SIGNED_MIN

    @property
    def name(self) -> str:
        """Vitess-style: hex prefixes of the unsigned bounds, '-40', '40-80', '80-', or '-' for all."""
        lo = "" if self.lo is None else _hex_prefix(self.lo_unsigned)
        hi = "" if self.hi is None else _hex_prefix(self.hi_unsigned)
        return f"{lo}-{hi}"

    @property
    def slug(self) -> str:
        """The name as it appears in a physical database name: '-40' -> 'min_40'."""
        lo = "min" if self.lo is None else _hex_prefix(self.lo_unsigned)
        hi = "max" if self.hi is None else _hex_prefix(self.hi_unsigned)
        return f"{lo}_{hi}"

    def contains(self, signed_hash: int) -> bool:
        return (self.lo is None or signed_hash >= self.lo) and (self.hi is None or signed_hash < self.hi)

    def split(self, parts: int) -> list[KeyRange]:
        """Divide evenly; boundaries are rounded to whole bytes where that keeps them distinct."""
        return even_ranges(parts, self.lo_unsigned, self.hi_unsigned)


def _hex_prefix(unsigned: int) -> str:
    text = f"{unsigned:016x}"
    while text.endswith("00") and len(text) > 2:
        text = text[:-2]
    return text


def _to_signed(unsigned: int) -> int | None:
    return unsigned + SIGNED_MIN


def _round_to_bytes(value: int, lo: int, hi: int, part_width: int) -> int:
    """The shortest whole-byte prefix near `value` inside (lo, hi), off by under 1/16 of a part."""
    for keep_bytes in range(1, 9):
        shift = 64 - 8 * keep_bytes
        rounded = (value >> shift) << shift
        if lo < rounded < hi and abs(rounded - value) * 16 < part_width:
            return rounded
    return value


def even_ranges(parts: int, lo_unsigned: int = 0, hi_unsigned: int = SPACE) -> list[KeyRange]:
    if parts < 1:
        raise ValueError("a range is divided into at least one part")
    width = hi_unsigned - lo_unsigned
    if parts > width:
        raise ValueError("the range is too small to divide")
    bounds = [lo_unsigned]
    for i in range(1, parts):
        exact = lo_unsigned + (width * i) // parts
        bounds.append(_round_to_bytes(exact, bounds[-1], hi_unsigned, width // parts))
    bounds.append(hi_unsigned)
    ranges = []
    for a, b in itertools.pairwise(bounds):
        ranges.append(KeyRange(None if a == 0 else _to_signed(a), None if b == SPACE else _to_signed(b)))
    return ranges


def parse_name(name: str) -> KeyRange:
    """'40-80' -> KeyRange. The inverse of KeyRange.name."""
    if name.count("-") != 1:
        raise ValueError(f"not a shard range name: {name!r}")
    lo_text, hi_text = name.split("-")

    def bound(text: str) -> int | None:
        if not text:
            return None
        if len(text) > 16 or len(text) % 2 or any(c not in "0123456789abcdef" for c in text):
            raise ValueError(f"not a shard range name: {name!r}")
        return int(text.ljust(16, "0"), 16) + SIGNED_MIN

    return KeyRange(bound(lo_text), bound(hi_text))


def physical_name(database: str, key_range: KeyRange) -> str:
    """The PostgreSQL database name of a shard: orders + 40-80 -> orders_40_80."""
    return f"{database}_{key_range.slug}"
