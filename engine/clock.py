"""The one source of "now": every judgement of time (cooldowns, expiry, grace periods, staleness)
takes a clock or an instant as a parameter, so that tests pin it instead of reading the date."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """The real wall clock, in UTC."""
    return datetime.now(UTC)
