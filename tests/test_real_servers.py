"""A fleet of one Debian PostgreSQL 15 and one embedded PostgreSQL 18, both declared by DSN and
both used through the least-privileged role README documents (no superuser): create, split
under a writer across versions (an online major-version upgrade), and no password on the
server side, as a pg_monitor member reads it."""

from __future__ import annotations

import shutil
import time

import psycopg
import pytest

import pgservers
from conftest import EXAMPLES, FleetDir, run_cli
from movers import Writer, active_shards, all_rows, hot_file, preload

pytestmark = pytest.mark.skipif(not pgservers.pg15_available(),
                                reason=f"Debian's postgresql-15 is not installed ({pgservers.PG15_BIN} has no"
                                       " initdb): `apt-get install postgresql-15`, as .ci/run does")

FLEET = """\
servers:
  a: {dsn_env: PG18_DSN, capacity: {storage: 20GiB, memory: 4GiB, cpus: 2}}
  b: {dsn_env: PG15_DSN, capacity: {storage: 20GiB, memory: 4GiB, cpus: 2}}
catalog: {server: a, database: shardctl}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: schema/001_init.sql
    shards: 4
    placement: [a, b]
    policy: default
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    base = tmp_path_factory.mktemp("servers")
    started = []
    try:
        started.append(pgservers.start_pg18(base))
        started.append(pgservers.start_pg15(base))
        yield {"a": started[0], "b": started[1]}
    finally:
        for server in started:
            server.shutdown()


class RealFleet(FleetDir):
    """A config directory whose servers are reached by DSN, as the role."""

    def __init__(self, base, servers):
        self.base = base
        self.path = base / "fleet"
        self.path.mkdir()
        shutil.copytree(EXAMPLES / "quickstart" / "schema", self.path / "schema")
        self.write("fleet.yaml", FLEET)
        self.servers = servers
        self.env = {"PG18_DSN": servers["a"].dsn, "PG15_DSN": servers["b"].dsn}

    def cli(self, *args, **kw):
        return run_cli("-C", "fleet", *args, cwd=self.base, env={**self.env, **kw.pop("env", {})}, **kw)

    def dsn(self, server: str, dbname: str = "postgres") -> str:
        return self.servers[server].dsn.replace("dbname=postgres", f"dbname={dbname}")

    def connect(self, server, dbname="postgres"):
        return psycopg.connect(self.dsn(server, dbname), autocommit=True)

    def catalog(self):
        return self.connect("a", "shardctl")

    def stop(self):
        pass


@pytest.fixture(scope="module")
def real(servers, tmp_path_factory):
    fleet = RealFleet(tmp_path_factory.mktemp("real"), servers)
    result = fleet.cli("apply", "--auto-approve")
    assert result.code == 0, result.both
    return fleet


def test_the_role_is_no_superuser_on_either_server(real):
    for name in ("a", "b"):
        with real.connect(name) as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
    assert real.servers["b"].version // 10000 == 15 and real.servers["a"].version // 10000 >= 16


def test_a_split_from_15_to_18_under_a_writer_is_an_online_major_upgrade(real):
    preload(real)
    hot_file(real.base / "hot.json")  # orders/40-80, placed on b (PostgreSQL 15)
    assert [s[3] for s in active_shards(real) if s[0] == "40-80"] == ["b"]
    before, problems = all_rows(real)
    assert not problems and before
    writer = Writer(pgservers_dsn_dict(real.dsn("a", "shardctl")), start_id=10_000_000,
                    servers={"a": real.dsn("a"), "b": real.dsn("b")})
    writer.start(before)
    try:
        result = real.cli("apply", "--auto-approve", "--metrics", "hot.json")
    finally:
        time.sleep(0.5)
        writer.stop()
    assert result.code == 0, result.both
    assert writer.errors == [] and writer.writes > 50
    rows, problems = all_rows(real)
    assert problems == [] and rows == writer.expected  # every row accounted for
    moved = {s[0]: s[3] for s in active_shards(real)}
    assert moved["40-60"] == "a" and moved["60-80"] == "a"  # the range now lives on PostgreSQL 18
    for server in ("a", "b"):
        with real.connect(server) as conn:
            assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)


def pgservers_dsn_dict(dsn: str) -> dict:
    from psycopg.conninfo import conninfo_to_dict

    return conninfo_to_dict(dsn)


def test_no_password_on_the_server_side_as_a_pg_monitor_member_reads_it(real):
    """After the split above: statistics, activity and the server logs of both servers."""
    secrets = [real.servers["a"].password, real.servers["b"].password]
    for name, server in real.servers.items():
        with server.monitor_connect() as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
            statements = [r[0] for r in conn.execute("SELECT query FROM pg_stat_statements")]
            activity = [r[0] or "" for r in conn.execute("SELECT query FROM pg_stat_activity")]
        log = server.log_text()
        for secret in secrets:  # (the messages never quote what was found: it is a password)
            assert not any(secret in q for q in statements), f"password in pg_stat_statements on {name}"
            assert not any(secret in q for q in activity), f"password in pg_stat_activity on {name}"
            assert secret not in log, f"password in the server log of {name}"


def test_a_failed_subscription_leaves_no_password_in_the_log_nor_the_error(real):
    """CREATE SUBSCRIPTION that fails (here: nothing listens at the source's address) is logged
    with its statement and context; neither holds the connection string."""
    from engine.actions.subscription import create_subscription

    secret = "Zq" + real.servers["a"].password[::-1]
    with real.connect("a", "shardctl") as conn:
        with pytest.raises(psycopg.Error) as failed:
            create_subscription(conn, "leak_probe", f"host=127.0.0.1 port=1 user=x password={secret} dbname=d",
                                publication="p", slot="s", streaming="on")
    assert secret not in str(failed.value) and "publisher" in str(failed.value)
    time.sleep(0.2)  # the log is written by the server process
    assert secret not in real.servers["a"].log_text()
    with real.servers["a"].monitor_connect() as conn:
        assert not any(secret in r[0] for r in conn.execute("SELECT query FROM pg_stat_statements"))
