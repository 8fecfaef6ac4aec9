"""Backups of a server the way an operator runs one: Debian's PostgreSQL 15 (its own initdb and
pg_ctl, TCP with scram passwords) reached through README's least-privileged role, declared by a
DSN with its password: doctor names the grants a backed-up server needs, then with them Barman
backs it up (the password only ever in Barman's environment), and the restore drill restores it
with PostgreSQL 15's own binaries."""

import shutil
from pathlib import Path

import psycopg
import pytest

import pgservers
from conftest import run_cli
from movers import preload

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not pgservers.pg15_available(), reason="Debian's postgresql-15 is not installed"),
    pytest.mark.skipif(shutil.which("rsync") is None, reason="Barman restores with rsync (Debian's rsync)"),
]

FLEET = """\
servers:
  a: {embedded: true}
  b: {dsn_env: PG15_DSN, capacity: {storage: 20GiB, memory: 4GiB, cpus: 2}}
backups: {}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: schema/001_init.sql
    shards: 2
    placement: [a, b]
"""


class Fleet:
    def __init__(self, base: Path, env: dict):
        self.base, self.path, self.env = base, base / "fleet", env
        shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "quickstart" / "schema",
                        self.path / "schema")
        (self.path / "fleet.yaml").write_text(FLEET)

    def cli(self, *args: str):
        return run_cli("-C", "fleet", *args, cwd=self.base, env=self.env)

    def connect(self, server: str, dbname: str = "postgres") -> psycopg.Connection:
        from engine.servers.embedded import EmbeddedServer

        srv = EmbeddedServer(server, self.path / ".shardctl" / "servers" / server)
        return psycopg.connect(**srv.conninfo(dbname), autocommit=True)

    def catalog(self) -> psycopg.Connection:
        return self.connect("a", "shardctl")

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def write(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)


def test_a_postgresql_15_server_backed_up_and_restored_through_the_least_privileged_role(tmp_path):
    pg15 = pgservers.start_pg15(tmp_path)
    fleet = Fleet(tmp_path, {"PG15_DSN": pg15.dsn})
    try:
        doctor = fleet.cli("doctor")
        assert doctor.code == 1 and "✗ backups: restore points" in doctor.out, doctor.out
        assert "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean)" in doctor.out
        with pg15.admin_connect() as conn:
            conn.execute(" ".join(pgservers.BACKUP_ROLE_SQL.split()))
        doctor = fleet.cli("doctor")
        assert "✗ backups" not in doctor.out, doctor.out

        assert fleet.cli("apply", "--auto-approve").code == 0
        _load(fleet, pg15)
        created = fleet.cli("backups", "create")
        assert created.code == 0, created.both
        drill = fleet.cli("backups", "verify")
        assert drill.code == 0, drill.both
        assert "ok     server b orders/80-: 2 tables" in drill.out and "Restored server b" in drill.err

        for path in (fleet.path / ".shardctl" / "barman").rglob("*"):  # barman.conf, its logs, the receivers'
            if path.is_file():
                assert pg15.password not in path.read_text(errors="replace"), path
        assert pg15.password not in created.both + drill.both
    finally:
        fleet.cli("down")
        pg15.shutdown()


def _load(fleet, pg15) -> None:
    """Customers on both shards: straight into each (the 80- shard is on PostgreSQL 15)."""
    class Shim:
        def connect(self, server, dbname):
            if server == "b":
                return psycopg.connect(**{**pg15.admin, "dbname": dbname}, autocommit=True)
            return fleet.connect(server, dbname)

        def catalog(self):
            return fleet.catalog()

    preload(Shim(), customers=2000)
