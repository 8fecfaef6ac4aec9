"""Rows of queries that always return one (an aggregate, SHOW, a function call, a one-row
table), read without an Optional to check at every call. No connection is opened here."""

from __future__ import annotations

from typing import Any, Protocol


class _Cursor(Protocol):
    def fetchone(self) -> Any: ...


def one(cursor: _Cursor) -> tuple[Any, ...]:
    """The query's single row; LookupError when there is none (a query that cannot return none)."""
    row = cursor.fetchone()
    if row is None:
        raise LookupError("the query returned no row")
    return row
