"""What a move says when it cannot go on: its failures (durations in them written by engine/durations.py).

Every failure is a UserError (a database condition, named with a way forward, never a bug
report). A VerificationFailed (CopyLost among them) undoes the move; any other leaves the
operation open for `apply` to resume or `abort` to undo.
"""

from __future__ import annotations

import psycopg

from engine.durations import span
from engine.errors import UserError


class MoveFailed(UserError):
    pass


class VerificationFailed(MoveFailed):
    """The copy differs from the source: the move is undone, never resumed."""


class CopyLost(VerificationFailed):
    """The source removed WAL the copy still needed: the copy can never complete; undone."""


class Leftovers(MoveFailed):
    """Cleanup (or abort) could not remove everything: a server did not answer. The operation
    stays open; what is left is listed."""


def verification_failed(label: str, text: str) -> VerificationFailed:
    return VerificationFailed(f"{label}: verification failed: {text}",
                              "the source keeps its rows and takes writes; what was created is removed")


def overrun(label: str, operation: int, fence_timeout: float, what: str) -> MoveFailed:
    """A wait behind the fence that did not finish within `moves.fence_timeout`."""
    return MoveFailed(f"{label}: {what} within {span(fence_timeout)} behind the fence"
                      " (moves.fence_timeout)",
                      "the fence is lifted: the source takes writes again. Apply again to retry the move;"
                      f" `shardctl abort {operation}` undoes it")


def subscription_failed(label: str, operation: int, target_server: str, target_dbname: str, exc: psycopg.Error,
                        source: str) -> MoveFailed:
    """A subscription the target's server refused: a database condition, named with its server,
    step and operation, and the ways forward (never a bug report). SOURCE: what is true of the
    source now (Live.source_state)."""
    diag = exc.diag
    why = " ".join(p for p in (diag.message_primary, diag.message_detail, diag.message_hint) if p) or str(exc)
    return MoveFailed(f"{label}: server {target_server} refused the subscription of {target_dbname}"
                      f" (step subscribe, operation {operation}): {why}",
                      f"`shardctl doctor` checks what moves need on every server. Fix the cause; {source}")
