"""The detector on recorded traces: sustained load is hot, spikes and hovering are not, unknown
never acts, and a moving window over a whole day never flaps between split and merge."""

from engine.config.models import Policy
from engine.detect.detector import assess, premise_holds

from datetime import timedelta

from traces import QUIET, START, diurnal, hovering, samples, spike, unknown

POLICY = Policy.model_validate({
    "hot": {"queries_per_second": 10000, "cpu_percent": 80, "latency_ms": 100},
    "cold": {"queries_per_second": 100, "cpu_percent": 10, "connections": 20},
    "detection": {"hot_samples": 3, "window": 5, "cold_window": 10, "tolerance_percent": 10},
})


def test_sustained_load_is_hot_with_checkable_evidence():
    trace = samples("orders/-40", {"queries_per_second": [500, 12000, 13000, 12500, 14000]})
    verdict = assess("orders/-40", trace, POLICY, {("hot", "queries_per_second"): "policies/default.yaml:9:7"})
    assert verdict.state == "hot"
    (evidence,) = verdict.evidence
    assert (evidence.metric, evidence.value, evidence.threshold) == ("queries_per_second", 14000, 10000)
    assert (evidence.samples_agreeing, evidence.window) == (4, 5)
    assert evidence.policy_location == "policies/default.yaml:9:7"
    assert evidence.observed_at == trace[-1].at
    assert "queries_per_second 14,000/s > 10,000/s in 4 of 5 samples" in evidence.describe()


def test_a_spike_shorter_than_the_window_is_not_hot():
    trace = samples("s", {"queries_per_second": spike(50000, width=2)})
    for end in range(1, len(trace) + 1):
        assert assess("s", trace[:end], POLICY).state != "hot"


def test_a_value_hovering_at_the_threshold_never_acts_but_warns():
    trace = samples("s", {"cpu_percent": hovering(80.0)})
    states = {assess("s", trace[:end], POLICY).state for end in range(1, len(trace) + 1)}
    assert states == {"normal"}
    assert any("near the hot threshold" in line for line in assess("s", trace, POLICY).near)


def test_values_just_over_the_threshold_stay_inside_the_tolerance_band():
    trace = samples("s", {"queries_per_second": [10900] * 5})  # 9% over: inside the 10% band
    assert assess("s", trace, POLICY).state == "normal"
    trace = samples("s", {"queries_per_second": [11100] * 5})  # 11% over
    assert assess("s", trace, POLICY).state == "hot"


def test_a_diurnal_curve_never_flaps_between_split_and_merge():
    trace = samples("s", {"queries_per_second": diurnal(20, 20000)}, interval=600)
    states = [assess("s", trace[:end], POLICY).state for end in range(1, len(trace) + 1)]
    # one hot period in the afternoon, one cold period at night; never hot right after cold
    changes = [(a, b) for a, b in zip(states, states[1:]) if a != b]
    assert ("cold", "hot") not in changes and ("hot", "cold") not in changes
    hot_runs = sum(1 for a, b in changes if b == "hot")
    assert hot_runs == 1 and "cold" in states


def test_a_server_down_is_unknown_and_never_an_action():
    assert assess("s", unknown("s", 10), POLICY).state == "unknown"
    assert assess("s", (), POLICY).state == "unknown"


def test_a_server_that_just_went_down_is_unknown_even_after_hot_samples():
    hot_then_down = samples("s", {"queries_per_second": [20000] * 4}) + unknown("s", 1, start=START + timedelta(seconds=40))
    assert assess("s", hot_then_down, POLICY).state == "unknown"


def test_unknown_values_do_not_count_toward_hot_or_cold():
    # two loud samples and three unknown ones: not three of five
    trace = samples("s", {"queries_per_second": [20000, 20000, None, None, None]})
    assert assess("s", trace, POLICY).state != "hot"
    # quiet everywhere, but one unknown connection count in the cold window: not known to be cold
    series = {"connections": [1.0] * 9 + [None]}
    assert assess("s", samples("s", series), POLICY).state == "normal"


def test_cold_needs_the_whole_cold_window_below_every_cold_threshold():
    quiet = samples("s", {"queries_per_second": [5.0] * 10})
    verdict = assess("s", quiet, POLICY)
    assert verdict.state == "cold"
    assert {e.metric for e in verdict.evidence} == {"queries_per_second", "cpu_percent", "connections"}
    assert assess("s", quiet[:9], POLICY).state == "normal"  # 9 of 10: not yet
    busy_once = samples("s", {"queries_per_second": [5.0] * 9 + [95.0]})  # within 10% of 100
    assert assess("s", busy_once, POLICY).state == "normal"


def test_premises_hold_with_hysteresis_and_fail_on_a_real_cool_down():
    hot = samples("s", {"queries_per_second": [12000] * 5})
    (evidence,) = assess("s", hot, POLICY).evidence
    dipped = samples("s", {"queries_per_second": [9500] * 5})  # below 10,000 but inside the band
    assert premise_holds(evidence, dipped, 3, 5) == (True, "")
    cooled = samples("s", {"queries_per_second": [2000] * 5})
    held, why = premise_holds(evidence, cooled, 3, 5)
    assert not held and "queries_per_second is 2,000/s now" in why
    held, why = premise_holds(evidence, unknown("s", 5), 3, 5)
    assert not held and "unknown" in why


def test_quiet_base_is_below_every_default_cold_threshold():
    assert QUIET["queries_per_second"] < 100 and QUIET["connections"] < 20
