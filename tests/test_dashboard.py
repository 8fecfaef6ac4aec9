"""The dashboard page from a fixed snapshot: pinned by a golden file, escaped, and readable
without JavaScript (the charts are inline SVG, the refresh a meta tag)."""

from datetime import datetime, timedelta, timezone

from conftest import assert_golden
from engine import __version__
from engine.observe.metrics import METRICS
from engine.plan.models import Plan
from engine.render.dashboard import chart, render_dashboard
from engine.watch.autonomy import Pending
from engine.watch.view import BranchView, HistoryEntry, ShardView, Snapshot

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)


def _series(values: list[float | None]) -> list[tuple]:
    start = NOW - timedelta(seconds=10 * len(values))
    return [((start + timedelta(seconds=10 * i)).timestamp(), v, 5.0, 1.0, 1.0, 2.0, 0.4) for i, v in enumerate(values)]


def _snapshot(**changes) -> Snapshot:
    hot = ShardView(address="orders/-80", database="orders", name="-80", server="a", load="hot",
                    evidence=("orders/-80: queries_per_second 15,000/s > 10,000/s in 5 of 5 samples",),
                    latest=dict(zip(METRICS, (15000.0, 40.0, 2.0, 1.0, 3.0, 0.5))),
                    hot_thresholds={"queries_per_second": 10000.0, "cpu_percent": 80.0, "latency_ms": 100.0})
    quiet = ShardView(address="orders/80-", database="orders", name="80-", server="b", load="unknown")
    base = Snapshot(
        who="ops@host (pid 1)", config_dir="/srv/fleet", started_at=NOW - timedelta(hours=1),
        role="leader", leader="ops@host (pid 1)", paused=True, pause_reason="incident 42", paused_by="ops@laptop",
        plan=Plan(shardctl_version=__version__, based_on_serial=3, catalog_exists=True, actions=()),
        plan_text="Plan: 2 to add, 0 to change, 1 to destroy.\n", planned_at=NOW - timedelta(seconds=20),
        pending=(Pending(address="shard.orders/-80", kind="split_shard", why="the daemon is paused"),),
        notes=("shard.orders/80-: hot, but held back by the cooldown until 2026-11-26T12:30:00Z",),
        shards=(hot, quiet),
        history=(HistoryEntry(at=NOW - timedelta(minutes=5), event="split_shard", address="shard.orders/-",
                              actor="daemon ops@host (pid 1)", summary="into -80, 80-",
                              evidence=("queries_per_second 20000 > 10000 in 5 of 5 samples",)),),
        branches=(BranchView(name="dev", parent="orders", data="schema", server="a", state="active",
                             created_at=NOW - timedelta(hours=2), expires_at=NOW + timedelta(hours=22)),),
        last_collect_at=NOW - timedelta(seconds=4), last_collect_seconds=0.012)
    return base.model_copy(update=changes)


def test_the_dashboard_is_pinned():
    series = {"orders/-80": _series([100, 200, 9000, 15000, 16000, 15000]), "orders/80-": _series([5, None, None])}
    html = render_dashboard(_snapshot(), series, now=NOW)
    assert_golden("dashboard.html", html)
    assert "<script" not in html and 'http-equiv="refresh"' in html
    assert 'class="alert hot-alert">orders/-80 is hot: queries_per_second 15,000/s' in html


def test_text_from_the_fleet_is_escaped():
    evil = ShardView(address="orders/-", database="orders", name="-", server="a", load="hot",
                     evidence=("orders/-: <script>alert(1)</script>",))
    html = render_dashboard(_snapshot(shards=(evil,), pause_reason="<b>x</b>"), {}, now=NOW)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>x</b>" not in html


def test_an_unknown_stretch_breaks_the_chart_line_and_the_threshold_is_drawn():
    drawn = chart(_series([1000, None, None, 3000, 4000]), "queries_per_second", threshold=10000.0)
    assert len(drawn["lines"]) == 2 and drawn["threshold_y"] is not None
    assert drawn["peak"] == 4000 and drawn["latest"] == 4000
