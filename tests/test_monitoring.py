"""Monitoring users already run: the Prometheus alerting rules and the Grafana dashboard in
examples/monitoring are checked with promtool (Debian's `prometheus` package; .ci/run installs
it), and every series they use is one the daemon's /metrics really exposes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from ruamel.yaml import YAML

from conftest import EXAMPLES
from engine.snapshot import move_eta_seconds
from engine.watch.prometheus import exposition
from engine.watch.view import BackupView, BranchLinkView, OrphanView, ReplicaView, ShardView, Snapshot, View

MONITORING = EXAMPLES / "monitoring"
RULES = MONITORING / "shardctl-alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed; .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install prometheus): the rules were not checked")
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules():
    result = _run("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    declared = sum(len(group["rules"]) for group in YAML(typ="safe").load(RULES.read_text())["groups"])
    assert declared >= 12  # every alert the README documents is in the file
    assert f"SUCCESS: {declared} rules found" in result.stdout


def test_promtool_runs_the_rules_unit_tests():
    result = _run("test", "rules", "shardctl-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_scrape_config():
    result = _run("check", "config", "prometheus-scrape.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_cover_what_operators_asked_for():
    from ruamel.yaml import YAML

    rules = YAML(typ="safe").load(RULES.read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"ShardctlShardHot", "ShardctlNoLeader", "ShardctlCollectionStalled", "ShardctlCollectionFailing",
            "ShardctlMoveStuck", "ShardctlMoveSlow", "ShardctlReplicaLag", "ShardctlBackupOverdue",
            "ShardctlWalNotStreaming", "ShardctlReplicaLinkBroken", "ShardctlLeftoverReplication"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def _full_snapshot() -> Snapshot:
    """A snapshot with everything the exposition can show: shards, a move, standbys, backups."""
    shard = ShardView(address="orders/-40", database="orders", name="-40", server="a", load="hot",
                      latest={"queries_per_second": 12000.0, "cpu_percent": 50.0, "memory_percent": 1.0,
                              "storage_percent": 2.0, "connections": 3.0, "latency_ms": 0.4})
    return Snapshot(who="d", config_dir="/x", started_at=NOW, role="leader", shards=(shard,),
                    activity="applying orders/-40", activity_since=NOW - timedelta(minutes=3),
                    progress={"step": "split orders/-40", "phase": "copy", "rows_copied": 10, "rows_expected": 100,
                              "rows_per_s": 5, "lag_bytes": 4096},
                    progress_at=NOW, last_collect_at=NOW, silent_servers=("b",),
                    replicas=(ReplicaView(server="a", name="standby1", lag_bytes=10.0, lag_seconds=0.5),),
                    backups=(BackupView(server="a", last_backup_at=NOW, every_seconds=86400.0, streaming=True,
                                        wal_lag_bytes=0),),
                    branch_links=(BranchLinkView(branch="mirror", shard="orders/-40", server="a", state="broken",
                                                 lag_bytes=4096, error="password authentication failed"),),
                    orphans=(OrphanView(server="a", kind="slot", name="shardctl_op7_0", database="orders_min_40",
                                        operation=7, retained_bytes=65536, text="slot shardctl_op7_0 ..."),))


def _exposed() -> set[str]:
    view = View(_full_snapshot())
    view.count_action("split_shard", "applied")
    text = exposition(view).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _series_names(promql: str) -> set[str]:
    return set(re.findall(r"\bshardctl_[a-z_]+\b", promql))


def test_every_series_the_rules_and_dashboard_use_is_exposed():
    exposed = _exposed()
    from ruamel.yaml import YAML

    used = set()
    for rule in YAML(typ="safe").load(RULES.read_text())["groups"][0]["rules"]:
        used |= _series_names(rule["expr"])
    for expr in _dashboard_exprs():
        used |= _series_names(expr)
    assert used and used <= exposed, sorted(used - exposed)


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"] if v.get("definition")]
    return exprs


def test_the_dashboard_is_provisioning_ready_and_its_queries_parse(tmp_path):
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "shardctl-fleet" and len(doc["uid"]) <= 40 and doc["title"]
    assert isinstance(doc["schemaVersion"], int) and "id" not in doc  # provisioning assigns the id
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    kinds = {p["type"] for p in doc["panels"]}
    assert {"stat", "timeseries", "state-timeline"} <= kinds
    # every query is valid PromQL: promtool parses them as recording rules
    exprs = [e for e in _dashboard_exprs() if not e.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$database", ".*")} for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard-queries.yml").write_text(json.dumps(rules))
    result = subprocess.run([_promtool(), "check", "rules", str(tmp_path / "dashboard-queries.yml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_move_in_progress_and_standbys_are_exposed():
    text = exposition(View(_full_snapshot())).decode()
    assert 'shardctl_move_in_progress 1.0' in text
    assert 'shardctl_move_rows_copied{step="split orders/-40"} 10.0' in text
    assert 'shardctl_move_eta_seconds{step="split orders/-40"} 18.0' in text
    assert 'shardctl_replica_lag_seconds{replica="standby1",server="a"} 0.5' in text
    assert 'shardctl_server_up{server="a"} 1.0' in text and 'shardctl_server_up{server="b"}' not in text
    idle = exposition(View(Snapshot(who="d", config_dir="/x", started_at=NOW))).decode()
    assert "shardctl_move_in_progress 0.0" in idle
    assert "shardctl_replica_lag" not in idle and "shardctl_move_rows_copied" not in idle  # absent, never zero


def test_move_eta_by_phase():
    assert move_eta_seconds({"phase": "copy", "rows_expected": 100, "rows_copied": 40, "rows_per_s": 6}) == 10.0
    assert move_eta_seconds({"phase": "copy", "rows_expected": 100, "rows_copied": 40, "rows_per_s": 0}) is None
    assert move_eta_seconds({"phase": "catch-up", "lag_bytes": 100.0, "apply_rate": 30.0, "wal_rate": 10.0}) == 5.0
    assert move_eta_seconds({"phase": "catch-up", "lag_bytes": 100.0, "apply_rate": 10.0, "wal_rate": 30.0}) is None
    assert move_eta_seconds({"phase": "caught up"}) == 0.0
