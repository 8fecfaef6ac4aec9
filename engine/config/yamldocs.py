"""YAML documents as the loader uses them: plain data with the line and column of every key and
value, from a file read whole within a size bound as UTF-8 text of printable characters only.

engine.config.yamlread composes the text into Docs with ruamel.yaml, refusing what a config
never needs. This module imports no ruamel: plan and apply keep the documents of files parsed
before (engine.collect.yaml_cache, as `stored` gives them), and a plan of unchanged files reads
them from there instead of importing ruamel and composing the YAML, most of what reading a
config costs. A file with a problem is never remembered: it is parsed every time, to say where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.errors import Diagnostic, Location
from engine.files import Unreadable, bounded_bytes

MAX_FILE_BYTES = 32 * 2**20  # a config file larger than this is refused unread

Path_ = tuple[Any, ...]
# YAML 1.2 printable: tab, LF, CR, and everything from space on except DEL, C1 controls (but
# NEL), surrogates and the two non-characters
_NOT_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass
class Doc:
    """One YAML document: plain data, and where each path's key and value are."""

    file: Path
    display: str
    data: Any
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    start: tuple[int, int] = (1, 1)

    def loc(self, path: Path_) -> Location:
        """The key at `path` if it exists, else the nearest parent that does."""
        best = self.start
        current: Path_ = ()
        for item in path:  # items that name nothing here (a union tag, a missing key) are passed over
            candidate = (*current, item)
            if candidate in self.keys:
                current, best = candidate, self.keys[candidate]
        return Location(self.display, *best)

    def value_loc(self, path: Path_) -> Location:
        """The value at `path` (for errors about a value, not its key)."""
        path = tuple(path)
        if path in self.values:
            return Location(self.display, *self.values[path])
        return self.loc(path)


def line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def check_file(file: Path, display: str, printable: bool = True) -> tuple[str | None, Diagnostic | None]:
    """The file's text, or why it cannot be read as one (never its content). `printable`: refuse
    every control character YAML refuses; otherwise (SQL) only NUL."""
    try:
        raw = bounded_bytes(file, MAX_FILE_BYTES)
    except Unreadable as exc:
        hint = {"too_large": "split the configuration over several files",
                "not_regular": "config files are ordinary files; move anything else out of the directory",
                "missing": "remove it, or point it at a file that exists",
                "broken_link": "remove it, or point it at a file that exists"}.get(exc.reason, exc.hint)
        message = {"not_regular": "not a regular file", "missing": "the file has disappeared"}.get(exc.reason,
                                                                                                  exc.message)
        return None, Diagnostic(Location(display), message, hint)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = raw[:exc.start].decode("utf-8")
        return None, Diagnostic(Location(display, *line_col(good, len(good))),
                                f"the file is not UTF-8: byte 0x{raw[exc.start]:02x} cannot start a character here",
                                "save the file as UTF-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    bad = _NOT_PRINTABLE.search(text) if printable else re.search("\x00", text)
    if bad:
        char = bad.group()
        what = "a NUL byte" if char == "\0" else f"the control character U+{ord(char):04X}"
        return None, Diagnostic(Location(display, *line_col(text, bad.start())),
                                f"{what} is not allowed in {'YAML' if printable else 'a schema file'}",
                                "remove it (the file must hold printable text only)")
    return text, None


class ParsedDocs(Protocol):
    """Documents parsed before, by their file's text (engine.collect.yaml_cache), as `stored`
    gives them: a text found here is not parsed again (engine.config.loader)."""

    def get(self, text: str) -> list[dict] | None: ...

    def put(self, text: str, docs: list[dict]) -> None: ...


def stored(doc: Doc) -> dict | None:
    """A Doc as JSON data, or None when JSON would not give it back the same: a mapping key that
    is not a string (`1:`, `true:`) would come back as one."""
    if not _string_keys(doc.data):
        return None
    return {"data": doc.data, "keys": [[list(p), list(at)] for p, at in doc.keys.items()],
            "values": [[list(p), list(at)] for p, at in doc.values.items()], "start": list(doc.start)}


def restored(data: dict, file: Path, display: str) -> Doc:
    """The Doc `stored` gave `data` for, read from `file` as `display`."""
    def positions(pairs: list) -> dict[Path_, tuple[int, int]]:
        return {tuple(p): (int(line), int(column)) for p, (line, column) in pairs}

    line, column = data["start"]
    return Doc(file, display, data["data"], keys=positions(data["keys"]), values=positions(data["values"]),
               start=(int(line), int(column)))


def _string_keys(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _string_keys(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_string_keys(v) for v in value)
    return True
