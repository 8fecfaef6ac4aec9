"""The declared servers of one config directory, and the way to the catalog among them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors, sql

from engine.config.loader import Desired
from engine.servers.connect import ServerHandle, handles


class Fleet:
    def __init__(self, desired: Desired):
        self.desired = desired
        self.servers: dict[str, ServerHandle] = handles(desired.servers, desired.directory)

    @property
    def catalog_server(self) -> ServerHandle:
        assert self.desired.catalog_server is not None
        return self.servers[self.desired.catalog_server]

    def start_embedded(self, say: Callable[[str], None] = lambda _: None) -> list[str]:
        """Start declared embedded servers that are not running; a local runtime concern, not a
        change to the fleet, so plan may do it too."""
        started = []
        for name, handle in sorted(self.servers.items()):
            server = handle.embedded
            if server is not None and not server.running_pid():
                say(f"Starting embedded server {name}...")
                server.start(say)
                started.append(name)
            elif server is not None:
                server.close_to_others(say)  # one an older version started: owner-only at once
        return started

    @contextmanager
    def catalog(self, create: bool = False) -> Iterator[psycopg.Connection | None]:
        """A connection to the control database; None when it does not exist and create is False."""
        handle = self.catalog_server
        name = self.desired.catalog_database
        with handle.connect() as admin:
            exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                if not create:
                    yield None
                    return
                with contextlib.suppress(errors.DuplicateDatabase):  # another apply created it at the same moment
                    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with handle.connect(name) as conn:
            yield conn
