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
        (reason,) = conn.execute("SELECT detail->>'reason' FROM shardctl.history"
                                 " WHERE event = 'split_shard'").fetchone()
        moves = store.finished_moves(conn)
    assert reason.startswith("orders/-40 is forecast to cross")
    assert [m.kind for m in moves] == ["split_shard"] and moves[0].seconds > 0  # the next lead time is measured


def test_a_batch_of_minutes_stored_in_the_catalog_is_judged_on_the_level_it_held(applied_fleet):
    """A nightly batch holding 20 minutes near 12,000/s, inside hours whose mean stays under
    4,000/s, stored as the daemon stores it (1-minute and 1-hour rollups): the plan's forecast is
    fitted on the level each hour held for the sustain, read from the 1-minute history, and
    crosses; a shard whose bursts last two minutes gets no such level."""
    from engine.collect import history
    from engine.config import loader

    end = datetime.now(UTC).replace(second=0, microsecond=0)
    rows = []
    for minute in range(4 * 1440, 0, -1):
        at = end - timedelta(minutes=minute)
        batch, burst = at.hour == 2 and 10 <= at.minute < 30, at.hour == 5 and at.minute < 2
        for address, high in (("orders/80-c0", batch), ("orders/c0-", burst)):
            metrics = {m: MetricValue(value=1.0, source="recorded") for m in METRICS}
            metrics["queries_per_second"] = MetricValue(value=12000.0 if high else 2500.0, source="recorded")
            rows.append((Reading(shard=address, server="a", dbname="x", at=at),
                         Sample(shard=address, server="a", at=at, interval_s=60.0, metrics=metrics)))
    with applied_fleet.catalog() as conn:
        store.save_samples(conn, rows, {"orders/80-c0": 40, "orders/c0-": 40})
        desired = loader.load(applied_fleet.path, cwd=applied_fleet.base)
        found = history.long_history(conn, list(_active(desired, conn)), end, desired)["hourly"]
    batch, bursts = found["orders/80-c0"], found["orders/c0-"]
    held = dict(batch.known("queries_per_second", highs=True))
    assert max(held.values()) == 12000.0 and max(v for _, v in batch.known("queries_per_second")) < 6000
    assert max(v for _, v in bursts.known("queries_per_second", highs=True)) == 2500.0  # two minutes: never held

    plan = applied_fleet.cli("plan")
    assert plan.code == 0, plan.both
    advice = [line for line in plan.out.splitlines() if "forecast-only" in line and "orders/80-c0" in line]
    assert len(advice) == 1 and "shard.orders/80-c0: queries_per_second forecast crosses" in advice[0], plan.out
    assert "; peak 12," in advice[0]
    assert not [line for line in plan.out.splitlines() if "orders/c0-" in line and "forecast" in line]


def _active(desired, conn):
    from engine.observe.models import CatalogShard

    for row in conn.execute("SELECT s.name, s.lo, s.hi, s.server, s.dbname FROM shardctl.shards s"
                            " WHERE s.state = 'active' AND s.database = 'orders'").fetchall():
        yield CatalogShard(database="orders", name=row[0], lo=row[1], hi=row[2], server=row[3], dbname=row[4],
                           state="active")
