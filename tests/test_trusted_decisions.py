"""Issue 14, replayed: decisions the daemon can be trusted with. Recorded traces go through the
daemon's own decision round; on every step each verdict's evidence is checked against the
verdict and the plan's JSON against a strict parser. Spikes shorter than the sustain time,
stale data and dirty samples never act; storage growing past its threshold splits once it has
been over it for the sustain time."""

from __future__ import annotations

import json
import math
import re
from datetime import timedelta

import pytest

from conftest import strict_json
from engine.config import loader
from engine.errors import ConfigError, UserError
from engine.observe import recorded
from engine.plan import load_rules
from engine.render.renderers import render_json
from replay import Replay
from test_load_planning import FLEET
from traces import START, samples, spike
from verdicts import assert_evidence_consistent, assert_verdict_consistent

POLICY = FLEET + """\
    policy: elastic
policies:
  elastic:
    extends: default
    autosplit: {cooldown: 30m}
    automerge: {enabled: true}
"""
SUSTAIN_TICKS = 30  # the default 5m at 10 s samples


def _desired(tmp_path, policy: str = POLICY):
    (tmp_path / "fleet.yaml").write_text(policy)
    return loader.load(tmp_path, cwd=tmp_path)


class Checked:
    """Runs on every round: verdicts agree with their evidence, actions only on hot or cold
    shards with consistent evidence, the plan's JSON is strict; keeps what it saw."""

    def __init__(self, desired):
        self.desired = desired
        self.states: list[dict[str, str]] = []
        self.warnings: list[tuple[str, ...]] = []

    def __call__(self, tick, observation, plan, decision) -> None:
        verdicts = load_rules.assessments(self.desired, observation)
        for verdict in verdicts.values():
            assert_verdict_consistent(verdict)
        for action in plan.actions:
            for evidence in getattr(action, "evidence", ()):
                assert_evidence_consistent(evidence)
                assert verdicts[evidence.shard].state == evidence.kind
        strict_json(render_json(plan))
        self.states.append({a: v.state for a, v in verdicts.items()})
        self.warnings.append(plan.warnings)


def _run(replay: Replay) -> tuple[list, Checked]:
    checked = Checked(replay.desired)
    replay.on_round = checked
    return replay.run(), checked


def _quiet(length: int, qps: float = 500.0) -> list[float]:
    return [qps] * length


# ------------------------------------------------------------------------------ sustain in time

@pytest.mark.parametrize("width", [3, 5, 12, SUSTAIN_TICKS - 1])  # 30 s, 50 s, 2 min, 4m50s at 5x
def test_spikes_shorter_than_the_sustain_time_never_act(tmp_path, width):
    trace = spike(50000, length=120, at=20, width=width)
    taken, checked = _run(Replay(_desired(tmp_path), {"-80": trace, "80-": _quiet(120)}))
    assert taken == []
    assert all(states["orders/-80"] != "hot" for states in checked.states)


def test_a_load_over_the_threshold_for_the_sustain_time_splits(tmp_path):
    trace = spike(50000, length=120, at=20, width=SUSTAIN_TICKS)
    taken, _ = _run(Replay(_desired(tmp_path), {"-80": trace, "80-": _quiet(120)}))
    assert [(t.kind, t.address, t.tick) for t in taken] == [("split_shard", "shard.orders/-80", 20 + SUSTAIN_TICKS - 1)]


# ------------------------------------------------------------------------------ thresholds

def test_storage_growing_past_its_threshold_splits_once_over_it_for_the_sustain_time(tmp_path):
    # 60% growing by 0.25 points a tick to 85%, then flat: under the old 10% band it never split
    storage = [min(85.0, 60.0 + 0.25 * i) for i in range(200)]
    replay = Replay(_desired(tmp_path), {"-80": _quiet(200), "80-": _quiet(200)},
                    gauges={"storage_percent": {"-80": storage, "80-": [5.0] * 200}})
    taken, checked = _run(replay)
    first_over = next(i for i, v in enumerate(storage) if v > 80.0)
    (split,) = taken
    assert (split.kind, split.address) == ("split_shard", "shard.orders/-80")
    assert split.tick == first_over + SUSTAIN_TICKS - 1  # 30 samples over 80%: five minutes
    assert all(states.get("orders/-80") != "hot" for states in checked.states[:split.tick])


def test_hovering_within_the_band_under_the_threshold_warns_and_never_acts(tmp_path):
    trace = [9500.0 + 400 * math.sin(i) for i in range(120)]  # 9,100 to 9,900: under 10,000
    taken, checked = _run(Replay(_desired(tmp_path), {"-80": trace, "80-": _quiet(120)}))
    assert taken == []
    assert any("near the hot threshold" in w for ws in checked.warnings for w in ws)


# ------------------------------------------------------------------------------ freshness

def test_samples_that_stop_arriving_are_stale_and_never_act(tmp_path):
    # hot for 20 ticks, then server a's samples stop (missing, not unknown) for 100 ticks
    replay = Replay(_desired(tmp_path), {"-80": _quiet(150, 20000), "80-": _quiet(150)}, silent={"a": range(20, 120)})
    taken, checked = _run(replay)
    assert all(t.tick >= 120 for t in taken)
    # max_age is three intervals: from the fourth silent tick on, the shard is stale and says so
    for tick in range(23, 120):
        assert checked.states[tick]["orders/-80"] == "stale", tick
        assert any(w.startswith("shard.orders/-80: stale: newest sample 2026-11-26T10:03:10Z") for w in
                   checked.warnings[tick])
    # once samples arrive again it takes the whole sustain time on fresh samples
    (split,) = taken
    assert split.tick == 120 + SUSTAIN_TICKS - 1


# ------------------------------------------------------------------------------ dirty samples

def _repeated(times: int):
    def dirty(sample, tick):
        return [sample] * times
    return dirty


def test_repeated_samples_are_folded_and_do_not_make_a_spike_sustained(tmp_path):
    trace = spike(50000, length=120, at=20, width=10)
    taken, checked = _run(Replay(_desired(tmp_path), {"-80": trace, "80-": _quiet(120)}, dirty=_repeated(3)))
    assert taken == []
    assert any("repeated samples (same time, same values) folded into one" in w for w in checked.warnings[-1])


def test_samples_with_the_same_time_and_other_values_keep_the_first_recorded(tmp_path):
    def contradicting(sample, tick):
        loud = sample.model_copy(update={"metrics": {**sample.metrics, "queries_per_second": type(
            sample.metrics["queries_per_second"])(value=50000.0, source="recorded")}})
        return [sample, loud]

    taken, checked = _run(Replay(_desired(tmp_path), {"-80": _quiet(80), "80-": _quiet(80)}, dirty=contradicting))
    assert taken == []
    assert any("with the time of an earlier one but other values dropped (kept the first recorded)" in w
               for w in checked.warnings[-1])


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_infinite_and_nan_rates_are_unknown_never_hot(tmp_path, bad):
    taken, checked = _run(Replay(_desired(tmp_path), {"-80": [bad] * 80, "80-": _quiet(80)}))
    assert taken == []
    assert any("rejected as unknown (not a measurement): queries_per_second" in w for w in checked.warnings[-1])


@pytest.mark.parametrize("bad", [pytest.param(-5.0, marks=pytest.mark.slow), math.nan])  # each replays 440 rounds
def test_negative_and_nan_rates_are_unknown_never_cold(tmp_path, bad):
    """Split by a real load, then the children report impossible rates for longer than
    cold_for: never a merge. The same children reporting a real 5/s do merge (the control)."""
    def trace(after):
        return _quiet(40, 20000) + [after] * 400

    control, _ = _run(Replay(_desired(tmp_path), {"-80": trace(5.0), "80-": _quiet(440)}))
    assert [t.kind for t in control] == ["split_shard", "merge_shards"]
    taken, checked = _run(Replay(_desired(tmp_path), {"-80": trace(bad), "80-": _quiet(440)}))
    assert [t.kind for t in taken] == ["split_shard"]
    assert "cold" not in {state for states in checked.states for state in states.values()}


# ------------------------------------------------------------------------------ recorded files

def _write(path, docs: list[dict]) -> None:
    path.write_text(json.dumps({"samples": docs}))


def _doc(i: int, qps, at: str | None = None) -> dict:
    return {"shard": "orders/-40", "server": "a", "at": at or f"2026-11-26T10:00:{i:02d}Z",
            "metrics": {"queries_per_second": qps}}


def test_a_recorded_time_without_a_zone_is_refused_naming_the_file_and_sample(tmp_path):
    path = tmp_path / "naive.json"
    _write(path, [_doc(0, 5.0), _doc(10, 5.0, at="2026-11-26T10:00:10")])
    with pytest.raises(UserError) as raised:
        recorded.load(path)
    message = raised.value.render()
    assert f"{path}: sample 2 (orders/-40): the time 2026-11-26T10:00:10 has no time zone" in message
    assert "2026-11-26T10:00:00Z" in message  # how to write it
    yaml_path = tmp_path / "naive.yaml"
    yaml_path.write_text("samples:\n  - {shard: orders/-40, server: a, at: 2026-11-26 10:00:00, metrics: {}}\n")
    with pytest.raises(UserError, match=r"sample 1 .*has no time zone"):
        recorded.load(yaml_path)


def test_recorded_nan_infinity_negative_and_repeats_are_cleaned_with_notes(tmp_path):
    path = tmp_path / "dirty.json"
    path.write_text('{"samples": ['
                    '{"shard": "orders/-40", "server": "a", "at": "2026-11-26T10:00:00Z", "metrics": {"queries_per_second": NaN}},'
                    '{"shard": "orders/-40", "server": "a", "at": "2026-11-26T10:00:10Z", "metrics": {"queries_per_second": Infinity}},'
                    '{"shard": "orders/-40", "server": "a", "at": "2026-11-26T10:00:20Z", "metrics": {"queries_per_second": -3}},'
                    '{"shard": "orders/-40", "server": "a", "at": "2026-11-26T10:00:30Z", "metrics": {"queries_per_second": 7}},'
                    '{"shard": "orders/-40", "server": "a", "at": "2026-11-26T10:00:30Z", "metrics": {"queries_per_second": 7}},'
                    '{"shard": "orders/-40", "server": "a", "at": "2026-11-26T10:00:30Z", "metrics": {"queries_per_second": 9}}'
                    ']}')
    windows, notes = recorded.load_with_notes(path)
    window = windows["orders/-40"]
    assert [s.value("queries_per_second") for s in window] == [None, None, None, 7.0]
    assert notes == (
        "metrics: orders/-40: 3 values rejected as unknown (not a measurement): queries_per_second NaN at"
        " 2026-11-26T10:00:00Z, queries_per_second infinite at 2026-11-26T10:00:10Z, queries_per_second negative"
        " at 2026-11-26T10:00:20Z",
        "metrics: orders/-40: 1 repeated sample (same time, same values) folded into one",
        "metrics: orders/-40: 1 sample with the time of an earlier one but other values dropped (kept the first"
        " recorded): at 2026-11-26T10:00:30Z",
    )
    yaml_path = tmp_path / "dirty.yaml"
    yaml_path.write_text("samples:\n"
                         "  - {shard: orders/-40, server: a, at: 2026-11-26T10:00:00Z, metrics: {cpu_percent: .nan}}\n"
                         "  - {shard: orders/-40, server: a, at: 2026-11-26T10:00:10Z,"
                         " metrics: {cpu_percent: {value: .inf, source: x}}}\n")
    windows, notes = recorded.load_with_notes(yaml_path)
    assert [s.value("cpu_percent") for s in windows["orders/-40"]] == [None, None]
    assert len(notes) == 1 and "2 values rejected as unknown" in notes[0]


def test_a_plan_over_a_dirty_recording_is_strict_json_with_the_notes(tmp_path):
    from test_load_planning import _observation

    desired = _desired(tmp_path, FLEET)
    hot = samples("orders/40-80", {"queries_per_second": [math.inf] * 31})
    path = tmp_path / "dirty.json"
    path.write_text(json.dumps({"samples": [s.model_dump(mode="json") for s in hot]}))  # Python writes Infinity
    windows, notes = recorded.load_with_notes(path)
    observation = _observation(desired, windows).model_copy(update={"metrics_notes": notes})
    from engine.plan import planner

    plan = planner.plan(desired, observation)
    assert plan.actions == ()
    doc = strict_json(render_json(plan))
    assert any("31 values rejected as unknown" in w for w in doc["warnings"])


# ------------------------------------------------------------------------------ policy checks

@pytest.mark.parametrize("policy, message", [
    ("    metrics: {interval: 1m}\n    detection: {sustain: 90s}\n",
     "detection.sustain (1m30s) is shorter than two metrics intervals (2 x 1m)"),
    ("    detection: {cold_for: 15s}\n", "detection.cold_for (15s) is shorter than two metrics intervals (2 x 10s)"),
    ("    metrics: {history: 20}\n", "metrics.history (20 samples, 3m20s at 10s) cannot cover"),
    ("    detection: {sustain: 5m, hot_samples: 3}\n", "give either sustain (a time, e.g. 5m) or hot_samples"),
    ("    hot: {queries_per_second: 1000}\n    cold: {queries_per_second: 950}\n",
     "cold.queries_per_second (950) is not under hot.queries_per_second (1000) by the 10% tolerance"),
])
def test_windows_are_checked_against_the_interval_with_file_and_line(tmp_path, policy, message):
    (tmp_path / "fleet.yaml").write_text(FLEET + "policies:\n  p:\n" + policy)
    with pytest.raises(ConfigError) as raised:
        loader.load(tmp_path, cwd=tmp_path)
    text = raised.value.render()
    assert message in text
    first_policy_line = FLEET.count("\n") + 3  # after `policies:` and `  p:`
    assert re.search(rf"^fleet\.yaml:{first_policy_line}:\d+: error: ", text, re.M), text


def test_an_inherited_interval_is_checked_too(tmp_path):
    (tmp_path / "fleet.yaml").write_text(FLEET + "policies:\n  slow:\n    metrics: {interval: 10m}\n")
    with pytest.raises(ConfigError) as raised:
        loader.load(tmp_path, cwd=tmp_path)
    assert "detection.sustain (5m) is shorter than two metrics intervals (2 x 10m)" in raised.value.render()
    (tmp_path / "fleet.yaml").write_text(FLEET + "policies:\n  slow:\n    metrics: {interval: 10m}\n"
                                                 "    detection: {sustain: 30m, cold_for: 2h}\n"
                                                 "    autosplit: {check_every: 10m}\n")
    policy = loader.load(tmp_path, cwd=tmp_path).policies["slow"].effective
    assert (policy.sustain_seconds, policy.cold_for_seconds, policy.max_age_seconds) == (1800, 7200, 1800)


def test_the_sample_count_form_replaces_an_inherited_time_form(tmp_path):
    (tmp_path / "fleet.yaml").write_text(FLEET + "policies:\n  counted:\n    detection: {hot_samples: 6, window: 10}\n")
    policy = loader.load(tmp_path, cwd=tmp_path).policies["counted"].effective
    assert policy.detection.sustain is None and policy.sustain_seconds == 60  # 6 x 10 s, not the inherited 5m
    assert policy.cold_for_seconds == 1800  # the time form it did not replace stays


def test_the_default_is_not_met_by_a_thirty_second_spike():
    from engine.config.models import Policy
    from engine.detect.detector import assess

    policy = Policy.model_validate({"hot": {"queries_per_second": 10000}})
    trace = samples("s", {"queries_per_second": [100] * 10 + [50000] * 3 + [100] * 10})
    for end in range(1, len(trace) + 1):
        assert assess("s", trace[:end], policy, at=trace[end - 1].at + timedelta(seconds=0)).state != "hot"
    assert START  # traces start at a fixed instant: nothing here reads the clock


# ------------------------------------------------------------------------------ reported once

def _plan(*actions, drift=()):
    from types import SimpleNamespace as NS

    return NS(actions=tuple(NS(kind=k, address=a, reason=NS(cause=c)) for k, a, c in actions), drift=drift)


def test_a_load_verdict_is_reported_once_it_held_for_a_check_and_a_flip_never():
    from engine.watch.settle import Reported, settle

    split = ("split_shard", "shard.orders/-80", "load")
    person = ("apply_schema", "schema.orders", "config")
    sequence = [(), (split,), (), (split,), (split,), (split,), (), (), (split, person), (split, person)]
    state, reported = Reported(), []
    for i, actions in enumerate(sequence):
        state, report = settle(state, _plan(*actions))
        if report:
            reported.append(i)
    # the first plan; the split once it held (4); its end once that held (7); a person's change at once (8)
    assert reported == [0, 4, 7, 8]


def test_a_noisy_crossing_is_reported_once_each_way(tmp_path):
    """Two hours of load rising through the threshold and back with +-8% noise, nothing applied
    (as in a pull request or a paused daemon): the split appears once and goes once."""
    import random

    from engine.watch.settle import Reported, settle

    rng = random.Random(7)
    trace = [(6000 + 8000 * math.sin(math.pi * i / 720)) * (1 + rng.uniform(-0.08, 0.08)) for i in range(720)]
    seen = {"state": Reported(), "reports": [], "changes": 0, "last": None}

    def on_round(tick, observation, plan, decision):
        seen["state"], report = settle(seen["state"], plan)
        key = tuple(a.address for a in plan.actions)
        seen["changes"] += key != seen["last"]
        seen["last"] = key
        if report:
            seen["reports"].append((tick, key))

    Replay(_desired(tmp_path), {"-80": trace, "80-": _quiet(720)}, paused=True, on_round=on_round).run()
    assert seen["changes"] == 3  # the empty plan, the split, and back: the plan itself no longer flips
    assert [key for _, key in seen["reports"]] == [(), ("shard.orders/-80",), ()]


def test_no_merge_whose_summed_peaks_come_within_the_tolerance_of_a_hot_threshold(tmp_path):
    """Hysteresis between cold and hot: two shards each under the cold threshold would together
    be within 10% of the hot one, and the merged shard would be split again."""
    from engine.keyspace import even_ranges
    from engine.plan import planner
    from test_load_planning import COLD_FOR, _observation

    policy = FLEET + "    policy: tight\npolicies:\n  tight:\n    hot: {queries_per_second: 1000}\n" \
                     "    cold: {queries_per_second: 500}\n"
    desired = _desired(tmp_path, policy)
    names = [f"orders/{r.name}" for r in even_ranges(4)]
    busy = {n: samples(n, {"queries_per_second": [470.0] * COLD_FOR}) for n in names}
    plan = planner.plan(desired, _observation(desired, busy))
    assert [a.kind for a in plan.actions] == []
    assert any("together their queries_per_second peaks at 940, within the 10% tolerance of the hot threshold 1000"
               in w for w in plan.warnings)
    calm = {n: samples(n, {"queries_per_second": [400.0] * COLD_FOR}) for n in names}
    assert [a.kind for a in planner.plan(desired, _observation(desired, calm)).actions] == ["merge_shards"]
