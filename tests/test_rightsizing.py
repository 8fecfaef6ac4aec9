"""Right-sizing advice from recorded samples: a server nearly idle over the history is named, with
the moves that would empty it; a busy fleet, a short history or an unknown stretch gives none.
Advice only: the plan's actions are untouched. Pinned in the plan's text by a golden file."""

from __future__ import annotations

from conftest import assert_golden
from engine.config import models
from engine.keyspace import even_ranges
from engine.observe import recorded
from engine.plan import planner, rightsizing
from engine.render.renderers import render
from test_load_planning import COLD_FOR, SUSTAINED, _desired, _observation
from traces import samples, to_file, unknown

# even_ranges(4) placed "ab"[i % 2]: -40 and 80-c0 on a, 40-80 and c0- on b
ON_A = ("orders/-40", "orders/80-c0")
ON_B = ("orders/40-80", "orders/c0-")
BUSY = {"queries_per_second": 800.0, "cpu_percent": 15.0, "memory_percent": 12.0, "storage_percent": 9.0,
        "connections": 20.0, "latency_ms": 2.0}
IDLE = {"queries_per_second": 0.2, "cpu_percent": 0.4, "memory_percent": 1.5, "storage_percent": 0.5,
        "connections": 1.0, "latency_ms": 0.3}


def _windows(length: int, b_load=IDLE, a_load=BUSY):
    names = [f"orders/{r.name}" for r in even_ranges(4)]
    return {n: samples(n, {"queries_per_second": [(a_load if n in ON_A else b_load)["queries_per_second"]] * length},
                       server="a" if n in ON_A else "b", base=a_load if n in ON_A else b_load) for n in names}


def _advice(tmp_path, windows, extra: str = ""):
    desired = _desired(tmp_path, extra)
    observation = _observation(desired, windows)
    return desired, observation, rightsizing.fleet_advice(desired, observation)


def test_a_nearly_idle_server_is_advised_away_with_the_moves_that_empty_it(tmp_path):
    desired, observation, advice = _advice(tmp_path, _windows(COLD_FOR))
    (b,) = advice
    assert b.server == "b" and b.blocked is None
    assert b.peaks == {"cpu_percent": 0.8, "memory_percent": 3.0, "storage_percent": 1.0}  # its two shards summed
    assert [(m.shard, m.target) for m in b.moves] == [("orders/40-80", "a"), ("orders/c0-", "a")]
    assert b.projected == {"a": {"cpu_percent": 30.8, "memory_percent": 27.0, "storage_percent": 19.0}}
    assert b.samples == COLD_FOR and (b.until - b.since).total_seconds() >= 1800
    plan = planner.plan(desired, observation)
    assert plan.actions == ()  # advice, never an action
    (line,) = [w for w in plan.warnings if "right-sizing" in w]
    assert line == b.describe() and "policies/default.yaml:" in line
    assert_golden("rightsizing.txt", render(plan, "text"))


def test_the_same_advice_comes_from_a_recorded_samples_file(tmp_path):
    from ruamel.yaml import YAML

    (tmp_path / "recorded").mkdir()
    path = tmp_path / "recorded" / "samples.yaml"  # outside the config directory
    with path.open("w") as out:
        YAML(typ="safe").dump(to_file(_windows(COLD_FOR)), out)
    windows = recorded.load(path)
    _, _, advice = _advice(tmp_path, windows)
    assert [(a.server, [(m.shard, m.target) for m in a.moves]) for a in advice] == [
        ("b", [("orders/40-80", "a"), ("orders/c0-", "a")])]


def test_no_advice_for_a_busy_fleet(tmp_path):
    _, observation, advice = _advice(tmp_path, _windows(COLD_FOR, b_load=BUSY))
    assert advice == ()
    desired = _desired(tmp_path)
    assert not [w for w in planner.plan(desired, observation).warnings if "right-sizing" in w]


def test_no_advice_without_enough_known_history(tmp_path):
    # five minutes of idle samples is not "stays under" for the policy's 30m
    assert _advice(tmp_path, _windows(SUSTAINED))[2] == ()
    # an unknown stretch ends the history that counts: b stopped answering a minute ago
    windows = _windows(COLD_FOR)
    last = windows["orders/-40"][-1].at
    for name in ON_B:
        windows[name] = windows[name][:-6] + unknown(name, 6, server="b", start=windows[name][-6].at)
    assert windows["orders/40-80"][-1].at == last
    assert _advice(tmp_path, windows)[2] == ()


def test_the_catalog_server_is_kept_and_the_receiver_must_have_room(tmp_path):
    # a idle too: a holds the catalog, so only b is advised, onto a
    _, _, advice = _advice(tmp_path, _windows(COLD_FOR, a_load=IDLE))
    assert [a.server for a in advice] == ["b"]
    # a's room: with a ceiling of 25%, a at 30% cpu cannot take b's shards
    extra = "policies:\n  default:\n    rightsizing: {target_max_percent: 25}\n"
    _, _, advice = _advice(tmp_path, _windows(COLD_FOR), extra)
    (b,) = advice
    assert b.moves == () and "fits on no other server of orders's placement under 25%" in (b.blocked or "")
    assert "it cannot be emptied" in b.describe()
    # switched off
    extra = "policies:\n  default:\n    rightsizing: {enabled: false}\n"
    assert _advice(tmp_path, _windows(COLD_FOR), extra)[2] == ()


def test_declared_capacities_scale_the_moved_load():
    big, small = models.Capacity(cpus=8), models.Capacity(cpus=2)
    assert rightsizing._scale("cpu_percent", small, big) == 0.25
    assert rightsizing._scale("cpu_percent", big, None) == 1.0


def test_status_and_the_dashboard_show_the_advice(tmp_path):
    import io
    from contextlib import redirect_stdout

    from engine.render.dashboard import render_picture
    from engine.status import render_status
    from test_dashboard import NOW, _busy_fleet

    _, _, advice = _advice(tmp_path, _windows(COLD_FOR))
    report = {"servers": [], "catalog": {"server": "a", "state": "ok"}, "interrupted": [], "databases": [],
              "advice": [{"server": a.server, "text": a.describe()} for a in advice]}
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        render_status(report, colour=False)
    assert_golden("status_rightsizing.txt", buffer.getvalue())
    html = render_picture("servers", _busy_fleet().model_copy(update={"advice": tuple(a.describe() for a in advice)}),
                          NOW)
    assert "Right-sizing advice" in html and "it could be retired by moving orders/40-80 to a" in html
    assert_golden("dashboard_rightsizing.html", html)
    # without advice the section is not drawn at all
    assert "Right-sizing" not in render_picture("servers", _busy_fleet(), NOW)


def test_status_and_plan_give_the_advice_on_a_real_fleet_from_recorded_samples(applied_fleet):
    import json

    from ruamel.yaml import YAML

    report = json.loads(applied_fleet.cli("status", "--json").out)
    where = {f"orders/{s['name']}": s["server"] for s in report["databases"][0]["shards"]}
    names = sorted(where)
    windows = {n: samples(n, {"queries_per_second": [5.0] * COLD_FOR}, server=where[n],
                          base=BUSY if where[n] == "a" else IDLE) for n in names}
    with (applied_fleet.base / "idle_b.yaml").open("w") as out:
        YAML(typ="safe").dump(to_file(windows), out)
    on_b = sorted(n for n in names if where[n] == "b")
    status = applied_fleet.cli("status", "--metrics", "idle_b.yaml")
    assert status.code == 0, status.both
    text = " ".join(status.out.split())
    assert "Right-sizing advice (nothing is applied by itself):" in text
    assert f"it could be retired by moving {on_b[0]} to a, {on_b[1]} to a" in text
    plan = applied_fleet.cli("plan", "--detailed-exitcode", "--metrics", "idle_b.yaml")
    assert plan.code == 0, plan.both  # no change: advice is never an action
    assert "server.b: right-sizing:" in plan.out
    busy = {n: samples(n, {"queries_per_second": [5.0] * COLD_FOR}, server=where[n], base=BUSY) for n in names}
    with (applied_fleet.base / "busy.yaml").open("w") as out:
        YAML(typ="safe").dump(to_file(busy), out)
    assert "right-sizing" not in applied_fleet.cli("plan", "--metrics", "busy.yaml").out


def test_a_receiver_whose_load_is_unknown_takes_nothing(tmp_path):
    windows = _windows(COLD_FOR)
    for name in ON_A:
        windows[name] = unknown(name, COLD_FOR, server="a")
    (b,) = _advice(tmp_path, windows)[2]
    assert b.moves == () and "no other server of orders's placement has known load" in (b.blocked or "")


def test_a_catalog_recorded_before_these_settings_plans_no_change(tmp_path):
    desired = _desired(tmp_path)
    observation = _observation(desired, _windows(SUSTAINED))
    recorded = observation.catalog.databases["orders"]
    older = {k: v for k, v in recorded.policy.items() if k != "rightsizing"}
    older["metrics"] = {k: v for k, v in older["metrics"].items() if k != "deadline"}
    catalog = observation.catalog.model_copy(update={"databases": {"orders": recorded.model_copy(
        update={"policy": older})}})
    assert planner.plan(desired, observation.model_copy(update={"catalog": catalog})).actions == ()
