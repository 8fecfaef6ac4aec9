"""The config files already parsed, remembered so that a plan of unchanged files parses no YAML.

Every load (engine.config.loader) reads each config file and the shipped policy presets with
ruamel.yaml (engine.config.yamlread). Importing ruamel and composing the documents are most of
what reading a config costs (about 40 ms of a plan's start on a quiet machine). A file parsed
without a problem is remembered as its documents (plain data and the line and column of every
key and value, engine.config.yamldocs.stored) under the sha256 of its text and of what parsed it
(engine/config/yamldocs.py and yamlread.py, ruamel.yaml's version): the same text parsed by
the same code gives the same documents. A file with a problem is never remembered: it is parsed
every time, to say where. Everything after the parse (the models, the references, the SQL
checks) runs on every load as before.

The file is `.shardctl/cache/yaml.json` (mode 0600) of the config directory, written only where
`.shardctl/` already is (plan and apply make it). `validate` neither reads nor writes it: it
parses everything, every time. A file that cannot be read or written is no cache, never an error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.collect import cache_file

FILE = Path(".shardctl") / "cache" / "yaml.json"
VERSION = 1
_PARSERS = tuple(Path(__file__).parent.parent / "config" / name for name in ("yamldocs.py", "yamlread.py"))


def _parser() -> str:
    """What the remembered results depend on besides their input: our code and the library's version."""
    return cache_file.fingerprint("ruamel.yaml", _PARSERS)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a value a config document holds")


class ParsedYaml:
    def __init__(self, path: Path | None):
        self.path = path
        self.parser = ""
        self._files: dict[str, list] = {}
        self._asked: set[str] = set()
        self._changed = False
        if path is None:
            return
        self.parser = _parser()
        data = cache_file.read(path, VERSION, "parser", self.parser, _no_constant)  # None: every file is parsed
        if data is not None and isinstance(data.get("files"), dict):
            self._files = {k: v for k, v in data["files"].items() if isinstance(v, list)}

    @classmethod
    def for_config(cls, directory: Path) -> ParsedYaml:
        return cls(directory / FILE)

    def _key(self, text: str) -> str:
        return hashlib.sha256(json.dumps([self.parser, text]).encode()).hexdigest()

    def get(self, text: str) -> list[dict] | None:
        if not self.parser:
            return None
        key = self._key(text)
        self._asked.add(key)
        return self._files.get(key)

    def put(self, text: str, docs: list[dict]) -> None:
        if not self.parser:
            return
        key = self._key(text)
        self._asked.add(key)
        self._files[key] = json.loads(json.dumps(docs))  # a copy: the loader's data is not ours to keep
        self._changed = True

    def save(self) -> None:
        """Write back the files this load read, when something changed (the documents of files
        no longer read are dropped)."""
        if self.path is None or not self.parser:
            return
        kept = {k: v for k, v in self._files.items() if k in self._asked}
        if not self._changed and len(kept) == len(self._files):
            return
        stored = {"version": VERSION, "parser": self.parser, "files": dict(sorted(kept.items()))}
        if cache_file.write(self.path, stored):
            self._files, self._changed = kept, False
