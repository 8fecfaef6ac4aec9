"""The dashboard page from a fixed snapshot: pinned by a golden file, escaped, and readable
without JavaScript (the charts are inline SVG, the refresh a meta tag). Its pictures (the
keyspace coloured by load, the servers' capacity use, the running move) are pinned one by
one, and the page is laid out in headless Chromium at a phone's 390 px without sideways scroll."""

import html as html_module
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from conftest import assert_golden
from engine import __version__
from engine.observe.metrics import METRICS
from engine.plan.models import Plan
from engine.render.dashboard import chart, keyspace, render_dashboard, render_picture
from engine.snapshot import BranchView, HistoryEntry, Pending, ReplicaView, ShardView, Snapshot

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def _series(values: list[float | None]) -> list[tuple]:
    start = NOW - timedelta(seconds=10 * len(values))
    return [((start + timedelta(seconds=10 * i)).timestamp(), v, 5.0, 1.0, 1.0, 2.0, 0.4) for i, v in enumerate(values)]


def _snapshot(**changes) -> Snapshot:
    hot = ShardView(address="orders/-80", database="orders", name="-80", server="a", load="hot",
                    evidence=("orders/-80: queries_per_second 15,000/s > 10,000/s in 5 of 5 samples",),
                    latest=dict(zip(METRICS, (15000.0, 40.0, 2.0, 1.0, 3.0, 0.5), strict=True)),
                    hot_thresholds={"queries_per_second": 10000.0, "cpu_percent": 80.0, "latency_ms": 100.0}, hi=0)
    quiet = ShardView(address="orders/80-", database="orders", name="80-", server="b", load="unknown", lo=0)
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
                              evidence=("queries_per_second 20000 > 10000 in 5 of 5 samples",), pause_ms=123.4),),
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


def _metrics(qps, cpu, mem, disk, conns=2.0, latency=0.5):
    return dict(zip(METRICS, (qps, cpu, mem, disk, conns, latency), strict=True))


def _busy_fleet() -> Snapshot:
    """Two databases over three servers, every load state, one server silent, a split copying."""
    q = 1 << 62  # a quarter of the keyspace, signed bounds as the catalog stores them
    shards = (
        ShardView(address="orders/-40", database="orders", name="-40", server="a", load="hot", hi=-q,
                  latest=_metrics(15000.0, 70.0, 20.0, 35.0)),
        ShardView(address="orders/40-80", database="orders", name="40-80", server="b", load="normal", lo=-q, hi=0,
                  latest=_metrics(900.0, 12.0, 8.0, 30.0)),
        ShardView(address="orders/80-c0", database="orders", name="80-c0", server="a", load="cold", lo=0, hi=q,
                  latest=_metrics(3.0, 0.5, 1.0, 20.0)),
        ShardView(address="orders/c0-", database="orders", name="c0-", server="c", load="stale", lo=q,
                  latest=_metrics(None, None, None, None, None, None), sampled_at=NOW - timedelta(minutes=3)),
        ShardView(address="sessions/-", database="sessions", name="-", server="b", load="unknown",
                  latest=_metrics(40.0, None, 2.0, 1.0)),
    )
    return Snapshot(who="ops@host (pid 1)", config_dir="/srv/fleet", started_at=NOW - timedelta(hours=1),
                    role="leader", shards=shards, silent_servers=("c",),
                    activity="applying shard.orders/-40", activity_since=NOW - timedelta(minutes=4),
                    progress={"step": "split orders/-40", "phase": "copy", "rows_copied": 1_250_000,
                              "rows_expected": 5_000_000, "rows_per_s": 25_000,
                              "text": "copying: 3/8 tables done, 1,250,000 of ~5,000,000 rows at 25,000 rows/s"},
                    progress_at=NOW - timedelta(seconds=1),
                    replicas=(ReplicaView(server="a", name="standby1", lag_bytes=4096.0, lag_seconds=0.2),))


@pytest.mark.parametrize("picture", ["keyspace", "servers", "move"])
def test_the_pictures_are_pinned(picture):
    assert_golden(f"dashboard_{picture}.html", render_picture(picture, _busy_fleet(), NOW))


def test_the_keyspace_bar_is_the_shards_share_in_key_order_coloured_by_load():
    (orders, sessions) = keyspace(_busy_fleet().shards)
    assert [(s["name"], s["load"], s["width"]) for s in orders["segments"]] == [
        ("-40", "hot", "25.000"), ("40-80", "normal", "25.000"),
        ("80-c0", "cold", "25.000"), ("c0-", "stale", "25.000")]
    assert sessions["segments"][0]["width"] == "100.000" and round(orders["covered"]) == 100
    page = render_dashboard(_busy_fleet(), {}, now=NOW)
    assert '<div class="seg hot" style="width:25.000%"' in page


def test_servers_show_their_capacity_use_and_a_silent_one_says_so():
    text = render_picture("servers", _busy_fleet(), NOW)
    a = text[text.index('data-server="a"'):text.index('data-server="b"')]
    assert "2 shards, 1 hot" in a and "70.5%" in a and "55.0%" in a  # cpu 70 + 0.5, storage 35 + 20
    c = text[text.index('data-server="c"'):]
    assert "not answering" in c and "unknown" in c


def test_the_running_move_shows_its_progress():
    text = render_picture("move", _busy_fleet(), NOW)
    assert "split orders/-40" in text and 'aria-label="25% done"' in text and "about 2m30s left in this phase" in text
    idle = render_picture("move", _snapshot(), NOW)
    assert "No split or merge is running." in idle


def _chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium): the layout was not measured")
    return chromium


@pytest.mark.parametrize("width", [390, 1280])
def test_in_chromium_the_page_fits_the_width_without_sideways_scroll(tmp_path, width):
    """Headless Chromium will not open a window narrower than 500 px, so the page is laid out in
    an iframe of the width (as a phone's viewport); the probe is in the test's wrapper page,
    never in the dashboard, which has no script."""
    snapshot = _busy_fleet().model_copy(update={
        "history": _snapshot().history, "branches": _snapshot().branches, "pending": _snapshot().pending,
        "notes": ("shard.orders/80-c0: a long note without spaces " + "x" * 120,),
        "plan_text": "Plan: 2 to add, 0 to change, 1 to destroy. " + "-" * 200 + "\n"})
    series = {s.address: _series([100, 200, None, 15000, 16000, 15000]) for s in snapshot.shards}
    page = render_dashboard(snapshot, series, now=NOW)
    assert "<script" not in page
    wrapper = (f'<!doctype html><html><body style="margin:0"><iframe style="border:0;width:{width}px;height:900px"'
               f' srcdoc="{html_module.escape(page, quote=True)}" onload="var d=this.contentDocument.documentElement;'
               " document.getElementById('probe').textContent='scroll='+d.scrollWidth+' client='+d.clientWidth;\">"
               '</iframe><pre id="probe">not measured</pre></body></html>')
    (tmp_path / "wrapper.html").write_text(wrapper)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={max(width + 50, 800)},1000"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", (tmp_path / "wrapper.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r"scroll=(\d+) client=(\d+)", dom.stdout)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    scroll, client = int(found.group(1)), int(found.group(2))
    assert client <= width and scroll <= client, f"the page is {scroll} px wide in a {client} px viewport"
