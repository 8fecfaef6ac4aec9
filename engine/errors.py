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
            parts.append(gutter + text.rstrip())
            if self.location.column:
                parts.append(" " * (len(gutter) + self.location.column - 1) + "^")
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


# Passwords can arrive in DSNs (key=value or URI form) and in libpq error texts; strip them
# from anything shown to a person or written to a plan.
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)([^@\s]*)(@)", re.IGNORECASE)


def redact(text: str) -> str:
    text = _KV_PASSWORD.sub(r"\1********", text)
    return _URI_PASSWORD.sub(r"\1********\3", text)
