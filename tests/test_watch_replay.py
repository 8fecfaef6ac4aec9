"""Recorded traces replayed through the daemon's decision round: spikes and hovering never act,
a diurnal curve scales out and back without flapping, and a server that stops answering
is never acted on."""

from datetime import timedelta

import pytest

from engine.config import loader
from replay import Replay, flapping_pairs
from test_load_planning import FLEET  # the same two-shard fleet, given an elastic policy below
from traces import diurnal, hovering, spike

ELASTIC = FLEET + """\
    policy: elastic
policies:
  elastic:
    extends: default
    metrics: {interval: INTERVAL}
    detection: DETECTION
    autosplit: {cooldown: 30m, check_every: CHECK}
    automerge: {enabled: true}
"""
FLAP_WINDOW = timedelta(hours=2)


def _desired(tmp_path, interval: str = "10s", detection: str = "{}"):
    # the daemon never looks for hot shards more often than samples arrive
    check = interval if interval.endswith("m") else "1m"
    (tmp_path / "fleet.yaml").write_text(ELASTIC.replace("INTERVAL", interval).replace("DETECTION", detection)
                                         .replace("CHECK", check))
    return loader.load(tmp_path, cwd=tmp_path)


def _quiet(length: int, qps: float = 500.0) -> list[float]:
    return [qps] * length


def test_spikes_shorter_than_the_window_never_act(tmp_path):
    trace = spike(50000, length=120, at=30, width=2)
    trace[80:82] = [60000, 60000]
    taken = Replay(_desired(tmp_path), {"-80": trace, "80-": _quiet(120)}).run()
    assert taken == []


def test_a_load_hovering_at_the_threshold_never_acts(tmp_path):
    taken = Replay(_desired(tmp_path), {"-80": hovering(10000, length=200), "80-": hovering(100, length=200)}).run()
    assert taken == []


def test_a_diurnal_load_scales_out_by_day_and_back_at_night_without_flapping(tmp_path):
    two_days = diurnal(20, 30000) * 2  # busy from 10:00 to 22:00, quiet at night, twice
    desired = _desired(tmp_path, "10m", "{sustain: 30m, cold_for: 2h}")  # at 10-minute samples
    taken = Replay(desired, {"-80": two_days, "80-": diurnal(10, 400) * 2}, interval=600).run()
    kinds = [t.kind for t in taken]
    assert "split_shard" in kinds and "merge_shards" in kinds  # it does follow the load both ways
    assert flapping_pairs(taken, FLAP_WINDOW) == []
    assert all(not t.latest_unknown for t in taken)
    # every split happens while the curve is high, every merge while it is low
    for t in taken:
        value = two_days[t.tick]
        assert (value > 10000) if t.kind == "split_shard" else (value < 1000), (t.kind, t.tick, value)


@pytest.mark.parametrize("hot_from, down, cooling_until", [
    (10, range(12, 40), 0),   # two hot samples, then silence: not five minutes known
    (0, range(35, 60), 40),   # hot all along but held by a cooldown that ends while the server is down
])
def test_a_server_that_stops_answering_is_never_acted_on(tmp_path, hot_from, down, cooling_until):
    load = _quiet(hot_from) + _quiet(120 - hot_from, 20000)
    replay = Replay(_desired(tmp_path), {"-80": load, "80-": _quiet(120)}, servers_down={"a": down},
                    cooling_until=cooling_until)
    taken = replay.run()
    assert all(not t.latest_unknown for t in taken)
    assert all(t.tick not in down for t in taken)
    # once it answers again and the load is still there, the split comes, on known samples
    (split,) = taken
    assert split.kind == "split_shard" and split.address == "shard.orders/-80" and split.tick >= down.stop


def test_paused_the_daemon_takes_no_action_on_the_same_load(tmp_path):
    replay = Replay(_desired(tmp_path), {"-80": _quiet(40, 20000), "80-": _quiet(40)}, paused=True)
    assert replay.run() == []
    assert [t.kind for t in Replay(_desired(tmp_path), {"-80": _quiet(40, 20000), "80-": _quiet(40)}).run()] \
        == ["split_shard"]
