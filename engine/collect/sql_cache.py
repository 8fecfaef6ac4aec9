"""The schema SQL already found clean, remembered so that a plan of unchanged files parses nothing.

Every load (engine.config.loader) checks each schema step's SQL with pglast (engine.config.sqlcheck): its syntax, what
reaches outside the database, the shard key of the tables it leaves. Parsing a small schema is
quick; importing pglast is not (about 35 ms of a plan's start on a quiet machine, more on a busy
one). A check that found nothing is remembered under the sha256 of what it read (the SQL, and for
the shard key check every step's SQL, the key and the reference tables) and of what checks it
(engine/config/sqlcheck.py and loader.py, pglast's version): the same input checked by the same code finds nothing
again. A check that finds a problem is never remembered: it runs every time, to say where.

The file is `.shardctl/cache/sql.json` (mode 0600) of the config directory, written only where
`.shardctl/` already is (plan and apply make it). `validate` neither reads nor writes it: it
checks everything, every time. A file that cannot be read or written is no cache, never an error.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from engine.servers import private

FILE = Path(".shardctl") / "cache" / "sql.json"
VERSION = 1
_CHECKERS = tuple(Path(__file__).parent.parent / "config" / name for name in ("sqlcheck.py", "loader.py"))


def _checker() -> str:
    """What a verdict depends on besides its input: the checking code and the parser's version."""
    digest = hashlib.sha256(metadata.version("pglast").encode())
    for path in _CHECKERS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class CleanSql:
    def __init__(self, path: Path | None):
        self.path = path
        self.checker = ""
        self._loaded: set[str] = set()
        self._clean: set[str] = set()
        self._asked: set[str] = set()
        if path is None:
            return
        try:
            self.checker = _checker()
            data = json.loads(path.read_text())
        except (OSError, ValueError, metadata.PackageNotFoundError):
            return  # none yet, or unreadable: every check runs
        if (isinstance(data, dict) and data.get("version") == VERSION and data.get("checker") == self.checker
                and isinstance(data.get("clean"), list)):
            self._loaded = {k for k in data["clean"] if isinstance(k, str)}
            self._clean = set(self._loaded)

    @classmethod
    def for_config(cls, directory: Path) -> CleanSql:
        return cls(directory / FILE)

    def key(self, check: str, *inputs: str) -> str:
        return hashlib.sha256(json.dumps([self.checker, check, *inputs]).encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        self._asked.add(key)
        return bool(self.checker) and key in self._clean

    def add(self, key: str) -> None:
        self._asked.add(key)
        if self.checker:
            self._clean.add(key)

    def save(self) -> None:
        """Write back the verdicts this load asked for, when they differ from the file's (the
        verdicts of SQL no longer declared are dropped)."""
        clean = self._clean & self._asked
        if self.path is None or not self.checker or clean == self._loaded or not self.path.parent.parent.is_dir():
            return
        try:
            self.path.parent.mkdir(exist_ok=True, mode=0o700)
            private.write_private(self.path, json.dumps({"version": VERSION, "checker": self.checker,
                                                         "clean": sorted(clean)}), None)
        except OSError:
            return
        self._loaded = clean
