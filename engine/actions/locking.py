"""Moved to engine/servers/locking.py (issue 32: engine/backups.py needs it below the actions).

Kept only for engine/actions/move.py's import, which its owner ("stages", issue 32) updates;
delete this file once nothing imports `engine.actions.locking`."""

from engine.servers.locking import Blocker, LockContention, with_lock_retries, write_holders

__all__ = ["Blocker", "LockContention", "with_lock_retries", "write_holders"]
