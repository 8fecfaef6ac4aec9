"""The detector on recorded traces, in time: load over a threshold for the sustain time is hot
and says what was judged; spikes, hovering, stale and unknown data never are; a moving window
over a whole day never flaps between split and merge."""

from datetime import timedelta
from itertools import pairwise

from engine.config.models import Policy
from engine.detect.detector import assess, premise_holds
from traces import QUIET, START, diurnal, hovering, samples, spike, unknown
from verdicts import assert_verdict_consistent

POLICY = Policy.model_validate({
    "hot": {"queries_per_second": 10000, "cpu_percent": 80, "latency_ms": 100},
    "cold": {"queries_per_second": 100, "cpu_percent": 10, "connections": 20},
    "detection": {"sustain": "1m", "cold_for": "2m", "tolerance_percent": 10},
})  # metrics every 10 s: 1m is six samples, 2m twelve


def _states(trace, policy=POLICY):
    verdicts = [assess("s", trace[:end], policy) for end in range(1, len(trace) + 1)]
    for v in verdicts:
        assert_verdict_consistent(v)
    return [v.state for v in verdicts]


def test_sustained_load_is_hot_with_evidence_of_what_was_judged():
    trace = samples("orders/-40", {"queries_per_second": [500, 12000, 13000, 12500, 14000, 15000, 13500]})
    verdict = assess("orders/-40", trace, POLICY, {("hot", "queries_per_second"): "policies/default.yaml:9:7"})
    assert verdict.state == "hot"
    assert_verdict_consistent(verdict)
    (evidence,) = verdict.evidence
    assert (evidence.metric, evidence.low, evidence.high, evidence.threshold) == (
        "queries_per_second", 12000, 15000, 10000)
    assert evidence.samples == 6 and evidence.window_seconds == 60
    assert (evidence.since, evidence.until) == (trace[1].at - timedelta(seconds=10), trace[-1].at)
    assert evidence.policy_location == "policies/default.yaml:9:7"
    line = evidence.describe()
    assert ("queries_per_second over the hot threshold 10,000/s for 1m (sustain 1m): 12,000/s to 15,000/s in 6"
            " samples from 2026-11-26T10:00:00Z to 2026-11-26T10:01:00Z") in line
    assert "a split's premise holds while it stays above 9,000/s (tolerance 10%)" in line
    assert assess("orders/-40", trace[:-1], POLICY).state == "normal"  # 50 s over: not yet


def test_spikes_shorter_than_the_sustain_time_are_never_hot():
    for width in (1, 3, 5):  # 10 s, 30 s, 50 s at 5x the threshold
        assert "hot" not in _states(samples("s", {"queries_per_second": spike(50000, length=20, width=width)}))


def test_the_default_policy_needs_five_minutes():
    default = Policy.model_validate({"hot": {"queries_per_second": 10000}})  # sustain and max_age by default
    assert default.sustain_seconds == 300
    thirty = samples("s", {"queries_per_second": [100] * 30 + [50000] * 29})  # 4m50s over
    assert assess("s", thirty, default).state == "normal"
    assert assess("s", thirty + samples("s", {"queries_per_second": [50000]}, start=thirty[-1].at
                                        + timedelta(seconds=10)), default).state == "hot"


def test_a_value_hovering_at_the_threshold_never_acts_but_warns():
    trace = samples("s", {"cpu_percent": hovering(80.0)})
    assert set(_states(trace)) == {"normal"}
    assert any("cpu_percent" in line for line in assess("s", trace, POLICY).near)


def test_the_threshold_means_what_it_says_no_band_above_it():
    assert assess("s", samples("s", {"queries_per_second": [10100] * 7}), POLICY).state == "hot"  # 1% over
    under = assess("s", samples("s", {"queries_per_second": [9900] * 7}), POLICY)
    assert under.state == "normal"
    assert any("near the hot threshold" in line for line in under.near)


def test_a_break_in_the_run_starts_the_sustain_again():
    trace = samples("s", {"queries_per_second": [12000] * 5 + [9000] + [12000] * 5})
    assert "hot" not in _states(trace)


def test_a_diurnal_curve_never_flaps_between_split_and_merge():
    daily = Policy.model_validate({**POLICY.model_dump(exclude={"detection", "metrics"}),
                                   "metrics": {"interval": "10m"},
                                   "detection": {"sustain": "30m", "cold_for": "1h"}})
    trace = samples("s", {"queries_per_second": diurnal(20, 20000)}, interval=600)
    states = _states(trace, daily)
    changes = [(a, b) for a, b in pairwise(states) if a != b]
    assert ("cold", "hot") not in changes and ("hot", "cold") not in changes
    assert sum(1 for a, b in changes if b == "hot") == 1 and "cold" in states


def test_a_server_down_is_unknown_and_never_an_action():
    assert assess("s", unknown("s", 10), POLICY).state == "unknown"
    assert assess("s", (), POLICY).state == "unknown"


def test_a_server_that_just_went_down_is_unknown_even_after_hot_samples():
    hot = samples("s", {"queries_per_second": [20000] * 8})
    hot_then_down = hot + unknown("s", 1, start=START + timedelta(seconds=80))
    assert assess("s", hot_then_down, POLICY).state == "unknown"


def test_samples_older_than_max_age_are_stale_and_never_act():
    hot = samples("s", {"queries_per_second": [20000] * 10})
    assert POLICY.max_age_seconds == 30
    assert assess("s", hot, POLICY, at=hot[-1].at + timedelta(seconds=30)).state == "hot"
    stale = assess("s", hot, POLICY, at=hot[-1].at + timedelta(seconds=31))
    assert stale.state == "stale" and stale.evidence == ()
    assert "older than detection.max_age (30s)" in stale.why
    # a gap longer than max_age inside the window breaks the run too
    gap = samples("s", {"queries_per_second": [20000] * 4}) + samples(
        "s", {"queries_per_second": [20000] * 4}, start=START + timedelta(seconds=80))
    assert assess("s", gap, POLICY).state == "normal"


def test_unknown_values_do_not_count_toward_hot_or_cold():
    trace = samples("s", {"queries_per_second": [20000] * 6 + [None]})
    assert assess("s", trace, POLICY).state != "hot"
    series = {"connections": [1.0] * 12 + [None]}
    assert assess("s", samples("s", series), POLICY).state == "normal"


def test_cold_needs_the_whole_cold_for_under_every_cold_threshold():
    quiet = samples("s", {"queries_per_second": [5.0] * 12})
    verdict = assess("s", quiet, POLICY)
    assert verdict.state == "cold"
    assert_verdict_consistent(verdict)
    assert {e.metric for e in verdict.evidence} == {"queries_per_second", "cpu_percent", "connections"}
    assert "under the cold threshold 100/s for 2m (cold_for 2m)" in verdict.evidence[0].describe() or \
        any("under the cold threshold 100/s" in e.describe() for e in verdict.evidence)
    assert assess("s", quiet[:11], POLICY).state == "normal"  # 110 s: not yet
    busy_once = samples("s", {"queries_per_second": [5.0] * 11 + [150.0]})
    assert assess("s", busy_once, POLICY).state == "normal"


def test_premises_hold_with_hysteresis_and_fail_on_a_real_cool_down():
    hot = samples("s", {"queries_per_second": [12000] * 7})
    (evidence,) = assess("s", hot, POLICY).evidence
    dipped = samples("s", {"queries_per_second": [9500] * 7})  # under 10,000 but above the 9,000 floor
    assert premise_holds(evidence, dipped, POLICY) == (True, "")
    cooled = samples("s", {"queries_per_second": [2000] * 7})
    held, why = premise_holds(evidence, cooled, POLICY)
    assert not held
    assert "queries_per_second is 2,000/s now; 6 of 6 samples of the last 1m were at or under 9,000/s" in why
    held, why = premise_holds(evidence, unknown("s", 7), POLICY)
    assert not held and "unknown" in why
    held, why = premise_holds(evidence, hot, POLICY, at=hot[-1].at + timedelta(minutes=5))
    assert not held and "no sample newer than detection.max_age" in why


def test_the_sample_count_form_is_read_as_a_time():
    counted = Policy.model_validate({"hot": {"queries_per_second": 10000},
                                     "detection": {"hot_samples": 3, "window": 5}})
    assert counted.sustain_seconds == 30
    assert assess("s", samples("s", {"queries_per_second": [100, 20000, 20000, 20000]}), counted).state == "hot"


def test_quiet_base_is_below_every_default_cold_threshold():
    assert QUIET["queries_per_second"] < 100 and QUIET["connections"] < 20
