"""The declared servers of one config directory, and the way to the catalog among them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors, sql

from engine.config.loader import Desired
from engine.errors import UserError
from engine.servers import adoption, embedded
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
        """Start declared embedded servers that are not running, configured for the replication
        the declared fleet needs (engine/plan/budget.py); a local runtime concern, not a change
        to the fleet, so plan may do it too. A running server whose settings fall short has them
        written for its next start, and is named with what a restart would raise."""
        started = []
        needs = None
        for name, handle in sorted(self.servers.items()):
            server = handle.embedded
            if server is None:
                continue
            if needs is None:
                from engine.plan import budget

                needs = budget.fleet_needs(self.desired)
            settings = _replication_settings(needs[name], server.major())
            if not server.running_pid():
                say(f"Starting embedded server {name}...")
                server.start(say, settings, adopting=self.adopting)
                started.append(name)
                continue
            server.close_to_others(say)  # one an older version started: owner-only at once
            if server.initialized() and server.configure(settings):
                with contextlib.suppress(psycopg.Error), handle.connect() as conn:
                    running = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                                                (sorted(settings),)).fetchall())
                    raised = [f"{k} {running[k]} -> {v}" for k, v in sorted(settings.items())
                              if k in running and int(running[k]) < v]
                    if raised:
                        conn.execute("SELECT pg_reload_conf()")  # marks them pending_restart
                        say(f"Server {name}: the declared fleet needs more replication than it runs with"
                            f" ({', '.join(raised)}); written to its settings, they take effect when it"
                            " restarts (`shardctl down`, then `shardctl up`)")
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


def _replication_settings(need, major: int) -> dict[str, int]:
    from engine.plan import budget

    floors = {k: int(v) for k, v in embedded.SETTINGS.items() if k in budget.EMBEDDED_SETTINGS}
    return budget.embedded_settings(need, major, floors)
