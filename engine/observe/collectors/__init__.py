"""Metric collectors: a registry others can extend.

A collector reads one server's shards in one round and returns or enriches `Reading`s. The
built-in ones are `postgres` (statistics views, one connection per server) and `proc` (real
CPU of backends from the host's /proc, for servers on this host). Third-party collectors
register through the `shardctl.collectors` entry-point group, or `register()` at run time.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import ClassVar

import psycopg

from engine.observe.metrics import Reading
from engine.observe.models import CatalogShard
from engine.servers.connect import ServerHandle


class Collector(ABC):
    name: ClassVar[str]

    def applies_to(self, server: ServerHandle) -> bool:
        return True

    @abstractmethod
    def collect(self, server: ServerHandle, conn: psycopg.Connection, shards: list[CatalogShard],
                readings: dict[str, Reading], full: bool) -> dict[str, Reading]:
        """Return `readings` with what this collector adds (new values, never mutation).
        `conn` is the round's one connection to the server (autocommit, database postgres).
        `full` asks for the slower tier too (sizes, buffer shares); a size already in `readings`
        (read by a plan's inspection a moment before) need not be read again."""


_lock = threading.Lock()
_registry: dict[str, type[Collector]] = {}
_loaded_entry_points = False


def register(cls: type[Collector]) -> type[Collector]:
    with _lock:
        _registry[cls.name] = cls
    return cls


def available() -> dict[str, type[Collector]]:
    global _loaded_entry_points
    with _lock:
        if not _loaded_entry_points:
            _loaded_entry_points = True
            for ep in entry_points(group="shardctl.collectors"):
                cls = ep.load()
                _registry.setdefault(cls.name, cls)
        return dict(_registry)


def default_collectors() -> list[Collector]:
    from engine.observe.collectors import postgres, proc  # noqa: F401  (registers them)

    found = available()
    return [found["postgres"](), found["proc"]()] + [
        cls() for name, cls in sorted(found.items()) if name not in ("postgres", "proc")
    ]
