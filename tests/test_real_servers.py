"""A fleet of one Debian PostgreSQL 15 and one embedded PostgreSQL 18, both declared by DSN and
both used through the least-privileged role README documents (no superuser): create, split
under a writer across versions (an online major-version upgrade), and no password on the
server side, as a pg_monitor member reads it.

The tests run in file order on one fleet (module-scoped servers): each starts from what the
previous ones left, as an operator's fleet would."""

from __future__ import annotations

import shutil

import psycopg
import pytest

import pgservers
from conftest import EXAMPLES, FleetDir, run_cli, wait_until
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


def _under_a_writer(real, metrics: str, start_id: int):
    before, problems = all_rows(real)
    assert not problems and before
    writer = Writer(pgservers_dsn_dict(real.dsn("a", "shardctl")), start_id=start_id,
                    servers={"a": real.dsn("a"), "b": real.dsn("b")})  # the catalog never holds a password
    writer.start(before)
    try:
        result = real.cli("apply", "--auto-approve", "--metrics", metrics)
        if result.code == 0:  # (else the assertion below says why)
            writer.goes_on()  # through the new routing
    finally:
        writer.stop()
    assert result.code == 0, result.both
    assert writer.errors == [] and writer.writes > 50
    rows, problems = all_rows(real)
    assert problems == [] and rows == writer.expected  # every row accounted for
    return result


def test_a_split_from_15_to_18_under_a_writer_is_an_online_major_upgrade(real):
    preload(real)
    hot_file(real.base / "hot.json")  # orders/40-80, placed on b (PostgreSQL 15)
    assert [s[3] for s in active_shards(real) if s[0] == "40-80"] == ["b"]
    _under_a_writer(real, "hot.json", 10_000_000)
    with real.catalog() as conn:
        (event,) = conn.execute("SELECT detail FROM shardctl.history WHERE event = 'split_shard'").fetchone()
    assert 0 < event["pause_ms"] < 5000, event["pause_ms"]  # catch-up through the slot: no superuser
    print(f"\nsplit 15 -> 18 as a non-superuser: writes paused {event['pause_ms']} ms")
    moved = {s[0]: s[3] for s in active_shards(real)}
    assert moved["40-60"] == "a" and moved["60-80"] == "a"  # the range now lives on PostgreSQL 18
    for server in ("a", "b"):
        with real.connect(server) as conn:
            assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)


def test_a_merge_of_a_15_shard_and_an_18_shard_under_a_writer_lands_on_18(real):
    from movers import load_file

    shards = {s[0]: s[3] for s in active_shards(real)}
    assert shards["80-c0"] == "a" and shards["c0-"] == "b"
    load_file(real.base / "cold.json", real, cold=("orders/80-c0", "orders/c0-"))
    result = _under_a_writer(real, "cold.json", 20_000_000)
    assert "will be merged" in result.out or "merge" in result.out
    assert {s[0]: s[3] for s in active_shards(real)}["80-"] == "a"  # PostgreSQL 15 cannot take the target
    for server in ("a", "b"):
        with real.connect(server) as conn:
            assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)


def pgservers_dsn_dict(dsn: str) -> dict:
    from psycopg.conninfo import conninfo_to_dict

    return conninfo_to_dict(dsn)


def test_no_password_on_the_server_side_as_a_pg_monitor_member_reads_it(real):
    """After the split and the merge above: statistics, activity and the server logs of both."""
    _no_password_anywhere(real)


def _no_password_anywhere(real):
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
    with real.connect("a", "shardctl") as conn, pytest.raises(psycopg.Error) as failed:
        create_subscription(conn, "leak_probe", f"host=127.0.0.1 port=1 user=x password={secret} dbname=d",
                            publication="p", slot="s", streaming="on")
    assert secret not in str(failed.value) and "publisher" in str(failed.value)
    # the server logs the failed statement moments later: wait for it, then read it

    def logged() -> str | None:
        text = real.servers["a"].log_text()
        return text if "could not connect to the publisher" in text else None

    log = wait_until(logged, "the failed statement's error in server a's log")
    assert secret not in log
    with real.servers["a"].monitor_connect() as conn:
        assert not any(secret in r[0] for r in conn.execute("SELECT query FROM pg_stat_statements"))


def test_doctor_checks_every_server_and_names_what_postgresql_15_cannot_do(real):
    result = real.cli("doctor")
    assert result.code == 1, result.both  # PostgreSQL 15 cannot take a move's target without superuser
    out = result.out
    assert "server a\n" in out and "server b\n" in out
    for check in ("version", "wal_level", "replication slots", "wal senders", "replication workers",
                  "max_slot_wal_keep_size", "pg_stat_statements", "connection headroom", "clock skew",
                  "CREATEDB", "REPLICATION", "CREATE SUBSCRIPTION", "pg_monitor"):
        assert f" {check} " in out, check
    assert "✗ CREATE SUBSCRIPTION" in out and "PostgreSQL 15 lets only a superuser create subscriptions" in out
    assert out.count("✗") == 1  # and nothing else fails: the documented grants are enough
    assert "Doctor: 1 check failed, 1 warning on 2 servers" in out  # the embedded 18 has no SSL (see below)
    for server in real.servers.values():
        assert server.password not in result.both
    data = __import__("json").loads(real.cli("doctor", "--json").out)
    assert data["failed"] == 1 and {c["name"] for c in data["servers"]["b"]} >= {"CREATE SUBSCRIPTION", "clock skew"}


REVOKE = {
    "CREATEDB": ("ALTER ROLE shardctl NOCREATEDB", "ALTER ROLE shardctl CREATEDB"),
    "REPLICATION": ("ALTER ROLE shardctl NOREPLICATION", "ALTER ROLE shardctl REPLICATION"),
    "CREATE SUBSCRIPTION": ("REVOKE pg_create_subscription FROM shardctl", "GRANT pg_create_subscription TO shardctl"),
}


@pytest.mark.parametrize("check", sorted(REVOKE))
def test_each_privilege_removed_in_turn_is_named_by_doctor_and_refused_by_plan(real, check):
    from movers import load_file

    revoke, grant = REVOKE[check]
    fleet_yaml = real.read("fleet.yaml")
    with real.catalog() as conn:
        serial = conn.execute("SELECT serial FROM shardctl.state").fetchone()[0]
    with real.servers["a"].admin_connect() as admin:
        admin.execute(revoke)
    try:
        doctor = real.cli("doctor")
        assert doctor.code == 1 and f"✗ {check} " in doctor.out, doctor.out
        if check == "CREATEDB":  # a new database placed on a
            real.write("fleet.yaml", fleet_yaml + "  extra:\n    shard_key: {column: customer_id, type: bigint}\n"
                       "    schema: schema/001_init.sql\n    shards: 1\n    placement: [a]\n")
            plan = real.cli("plan")
            assert plan.code == 1 and "server 'a' fails the check 'CREATEDB'" in plan.err, plan.both
            assert "ALTER ROLE shardctl CREATEDB" in plan.err
            assert real.cli("apply", "--auto-approve").code == 1
            with real.connect("a") as conn:
                assert not conn.execute("SELECT 1 FROM pg_database WHERE datname LIKE 'extra%'").fetchone()
        else:  # a hot shard on a: its split needs a as source (REPLICATION) or as target (subscription)
            load_file(real.base / "hot-a.json", real, hot=("orders/-40",))
            plan = real.cli("plan", "--metrics", "hot-a.json")
            assert plan.code == 0, plan.both
            assert "orders/-40: hot, but it cannot be split" in plan.out and f"'{check}'" in plan.out, plan.out
            assert "will be split" not in plan.out
    finally:
        real.write("fleet.yaml", fleet_yaml)
        with real.servers["a"].admin_connect() as admin:
            admin.execute(grant)
    with real.catalog() as conn:
        assert conn.execute("SELECT serial FROM shardctl.state").fetchone()[0] == serial  # nothing changed


REPLICA_CASES = {
    # revoked on a (which holds shards of orders), the replica on a: its slot there, its subscriptions
    "REPLICATION": (["ALTER ROLE shardctl NOREPLICATION"], ["ALTER ROLE shardctl REPLICATION"], "a",
                    [("REPLICATION", "ALTER ROLE shardctl REPLICATION")]),
    "pg_create_subscription": (["REVOKE pg_create_subscription FROM shardctl"],
                               ["GRANT pg_create_subscription TO shardctl"], "a",
                               [("CREATE SUBSCRIPTION", "GRANT pg_create_subscription TO shardctl")]),
    "both": (["ALTER ROLE shardctl NOREPLICATION", "REVOKE pg_create_subscription FROM shardctl"],
             ["ALTER ROLE shardctl REPLICATION", "GRANT pg_create_subscription TO shardctl"], "a",
             [("REPLICATION", "ALTER ROLE shardctl REPLICATION"),
              ("CREATE SUBSCRIPTION", "GRANT pg_create_subscription TO shardctl")]),
    # nothing revoked: PostgreSQL 15 lets only a superuser create subscriptions
    "replica on PostgreSQL 15": ([], [], "b", [("CREATE SUBSCRIPTION", "lets only a superuser create subscriptions")]),
}


@pytest.mark.parametrize("case", sorted(REPLICA_CASES))
def test_a_replica_without_its_privileges_is_refused_before_anything_is_made(real, case):
    """The issue's find: plan accepted such a replica, and apply left a slot, a publication, a
    database and a running operation behind. Now plan refuses it, naming each privilege and the
    statement that grants it; apply refuses the same; nothing exists afterwards on any server."""
    revoke, grant, on, named = REPLICA_CASES[case]
    fleet_yaml = real.read("fleet.yaml")
    shards = active_shards(real)
    assert {s[3] for s in shards} >= {"a"}  # orders has a shard on a (the servers a replica links)
    with real.catalog() as conn:
        serial = conn.execute("SELECT serial FROM shardctl.state").fetchone()[0]
    with real.servers["a"].admin_connect() as admin:
        for statement in revoke:
            admin.execute(statement)
    try:
        real.write("fleet.yaml", fleet_yaml + ("branches:\n" if "branches:" not in fleet_yaml else "")
                   + f"  mirror: {{from: orders, data: replica, server: {on}, ttl: 1d}}\n")
        for command in (("plan",), ("apply", "--auto-approve")):
            result = real.cli(*command)
            assert result.code == 1, result.both
            for check, fix in named:
                assert f"branch.mirror: server '{'a' if check == 'REPLICATION' else on}' fails the check" \
                       f" '{check}'" in result.err, result.err
                assert fix in result.err, result.err
            assert "Traceback" not in result.both and "bug" not in result.err
    finally:
        real.write("fleet.yaml", fleet_yaml)
        with real.servers["a"].admin_connect() as admin:
            for statement in grant:
                admin.execute(statement)
    with real.catalog() as conn:
        assert conn.execute("SELECT serial FROM shardctl.state").fetchone()[0] == serial  # nothing recorded
        assert conn.execute("SELECT count(*) FROM shardctl.branches WHERE name = 'mirror'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM shardctl.operations WHERE state = 'running'").fetchone() == (0,)
    for name, server in real.servers.items():
        with server.admin_connect() as admin:
            assert "branch_mirror" not in {r[0] for r in admin.execute("SELECT datname FROM pg_database")}
            assert admin.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'shardctl%'"
                                 ).fetchone() == (0,), name
        for shard in [s for s in shards if s[3] == name]:
            with server.admin_connect(shard[4]) as conn:
                assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname LIKE 'shardctl%'"
                                    ).fetchone() == (0,), shard


def test_branches_across_versions_both_ways(real):
    """orders' first shard runs 18: its branch on 15 restores an 18 dump on 15; events' first
    shard runs 15: its branch on 18 restores the other way. Both with their rows."""
    fleet_yaml = real.read("fleet.yaml")
    real.write("fleet.yaml", fleet_yaml + """\
  events:
    shard_key: {column: customer_id, type: bigint}
    schema: schema/001_init.sql
    shards: 2
    placement: [b, a]
branches:
  on15: {from: orders, data: full, server: b, ttl: 1d}
  on18: {from: events, data: full, server: a, ttl: 1d}
""")
    assert real.cli("apply", "--auto-approve").code == 0  # events first: a branch waits for its parent
    with real.connect("b", "events_min_80") as conn:
        conn.execute("INSERT INTO customers (customer_id, name) SELECT g, 'e' || g FROM generate_series(1, 5000) g"
                     " WHERE hashint8extended(g::bigint, 0) < 0")
    result = real.cli("apply", "--auto-approve")
    assert result.code == 0, result.both
    rows = {}
    for server, dbname in (("b", "branch_on15"), ("a", "branch_on18")):
        with real.connect(server, dbname) as conn:
            rows[dbname] = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
            version = conn.info.server_version // 10000
        assert version == (15 if server == "b" else 18)
    orders_rows = sum(1 for _ in all_rows(real)[0])
    assert rows == {"branch_on15": orders_rows, "branch_on18": 5000 - sum(
        1 for g in range(1, 5001) if __import__("engine.client", fromlist=["x"]).hashint8extended(g) >= 0)}
    plan = real.cli("plan")
    assert plan.code == 0 and "No changes" in plan.out, plan.both
    drift = real.cli("drift", "--detailed-exitcode")
    assert drift.code == 0, drift.both


def test_a_branch_that_failed_midway_is_shown_by_plan_and_drift_then_rebuilt(real):
    fleet_yaml = real.read("fleet.yaml")
    real.write("fleet.yaml", fleet_yaml + ("branches:\n" if "branches:" not in fleet_yaml else "")
               + "  half: {from: orders, data: full, server: b, ttl: 1d}\n")
    killed = real.cli("apply", "--auto-approve", env={"SHARDCTL_FAILPOINT": "data half"})
    assert killed.code != 0
    plan = real.cli("plan", "--detailed-exitcode")
    assert plan.code == 2, plan.both
    assert "branch.half" in plan.out and "did not finish building branch half" in plan.out
    drift = real.cli("drift", "--detailed-exitcode")
    assert drift.code == 2 and "branch.half" in drift.out, drift.both
    assert real.cli("apply", "--auto-approve").code == 0
    with real.connect("b", "branch_half") as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == len(all_rows(real)[0])
    assert real.cli("plan", "--detailed-exitcode").code == 0
    real.write("fleet.yaml", fleet_yaml + "allow_destroy: {branches: [half]}\n")
    assert real.cli("apply", "--auto-approve").code == 0
    real.write("fleet.yaml", fleet_yaml)


def test_a_branch_that_fails_on_an_older_server_is_shown_and_rebuilt_where_it_fits(real):
    """The case found: a parent made on 18 with a view using any_value() (new in 16) cannot be
    restored on 15. The branch stays visible (plan, drift, status) instead of 'creating' in
    silence; declared on the 18 server instead, it is built there and the half-built database
    on 15 is dropped."""
    fleet_yaml = real.read("fleet.yaml")
    grown = fleet_yaml.replace("branches:\n", """\
  reports:
    shard_key: {column: customer_id, type: bigint}
    schema:
      - schema/001_init.sql
      - {name: 002_view, sql: "CREATE VIEW some_names AS SELECT any_value(name) AS name FROM customers;"}
    shards: 1
    placement: [a]
branches:
""") if "branches:" in fleet_yaml else fleet_yaml
    assert "reports:" in grown
    real.write("fleet.yaml", grown)
    assert real.cli("apply", "--auto-approve").code == 0  # the parent first: a branch waits for it
    real.write("fleet.yaml", grown + "  r15: {from: reports, data: full, server: b, ttl: 1d}\n")
    failed = real.cli("apply", "--auto-approve")
    assert failed.code == 1, failed.both
    assert "building branch database branch_r15 failed" in failed.err and "any_value" in failed.err
    assert "Traceback" not in failed.err
    plan = real.cli("plan", "--detailed-exitcode")
    assert plan.code == 2 and "did not finish building branch r15" in plan.out, plan.both
    drift = real.cli("drift", "--detailed-exitcode")
    assert drift.code == 2 and "branch.r15" in drift.out, drift.both
    assert "branch_r15" in real.databases("b")

    real.write("fleet.yaml", grown + "  r15: {from: reports, data: full, server: a, ttl: 1d}\n")
    plan = real.cli("plan")
    assert "drops the half-built branch_r15 on b" in plan.out, plan.out
    rebuilt = real.cli("apply", "--auto-approve")
    assert rebuilt.code == 0, rebuilt.both
    assert "branch_r15" in real.databases("a") and "branch_r15" not in real.databases("b")
    with real.connect("a", "branch_r15") as conn:
        assert conn.execute("SELECT count(*) FROM some_names").fetchone() == (1,)
    assert real.cli("plan", "--detailed-exitcode").code == 0
    assert real.cli("drift", "--detailed-exitcode").code == 0
    with real.catalog() as conn:
        assert conn.execute("SELECT count(*) FROM shardctl.operations WHERE state = 'running'").fetchone() == (0,)
    real.write("fleet.yaml", fleet_yaml)  # the branch and the empty database go again
    assert real.cli("apply", "--auto-approve").code == 0


def test_a_service_and_a_passfile_reach_the_source_and_the_subscription_too(real, tmp_path):
    """Server b declared as a libpq service (pg_service.conf with host, port, user) and its
    password in a passfile, as libpq users keep them: a split of b's shard into a works, because
    the subscription on a gets what libpq resolved here, spelled out (no service file there)."""
    import json

    from traces import samples, to_file

    b = real.servers["b"]
    params = dict(item.split("=", 1) for item in b.dsn.split())
    services, passfile = tmp_path / "pg_service.conf", tmp_path / "pgpass"
    services.write_text(f"[pg15]\nhost={params['host']}\nport={params['port']}\nuser={params['user']}\n")
    passfile.write_text(f"{params['host']}:{params['port']}:*:{params['user']}:{b.password}\n")
    passfile.chmod(0o600)
    fleet_yaml = real.read("fleet.yaml")
    real.write("fleet.yaml", fleet_yaml.replace("b: {dsn_env: PG15_DSN,", "b: {service: pg15,"))
    env = {"PGSERVICEFILE": str(services), "PGPASSFILE": str(passfile), "PG15_DSN": ""}
    with real.catalog() as conn:
        shards = conn.execute("SELECT name, server FROM shardctl.shards WHERE database = 'events'"
                              " AND state = 'active' ORDER BY lo NULLS FIRST").fetchall()
    assert shards == [("-80", "b"), ("80-", "a")]
    qps = {"-80": 15000.0, "80-": 5.0}
    windows = {f"events/{name}": samples(f"events/{name}", {"queries_per_second": [qps[name]] * 40}, server=server)
               for name, server in shards}
    (real.base / "hot-events.json").write_text(json.dumps(to_file(windows)))
    try:
        doctor = real.cli("doctor", env=env)
        assert "server b\n  ✓ version" in doctor.out, doctor.both
        result = real.cli("apply", "--auto-approve", "--metrics", "hot-events.json", env=env)
        assert result.code == 0, result.both
        assert "Split complete" in result.out
        with real.catalog() as conn:
            moved = conn.execute("SELECT name, server FROM shardctl.shards WHERE database = 'events'"
                                 " AND state = 'active' ORDER BY lo NULLS FIRST").fetchall()
        assert moved == [("-40", "a"), ("40-80", "a"), ("80-", "a")]
        with real.connect("a", "events_min_40") as conn:
            n = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
        with real.connect("a", "events_40_80") as conn:
            n += conn.execute("SELECT count(*) FROM customers").fetchone()[0]
        with b.admin_connect("events_min_80") as conn:
            assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == n > 0
        assert b.password not in result.both and b.password not in real.servers["a"].log_text()
    finally:
        real.write("fleet.yaml", fleet_yaml)


def test_metrics_that_cannot_be_read_say_why_and_a_missing_grant_loses_no_round(real):
    """Server a without declared capacity (not this host's: cores and disk unknown) and without
    pg_monitor (pg_buffercache unreadable): doctor, status and the plan's notes name each reason;
    the round still samples every shard of a."""
    import json

    fleet_yaml = real.read("fleet.yaml")
    with_capacity = "a: {dsn_env: PG18_DSN, capacity: {storage: 20GiB, memory: 4GiB, cpus: 2}}"
    real.write("fleet.yaml", fleet_yaml.replace(with_capacity, "a: {dsn_env: PG18_DSN}"))
    with real.servers["a"].admin_connect() as admin:
        admin.execute("REVOKE pg_monitor FROM shardctl")
    try:
        doctor = real.cli("doctor")
        assert "! metrics" in doctor.out and "cpu_percent (no declared capacity" in doctor.out, doctor.out
        assert "memory_percent (role shardctl may not read pg_buffercache" in doctor.out
        assert "! pg_monitor" in doctor.out and "GRANT pg_monitor TO shardctl;" in doctor.out
        assert real.cli("metrics", "collect", "--count", "2", "--interval", "1s").code == 0
        status = real.cli("status", "--json")
        assert status.code == 0, status.both
        report = json.loads(status.out)
        a = next(s for s in report["servers"] if s["name"] == "a")
        assert set(a["unknown_metrics"]) == {"cpu_percent", "memory_percent", "storage_percent"}
        on_a = [s for db in report["databases"] for s in db["shards"] if s["server"] == "a" and s["state"] == "active"]
        assert on_a and all(s["metrics"]["connections"] is not None for s in on_a)  # the round was not lost
        assert all(s["metrics"]["memory_percent"] is None for s in on_a)
        text = real.cli("status").out
        assert "server a: memory_percent is unknown (?) for its shards" in text
        plan = real.cli("plan")
        assert "server.a: cpu_percent is unknown for its shards: no declared capacity" in plan.out, plan.out
        assert "orders (a cold threshold on cpu_percent) can never be cold there" in plan.out
    finally:
        real.write("fleet.yaml", fleet_yaml)
        with real.servers["a"].admin_connect() as admin:
            admin.execute("GRANT pg_monitor TO shardctl")


def test_connection_errors_to_a_dsn_server_say_how_to_reach_it_and_status_json_fails(real, tmp_path):
    broken = {"PG15_DSN": "host=127.0.0.1 port=1 user=x password=NotThisOne dbname=postgres connect_timeout=2"}
    status = real.cli("status", "--json", env={"PG18_DSN": broken["PG15_DSN"]})  # the catalog's server
    assert status.code == 1 and "unreachable" in status.out
    plan = real.cli("plan", env={"PG18_DSN": broken["PG15_DSN"]})
    assert plan.code == 1 and "$PG18_DSN reaches it" in plan.err and "shardctl up" not in plan.err, plan.both
    assert "NotThisOne" not in plan.both + status.both
    down = real.cli("down")
    assert down.code == 0 and "server a: not embedded, left running" in down.out


def _certificates(directory, owner_of_key: str | None):
    """A CA and a server certificate for 127.0.0.1 (subjectAltName IP), made with openssl."""
    import subprocess

    run = lambda *argv: subprocess.run(argv, check=True, capture_output=True, cwd=directory)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
        "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "server.crt")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other-ca",
        "-keyout", "other.key", "-out", "other.crt")
    import os
    import pwd

    os.chmod(directory, 0o755)
    for name in ("ca.crt", "other.crt", "server.crt"):
        os.chmod(directory / name, 0o644)
    os.chmod(directory / "server.key", 0o600)
    if owner_of_key:
        entry = pwd.getpwnam(owner_of_key)
        os.chown(directory / "server.key", entry.pw_uid, entry.pw_gid)
        os.chown(directory / "server.crt", entry.pw_uid, entry.pw_gid)


def test_sslmode_verify_full_is_honoured_for_shardctl_and_spelled_out_for_subscriptions(real, tmp_path_factory):
    from engine.actions.subscription import resolved_conninfo
    from engine.servers.embedded import _system_user

    certs = tmp_path_factory.mktemp("tls", numbered=True)
    for parent in list(certs.parents)[:-1]:
        if str(parent).startswith("/tmp"):
            parent.chmod(parent.stat().st_mode | 0o011)  # the server's user reaches its key
    _certificates(certs, _system_user())
    b = real.servers["b"]
    with b.admin_connect() as admin:
        admin.execute("ALTER SYSTEM SET ssl = on")
        cert, key = (psycopg.sql.Literal(str(certs / name)) for name in ("server.crt", "server.key"))
        admin.execute(psycopg.sql.SQL("ALTER SYSTEM SET ssl_cert_file = {}").format(cert))
        admin.execute(psycopg.sql.SQL("ALTER SYSTEM SET ssl_key_file = {}").format(key))
        admin.execute("SELECT pg_reload_conf()")

    def ssl_on() -> bool:
        with b.admin_connect() as conn:
            return conn.execute("SELECT current_setting('ssl')").fetchone() == ("on",)

    wait_until(ssl_on, "server b to reload with ssl on")
    verified = f"{b.dsn} sslmode=verify-full sslrootcert={certs / 'ca.crt'}"
    wrong = f"{b.dsn} sslmode=verify-full sslrootcert={certs / 'other.crt'}"
    try:
        with psycopg.connect(verified, autocommit=True) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
            spelled = resolved_conninfo(conn)
        assert "sslmode=verify-full" in spelled and f"sslrootcert={certs / 'ca.crt'}" in spelled
        assert real.cli("status", env={"PG15_DSN": verified}).code == 0
        doctor = real.cli("doctor", env={"PG15_DSN": verified})
        assert "server b\n  ✓ version" in doctor.out, doctor.both
        # a split of a shard of b into a, b reached with verify-full: the subscription on a gets
        # sslmode and sslrootcert spelled out, and its server verifies b's certificate too
        import json

        from traces import samples, to_file

        fleet_yaml = real.read("fleet.yaml")
        real.write("fleet.yaml", fleet_yaml.replace("databases:\n", "databases:\n  tls:\n"
                   "    shard_key: {column: customer_id, type: bigint}\n    schema: schema/001_init.sql\n"
                   "    shards: 1\n    placement: [b, a]\n", 1))
        env = {"PG15_DSN": verified}
        assert real.cli("apply", "--auto-approve", env=env).code == 0
        with psycopg.connect(verified.replace("dbname=postgres", "dbname=tls_min_max"), autocommit=True) as conn:
            conn.execute("INSERT INTO customers (customer_id, name) SELECT g, 't' FROM generate_series(1, 3000) g")
        (real.base / "hot-tls.json").write_text(json.dumps(to_file(
            {"tls/-": samples("tls/-", {"queries_per_second": [15000.0] * 40}, server="b")})))
        # ... but the embedded PostgreSQL 18 is built without SSL: its subscription cannot use TLS.
        # Doctor says so beforehand, and the split stops at its subscribe step naming server,
        # step and operation; abort leaves the source as it was.
        tls_line = [line for line in real.cli("doctor", env=env).out.splitlines() if "TLS for subscriptions" in line]
        assert tls_line[0].startswith("  ! ") and "built without SSL support" in tls_line[0]  # server a's
        split = real.cli("apply", "--auto-approve", "--metrics", "hot-tls.json", env=env)
        assert split.code == 1 and "server a refused the subscription" in split.err, split.both
        assert "SSL support is not compiled in" in split.err and "(step subscribe, operation" in split.err
        assert "bug" not in split.err and b.password not in split.both
        operation = split.err.split("shardctl abort ")[1].split("`")[0]
        assert real.cli("abort", operation, env=env).code == 0
        with psycopg.connect(verified.replace("dbname=postgres", "dbname=tls_min_max"), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == 3000
            conn.execute("INSERT INTO customers (customer_id, name) VALUES (-1, 'writable')")  # no fence left
            assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
        real.write("fleet.yaml", fleet_yaml + "allow_destroy: {databases: [tls]}\n")
        assert real.cli("apply", "--auto-approve", env=env).code == 0
        real.write("fleet.yaml", fleet_yaml)

        refused = real.cli("doctor", env={"PG15_DSN": wrong})  # another CA: not this server's
        assert refused.code == 1 and "✗ reachable" in refused.out and "certificate verify failed" in refused.out
        plan = real.cli("plan", env={"PG15_DSN": wrong})
        assert "server.b is unreachable" in plan.out and "certificate verify failed" in plan.out, plan.both
        assert b.password not in refused.both + plan.both
    finally:
        with b.admin_connect() as admin:
            admin.execute("ALTER SYSTEM RESET ssl")
            admin.execute("SELECT pg_reload_conf()")


def test_a_database_condition_is_reported_as_such_never_as_a_bug(real):
    fleet_yaml = real.read("fleet.yaml")
    with real.servers["b"].admin_connect() as admin:
        admin.execute("ALTER ROLE shardctl SET default_transaction_read_only = on")
    try:
        real.write("fleet.yaml", fleet_yaml.replace("databases:\n", "databases:\n  ro:\n"
                   "    shard_key: {column: customer_id, type: bigint}\n    schema: schema/001_init.sql\n"
                   "    shards: 1\n    placement: [b]\n", 1))
        result = real.cli("apply", "--auto-approve")
        assert result.code == 1 and "read-only" in result.err, result.both
        assert "Error: server b (database " in result.err and ") refused:" in result.err, result.err  # named
        assert "bug" not in result.err and "shardctl doctor" in result.err
    finally:
        with real.servers["b"].admin_connect() as admin:
            admin.execute("ALTER ROLE shardctl RESET default_transaction_read_only")
        real.write("fleet.yaml", fleet_yaml + "allow_destroy: {databases: [ro]}\n")
        assert real.cli("apply", "--auto-approve").code == 0
        real.write("fleet.yaml", fleet_yaml)


def test_last_no_password_anywhere_after_branches_service_moves_and_failures(real):
    """Once more at the end of the module, after the branches, the split from a service with a
    passfile, the failed subscription and the refused plans."""
    _no_password_anywhere(real)
