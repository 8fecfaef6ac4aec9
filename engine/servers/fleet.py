"""The declared servers of one config directory, and the way to the catalog among them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors, sql

from engine.config.loader import Desired
from engine.errors import UserError
from engine.servers import adoption
from engine.servers.connect import ServerHandle, handles
from engine.servers.embedded import EmbeddedServer


class DeclaredServers(dict[str, ServerHandle]):
    """The declared servers by name; a name the YAML does not declare (a server removed since
    an operation began) is a UserError saying so, never a KeyError mid-apply."""

    def __missing__(self, name: str) -> ServerHandle:
        raise UserError(f"server {name!r} is not declared in the configuration, and shardctl needs it here",
                        f"declare {name} again (as it was) so that shardctl can reach it; nothing more was done")


class Fleet:
    def __init__(self, desired: Desired, adopting: bool = False):
        self.desired = desired
        self.servers: dict[str, ServerHandle] = DeclaredServers(handles(desired.servers, desired.directory))
        self.adopting = adopting  # `shardctl adopt`: a copied directory's servers and catalog become its own

    @property
    def catalog_server(self) -> ServerHandle:
        assert self.desired.catalog_server is not None
        return self.servers[self.desired.catalog_server]

    def is_catalog(self, server: str, dbname: str) -> bool:
        return (server, dbname) == (self.desired.catalog_server, self.desired.catalog_database)

    def start_embedded(self, say: Callable[[str], None] = lambda _: None) -> list[str]:
        """Start declared embedded servers that are not running; a local runtime concern, not a
        change to the fleet, so plan may do it too."""
        started = []
        for name, handle in sorted(self.servers.items()):
            server = handle.embedded
            if server is not None and not server.running_pid():
                say(f"Starting embedded server {name}...")
                server.start(say, adopting=self.adopting)
                started.append(name)
            elif server is not None:
                server.close_to_others(say)  # one an older version started: owner-only at once
        return started

    def undeclared_embedded(self) -> list[EmbeddedServer]:
        """Embedded servers under this directory's .shardctl/ that the YAML no longer declares
        (removed after their shards were drained): shardctl names them and `down` stops them."""
        root = self.desired.directory / ".shardctl" / "servers"
        try:
            found = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in self.servers)
        except OSError:
            return []
        return [EmbeddedServer(p.name, p) for p in found if (p / "data" / "PG_VERSION").exists()]

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
            # it belongs to this directory, and records how each server is reached now (adoption.py)
            adoption.settle(self, conn, adopt=self.adopting)
            yield conn
