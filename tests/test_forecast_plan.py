"""The plan's `forecast` cause on recorded history: a split ahead of the crossing with the
forecast as evidence, forecast-only advice, nothing before the minimum history, storage
outlooks in the notes, and no merge of shards whose joint load is forecast hot."""

from __future__ import annotations

from datetime import timedelta

from engine.detect.backtest import Trace
from engine.observe import rollup
from engine.plan import planner
from engine.render.renderers import render
from test_load_planning import FLEET, _desired, _observation
from traces import START, multi_day, samples

QPS = "queries_per_second"
NAMES = ["orders/-40", "orders/40-80", "orders/80-c0", "orders/c0-"]
ACT = "    policy: ahead\npolicies:\n  ahead:\n    forecast: {mode: act}\n"
# the daily trace of tests/traces.py crosses 10,000/s near midnight of its eighth day
BEFORE_CROSSING = START + timedelta(days=7, hours=11, minutes=15)


def _hourly(kind: str, address: str, until, scale: float = 1.0, metric: str = QPS):
    values = tuple(v * scale for v in multi_day(kind, 9))
    trace = Trace(name=address, metric=metric, start=START, interval=60.0, values=values)
    return tuple(s for s in rollup.means([s for s in trace.samples() if s.at <= until], 3600)[address])


def _observed(desired, now, hot_kind="daily", hourly_until=None):
    """Normal recent windows (nothing is hot now), long hourly history, judged at `now`."""
    recent = {n: samples(n, {QPS: [500.0] * 31}, start=now - timedelta(seconds=300)) for n in NAMES}
    observation = _observation(desired, recent)
    until = hourly_until or now
    hourly = {n: _hourly("quiet", n, until) for n in NAMES}
    hourly["orders/40-80"] = _hourly(hot_kind, "orders/40-80", until)
    return observation.model_copy(update={"hourly": hourly})


def test_a_shard_forecast_to_cross_within_the_lead_time_is_split_with_the_forecast_as_evidence(tmp_path):
    desired = _desired(tmp_path, fleet=FLEET.replace("    placement: [a, b]\n", "    placement: [a, b]\n" + ACT)
                       .replace("shards: 2", "shards: 4"))
    plan = planner.plan(desired, _observed(desired, BEFORE_CROSSING))
    splits = [a for a in plan.actions if a.kind == "split_shard"]
    assert [(a.address, a.reason.cause) for a in splits] == [("shard.orders/40-80", "forecast")]
    split = splits[0]
    assert split.evidence == () and split.forecast is not None and split.forecast.threshold == 10000
    assert "no move measured yet" in (split.lead_time or "")
    text = render(plan, "text")
    assert "forecast crosses 10,000/s" in text and "fitted on" in text and "lead time" in text
    assert "next 24 hours from" in text
    assert "forecast" in render(plan, "markdown")


def test_forecast_only_mode_advises_and_does_nothing(tmp_path):
    desired = _desired(tmp_path, fleet=FLEET.replace("shards: 2", "shards: 4"))  # default: forecast.mode advise
    plan = planner.plan(desired, _observed(desired, BEFORE_CROSSING))
    assert not [a for a in plan.actions if a.kind == "split_shard"]
    advice = [w for w in plan.warnings if "forecast-only" in w]
    assert len(advice) == 1 and advice[0].startswith("shard.orders/40-80: queries_per_second forecast crosses")
    assert "forecast-only" in render(plan, "markdown")


def test_nothing_acts_before_the_minimum_history_or_while_the_crossing_is_beyond_the_lead_time(tmp_path):
    desired = _desired(tmp_path, fleet=FLEET.replace("    placement: [a, b]\n", "    placement: [a, b]\n" + ACT)
                       .replace("shards: 2", "shards: 4"))
    young = _observed(desired, BEFORE_CROSSING)
    young = young.model_copy(update={"hourly": {a: h[-48:] for a, h in young.hourly.items()}})  # two days only
    plan = planner.plan(desired, young)
    assert not [a for a in plan.actions if a.kind == "split_shard"]
    assert not [w for w in plan.warnings if "forecast" in w]

    early = planner.plan(desired, _observed(desired, BEFORE_CROSSING - timedelta(hours=6)))
    assert not [a for a in early.actions if a.kind == "split_shard"]
    assert any("a split is planned once the crossing is within the lead time" in w for w in early.warnings)


def test_storage_growth_is_told_as_when_it_reaches_the_threshold(tmp_path):
    desired = _desired(tmp_path, fleet=FLEET.replace("shards: 2", "shards: 4"))
    now = START + timedelta(days=5)
    observation = _observed(desired, now)
    growing = Trace(name="orders/-40", metric="storage_percent", start=START, interval=60.0,
                    values=tuple(50.0 + 1.6 * i / 1440 for i in range(5 * 1440)))  # storage fills linearly
    hourly = dict(observation.hourly)
    hourly["orders/-40"] = rollup.means(growing.samples(), 3600)["orders/-40"]
    plan = planner.plan(desired, observation.model_copy(update={"hourly": hourly}))
    notes = [w for w in plan.warnings if "storage reaches 80%" in w]
    # 50% + 1.6 points a day = 58% now, 80% in 22 / 1.6 = 13.75 days
    assert len(notes) == 1 and notes[0].startswith("shard.orders/-40: storage reaches 80% in about 14 days"), notes
    assert "+1.6 points a day" in notes[0]


def test_cold_neighbours_whose_joint_load_is_forecast_hot_are_not_merged(tmp_path):
    fleet = FLEET.replace("    placement: [a, b]\n", "    placement: [a, b]\n" + ACT)
    desired = _desired(tmp_path, fleet=fleet + "    automerge: {enabled: true}\n")
    now = START + timedelta(days=6, hours=10)  # a quiet night hour: every shard is cold
    windows = {n: samples(n, {QPS: [5.0] * 181}, start=now - timedelta(seconds=1800)) for n in NAMES}
    observation = _observation(desired, windows)
    # history before this quiet half hour: busy days at 6,000/s a shard, 12,000/s together
    busy = {n: _hourly("daily", n, now, scale=0.8) for n in NAMES}
    held = planner.plan(desired, observation.model_copy(update={"hourly": busy}))
    assert not [a for a in held.actions if a.kind == "merge_shards"]
    assert any("forecast over the hot threshold" in w for w in held.warnings)
    merged = planner.plan(desired, observation)  # no long history: no forecast, the merge goes ahead
    assert [a for a in merged.actions if a.kind == "merge_shards"]


def test_the_dashboard_draws_the_forecast_band_and_status_says_when_storage_fills(tmp_path):
    from engine.config.models import Policy
    from engine.detect.forecast import shard_outlook
    from engine.render.dashboard import render_dashboard
    from engine.snapshot import ShardView, Snapshot

    policy = Policy.model_validate({"hot": {QPS: 10000, "storage_percent": 80}})
    hourly = _hourly("daily", "orders/40-80", BEFORE_CROSSING)
    growing = Trace(name="orders/40-80", metric="storage_percent", start=START, interval=60.0,
                    values=tuple(50.0 * 1.03 ** (i / 1440) for i in range(8 * 1440)))
    storage = {s.at: s for s in rollup.means(growing.samples(), 3600)["orders/40-80"]}
    merged = tuple(s.model_copy(update={"metrics": {**s.metrics, "storage_percent": storage[s.at].metrics[
        "storage_percent"]}}) if s.at in storage else s for s in hourly)
    lines, forecasts = shard_outlook("orders/40-80", merged, policy, BEFORE_CROSSING)
    assert lines[0].startswith("storage reaches 80% in about") and "crosses 10,000/s" in lines[1]
    assert {f.metric for f in forecasts} == {QPS, "storage_percent"}

    view = ShardView(address="orders/40-80", database="orders", name="40-80", server="a", load="normal",
                     hot_thresholds={QPS: 10000.0}, outlook=tuple(lines), forecasts=tuple(forecasts))
    page = render_dashboard(Snapshot(who="t", config_dir="/x", started_at=START, shards=(view,)), {},
                            now=BEFORE_CROSSING)
    assert page.count('<polygon class="band"') == 1  # queries_per_second is charted, storage is not
    assert "next 48 h: peak 10,6" in page and "over the threshold in" in page
    assert "forecast: storage reaches 80% in about" in page

    off = policy.model_copy(update={"forecast": policy.forecast.model_copy(update={"mode": "off"})})
    assert shard_outlook("orders/40-80", merged, off, BEFORE_CROSSING) == ([], [])


def test_a_saved_forecast_split_is_refused_when_its_forecast_no_longer_crosses(tmp_path):
    import pytest

    from engine.workflow import PremiseFailed, check_premises

    desired = _desired(tmp_path, fleet=FLEET.replace("    placement: [a, b]\n", "    placement: [a, b]\n" + ACT)
                       .replace("shards: 2", "shards: 4"))
    observation = _observed(desired, BEFORE_CROSSING)
    plan = planner.plan(desired, observation)
    assert [a.reason.cause for a in plan.actions if a.kind == "split_shard"] == ["forecast"]
    check_premises(desired, plan, observation)  # the same history: it holds
    calmer = dict(observation.hourly)
    calmer["orders/40-80"] = _hourly("daily", "orders/40-80", BEFORE_CROSSING, scale=0.5)
    with pytest.raises(PremiseFailed) as refused:
        check_premises(desired, plan, observation.model_copy(update={"hourly": calmer}))
    assert "shard.orders/40-80: queries_per_second is no longer forecast to cross 10000" in refused.value.render()


def test_compare_policy_replays_the_hourly_history_under_both_policies(tmp_path):
    from engine.plan import whatif

    (tmp_path / "act").mkdir()
    act = _desired(tmp_path / "act", fleet=FLEET.replace("    placement: [a, b]\n", "    placement: [a, b]\n" + ACT)
                   .replace("shards: 2", "shards: 4"))
    (tmp_path / "base").mkdir()
    base = _desired(tmp_path / "base", fleet=FLEET.replace("shards: 2", "shards: 4"))
    observation = _observed(act, START + timedelta(days=9))
    compared = whatif.compare(base, act, observation, "main")
    line = next(x for x in compared.backtest if x.startswith("orders/40-80"))
    assert "baseline: reactive hot" in line and "; proposed: reactive hot" in line
    plan = planner.plan(act, observation).model_copy(update={"what_if": compared})
    assert "Replayed hourly history" in render(plan, "text") and "Replayed hourly history" in render(plan, "markdown")
