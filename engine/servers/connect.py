"""Connections to declared servers: resolve a server to libpq parameters, connect, redact.

A server is reached through its embedded socket, a DSN read from an environment variable, or a
libpq service. Passwords stay inside the parameters handed to psycopg: `describe()` is the only
text form, and it never includes one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from engine.config import models
from engine.errors import UserError, redact, register_secret
from engine.servers.embedded import EmbeddedServer

SECRET_KEYS = {"password", "sslpassword", "passfile"}


@dataclass(frozen=True)
class ServerHandle:
    name: str
    spec: models.Server
    config_dir: Path

    @property
    def embedded(self) -> EmbeddedServer | None:
        if not self.spec.embedded:
            return None
        return EmbeddedServer(self.name, self.config_dir / ".shardctl" / "servers" / self.name)

    def params(self, dbname: str = "postgres") -> dict[str, Any]:
        if self.embedded:
            return self.embedded.conninfo(dbname)
        if self.spec.dsn_env:
            raw = os.environ.get(self.spec.dsn_env)
            if not raw:
                raise UserError(
                    f"server {self.name!r}: environment variable {self.spec.dsn_env} is not set",
                    f"export {self.spec.dsn_env}='host=... dbname=postgres user=...' (a libpq DSN) and rerun",
                )
            register_secret(raw)  # never shown, whatever happens to it
            try:
                params = {k: str(v) for k, v in conninfo_to_dict(raw).items()}
            except psycopg.ProgrammingError as exc:
                # libpq quotes the offending part of the string: keep only what kind of mistake it is
                why = re.sub(r'"[^"]*"', "(...)", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                raise UserError(f"server {self.name!r}: {self.spec.dsn_env} is not a valid DSN: {redact(why)}",
                                "it must be a libpq key=value string or a postgresql:// URI"
                                " (percent-encode special characters in a URI)") from None
            register_secret(params.get("password"))
        else:
            params = {"service": str(self.spec.service)}
        params["dbname"] = dbname
        return params

    def describe(self, dbname: str = "postgres") -> str:
        """A connection string safe to print: no password, ever."""
        try:
            params = self.params(dbname)
        except UserError:
            return f"(from ${self.spec.dsn_env})"
        shown = {k: v for k, v in params.items() if k not in SECRET_KEYS}
        return " ".join(f"{k}={v}" for k, v in sorted(shown.items()))

    @contextmanager
    def connect(self, dbname: str = "postgres", autocommit: bool = True, connect_timeout: str = "10",
                **kwargs) -> Iterator[psycopg.Connection]:
        try:
            params = {"connect_timeout": connect_timeout, "application_name": "shardctl", **self.params(dbname)}
            conn = psycopg.connect(**params, autocommit=autocommit, **kwargs)
        except psycopg.OperationalError as exc:
            raise ServerUnreachable(self.name, dbname, exc, self.how_to_reach()) from None
        try:
            yield conn
        except psycopg.Error as exc:
            blame(exc, self.name, dbname, certain=conn.broken)
            raise
        finally:
            conn.close()


    def how_to_reach(self) -> str:
        """The hint of a failed connection, for this kind of server."""
        if self.spec.embedded:
            return "check that the server is running (`shardctl up` starts embedded servers)"
        if self.spec.dsn_env:
            return (f"check that the server is running and that ${self.spec.dsn_env} reaches it (host, port, user,"
                    " password or passfile, sslmode); `shardctl doctor` checks every server")
        return (f"check that the server is running and the service {self.spec.service!r} in pg_service.conf"
                " (PGSERVICEFILE) reaches it; `shardctl doctor` checks every server")


def blame(exc: psycopg.Error, server: str, dbname: str, certain: bool) -> None:
    """Name the server an error came from, for the CLI's message. Several connections' contexts
    may see one error go by (those a move holds open together); the innermost claims it, unless
    another one's connection is the one that broke (a server that stopped answering)."""
    if getattr(exc, "shardctl_server", None) is None or (certain and not getattr(exc, "shardctl_certain", False)):
        exc.shardctl_server = (server, dbname)  # type: ignore[attr-defined]
        exc.shardctl_certain = certain  # type: ignore[attr-defined]


def blamed(exc: BaseException) -> tuple[str, str] | None:
    """(server, database) an error came from, when a connection of ours saw it."""
    return getattr(exc, "shardctl_server", None)


class ServerUnreachable(UserError):
    def __init__(self, server: str, dbname: str, exc: Exception,
                 hint: str = "check that the server is running (`shardctl up` starts embedded servers)"):
        message = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        super().__init__(f"cannot connect to server {server!r} (database {dbname!r}): {message}", hint)
        self.server = server
        self.dbname = dbname


def handles(servers: dict[str, models.Server], config_dir: Path) -> dict[str, ServerHandle]:
    return {name: ServerHandle(name, spec, config_dir) for name, spec in servers.items()}
