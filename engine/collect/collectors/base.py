"""The collector interface and its registry (built-in collectors and plugins register here;
engine/collect/collectors/__init__.py lists the ones a round uses)."""

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
