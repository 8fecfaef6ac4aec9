"""Watching the config directory for edits, with watchfiles, debounced.

Only the directories that can hold config are watched, each non-recursively: the directory
itself and its subdirectories, skipping hidden ones. A recursive watch would also see the
embedded servers' data directories under `.shardctl/` and wake the daemon on every WAL write.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import watchfiles

SUFFIXES = (".yaml", ".yml", ".sql")


def watched_directories(root: Path, depth: int = 3) -> list[Path]:
    found = []
    for current, dirs, _ in os.walk(root):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules"))
        if len(here.relative_to(root).parts) >= depth:
            dirs[:] = []
        found.append(here)
    return found


def _is_config(change: watchfiles.Change, path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(SUFFIXES) and not name.startswith(".")


class ConfigWatcher:
    """Calls `on_change(paths)` from its own thread after each debounced batch of edits."""

    def __init__(self, root: Path, on_change: Callable[[list[str]], None], debounce_ms: int = 500):
        self.root = root
        self.on_change = on_change
        self.debounce_ms = debounce_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardctl-config-watch", daemon=True)

    def start(self) -> ConfigWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            paths = watched_directories(self.root)
            # a new subdirectory is picked up by restarting the watch when one appears
            # `step` is how often the watcher wakes to look at the stop event: 20 times a second
            # by default, a third of the idle daemon's CPU
            for changes in watchfiles.watch(*paths, watch_filter=None, debounce=self.debounce_ms, step=250,
                                            stop_event=self._stop, recursive=False, raise_interrupt=False,
                                            rust_timeout=1000, yield_on_timeout=False):
                config = sorted({p for c, p in changes if _is_config(c, p)})
                if config:
                    self.on_change(config)
                if watched_directories(self.root) != paths:
                    break
