"""Errors a user can cause, and how they are told: file:line:column, the line, and a fix.

Every failure that is the user's to fix is a `UserError` (or a subclass); the CLI prints it
and exits 1 without a traceback. Anything else is a bug and keeps its traceback under --debug.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, order=True)
class Location:
    """A place in a source file. Lines and columns are 1-based, as editors show them."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"

    def source_line(self) -> str | None:
        if not self.line:
            return None
        try:
            lines = Path(self.file).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return None
        if 0 < self.line <= len(lines):
            return lines[self.line - 1]
        return None


@dataclass(frozen=True, order=True)
class Diagnostic:
    location: Location
    message: str
    hint: str | None = None

    def render(self) -> str:
        head = f"{self.location}: error: {self.message}"
        text = self.location.source_line()
        parts = [head]
        if text is not None:
            gutter = f"{self.location.line:>5} | "
            shown, column = printable(redact(text.rstrip()), self.location.column)
            parts.append(gutter + shown)
            if column:
                parts.append(" " * (len(gutter) + column - 1) + "^")
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)


class UserError(Exception):
    """A failure the user can fix. `summary` is one line; `detail` may add more."""

    exit_code = 1

    def __init__(self, summary: str, detail: str | None = None):
        super().__init__(summary)
        self.summary = summary
        self.detail = detail

    def render(self) -> str:
        text = f"Error: {redact(self.summary)}"
        if self.detail:
            text += "\n\n" + redact(self.detail)
        return text


class ConfigError(UserError):
    """One or more problems in the config files, each with its location."""

    def __init__(self, diagnostics: list[Diagnostic], where: str = "in the configuration"):
        self.diagnostics = sorted(set(diagnostics))
        count = len(self.diagnostics)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} {where}")

    def render(self) -> str:
        body = "\n\n".join(redact(d.render()) for d in self.diagnostics)
        return f"{body}\n\nError: {self.summary}; nothing was changed."


@dataclass
class LockInfo:
    id: str
    operation: str
    who: str
    version: str
    created: str
    extra: dict = field(default_factory=dict)


class LockHeldError(UserError):
    def __init__(self, info: LockInfo | None):
        self.info = info
        lines = [
            "shardctl acquires a lock on the catalog so that only one apply runs at a time.",
            "Another shardctl process holds it now; wait for it to finish, or rerun with",
            "--lock-timeout=DURATION to wait for it.",
        ]
        if info:
            lines += [
                "",
                "Lock Info:",
                f"  ID:        {info.id}",
                f"  Operation: {info.operation}",
                f"  Who:       {info.who}",
                f"  Version:   {info.version}",
                f"  Created:   {info.created}",
            ]
        super().__init__("Error acquiring the state lock", "\n".join(lines))


# Secrets can arrive in DSNs (key=value or URI form), in libpq error texts, and in the YAML
# itself (a `password:` key where none belongs, a DSN pasted as a service name). Redact by what
# a thing is: secret-looking keys, URL userinfo of any scheme, and every value read from a
# `dsn_env` variable (registered when read), wherever they appear in what is shown.
SECRET_KEY = (r"[\w.-]*(?:password|passwd|pwd|secret|token|pgpass|credential|private[_-]?key|api[_-]?key|apikey"
              r"|service)[\w.-]*")
_KV_SECRET = re.compile(rf"(\b{SECRET_KEY}\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_YAML_SECRET = re.compile(rf"""(\b{SECRET_KEY}["']?\s*:(?:\s+|(?=["']))|\b{SECRET_KEY}["']?:$)"""
                          r"""("(?:[^"\\]|\\.)*"?|'(?:[^']|'')*'?|[^,}\]\n#]*[^,}\]\n#\s])?""", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)([^/@\s?#]+)(@)", re.IGNORECASE)
# user:password@host without a scheme (a DSN pasted half-way), up to the token's last @
_BARE_USERINFO = re.compile(r"(?<![\w.%+~-])[\w.%+~-]+:[^\s/'\"]*(@)(?=[\w\[])")
# a pgpass line, host:port:database:user:password (the password may hold escaped colons)
_PGPASS = re.compile(r"(?<![\w.*-])([\w.*-]+:(?:\d+|\*):[^\s:]+:[^\s:]+:)((?:\\.|[^\s\\'\"])+)")
# a secret-looking word before an SQL string literal: PASSWORD 'x' (CREATE or ALTER ROLE),
# password 'x' in OPTIONS (USER MAPPING, SERVER), E'x', and SQL inside a single-quoted YAML
# string, where its quotes are doubled (''x'')
_SQL_SECRET = re.compile(rf"(\b{SECRET_KEY}\s+E?)(''(?:[^']|'''')+''|'(?:[^']|'')*'?)", re.IGNORECASE)
_REGISTERED: set[str] = set()
MASK = "********"


def register_secret(value: str | None) -> None:
    """A value never to be shown (a DSN from the environment, a password in it)."""
    if value and len(value) >= 4:
        _REGISTERED.add(value)


def _masked_literal(match: re.Match) -> str:
    quote = "''" if match.group(2).startswith("''") else "'"
    return f"{match.group(1)}{quote}{MASK}{quote}"


def redact(text: str) -> str:
    for secret in sorted(_REGISTERED, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URI_USERINFO.sub(rf"\1{MASK}\3", text)
    text = _BARE_USERINFO.sub(rf"{MASK}\1", text)
    text = _PGPASS.sub(rf"\1{MASK}", text)
    text = _SQL_SECRET.sub(_masked_literal, text)
    text = _KV_SECRET.sub(rf"\1{MASK}", text)
    return _YAML_SECRET.sub(lambda m: m.group(1) + (MASK if m.group(2) else ""), text)


_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(line: str, column: int = 0, width: int = 160) -> tuple[str, int]:
    """A source line as it may be echoed: control characters escaped, at most `width`
    characters around `column`. Returns the line and the caret's new column."""
    line = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", line)
    if len(line) <= width:
        return line, column
    start = max(0, min(column - width // 2, len(line) - width)) if column else 0
    shown = ("..." if start else "") + line[start:start + width] + ("..." if start + width < len(line) else "")
    return shown, (column - start + (3 if start else 0)) if column else 0
