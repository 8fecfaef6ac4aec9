"""Forecasts from a real catalog: hourly history stored through the rollups reaches `status`
(FORECAST lines), `plan` (forecast-only advice) and `shardctl forecast`, end to end."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from engine.catalog import store
from engine.observe.metrics import METRICS, MetricValue, Reading, Sample


def _store_history(conn, address: str, hours: int, end: datetime) -> None:
    """One sample an hour for `hours` hours before `end`: storage growing 3% a day from 50%,
    a daily query-rate cycle peaking at 9,700/s and growing 4% a day (crossing 10,000/s ahead)."""
    import math

    rows = []
    for h in range(hours, 0, -1):
        at = end - timedelta(hours=h)
        day = (hours - h) / 24
        qps = (2000 + 7700 * (1 + math.cos(2 * math.pi * (at.hour - 14) / 24)) / 2) * 1.04 ** (day - hours / 24)
        values = {"queries_per_second": qps, "storage_percent": 50 * 1.03 ** day}
        metrics = {m: MetricValue(value=round(values.get(m, 1.0), 3), source="recorded") for m in METRICS}
        sample = Sample(shard=address, server="a", at=at, interval_s=10.0, metrics=metrics)
        rows.append((Reading(shard=address, server="a", dbname="x", at=at), sample))
    for pair in rows:
        store.save_samples(conn, [pair], {address: 40})


def test_stored_hourly_history_reaches_status_plan_and_forecast(applied_fleet):
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with applied_fleet.catalog() as conn:
        _store_history(conn, "orders/-40", 5 * 24, end)
    status = applied_fleet.cli("status")
    assert status.code == 0, status.both
    assert "FORECAST orders/-40: storage reaches 80% in about" in status.out, status.out

    plan = applied_fleet.cli("plan")
    assert plan.code == 0, plan.both
    assert "shard.orders/-40: storage reaches 80% in about" in plan.out
    advice = [line for line in plan.out.splitlines() if "forecast-only" in line]
    assert len(advice) == 1 and "shard.orders/-40: queries_per_second forecast crosses 10,000/s" in advice[0]
    assert "No changes" in plan.out  # advice only: nothing is planned on it

    forecast = applied_fleet.cli("forecast", "--json", "--metric", "storage_percent")
    rows = {r["shard"]: r for r in json.loads(forecast.out)}
    assert rows["orders/-40"]["forecast"]["trend_per_day"] > 2.5
    assert rows["orders/-40"]["forecast"]["fitted_hours"] >= 5 * 24 - 1


def _store_growth(conn, address: str, hours: int, end: datetime, last: float) -> None:
    """Hourly query rates growing 4% a day to `last` at `end`: about to cross 10,000/s."""
    rows = []
    for h in range(hours, 0, -1):
        at = end - timedelta(hours=h - 1)
        metrics = {m: MetricValue(value=1.0, source="recorded") for m in METRICS}
        metrics["queries_per_second"] = MetricValue(value=round(last * 1.04 ** (-(h - 1) / 24), 3), source="recorded")
        rows.append((Reading(shard=address, server="a", dbname="x", at=at),
                     Sample(shard=address, server="a", at=at, interval_s=10.0, metrics=metrics)))
    for pair in rows:
        store.save_samples(conn, [pair], {address: 40})


def test_in_act_mode_a_forecast_split_is_planned_and_applied_for_real(fleet):
    from movers import active_shards, all_rows, preload

    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("    policy: default", "    policy: ahead")
                + "\npolicies:\n  ahead:\n    forecast: {mode: act}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, 2000)
    before, _ = all_rows(fleet)
    now = datetime.now(UTC)
    with fleet.catalog() as conn:
        _store_growth(conn, "orders/-40", 4 * 24, now, last=9990.0)

    planned = fleet.cli("plan", "-out", "ahead.plan")
    assert planned.code == 0, planned.both
    assert "# (because orders/-40 is forecast to cross the hot threshold of queries_per_second" in planned.out
    assert "lead time: no move measured yet" in planned.out
    applied = fleet.cli("apply", "ahead.plan")  # the saved plan: its forecast is refitted, and holds
    assert applied.code == 0, applied.both
    assert [s[0] for s in active_shards(fleet)] == ["-20", "20-40", "40-80", "80-c0", "c0-"]
    after, problems = all_rows(fleet)
    assert after == before and problems == []
    with fleet.catalog() as conn:
        reason = conn.execute("SELECT detail->>'reason' FROM shardctl.history WHERE event = 'split_shard'").fetchone()[0]
        moves = store.finished_moves(conn)
    assert reason.startswith("orders/-40 is forecast to cross")
    assert [m.kind for m in moves] == ["split_shard"] and moves[0].seconds > 0  # the next lead time is measured
