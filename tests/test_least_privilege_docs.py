"""README's "Running against your own servers" gives the SQL the suite's real-server tests run."""

from pathlib import Path

import pgservers

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_quotes_the_role_sql_the_tests_run():
    section = README.split("## Running against your own servers", 1)[1].split("\n## ", 1)[0]
    assert pgservers.ROLE_SQL.strip() in section


def test_readme_lists_doctor_among_the_commands():
    assert "| `shardctl doctor [--json]` |" in README


def _caps(**kw):
    from engine.observe.models import Capabilities

    base = dict(version_num=150020, superuser=False, createdb=True, replication=True, monitor=True,
                create_subscription=False, origin_progress=False, wal_level="logical", max_replication_slots=10,
                used_replication_slots=0, max_wal_senders=10, used_wal_senders=0, max_worker_processes=8,
                max_logical_replication_workers=4, max_slot_wal_keep_size_bytes=-1, stat_statements_loaded=True,
                stat_statements_created=True, buffercache_created=True, stat_statements_track="top",
                max_connections=100, reserved_connections=3, connections=5, role_connection_limit=-1,
                role="shardctl", clock_offset_s=0.0)
    return Capabilities(**{**base, **kw})


def test_the_checks_say_what_each_version_needs_for_a_subscription():
    from engine.observe.models import LiveServer
    from engine.plan import checks

    def live(**kw):
        return LiveServer(name="s", reachable=True, version="x", wal_level="logical", capabilities=_caps(**kw))

    assert "PostgreSQL 15 lets only a superuser" in checks.why_not(live(), "move_target")
    assert checks.why_not(live(superuser=True), "move_target") is None
    assert "GRANT pg_create_subscription TO shardctl" in checks.why_not(live(version_num=160004), "move_target")
    assert checks.why_not(live(version_num=180001, create_subscription=True), "move_target") is None
    assert "ALTER ROLE shardctl REPLICATION" in checks.why_not(live(replication=False), "move_source")
    assert "wal_level = logical" in checks.why_not(live(wal_level="replica"), "move_source")
    assert "1 of 10 free" in checks.why_not(live(used_replication_slots=9), "move_source")
    assert checks.why_not(live(createdb=False), "shard").startswith("server s fails the check 'CREATEDB'")
    warned = {c.name for c in checks.server_checks(live(stat_statements_track="all", buffercache_created=False))
              if c.mark == "warn"}
    assert warned == {"max_slot_wal_keep_size", "pg_stat_statements.track", "pg_buffercache"}
    assert checks.failing(LiveServer(name="s", reachable=True), "move_target") == []  # unknown never refuses
