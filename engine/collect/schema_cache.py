"""A local cache of shard schema snapshots and ledgers, kept by their databases' signatures.

Reading a shard's whole schema costs its new connection about three times what the connection
and a trivial query cost (the catalogs it reads must first be loaded into the new backend's
caches), so a plan over 256 shards spent seconds on schemas that had not changed. Every change
to a schema writes rows of the database's system catalogs, and PostgreSQL counts the rows
written per table in its cumulative statistics; those counters are read in the same statement
as the shard's ledger (engine.observe.introspect.LIGHT), nearly for free. The snapshot read last
time is reused while the signature is the same (the database's oid, the server's start, its
statistics' last reset, and the rows written to pg_class, pg_attribute, pg_attrdef,
pg_constraint, pg_index, pg_type and pg_namespace), for at most MAX_AGE; anything else reads
the schema again. The shard's ledger of applied steps (`_shardctl.schema_steps`) is kept the same
way, under the rows written to it: opening that table in a new backend cost as much again as
the connection, and it changes only when a step is recorded. The cost of that: a session's
statistics reach the counters when it ends, or at the latest about ten seconds after its
transaction (PostgreSQL flushes them no more often), so a change made by hand may show in a
plan that much later; with `track_counts = off` nothing is cached.

The cache is a file under the config directory's `.shardctl/` (mode 0600): a plan writes it,
never the fleet; a plan without it (CI, another laptop) reads every schema. It never decides
anything on its own: it holds what the shards said, under the signature they said it with.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from engine.clock import system_clock
from engine.servers import private

MAX_AGE = 3600.0  # seconds a cached snapshot is trusted without a full read
FILE = Path(".shardctl") / "cache" / "schemas.json"
VERSION = 3  # 2: the ledger's steps beside the snapshot; 3: the signature's instants in ISO 8601, UTC


class SchemaCache:
    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._changed = False
        self._lock = threading.Lock()
        if path is None:
            return
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # none yet, or unreadable: every schema is read
        if isinstance(data, dict) and data.get("version") == VERSION and isinstance(data.get("shards"), dict):
            self._entries = data["shards"]

    @classmethod
    def for_config(cls, directory: Path) -> SchemaCache:
        return cls(directory / FILE)

    @staticmethod
    def key(server: str, dbname: str) -> str:
        return f"{server}/{dbname}"

    def get(self, server: str, dbname: str, signature: list | None) -> tuple[dict[str, Any], tuple[str, ...]] | None:
        """The snapshot and the ledger's steps cached under this signature, while they are young
        enough; else None."""
        if signature is None:
            return None
        entry = self._entries.get(self.key(server, dbname))
        if not entry or entry.get("signature") != signature:
            return None
        if system_clock().timestamp() - entry.get("at", 0) > MAX_AGE:  # kept on disk: wall-clock seconds
            return None
        snapshot, steps = entry.get("snapshot"), entry.get("steps")
        if not isinstance(snapshot, dict) or not isinstance(steps, list):
            return None
        return snapshot, tuple(steps)

    def put(self, server: str, dbname: str, signature: list | None, snapshot: dict[str, Any],
            steps: tuple[str, ...]) -> None:
        if signature is None:
            return
        with self._lock:
            self._entries[self.key(server, dbname)] = {"signature": signature, "at": system_clock().timestamp(),
                                                       "snapshot": snapshot, "steps": list(steps)}
            self._changed = True

    def save(self, keep: set[str] | None = None) -> None:
        """Write it back when something was read afresh; entries of databases not seen this time
        (KEEP: the keys seen) are dropped. A cache that cannot be written is no error."""
        if self.path is None or not self._changed:
            return
        entries = {k: v for k, v in self._entries.items() if keep is None or k in keep}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            private.write_private(self.path, json.dumps({"version": VERSION, "shards": entries},
                                                        separators=(",", ":")), None)
        except OSError:
            return
        finally:
            self._changed = False
