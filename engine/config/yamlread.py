"""Reading YAML safely: plain data with the line and column of every key and value, and limits.

A config file is read whole within a size bound, as UTF-8 text of printable characters only;
engine.config.yamlcompose composes it into Docs with ruamel.yaml and refuses what a config never
needs (alias bombs, deep nesting, huge numbers, NaN, tags). Every refusal is a Diagnostic at
file:line:column.

Given a cache of parsed documents (engine.collect.yaml_cache, for plan and apply), a file whose
text was parsed before without a problem is not parsed again: importing ruamel and composing the
YAML are most of what reading a config costs, and a plan of unchanged files pays neither. A file
with a problem is never remembered: it is parsed every time, to say where.
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
    gives them: a text found here is not parsed again."""

    def get(self, text: str) -> list[dict] | None: ...

    def put(self, text: str, docs: list[dict]) -> None: ...


def read(file: Path, display: str, problems: list[Diagnostic], parsed: ParsedDocs | None = None) -> list[Doc]:
    """Every non-empty document of a YAML file, or Diagnostics appended to `problems`."""
    text, problem = check_file(file, display)
    if problem or text is None:
        problems.append(problem or Diagnostic(Location(display), "cannot read the file"))
        return []
    if parsed is not None and (known := parsed.get(text)) is not None:
        try:
            return [restored(k, file, display) for k in known]
        except (KeyError, TypeError, ValueError):
            pass  # not what `stored` writes: parsed again below
    found: list[Diagnostic] = []
    docs = read_text(text, file, display, found)
    problems.extend(found)
    if parsed is not None and not found:
        kept = [stored(doc) for doc in docs]
        if all(k is not None for k in kept):
            parsed.put(text, [k for k in kept if k is not None])
    return docs


def read_text(text: str, file: Path, display: str, problems: list[Diagnostic]) -> list[Doc]:
    """Every non-empty document of the text, composed by ruamel.yaml (imported here: see above)."""
    from engine.config import yamlcompose

    return yamlcompose.read_text(text, file, display, problems)


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
