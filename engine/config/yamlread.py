"""Reading YAML safely: plain data with the line and column of every key and value, and limits.

ruamel.yaml composes the node graph (safe schema, YAML 1.2); this module builds the data from
it instead of ruamel's constructor, so that it can refuse what a config never needs and what
would hang or crash a loader: alias expansion beyond a bound (an alias is shared, never copied),
nesting beyond a depth, files beyond a size, numbers beyond a range, NaN and infinities, NUL and
other control characters, and tags other than the core ones. Merge keys (`<<: *x`,
`<<: [*a, {...}]`) work. Every refusal is a Diagnostic at file:line:column.

The file's checks (size, UTF-8, printable) and the documents' shape are engine.config.yamldocs,
which imports no ruamel: the loader comes here only for a file not parsed before.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from engine.config.yamldocs import Doc, Path_, check_file, line_col
from engine.errors import Diagnostic, Location

MAX_DEPTH = 64  # nesting of mappings and sequences
MAX_ALIAS_EXPANSION = 100_000  # values that aliases may add to a document beyond its own
MAX_NUMBER_CHARS = 40  # digits of a number literal; longer ones are refused before conversion

T = "tag:yaml.org,2002:"


class _Refused(Exception):
    def __init__(self, node: Node | None, message: str, hint: str | None = None, mark=None):
        self.mark = mark if mark is not None else (node.start_mark if node is not None else None)
        self.message, self.hint = message, hint


def _pos(mark) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


def read(file: Path, display: str, problems: list[Diagnostic]) -> list[Doc]:
    """Every non-empty document of a YAML file, or Diagnostics appended to `problems`."""
    text, problem = check_file(file, display)
    if problem or text is None:
        problems.append(problem or Diagnostic(Location(display), "cannot read the file"))
        return []
    return read_text(text, file, display, problems)


def read_text(text: str, file: Path, display: str, problems: list[Diagnostic]) -> list[Doc]:
    yaml = YAML(typ="safe", pure=True)
    yaml.version = (1, 2)
    docs: list[Doc] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a re-used anchor is valid YAML: the later one counts
            nodes = list(yaml.compose_all(text))
        for node in nodes:
            if node is None or (isinstance(node, ScalarNode) and node.tag == T + "null"):
                continue
            if not isinstance(node, MappingNode):
                problems.append(Diagnostic(
                    Location(display, *_pos(node.start_mark)),
                    "a config document must be a mapping with servers:, databases:, policies: or catalog:"))
                continue
            doc = Doc(file, display, None, start=_pos(node.start_mark))
            try:
                _check_expansion(node)
                doc.data = _Builder(doc).build(node, (), 0)
            except _Refused as exc:
                problems.append(Diagnostic(Location(display, *_pos(exc.mark)), exc.message, exc.hint))
                continue
            docs.append(doc)
    except MarkedYAMLError as exc:
        problems.append(_syntax(exc, display))
    except RecursionError:
        problems.append(Diagnostic(Location(display, *_deep_position(text)),
                                   f"the YAML nests deeper than {MAX_DEPTH} levels",
                                   "a config file never needs such nesting"))
    except YAMLError as exc:
        problems.append(Diagnostic(Location(display, 1, 1), f"YAML syntax: {exc}"))
    return docs


def _syntax(exc: MarkedYAMLError, display: str) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    what = exc.problem or exc.context or "invalid YAML"
    if exc.context_mark is not None and exc.context and (
            "<stream end>" in what or "end of stream" in what or "quoted scalar" in exc.context):
        # "unexpected end of file" is useless; point at what was left open instead
        mark = exc.context_mark
        what = f"{exc.context} that is never closed ({what})"
    return Diagnostic(Location(display, *_pos(mark)), f"YAML syntax: {what}")


def _deep_position(text: str) -> tuple[int, int]:
    """Where nesting first goes beyond MAX_DEPTH (flow brackets or indentation), roughly."""
    depth = 0
    for index, char in enumerate(text):
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return line_col(text, index)
        elif char in "]}":
            depth -= 1
        elif char == "\n":
            indent = len(text[index + 1:index + 1 + 4 * MAX_DEPTH + 1]) - len(
                text[index + 1:index + 1 + 4 * MAX_DEPTH + 1].lstrip(" -"))
            if indent > 2 * MAX_DEPTH:
                return line_col(text, index + 1)
    return 1, 1


def _check_expansion(root: Node) -> None:
    """Refuse a document whose aliases would expand to more than MAX_ALIAS_EXPANSION values
    (a "billion laughs"): sizes are counted once per node, so this is linear in the document."""
    size: dict[int, int] = {}
    own = 0
    stack: list[tuple[Node, bool]] = [(root, False)]
    seen_once: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            children = _children(node)
            total = 1 + sum(size[id(c)] for c in children)
            size[key] = total
            continue
        if key in size or key in seen_once:
            continue
        seen_once.add(key)
        own += 1
        stack.append((node, True))
        for child in _children(node):
            if id(child) not in size and id(child) not in seen_once:
                stack.append((child, False))
            elif id(child) in seen_once and id(child) not in size:
                raise _Refused(child, "an alias refers to a node that contains it (a recursive alias)",
                               "aliases may only repeat complete values")
    expanded = size.get(id(root), 0)
    if expanded - own > MAX_ALIAS_EXPANSION:
        # point at the top-level entry that expands the most
        where = max(root.value, key=lambda pair: size.get(id(pair[1]), 0))[0] if isinstance(root, MappingNode) else root
        raise _Refused(where, f"aliases expand this document by more than {MAX_ALIAS_EXPANSION:,} values"
                       f" ({expanded:,} in all)", "a config never needs this; it looks like an alias bomb")


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _Builder:
    """Nodes -> plain dicts, lists and scalars, recording positions of paths as it goes. A node
    reached again through an alias yields the same object: aliases are shared, not copied."""

    def __init__(self, doc: Doc):
        self.doc = doc
        self.done: dict[int, Any] = {}
        self.aliased: set[int] = set()

    def build(self, node: Node, path: Path_, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise _Refused(node, f"the YAML nests deeper than {MAX_DEPTH} levels",
                           "a config file never needs such nesting")
        key = id(node)
        if key in self.done:
            return self.done[key]
        if isinstance(node, ScalarNode):
            value = _scalar(node)
        elif isinstance(node, SequenceNode):
            if node.tag != T + "seq":
                raise _unsupported_tag(node)
            value = []
            self.done[key] = value
            for i, item in enumerate(node.value):
                sub = (*path, i)
                self.doc.keys.setdefault(sub, _pos(item.start_mark))
                value.append(self.build(item, sub, depth + 1))
        elif isinstance(node, MappingNode):
            if node.tag != T + "map":
                raise _unsupported_tag(node)
            value = {}
            self.done[key] = value
            merged: list[tuple[Node, Node]] = []
            for k, v in node.value:
                if k.tag == T + "merge":
                    merged.extend(self._merge_sources(v))
                    continue
                self._put(value, k, v, path, depth, explicit=True)
            for k, v in merged:
                self._put(value, k, v, path, depth, explicit=False)
        else:
            raise _Refused(node, "unsupported YAML node")
        self.done[key] = value
        return value

    def _merge_sources(self, node: Node) -> list[tuple[Node, Node]]:
        """The pairs a merge key brings in: one mapping, or a list of them (earlier wins)."""
        sources = node.value if isinstance(node, SequenceNode) else [node]
        pairs: list[tuple[Node, Node]] = []
        for source in sources:
            if not isinstance(source, MappingNode) or source.tag != T + "map":
                raise _Refused(source, "a merge key (<<) takes a mapping or a list of mappings",
                               "write `<<: *anchor` or `<<: [*a, *b]` where the anchors name mappings")
            for k, v in source.value:
                if k.tag == T + "merge":
                    pairs.extend(self._merge_sources(v))
                else:
                    pairs.append((k, v))
        return pairs

    def _put(self, target: dict, k: Node, v: Node, path: Path_, depth: int, explicit: bool) -> None:
        if not isinstance(k, ScalarNode):
            raise _Refused(k, "a mapping key must be a plain value, not a mapping or a list")
        name = _scalar(k)
        if isinstance(name, float):
            name = str(name)
        if name in target:
            if explicit:
                raise _Refused(k, f'YAML syntax: duplicate key "{name}": each key may appear once in a mapping')
            return  # a merged key never overrides one given in the mapping itself
        sub = (*path, name)
        self.doc.keys.setdefault(sub, _pos(k.start_mark))
        self.doc.values.setdefault(sub, _pos(v.start_mark))
        target[name] = self.build(v, sub, depth + 1)


def _unsupported_tag(node: Node) -> _Refused:
    tag = (node.tag or "").replace(T, "!!")
    return _Refused(node, f"the YAML tag {tag} is not supported",
                    "write a plain mapping, list or value (no tags such as !!omap, !!set, !!binary or !custom)")


_INT = re.compile(r"^[-+]?(0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+|[0-9_]+)$")


def _scalar(node: ScalarNode) -> Any:
    tag, text = node.tag, node.value
    if "\0" in text:
        raise _Refused(node, "a NUL character is not allowed in a value", "remove the \\0 escape")
    if tag in (T + "str", "!"):
        return text
    if tag == T + "null":
        return None
    if tag == T + "bool":
        return text.lower() == "true"
    if tag == T + "int":
        digits = text.lstrip("+-").replace("_", "")
        if len(digits) > MAX_NUMBER_CHARS or not _INT.match(text):
            raise _Refused(node, f"the number {_short(text)} is out of range",
                           "numbers in a config have at most a few digits")
        sign = -1 if text.startswith("-") else 1
        for prefix, base in (("0x", 16), ("0o", 8), ("0b", 2)):
            if digits.lower().startswith(prefix):
                return sign * int(digits[2:], base)
        return sign * int(digits)
    if tag == T + "float":
        if len(text) > MAX_NUMBER_CHARS:
            raise _Refused(node, f"the number {_short(text)} is out of range",
                           "numbers in a config have at most a few digits")
        try:
            value = float(text.replace("_", ""))
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise _Refused(node, f"{_short(text)} is not a finite number: NaN and infinities are not allowed",
                           "give a number")
        return value
    if tag == T + "timestamp":
        return text  # no setting is a timestamp: the model refuses it as the string it is
    raise _unsupported_tag(node)


def _short(text: str) -> str:
    return repr(text if len(text) <= 24 else text[:20] + "...")
