"""The metrics commands and recorded samples through the CLI, and the catalog's forward
migration from schema v1 (no metric history) to v2."""

import json

from ruamel.yaml import YAML

from engine.catalog import schema
from engine.keyspace import even_ranges
from traces import samples, to_file


def _recorded(path, hot="orders/40-80"):
    names = [f"orders/{r.name}" for r in even_ranges(4)]
    windows = {n: samples(n, {"queries_per_second": [15000] * 31} if n == hot else {"queries_per_second": [5.0] * 31},
                          server="ab"[i % 2]) for i, n in enumerate(names)}
    path.write_text(json.dumps(to_file(windows)))


def test_plan_with_a_recorded_samples_file_is_offline_what_if(applied_fleet):
    _recorded(applied_fleet.base / "hot.json")
    doc = json.loads(applied_fleet.cli("plan", "--format", "json", "--metrics", "hot.json").out)
    assert doc["metrics_source"] == "recorded hot.json"
    (split,) = doc["actions"]
    assert split["source"]["name"] == "40-80" and split["evidence"][0]["source"] == "recorded"
    first = applied_fleet.cli("plan", "--metrics", "hot.json").out
    assert first == applied_fleet.cli("plan", "--metrics", "hot.json").out  # same input, same bytes


def test_collected_samples_export_to_a_file_that_plan_reads_back(applied_fleet):
    assert applied_fleet.cli("metrics", "collect", "--count", "2", "--interval", "1s").code == 0
    exported = applied_fleet.cli("metrics", "export", "-o", "recorded.yaml")
    assert exported.code == 0, exported.both
    data = YAML(typ="safe").load((applied_fleet.base / "recorded.yaml").read_text())
    shards = {s["shard"] for s in data["samples"]}
    assert shards == {"orders/-40", "orders/40-80", "orders/80-c0", "orders/c0-"}
    assert len(data["samples"]) >= 8
    plan = applied_fleet.cli("plan", "--detailed-exitcode", "--metrics", "recorded.yaml")
    assert plan.code == 0, plan.both


def test_status_shows_load_state_sources_and_history(applied_fleet):
    status = applied_fleet.cli("status")
    assert status.code == 0, status.both
    assert "q/s history" in status.out and "Metrics: live; ? = unknown (never counted as zero)" in status.out
    assert "source: pg_stat_statements calls" in status.out
    report = json.loads(applied_fleet.cli("status", "--json").out)
    shard = report["databases"][0]["shards"][0]
    assert shard["load"] in ("normal", "cold") and shard["samples"] >= 1
    assert set(shard["metrics"]) == {"queries_per_second", "cpu_percent", "memory_percent", "storage_percent",
                                     "connections", "latency_ms"}
    assert shard["metrics"]["cpu_percent"]["source"].startswith("host /proc CPU of backends") or \
        shard["metrics"]["cpu_percent"]["source"].startswith("pg_stat_database active_time")


def test_a_bad_samples_file_is_a_clear_error(applied_fleet):
    (applied_fleet.base / "bad.yaml").write_text("samples:\n  - {shard: orders/-40, server: a, at: yesterday}\n")
    result = applied_fleet.cli("plan", "--metrics", "bad.yaml")
    assert result.code == 1 and "Traceback" not in result.err
    assert result.err.startswith("Error: bad.yaml: sample 1")
    (applied_fleet.base / "typo.yaml").write_text(
        "samples:\n  - {shard: orders/-40, server: a, at: 2026-11-26T10:00:00Z, metrics: {qps: 5}}\n")
    result = applied_fleet.cli("plan", "--metrics", "typo.yaml")
    assert "unknown metric 'qps'" in result.err
    (applied_fleet.base / "naive.yaml").write_text(
        "samples:\n  - {shard: orders/-40, server: a, at: 2026-11-26T10:00:00Z, metrics: {}}\n"
        "  - {shard: orders/-40, server: a, at: 2026-11-26T10:00:10, metrics: {}}\n")
    result = applied_fleet.cli("plan", "--metrics", "naive.yaml")
    assert result.code == 1 and "Traceback" not in result.err and "This is a bug" not in result.err
    assert result.err.startswith(
        "Error: naive.yaml: sample 2 (orders/-40): the time 2026-11-26T10:00:10 has no time zone")


def test_impossible_recorded_values_are_unknown_with_a_note_and_the_json_plan_is_strict(applied_fleet):
    path = applied_fleet.base / "hot.json"
    _recorded(path)
    text = path.read_text().replace('"value": 15000.0', '"value": Infinity').replace('"value": 5.0', '"value": NaN', 1)
    path.write_text(text)
    result = applied_fleet.cli("plan", "--format", "json", "--metrics", "hot.json")  # run_cli parses it strictly
    doc = json.loads(result.out)
    assert result.code == 0 and doc["actions"] == []
    assert any("rejected as unknown (not a measurement): queries_per_second infinite" in w for w in doc["warnings"])


def test_a_v1_catalog_is_migrated_forward_by_apply(fleet):
    assert fleet.cli("up").code == 0
    with fleet.connect("a") as admin:
        admin.execute("CREATE DATABASE shardctl")
    with fleet.catalog() as conn, conn.transaction():
        conn.execute(schema.MIGRATIONS[0])
        conn.execute("INSERT INTO shardctl.meta VALUES ('schema_version', '1')")
    collect = fleet.cli("metrics", "collect")
    assert collect.code == 1 and "run `shardctl apply` to upgrade it" in collect.err
    assert fleet.cli("plan", "--detailed-exitcode").code == 2  # plan reads a v1 catalog as it is
    assert fleet.cli("apply", "--auto-approve").code == 0
    with fleet.catalog() as conn:
        assert schema.installed_version(conn) == schema.VERSION == len(schema.MIGRATIONS)
        assert conn.execute("SELECT to_regclass('shardctl.metric_samples') IS NOT NULL").fetchone() == (True,)
    assert fleet.cli("metrics", "collect").code == 0


def test_the_catalog_keeps_only_the_newest_samples_each_shard_may_have(applied_fleet):
    from datetime import timedelta

    from engine.catalog import store
    from engine.observe.metrics import Reading
    from traces import START, samples

    def rows(address: str, count: int, offset: int):
        window = samples(address, {"queries_per_second": [float(offset + i) for i in range(count)]},
                         start=START + timedelta(minutes=offset))
        return [(Reading(shard=s.shard, server=s.server, dbname="x", at=s.at), s) for s in window]

    with applied_fleet.catalog() as conn:
        store.save_samples(conn, rows("keep/a", 4, 0) + rows("keep/b", 4, 0), {"keep/a": 3, "keep/b": 1})
        store.save_samples(conn, rows("keep/a", 2, 10), {"keep/a": 3})
        kept = conn.execute("SELECT shard, (metrics->'metrics'->'queries_per_second'->>'value')::float"
                            " FROM shardctl.metric_samples WHERE shard LIKE 'keep/%' ORDER BY shard, at").fetchall()
        conn.execute("DELETE FROM shardctl.metric_samples WHERE shard LIKE 'keep/%'")
    assert kept == [("keep/a", 3.0), ("keep/a", 10.0), ("keep/a", 11.0), ("keep/b", 3.0)]
