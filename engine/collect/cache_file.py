"""What the config caches (sql_cache, yaml_cache) share: the fingerprint of the code whose
results they remember, and their file, `.shardctl/cache/<name>.json`, read only when it was written
by the same code and written back private (0600), only where `.shardctl/` already is. A file that
cannot be read or written is no cache, never an error."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from engine.servers import private


def fingerprint(distribution: str, sources: tuple[Path, ...]) -> str:
    """The sha256 of a library's version and the bytes of our code that uses it; "" when either
    cannot be read (then nothing is cached)."""
    try:
        digest = hashlib.sha256(metadata.version(distribution).encode())
        for path in sources:
            digest.update(path.read_bytes())
    except (OSError, metadata.PackageNotFoundError):
        return ""
    return digest.hexdigest()


def read(path: Path, version: int, field: str, code: str,
         parse_constant: Callable[[str], object] | None = None) -> dict | None:
    """The file's data when it was written at VERSION by the code whose fingerprint its FIELD
    holds and is CODE; None when it is not, or cannot be read."""
    if not code:
        return None
    try:
        data = json.loads(path.read_text(), parse_constant=parse_constant)
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("version") == version and data.get(field) == code:
        return data
    return None


def write(path: Path, data: dict) -> bool:
    """DATA written to PATH (0600) when `.shardctl/` exists; whether it was."""
    if not path.parent.parent.is_dir():
        return False
    try:
        path.parent.mkdir(exist_ok=True, mode=0o700)
        private.write_private(path, json.dumps(data), None)
    except OSError:
        return False
    return True
