"""Real servers the way an operator runs them: a Debian PostgreSQL 15 started with its own initdb
and pg_ctl in a temporary directory (TCP on 127.0.0.1, a free port), and an embedded
PostgreSQL 18; both reached through the least-privileged role README documents, declared as
`dsn_env` servers.

`ROLE_SQL` is the same SQL as README's "Running against your own servers" (a test checks that
README quotes it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

PG15_BIN = Path(os.environ.get("SHARDCTL_PG15_BIN", "/usr/lib/postgresql/15/bin"))
ROLE = "shardctl"
MONITOR = "watcher"  # a pg_monitor member and nothing else: what another team's dashboard runs as

# The grants README documents, one statement per line. {password} is filled from a fresh
# random value; {subscribe} is granted on 16+ only.
ROLE_SQL = """\
CREATE ROLE shardctl LOGIN CREATEDB REPLICATION PASSWORD '...';
GRANT pg_monitor TO shardctl;
GRANT pg_create_subscription TO shardctl;  -- PostgreSQL 16 and later
"""

# What a backed-up server needs besides (README's "Running against your own servers" quotes it)
BACKUP_ROLE_SQL = """\
GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean), pg_switch_wal(),
    pg_create_restore_point(text) TO shardctl;
"""

SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "32",
    "max_wal_senders": "32",
    "max_logical_replication_workers": "16",
    "max_worker_processes": "32",
    "max_slot_wal_keep_size": "2GB",
    "shared_preload_libraries": "pg_stat_statements",
    "max_connections": "200",
    # the logs an operator keeps: every DDL statement, and the statement of every error
    "log_statement": "ddl",
    "log_min_error_statement": "error",
}


def pg15_available() -> bool:
    return (PG15_BIN / "initdb").exists() and (PG15_BIN / "pg_ctl").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_statements(password: str, version: int) -> list[sql.Composable]:
    """ROLE_SQL with the password (a SCRAM verifier made on the client, as psql's \\password does,
    so that the administrator's own statement shows no password in logs or statistics)."""
    out: list[sql.Composable] = []
    for line in ROLE_SQL.splitlines():
        statement = line.split("--")[0].strip().rstrip(";")
        if "pg_create_subscription" in statement and version < 160000:
            continue
        if "PASSWORD" in statement:
            out.append(sql.SQL("CREATE ROLE shardctl LOGIN CREATEDB REPLICATION PASSWORD {}").format(
                sql.Literal(password)))
        else:
            out.append(sql.SQL(statement))
    return out


@dataclass
class Server:
    """A running server, its administrator's connection parameters and the role's DSN."""

    name: str
    admin: dict[str, str]  # superuser, for the fixture only
    dsn: str  # the least-privileged role, as shardctl is given it
    password: str
    monitor: dict[str, str]  # a pg_monitor member, to look for leaks as another team would
    log_file: Path
    version: int = 0
    stop: list = field(default_factory=list)

    def admin_connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(**{**self.admin, "dbname": dbname}, autocommit=True)

    def monitor_connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(**{**self.monitor, "dbname": dbname}, autocommit=True)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def shutdown(self) -> None:
        for fn in reversed(self.stop):
            fn()


def _prepare_roles(server: Server) -> None:
    monitor_password = server.monitor["password"]
    with server.admin_connect() as conn:
        server.version = conn.info.server_version
        verifier = conn.pgconn.encrypt_password(server.password.encode(), ROLE.encode(), b"scram-sha-256").decode()
        for statement in role_statements(verifier, server.version):
            conn.execute(statement)
        verifier = conn.pgconn.encrypt_password(monitor_password.encode(), MONITOR.encode(), b"scram-sha-256").decode()
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE pg_monitor").format(
            sql.Identifier(MONITOR), sql.Literal(verifier)))
        for extension in ("pg_stat_statements", "pg_buffercache"):
            conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension)))
        # template1 too, so that every new database has them (as a managed service does)
        with psycopg.connect(**{**server.admin, "dbname": "template1"}, autocommit=True) as t1:
            t1.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def _demote() -> tuple[str | None, dict]:
    """As root, the server runs as the wheel's system user: subprocess's user=/group= with no
    supplementary groups, as engine/servers/embedded.py starts its own."""
    import pwd

    from engine.servers.embedded import _system_user

    user = _system_user()
    if user is None:
        return None, {}
    entry = pwd.getpwnam(user)
    return user, {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _chown_tree(path: Path, user: str | None) -> None:
    if not user:
        return
    import pwd

    entry = pwd.getpwnam(user)
    for root, _dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for f in files:
            os.chown(os.path.join(root, f), entry.pw_uid, entry.pw_gid)


def start_pg15(base: Path) -> Server:
    """initdb + pg_ctl of Debian's PostgreSQL 15 in BASE; TCP on 127.0.0.1 with scram passwords,
    and the administrator on a private socket."""
    user, run_as = _demote()
    root = Path(tempfile.mkdtemp(prefix="sc15-", dir="/tmp"))  # short: socket paths are limited
    data, log_file = root / "data", root / "server.log"
    os.chmod(root, 0o700)  # the administrator's socket (trust) is there: its server's user only
    _chown_tree(root, user)
    password = secrets.token_urlsafe(18)
    run = lambda argv: subprocess.run(argv, check=True, capture_output=True, cwd=str(root), **run_as)  # noqa: E731
    run([str(PG15_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
         "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-instructions"])
    port = free_port()
    with open(data / "postgresql.conf", "a") as conf:
        for key, value in {**SETTINGS, "listen_addresses": "'127.0.0.1'", "port": str(port),
                           "unix_socket_directories": f"'{root}'"}.items():
            conf.write(f"{key} = {value}\n")
    run([str(PG15_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(log_file), "start"])
    admin = {"host": str(root), "port": str(port), "user": "postgres", "dbname": "postgres"}
    monitor = {"host": "127.0.0.1", "port": str(port), "user": MONITOR, "password": secrets.token_urlsafe(12)}
    server = Server("pg15", admin, f"host=127.0.0.1 port={port} user={ROLE} password={password} dbname=postgres",
                    password, monitor, log_file)

    def stop() -> None:
        subprocess.run([str(PG15_BIN / "pg_ctl"), "-D", str(data), "-w", "-m", "immediate", "stop"],
                       capture_output=True, cwd=str(root), **run_as)
        shutil.rmtree(root, ignore_errors=True)

    server.stop.append(stop)
    try:
        _prepare_roles(server)
    except Exception:
        server.shutdown()
        raise
    return server


def start_pg18(base: Path) -> Server:
    """An embedded PostgreSQL 18 that shardctl does not manage (declared by DSN, not `embedded`),
    where the role and the pg_monitor member must give their passwords (scram) while the
    administrator is the owner, let in by peer authentication as every embedded server's."""
    from engine.servers.embedded import EmbeddedServer

    emb = EmbeddedServer("pg18", base / "pg18")
    emb.start()
    hba = emb.data_dir / "pg_hba.conf"
    rules = f"local all {ROLE},{MONITOR} scram-sha-256\nhost all {ROLE},{MONITOR} 127.0.0.1/32 scram-sha-256\n"
    hba.write_text(rules + hba.read_text())
    with open(emb.data_dir / "postgresql.conf", "a") as conf:
        conf.write("log_statement = ddl\nlog_min_error_statement = error\n")
    admin = emb.conninfo()
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    password = secrets.token_urlsafe(18)
    monitor = {"host": admin["host"], "port": admin["port"], "user": MONITOR, "password": secrets.token_urlsafe(12)}
    server = Server("pg18", admin,
                    f"host={admin['host']} port={admin['port']} user={ROLE} password={password} dbname=postgres",
                    password, monitor, emb.log_file)
    server.stop.append(emb.stop)
    try:
        _prepare_roles(server)
    except Exception:
        server.shutdown()
        raise
    return server
