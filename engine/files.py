"""Files a user names on the command line: read bounded, parsed bounded, written atomically.

A plan file, a recorded-samples file or a schema file to check is whatever path was typed:
`/dev/zero`, a FIFO, a directory, a sparse file of a terabyte, or 100,000 `[`. Each is read
only when it is a regular file under a size limit (the read itself stops at the limit, in
case the file grows meanwhile), and JSON is parsed only once its nesting is known to stay
within a depth limit (Python's parser recurses). Every refusal is a `UserError` naming the
file and the limit, never a MemoryError or RecursionError. Config files go through the same
read (engine.config.yamlread), with their own messages.

What shardctl writes for a user (`plan -out`, `metrics export -o`, `schema --out`) is written
to a temporary file beside the target and renamed over it: a reader never sees half a file,
and a path that cannot be written is an error before anything claims the file was saved.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from engine.errors import UserError

MAX_PLAN_BYTES = 64 * 2**20  # a plan of 10,000 actions is a few MiB
MAX_METRICS_BYTES = 256 * 2**20  # weeks of per-minute samples for a few dozen shards
MAX_JSON_DEPTH = 64  # a plan nests about a dozen levels


class Unreadable(Exception):
    """Why a file cannot be read as a bounded regular file: `reason` (missing, broken_link,
    not_regular, too_large, unreadable), a message and a hint."""

    def __init__(self, reason: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.reason, self.message, self.hint = reason, message, hint


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def bounded_bytes(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, or Unreadable saying why not."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise Unreadable("broken_link", "the file is a broken symbolic link",
                             "point it at a file that exists") from None
        raise Unreadable("missing", "no such file") from None
    except OSError as exc:
        raise Unreadable("unreadable", f"cannot read the file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise Unreadable("not_regular", f"not a regular file ({_kind(info.st_mode)})",
                         "give the path of an ordinary file")
    if info.st_size > limit:
        raise Unreadable("too_large", f"the file is {info.st_size:,} bytes; the limit is {limit:,}")
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)  # a file that grew since stat() is still cut off
    except OSError as exc:
        raise Unreadable("unreadable", f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise Unreadable("too_large", f"the file is larger than {limit:,} bytes")
    return data


def read_text(path: str | Path, what: str, limit: int) -> str:
    """A user-named file as UTF-8 text (`what` names it in errors: "plan file", ...)."""
    try:
        data = bounded_bytes(Path(path), limit)
    except Unreadable as exc:
        raise UserError(f"{what} {path}: {exc.message}", exc.hint) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start:,})",
                        f"is {path} really a {what}?") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str, limit: int) -> int:
    """How deep the JSON text nests, counted until it passes `limit` (then limit + 1).
    Strings are removed first, so a bracket inside one does not count."""
    depth = 0
    for char in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        if char in "[{":
            depth += 1
            if depth > limit:
                return depth
        else:
            depth -= 1
    return 0


def load_json(path: str | Path, what: str, limit: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A user-named JSON file, bounded in size and depth; refusals name the file."""
    text = read_text(path, what, limit)
    if json_depth(text, max_depth) > max_depth:
        raise UserError(f"{what} {path} nests deeper than {max_depth} levels",
                        f"no {what} nests so deep; is {path} really one?")
    try:
        return json.loads(text)
    except RecursionError:  # json_depth counts what json nests; this stays a safety net
        raise UserError(f"{what} {path} nests deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from None


def check_writable(path: str | Path, what: str) -> None:
    """Refuse at once a path that can never be written (before minutes of work are spent on
    what it would hold): a missing directory, a file where a directory should be, a target
    that is not a regular file (a rename would replace /dev/full or a FIFO)."""
    target = Path(path)
    try:
        mode = target.stat().st_mode
    except OSError:
        mode = None  # absent, or beyond a missing or unreadable directory: said below
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"cannot write the {what} to {path}: it is {_kind(mode)}",
                        "give the path of an ordinary file (it is replaced whole)")
    directory = target.parent
    if not directory.is_dir():
        reason = FileNotFoundError() if not directory.exists() and _first_file(directory) is None \
            else NotADirectoryError()
        raise UserError(f"cannot write the {what} to {path}: {_why(reason, directory)}",
                        "give a path in a directory that exists and that you may write to")


def write_atomically(path: str | Path, text: str, what: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename, so
    the file is whole or absent; a path that cannot be written is a UserError saying why."""
    check_writable(path, what)
    target = Path(path)
    directory = target.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UserError(f"cannot write the {what} to {path}: {_why(exc, directory)}",
                        "give a path in a directory that exists and that you may write to") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary new file would be (mkstemp makes 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise UserError(f"cannot write the {what} to {path}: {_why(exc, target)}",
                        "nothing was saved; free some space or choose another path") from None


def _why(exc: OSError, where: Path) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"the directory {where if where != Path('.') else '.'} does not exist"
    if isinstance(exc, NotADirectoryError):
        return f"{_first_file(where) or where} is a file, not a directory"
    if isinstance(exc, IsADirectoryError):
        return f"{where} is a directory"
    return exc.strerror or str(exc)


def _first_file(where: Path) -> Path | None:
    """The part of a path that is a file where a directory was needed."""
    for parent in reversed((where, *where.parents)):
        if parent.exists() and not parent.is_dir():
            return parent
    return None
