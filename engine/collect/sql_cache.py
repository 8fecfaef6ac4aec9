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
from pathlib import Path

from engine.collect import cache_file

FILE = Path(".shardctl") / "cache" / "sql.json"
VERSION = 1
_CHECKERS = tuple(Path(__file__).parent.parent / "config" / name for name in ("sqlcheck.py", "loader.py"))


def _checker() -> str:
    """What the remembered results depend on besides their input: our code and the library's version."""
    return cache_file.fingerprint("pglast", _CHECKERS)


class CleanSql:
    def __init__(self, path: Path | None):
        self.path = path
        self.checker = ""
        self._loaded: set[str] = set()
        self._clean: set[str] = set()
        self._asked: set[str] = set()
        if path is None:
            return
        self.checker = _checker()
        data = cache_file.read(path, VERSION, "checker", self.checker)  # None: every check runs
        if data is not None and isinstance(data.get("clean"), list):
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
        if self.path is None or not self.checker or clean == self._loaded:
            return
        if cache_file.write(self.path, {"version": VERSION, "checker": self.checker, "clean": sorted(clean)}):
            self._loaded = clean
