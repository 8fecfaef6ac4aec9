"""Predictive splits on recorded multi-day traces (tests/traces.py multi_day): the forecast
method on its own, the lead time from measured moves, and the reactive and predictive policies
replayed on the same traces (engine.detect.backtest)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from traces import START, multi_day

from engine.config.models import Policy
from engine.detect.backtest import Trace, replay
from engine.detect.forecast import about, fit, lead_time
from engine.observe.models import MoveRecord
from engine.observe import rollup

QPS = "queries_per_second"
THRESHOLD = 10000.0
MOVE = 2700.0  # the replayed moves take 45 minutes
POLICY = Policy.model_validate({
    "hot": {QPS: THRESHOLD}, "cold": {QPS: 100}, "detection": {"sustain": "5m", "cold_for": "30m"},
    "metrics": {"interval": "1m"}, "automerge": {"enabled": True}, "forecast": {"mode": "act"}})
LEAD = lead_time([MoveRecord(kind="split_shard", seconds=2400, size_bytes=4e9),
                  MoveRecord(kind="split_shard", seconds=MOVE, size_bytes=5e9),
                  MoveRecord(kind="split_shard", seconds=20000, size_bytes=90e9)], 5e9, 3600, 3600)
CROSSING = ("daily", "weekly", "nights", "growth_spikes")
CALM = ("spikes", "quiet")


def trace(kind: str, days: int = 21) -> Trace:
    return Trace(name=f"orders/{kind}", metric=QPS, start=START, interval=60.0, values=tuple(multi_day(kind, days)))


def hourly(kind: str, days: int = 21) -> list:
    return [(s.at, s.value(QPS)) for s in rollup.means(trace(kind, days).samples(), 3600)[f"orders/{kind}"]]


@pytest.fixture(scope="module")
def results():
    return {kind: replay(trace(kind), POLICY, MOVE, LEAD) for kind in (*CROSSING, *CALM)}


def test_the_lead_time_is_the_slowest_similar_move_plus_the_margin():
    assert LEAD.seconds == MOVE + 3600  # the 90 GB move is not like a 5 GB shard's
    assert "2 past moves of similar size took 45m" in LEAD.why
    assert lead_time([], None, 600, 1800).seconds == 2400
    scaled = lead_time([MoveRecord(kind="split_shard", seconds=1000, size_bytes=1e9)], 10e9, 0, 0)
    assert scaled.seconds == pytest.approx(10000) and "scaled by size" in scaled.why


def test_no_forecast_before_the_minimum_history():
    points = hourly("daily")
    early = START + timedelta(days=2, hours=23)
    assert fit("s", QPS, points, early, 172800, 3 * 86400) is None
    assert fit("s", QPS, points, early + timedelta(hours=2), 172800, 3 * 86400) is not None


def test_the_forecast_follows_growth_and_the_daily_cycle_and_ignores_spikes():
    now = START + timedelta(days=10)
    daily = fit("s", QPS, hourly("daily"), now, 172800, 3 * 86400)
    actual = dict(hourly("daily"))
    assert daily is not None and daily.seasonality == "daily"
    assert daily.trend_per_day == pytest.approx(4.0, abs=0.5)  # the trace grows 4% a day
    errors = [abs(v - actual[daily.at(i)]) / actual[daily.at(i)] for i, v in enumerate(daily.values)]
    assert max(errors) < 0.1 and sum(errors) / len(errors) < 0.03
    assert daily.band < 0.05 * max(daily.values)  # in-sample residuals are the 2% noise

    spikes = fit("s", QPS, hourly("spikes"), now, 172800, 3 * 86400)
    # the bursts recur at the same minutes each day: they show as their hourly mean, never near 15,000/s
    assert spikes is not None and max(spikes.values) < 2500
    assert spikes.crossing(THRESHOLD, upper=True) is None


def test_two_weeks_of_history_give_a_weekly_season_that_sees_the_weekend():
    points = hourly("weekly")
    now = START + timedelta(days=15)
    weekly = fit("s", QPS, points, now, 7 * 86400, 3 * 86400)
    assert weekly is not None and weekly.seasonality == "weekly"
    actual = dict(points)
    pairs = [(v, actual[weekly.at(i)]) for i, v in enumerate(weekly.values) if weekly.at(i) in actual]
    error = sum(abs(f - a) for f, a in pairs) / sum(a for _, a in pairs)
    assert len(pairs) == 24 * 6 and error < 0.05


def test_predictive_splits_finish_before_the_crossing_and_cut_hot_time_by_80_percent(results):
    reactive = sum(results[k].reactive.over_seconds for k in CROSSING)
    predictive = sum(results[k].predictive.over_seconds for k in CROSSING)
    assert reactive > 0
    assert predictive <= 0.2 * reactive, (reactive, predictive)
    for kind in CROSSING:
        result = results[kind]
        first_hot = result.reactive.decisions[0].at  # when the reactive policy saw it hot
        split = result.predictive.decisions[0]
        assert (split.kind, split.cause) == ("split", "forecast"), kind
        assert split.at + timedelta(seconds=MOVE) < first_hot - timedelta(seconds=POLICY.sustain_seconds), kind
        assert "forecast crosses 10,000" in split.why and "fitted on" in split.why


def test_no_flapping_no_action_on_spikes_or_a_quiet_shard_and_none_before_the_minimum_history(results):
    for kind, result in results.items():
        assert result.predictive.flapping_pairs == 0, kind
        assert all(d.kind == "split" for d in result.predictive.decisions if d.cause == "forecast")
        assert all(d.at >= START + timedelta(seconds=POLICY.forecast.min_history)
                   for d in result.predictive.decisions if d.cause == "forecast"), kind
    for kind in CALM:
        assert results[kind].reactive.decisions == results[kind].predictive.decisions == (), kind
    # the reactive policy, merging cold split shards at night, flaps on the same trace
    assert results["nights"].reactive.flapping_pairs > 0


def test_a_shard_hot_before_the_minimum_history_is_left_to_the_reactive_policy():
    hot_early = Trace(name="orders/early", metric=QPS, start=START, interval=60.0,
                      values=tuple(v * 2.2 for v in multi_day("daily", 4)))
    result = replay(hot_early, POLICY, MOVE, LEAD)
    assert result.predictive.decisions and result.predictive.decisions[0].at < START + timedelta(days=3)
    assert all(d.cause == "load" for d in result.predictive.decisions
               if d.at < START + timedelta(seconds=POLICY.forecast.min_history))


def test_about_rounds_like_a_person():
    assert about(timedelta(minutes=40)) == "40 minutes"
    assert about(timedelta(hours=5, minutes=10)) == "5 hours"
    assert about(timedelta(days=3, hours=2)) == "3 days"


def test_shardctl_forecast_backtest_replays_a_recorded_file(tmp_path):
    """The CLI on a recording: 10 days of the daily trace and a quiet shard, under the
    quickstart's policy (10 s interval in the policy; the 1-minute replay keeps its windows in time)."""
    import json

    from conftest import FleetDir

    from engine.observe import recorded

    fleet = FleetDir(tmp_path)
    days = 10
    windows = []
    for address, kind in (("orders/-40", "daily"), ("orders/40-80", "quiet")):
        t = Trace(name=address, metric=QPS, start=START, interval=60.0, values=tuple(multi_day(kind, days)))
        windows += t.samples()
    (tmp_path / "fleet" / "history.json").write_text(json.dumps(recorded.dump(windows)))
    result = fleet.cli("forecast", "--backtest", "--metrics", "fleet/history.json")
    assert result.code == 0, result.both
    out = result.out
    assert "orders/-40: queries_per_second over 10 days, hot threshold 10000" in out
    assert "predictive  hot for 0s; 1 splits (1 on a forecast), 0 merges, 0 flapping pairs" in out, out
    assert "reactive    hot for" in out and "1 splits (0 on a forecast)" in out
    assert "orders/40-80" in out and "Hot time: reactive" in out and "(100% less)" in out

    now = fleet.cli("forecast", "--metrics", "fleet/history.json", "--json")
    rows = json.loads(now.out)
    assert [r["shard"] for r in rows] == ["orders/-40", "orders/40-80"]
    assert rows[0]["forecast"]["seasonality"] == "daily" and "crosses" in rows[0]["summary"]
