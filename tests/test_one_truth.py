"""One truth across `status`, the dashboard, /api and /metrics: an idle shard is normal (not
unknown) everywhere, a stale figure is labelled, a retired shard shows no live load, the pause
owner is named only while paused, "near" means near, a cold shard is one line, and the catalog's
connection string (for shardctl.route() and ShardClient) is shown, without its password."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from datetime import timedelta
from types import SimpleNamespace

from conftest import EXAMPLES, FleetDir, run_cli
from engine.config.models import Policy
from engine.detect.detector import assess
from engine.render.dashboard import chart, render_dashboard
from engine.status import _shard_row, render_status
from engine.watch.http import api_status
from engine.watch.view import ShardView, Snapshot, View
from traces import START, samples

POLICY = Policy.model_validate({
    "hot": {"queries_per_second": 10000, "cpu_percent": 80, "latency_ms": 100},
    "cold": {"queries_per_second": 100, "cpu_percent": 10, "memory_percent": 10, "storage_percent": 10,
             "connections": 20},
    "detection": {"sustain": "1m", "cold_for": "2m", "tolerance_percent": 10},
})
IDLE = {"queries_per_second": 0.0, "cpu_percent": 0.0, "memory_percent": 0.2, "storage_percent": 0.04,
        "connections": 0.0, "latency_ms": None}  # no statement ran: no latency


def _shard(name: str = "-40", state: str = "active"):
    return SimpleNamespace(name=name, lo=None, hi=None, server="a", dbname=f"orders_{name}", state=state)


def test_an_idle_shard_without_latency_is_normal_then_cold_never_unknown():
    one = samples("orders/-40", {"queries_per_second": [0.0]}, base=IDLE)
    assert assess("orders/-40", one, POLICY).state == "normal"
    long_idle = samples("orders/-40", {"queries_per_second": [0.0] * 20}, base=IDLE)
    verdict = assess("orders/-40", long_idle, POLICY)
    assert verdict.state == "cold", verdict


def test_status_prints_one_cold_line_per_idle_shard():
    window = samples("orders/-40", {"queries_per_second": [0.0] * 20}, base=IDLE)
    verdict = assess("orders/-40", window, POLICY, {("cold", m): "policies/default.yaml:17:7" for m in IDLE})
    rows = [_shard_row(_shard(name), window, verdict) for name in ("-40", "40-80", "80-")]
    assert len(rows[0]["evidence"]) == 5  # the JSON keeps the evidence per metric
    text = _render({"databases": [_database(rows)]})
    cold = [line for line in text.splitlines() if line.lstrip().startswith("COLD")]
    assert len(cold) == 3, text
    assert "under every cold threshold for" in cold[0] and "queries_per_second 0/s < 100/s" in cold[0]
    assert "thresholds from policies/default.yaml:17:7" in " ".join(text.split())


def test_far_over_the_threshold_is_never_called_near():
    # five times the hot threshold for 30 s of a 1 m sustain: over, not yet sustained; not "near"
    window = samples("orders/-40", {"queries_per_second": [50.0] * 9 + [50_000.0] * 3})
    verdict = assess("orders/-40", window, POLICY)
    assert verdict.state == "normal"
    row = _shard_row(_shard(), window, verdict)
    assert row["near"] == [] and [n["kind"] for n in row["notes"]] == ["rising"]
    text = _render({"databases": [_database([row])]})
    assert "near" not in text.replace("near the hot", ""), text
    assert "over, not sustained yet: orders/-40: queries_per_second over the hot threshold" in text
    # really near (within the 10% tolerance under it): called near
    close = samples("orders/-40", {"queries_per_second": [9_500.0] * 3})
    row = _shard_row(_shard(), close, assess("orders/-40", close, POLICY))
    assert [n["kind"] for n in row["notes"]] == ["near"]
    assert "near: orders/-40: queries_per_second 9,500/s is near the hot threshold" in _render(
        {"databases": [_database([row])]})


def test_a_retired_shard_shows_no_live_load():
    window = samples("orders/-", {"queries_per_second": [7000.0] * 5})
    row = _shard_row(_shard("-", state="retired"), window, None)
    assert row["load"] == "retired" and row["samples"] == 0 and row["query_rate_history"] == []
    assert all(v is None for v in row["metrics"].values())
    text = _render({"databases": [_database([row])]})
    line = next(line for line in text.splitlines() if "orders/-" in line and "retired" in line)
    assert "7,000" not in line and "?" not in line and "-" in line


def _database(rows):
    return {"name": "orders", "shard_key": "customer_id (bigint)", "policy": "default", "protect": False,
            "state": "active", "schema_steps": [], "shards": rows}


def _render(report):
    full = {"servers": [], "catalog": {"server": "a", "state": "ok"}, "interrupted": [], **report}
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        render_status(full, colour=False)
    return buffer.getvalue()


def test_api_status_names_the_pause_owner_only_while_paused():
    base = Snapshot(who="d", config_dir="/x", started_at=START, paused=False, paused_by="ops@laptop",
                    pause_reason="incident 42")
    lifted = api_status(SimpleNamespace(view=View(base)))
    assert lifted["paused"] is False and lifted["paused_by"] is None and lifted["pause_reason"] == ""
    held = api_status(SimpleNamespace(view=View(base.model_copy(update={"paused": True}))))
    assert held["paused_by"] == "ops@laptop" and held["pause_reason"] == "incident 42"


def test_a_chart_never_captions_a_stale_value_as_current():
    t0 = START.timestamp()
    points = [(t0 + 10 * i, v, None, None, None, None, None) for i, v in enumerate([120.0, 130.0, None, None])]
    drawn = chart(points, "queries_per_second", threshold=None)
    assert drawn["latest"] is None and drawn["last_known"] == 130.0
    view = ShardView(address="orders/-40", database="orders", name="-40", server="a", load="stale",
                     sampled_at=START + timedelta(seconds=10))
    snap = Snapshot(who="d", config_dir="/x", started_at=START, shards=(view,))
    html = render_dashboard(snap, {"orders/-40": points}, now=START + timedelta(seconds=100))
    caption = re.search(r"<figcaption>queries per second: (.*?)</figcaption>", html).group(1)
    assert caption.startswith('<span class="stale-value">unknown now (last known 130/s, 1m30s ago)'), caption
    assert "values as of 1m30s ago" in html


def test_status_shows_the_catalog_connection_without_its_password(tmp_path):
    fleet = FleetDir(tmp_path)
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace(
        "  b:\n    embedded: true\n", "  b:\n    embedded: true\n  ext:\n    dsn_env: CATALOG_DSN\n")
        + "catalog: {server: ext, database: control}\n")
    dsn = "host=127.0.0.1 port=1 user=ops password=sekret-9f2 dbname=postgres connect_timeout=2"
    shown = run_cli("-C", "fleet", "status", cwd=tmp_path, env={"CATALOG_DSN": dsn})
    as_json = run_cli("-C", "fleet", "status", "--json", cwd=tmp_path, env={"CATALOG_DSN": dsn})
    assert "sekret" not in shown.both + as_json.both
    assert "connection: connect_timeout=2 dbname=control host=127.0.0.1 port=1 user=ops" in shown.out, shown.both
    catalog = json.loads(as_json.out)["catalog"]
    assert catalog["connection"] == "connect_timeout=2 dbname=control host=127.0.0.1 port=1 user=ops"


def test_a_quickstart_example_is_still_valid(tmp_path):
    assert run_cli("-C", str(EXAMPLES / "quickstart"), "validate", cwd=tmp_path).code == 0


def test_the_daemon_api_and_metrics_agree_with_status_on_an_idle_fleet(tmp_path):
    """Before this, every shard read `unknown` on the page, /api/shards and /metrics until the
    second check (a minute in), while `status` called them normal: the first check ran before
    the first collection round."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    fleet = FleetDir(tmp_path)
    try:
        assert fleet.cli("apply", "--auto-approve").code == 0
        assert fleet.cli("pause", "--reason", "drill").code == 0
        assert fleet.cli("resume").code == 0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCTL_")}
        proc = subprocess.Popen([sys.executable, "-m", "engine", "watch", "-C", "fleet", "--listen",
                                 f"127.0.0.1:{port}"], cwd=tmp_path, env={**env, "NO_COLOR": "1"},
                                stdout=subprocess.DEVNULL, stderr=(tmp_path / "watch.err").open("w"))
        try:
            def get(path: str) -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                    return response.read().decode()

            deadline = time.monotonic() + 90
            status = None
            while time.monotonic() < deadline:
                try:
                    status = json.loads(get("/api/status"))
                except OSError:
                    status = None
                if status and status["planned_at"]:
                    break
                time.sleep(0.5)
            assert status and status["planned_at"], (tmp_path / "watch.err").read_text()[-3000:]
            assert status["paused"] is False and status["paused_by"] is None and status["pause_reason"] == ""
            shards = json.loads(get("/api/shards"))["shards"]
            assert len(shards) == 4 and {s["load"] for s in shards} == {"normal"}, shards
            families = {f.name: f for f in text_string_to_metric_families(get("/metrics"))}
            unknown = [s for s in families["shardctl_shard_load"].samples
                       if s.labels["state"] == "unknown" and s.value == 1.0]
            normal = [s for s in families["shardctl_shard_load"].samples
                      if s.labels["state"] == "normal" and s.value == 1.0]
            assert unknown == [] and len(normal) == 4
            report = json.loads(fleet.cli("status", "--json").out)
            assert {s["load"] for d in report["databases"] for s in d["shards"]} == {"normal"}
            assert report["automation"]["paused_by"] is None
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    finally:
        fleet.stop()
