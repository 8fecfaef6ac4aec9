"""Backups declared in the YAML, without a server: what is refused at its line, the settings each
server gets, the Barman configuration shardctl writes (never a password) and the command lines
it runs, the checks doctor makes of a backed-up server, and what /metrics shows."""

import os
from datetime import UTC, datetime, timedelta

import pytest

from conftest import run_cli
from engine.catalog.backups import parse_at
from engine.config import loader
from engine.errors import ConfigError
from engine.servers.barman import Barman, connection
from engine.servers.connect import handles

SCHEMA = "schema: [{name: init, sql: 'CREATE TABLE customers (customer_id bigint PRIMARY KEY);'}]"


def _fleet(tmp_path, extra: str = "", servers: str = "  a: {embedded: true}\n  b: {embedded: true}\n"):
    (tmp_path / "fleet.yaml").write_text(
        f"servers:\n{servers}databases:\n  orders:\n    shard_key: {{column: customer_id, type: bigint}}\n"
        f"    {SCHEMA}\n    placement: [a, b]\n{extra}")
    return tmp_path


def _errors(tmp_path) -> str:
    with pytest.raises(ConfigError) as caught:
        loader.load(tmp_path)
    return caught.value.render()


def test_fleet_wide_backups_with_a_server_override_and_one_left_out(tmp_path):
    _fleet(tmp_path, "backups: {every: 12h, retention: REDUNDANCY 3}\n",
           servers="  a: {embedded: true}\n  b: {embedded: true, backups: {retention: RECOVERY WINDOW OF 14 DAYS,"
                   " directory: /srv/b-backups}}\n  c: {embedded: true, backups: {enabled: false}}\n")
    desired = loader.load(tmp_path)
    assert sorted(desired.backups) == ["a", "b"]
    a, b = desired.backups["a"], desired.backups["b"]
    assert (a.retention, a.every, a.directory) == ("REDUNDANCY 3", 43200.0, str(tmp_path / ".shardctl/backups"))
    assert (b.retention, b.every, b.directory) == ("RECOVERY WINDOW OF 14 DAYS", 43200.0, "/srv/b-backups")


def test_only_the_servers_that_declare_backups_without_a_fleet_wide_setting(tmp_path):
    _fleet(tmp_path, servers="  a: {embedded: true, backups: {}}\n  b: {embedded: true}\n")
    assert sorted(loader.load(tmp_path).backups) == ["a"]
    _fleet(tmp_path)
    assert loader.load(tmp_path).backups == {}


@pytest.mark.parametrize(("extra", "expected"), [
    ("backups: {retention: keep 3}\n", "backups.retention"),
    ("backups: {every: 30s}\n", "shorter than a minute"),
    ("backups: {directory: \"a%(x)s\"}\n", "backups.directory"),
    ("backups: {}\nbranches:\n  dev: {from: orders, server: a, at: latest}\n", "`at:` says which moment"),
    ("backups: {}\nbranches:\n  dev: {from: orders, data: backup, server: a, at: '2026-12-06 15:00'}\n",
     "branches.dev.at"),
    ("branches:\n  dev: {from: orders, data: backup, server: a}\n", "no server is backed up"),
])
def test_what_is_refused_at_its_line(tmp_path, extra, expected):
    _fleet(tmp_path, extra)
    text = _errors(tmp_path)
    assert "fleet.yaml:" in text and (expected in text or expected.split(".")[-1] in text), text


def test_at_is_latest_a_point_name_or_a_time_with_its_zone():
    assert parse_at("latest") is None and parse_at("backup-op3") is None
    assert parse_at("2026-12-06T15:00:00Z") == datetime(2026, 12, 6, 15, tzinfo=UTC)
    assert parse_at("2026-12-06 17:00+0200") == datetime(2026, 12, 6, 15, tzinfo=UTC)
    assert parse_at("2026-12-06T15:00:00.5-05:00").utcoffset() == timedelta(hours=-5)


def test_barman_conf_holds_no_password_and_its_secrets_travel_in_the_environment(tmp_path, monkeypatch):
    secret = "s3cr%t pass"
    monkeypatch.setenv("PROD_DSN", f"host=db.example port=5433 user=shardctl password='{secret}' sslmode=require")
    _fleet(tmp_path, "backups: {}\n", servers="  a: {embedded: true}\n  b: {dsn_env: PROD_DSN}\n")
    desired = loader.load(tmp_path)
    barman = Barman(desired)
    text = barman.write_config().read_text()
    assert secret not in text and "password=" not in text and "s3cr" not in text
    assert "conninfo = dbname=postgres host=db.example port=5433 sslmode=require user=shardctl" in text
    assert "backup_method = postgres" in text and "streaming_archiver = on" in text and "slot_name = shardctl_backup"
    assert oct(barman.config_file.stat().st_mode & 0o777) == "0o600"
    conninfo, env = connection(handles(desired.servers, desired.directory)["b"])
    assert env == {"PGPASSWORD": secret} and secret not in conninfo
    assert barman.env("b")["PGPASSWORD"] == secret and "PGPASSWORD" not in barman.env("a")


def test_a_percent_in_a_connection_value_is_doubled_for_barmans_parser(tmp_path, monkeypatch):
    monkeypatch.setenv("PROD_DSN", "host=db.example user=ops%team")
    _fleet(tmp_path, "backups: {}\n", servers="  a: {embedded: true}\n  b: {dsn_env: PROD_DSN}\n")
    assert "user=ops%%team" in Barman(loader.load(tmp_path)).write_config().read_text()


def test_every_value_barman_is_given_follows_its_flag_or_the_double_dash(tmp_path):
    barman = Barman(loader.load(_fleet(tmp_path, "backups: {}\n")))
    argv = barman.argv("recover", "--target-name=-x", "--target-action=promote", server="a",
                       args=("20261206T000000", "/tmp/dest"))
    assert argv[-4:] == ["--", "a", "20261206T000000", "/tmp/dest"]
    assert "--target-name=-x" in argv and argv.index("--target-name=-x") < argv.index("--")
    with pytest.raises(AssertionError):
        barman.argv("backup", "-x")  # a bare value before `--` is refused


def test_doctor_names_the_grants_a_backed_up_server_needs():
    from engine.observe.models import Capabilities, LiveServer
    from engine.plan.checks import backup_checks

    base = dict(version_num=150020, superuser=False, createdb=True, replication=True, monitor=True,
                create_subscription=False, origin_progress=False, wal_level="logical", max_replication_slots=10,
                used_replication_slots=0, max_wal_senders=10, used_wal_senders=0, max_worker_processes=8,
                max_logical_replication_workers=4, max_slot_wal_keep_size_bytes=-1, stat_statements_loaded=True,
                stat_statements_created=True, buffercache_created=True, stat_statements_track="top",
                max_connections=100, reserved_connections=3, connections=5, role_connection_limit=-1,
                role="shardctl", clock_offset_s=0.0)

    def checks(**kw):
        live = LiveServer(name="s", reachable=True, capabilities=Capabilities(**{**base, **kw}))
        return {c.name: c for c in backup_checks(live)}

    bare = checks()
    assert not bare["backups: restore points"].ok and not bare["backups: base backups"].ok
    assert "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean), pg_switch_wal()," \
           " pg_create_restore_point(text) TO shardctl;" in bare["backups: restore points"].fix
    assert bare["backups: REPLICATION"].ok
    assert "ALTER ROLE shardctl REPLICATION" in checks(replication=False)["backups: REPLICATION"].fix
    granted = checks(restore_points=True, backup_functions=True)
    assert all(c.ok for c in granted.values()), granted
    assert all(c.ok for c in checks(superuser=True, replication=False).values())
    assert not checks(used_wal_senders=10)["backups: WAL senders"].ok


def test_metrics_show_each_servers_last_backup_and_wal_streaming():
    from prometheus_client.parser import text_string_to_metric_families

    from engine.snapshot import BackupView, Snapshot
    from engine.watch.prometheus import exposition
    from engine.watch.view import View

    started = datetime(2026, 1, 1, tzinfo=UTC)
    view = View(Snapshot(who="t", config_dir="/x", started_at=started))
    assert b"shardctl_backup_" not in exposition(view)  # nothing backed up: no series at all
    view.update(backups=(
        BackupView(server="a", last_backup_at=started, every_seconds=86400.0, streaming=True, wal_lag_bytes=512),
        BackupView(server="b", every_seconds=86400.0, streaming=False)))
    text = exposition(view).decode()
    samples = {(s.name, s.labels.get("server")): s.value for family in text_string_to_metric_families(text)
               for s in family.samples}
    assert samples[("shardctl_backup_last_timestamp_seconds", "a")] == started.timestamp()
    assert ("shardctl_backup_last_timestamp_seconds", "b") not in samples  # never backed up: absent, not zero
    assert 'shardctl_backup_age_seconds{server="a"}' in text and 'shardctl_backup_age_seconds{server="b"}' not in text
    assert 'shardctl_backup_wal_streaming{server="a"} 1.0' in text
    assert 'shardctl_backup_wal_streaming{server="b"} 0.0' in text
    assert 'shardctl_backup_wal_lag_bytes{server="a"} 512.0' in text
    assert 'shardctl_backup_interval_seconds{server="b"} 86400.0' in text


def test_backups_commands_explain_themselves_and_need_backups_declared(tmp_path):
    _fleet(tmp_path)
    helped = run_cli("backups", "--help", cwd=tmp_path)
    assert helped.code == 0 and "create" in helped.out and "verify" in helped.out and "barman.conf" in helped.out
    refused = run_cli("-C", str(tmp_path), "backups", "list", cwd=tmp_path)
    assert refused.code == 1 and "no server is backed up" in refused.err and "Traceback" not in refused.both
    assert not (tmp_path / ".shardctl").exists() or os.listdir(tmp_path / ".shardctl") == []


def test_readme_quotes_the_backup_grants_the_real_server_test_runs():
    import pgservers
    from conftest import ROOT

    section = (ROOT / "README.md").read_text().split("## Running against your own servers", 1)[1].split("\n## ", 1)[0]
    assert pgservers.BACKUP_ROLE_SQL.strip() in section
