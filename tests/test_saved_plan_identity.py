"""A saved plan runs only where and as it was made (issue 26, items 3 to 5): apply refuses another
fleet's plan, and one whose servers, databases or settings the YAML no longer declares, before
anything runs, naming what differs; a split, merge or move runs with the settings its plan (or
its recorded operation) carries, never the YAML's, and abort needs no more of the YAML than the
servers it must reach. Every refusal leaves every server, the catalog included, as it was."""

from __future__ import annotations

import json
import re

import pytest

from conftest import FleetDir, run_cli
from engine.catalog.journal import FAILPOINT_ENV
from movers import active_shards, hot_file, preload
from untouched import catalog_intact, server_state

EXTRA = ("  extra:\n    shard_key: {column: customer_id, type: bigint}\n    schema: schema/001_init.sql\n"
         "    shards: 2\n    placement: [a, b]\n")


@pytest.fixture
def applied(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    return fleet


def _with_extra(fleet: FleetDir) -> None:
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("databases:\n", "databases:\n" + EXTRA))


def _refused(result, summary: str) -> None:
    assert result.code == 1, result.both
    assert result.err.startswith(f"Error: {summary}"), result.err
    assert "Traceback" not in result.both and "This is a bug" not in result.both
    assert "Nothing was changed" in result.err


# ---------------------------------------------------------------------------- item 3: another fleet


def test_a_plan_made_for_staging_is_refused_by_prod_whose_catalog_has_the_same_serial(tmp_path):
    staging, prod = FleetDir(tmp_path / "staging"), FleetDir(tmp_path / "prod")
    try:
        for fleet in (staging, prod):
            assert fleet.cli("apply", "--auto-approve").code == 0
            _with_extra(fleet)  # one repository: both directories declare the same change
        with staging.catalog() as s, prod.catalog() as p:
            assert s.execute("SELECT serial FROM shardctl.state").fetchone() == \
                p.execute("SELECT serial FROM shardctl.state").fetchone()
            staging_id = s.execute("SELECT value FROM shardctl.meta WHERE key = 'fleet_id'").fetchone()[0]
            prod_id = p.execute("SELECT value FROM shardctl.meta WHERE key = 'fleet_id'").fetchone()[0]
        assert staging_id != prod_id
        assert staging.cli("plan", "-out", "../staging.plan").code == 0
        before = server_state(prod)
        result = run_cli("-C", "prod/fleet", "apply", "staging.plan", cwd=tmp_path)
        _refused(result, "Saved plan does not match this fleet")
        assert "made for another fleet" in result.err
        assert staging_id in result.err and prod_id in result.err
        assert server_state(prod) == before  # no extra_* database, the catalog as it was
        catalog_intact(prod, before)
        # the plan is good where it was made
        assert run_cli("-C", "staging/fleet", "apply", "staging.plan", cwd=tmp_path).code == 0
        assert {"extra_min_80", "extra_80_max"} <= staging.databases("a") | staging.databases("b")
    finally:
        staging.stop()
        prod.stop()


def test_a_plan_made_with_a_catalog_is_refused_where_there_is_none_and_none_is_created(tmp_path):
    staging, prod = FleetDir(tmp_path / "staging"), FleetDir(tmp_path / "prod")
    try:
        assert staging.cli("apply", "--auto-approve").code == 0
        for fleet in (staging, prod):
            _with_extra(fleet)
        assert staging.cli("plan", "-out", "../staging.plan").code == 0
        assert prod.cli("up").code == 0  # its servers run; nothing was ever applied there
        before = server_state(prod)
        result = run_cli("-C", "prod/fleet", "apply", "staging.plan", cwd=tmp_path)
        _refused(result, "Saved plan does not match this fleet")
        assert "this fleet has none (database shardctl on server a does not exist)" in result.err
        assert server_state(prod) == before
        assert "shardctl" not in prod.databases("a")
    finally:
        staging.stop()
        prod.stop()


def test_a_plan_whose_yaml_differs_from_the_other_fleets_is_refused_before_anything_starts(tmp_path):
    staging, prod = FleetDir(tmp_path / "staging"), FleetDir(tmp_path / "prod")
    try:
        _with_extra(staging)  # prod's YAML lacks the database the plan creates
        assert staging.cli("plan", "-out", "../staging.plan").code == 0
        result = run_cli("-C", "prod/fleet", "apply", "staging.plan", cwd=tmp_path)
        _refused(result, "Saved plan does not match the configuration")
        assert "database extra: no longer declared; the plan acts on it" in result.err
        assert not (prod.path / ".shardctl").exists()  # not even its servers were started
    finally:
        staging.stop()
        prod.stop()


# ---------------------------------------------------------------------------- items 4 and 5: the YAML changed


def _moves_policy(text: str) -> str:
    return text + "policies:\n  default:\n    moves: {copy_streams: 1, converge_timeout: 10m}\n"


EDITS = {
    # what changed in the YAML after `plan -out`, and the difference apply must name
    "server-removed": (lambda t: re.sub(r"  b:\n    embedded: true\n    capacity: \{[^}]*\}\n", "",
                                        t.replace("[a, b]", "[a]")),
                       ["server b: no longer declared; the plan acts on it",
                        'placement: ["a", "b"] when planned, ["a"] now']),
    "moves-settings": (_moves_policy, ["policy.moves.copy_streams: null when planned, 1 now",
                                       "policy.moves.converge_timeout: 1800.0 when planned, 600.0 now"]),
    "retire-grace": (lambda t: t + "policies:\n  default:\n    autosplit: {retire_after: 5h}\n",
                     ["policy.autosplit.retire_after: 3600.0 when planned, 18000.0 now"]),
    "parallel": (lambda t: t + "policies:\n  default:\n    moves: {parallel: 1}\n",
                 ["policy.moves.parallel: 2 when planned, 1 now"]),
    "server-reached-otherwise": (lambda t: t.replace("  b:\n    embedded: true\n", "  b:\n    dsn_env: B_DSN\n"),
                                 ["server b (fleet/fleet.yaml:10:3): ", "embedded: true when planned, not declared now",
                                  'dsn_env: not in the plan, "B_DSN" now']),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_saved_plan_is_refused_when_the_yaml_no_longer_declares_what_it_acts_on(applied, edit):
    change, named = EDITS[edit]
    applied.write("fleet.yaml", applied.read("fleet.yaml").replace("shards: 4", "shards: 8"))
    assert applied.cli("plan", "-out", "eight.plan").code == 0  # four splits over a and b
    planned = applied.read("fleet.yaml")
    applied.write("fleet.yaml", change(planned))
    before = server_state(applied)
    result = applied.cli("apply", "eight.plan")
    _refused(result, "Saved plan does not match the configuration")
    for difference in named:
        assert difference in result.err, result.err
    assert server_state(applied) == before
    catalog_intact(applied, before)
    applied.write("fleet.yaml", planned)  # so that `down` at teardown stops server b too


def test_a_hand_edited_plan_naming_an_undeclared_server_is_refused(applied):
    _with_extra(applied)
    assert applied.cli("plan", "-out", "extra.plan").code == 0
    plan = json.loads((applied.base / "extra.plan").read_text())
    plan["actions"][0]["shards"][0]["server"] = "zz"
    (applied.base / "edited.plan").write_text(json.dumps(plan))
    before = server_state(applied)
    result = applied.cli("apply", "edited.plan")
    _refused(result, "Saved plan does not match the configuration")
    assert "server zz: an action of the plan names it, but the plan does not record how it was declared" in result.err
    assert "it is not declared now either" in result.err
    # recording it too does not help: the record no longer matches its digest
    plan["fleet"]["declared"].append({"kind": "server", "name": "zz", "value": {"embedded": True}})
    (applied.base / "edited.plan").write_text(json.dumps(plan))
    result = applied.cli("apply", "edited.plan")
    _refused(result, "Saved plan does not match the configuration")
    assert "does not match its digest" in result.err and "server zz: no longer declared" in result.err
    assert server_state(applied) == before


def test_an_older_plan_format_is_refused_with_the_hint_to_plan_again(applied):
    _with_extra(applied)
    assert applied.cli("plan", "-out", "extra.plan").code == 0
    plan = json.loads((applied.base / "extra.plan").read_text())
    plan["format_version"] = 2
    del plan["fleet"]
    (applied.base / "old.plan").write_text(json.dumps(plan))
    result = applied.cli("apply", "old.plan")
    assert result.code == 1
    assert "is a plan of format version 2; this shardctl applies version 3 only" in result.err
    assert "plan again" in result.err


# ---------------------------------------------------------------------------- settings come from the plan


@pytest.fixture
def loaded(applied):
    preload(applied, customers=2000)
    hot_file(applied.base / "hot.json")
    applied.write("fleet.yaml", applied.read("fleet.yaml")
                  + "policies:\n  default:\n    autosplit: {retire_after: 2h}\n    moves: {copy_streams: 1}\n")
    assert applied.cli("apply", "--auto-approve").code == 0  # the policy recorded; no load to act on
    return applied


def test_an_interrupted_split_resumes_with_the_settings_it_was_planned_with(loaded):
    killed = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json",
                        env={FAILPOINT_ENV: "split orders/40-80: sync"})
    assert killed.code == -9, killed.both
    with loaded.catalog() as conn:
        (action,) = conn.execute("SELECT detail -> 'action' FROM shardctl.operations WHERE state = 'running'"
                                 ).fetchone()
    assert action["settings"]["retire_after"] == 7200.0 and action["settings"]["copy_streams"] == 1
    assert action["settings"]["key_column"] == "customer_id" and action["settings"]["steps"][0]["sql"]
    # the YAML changes under the interrupted operation: it finishes as it was planned
    loaded.write("fleet.yaml", loaded.read("fleet.yaml").replace("retire_after: 2h", "retire_after: 5h")
                 .replace("copy_streams: 1", "copy_streams: 4"))
    resumed = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json")
    assert resumed.code == 0, resumed.both
    assert "Resuming" in resumed.out
    # the plan also records the new policy, after the split: the split ran with what it began with
    assert "kept for autosplit.retire_after (2h)" in resumed.out, resumed.out
    assert [s[0] for s in active_shards(loaded)] == ["-40", "40-60", "60-80", "80-c0", "c0-"]


def test_abort_needs_only_the_servers_of_the_operation_and_says_so_when_one_is_gone(loaded):
    before = server_state(loaded)
    killed = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json",
                        env={FAILPOINT_ENV: "split orders/40-80: subscribe"})
    assert killed.code == -9, killed.both
    (op,) = json.loads(loaded.cli("status", "--json").out)["interrupted"]
    yaml = loaded.read("fleet.yaml")
    # the policy and its moves settings are gone from the YAML, and so is server b
    loaded.write("fleet.yaml", re.sub(r"  b:\n    embedded: true\n    capacity: \{[^}]*\}\n", "",
                                      yaml.split("policies:")[0]).replace("[a, b]", "[a]"))
    for command in (("abort", str(op["id"])), ("plan",)):
        result = loaded.cli(*command)
        assert result.code == 1, result.both
        assert "Traceback" not in result.both and "KeyError" not in result.both and "This is a bug" not in result.both
        assert "server 'b'" in result.err and "declare" in result.err, result.err
    # the servers declared again, the policy still gone: abort undoes the operation all the same
    loaded.write("fleet.yaml", yaml.split("policies:")[0])
    aborted = loaded.cli("abort", str(op["id"]))
    assert aborted.code == 0, aborted.both
    after = server_state(loaded)
    assert {s: set(d) for s, d in after.items()} == {s: set(d) for s, d in before.items()}  # no target left
    for server in ("a", "b"):
        for name, tables in after[server].items():
            if name != "shardctl":  # every shard's rows as they were
                mine = {t: v for t, v in tables.items() if t.startswith("public.")}
                assert mine == {t: v for t, v in before[server][name].items() if t.startswith("public.")}


# ---------------------------------------------------------------------------- item 6: plan -out


def _no_stray_files(directory, expected: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == expected


@pytest.mark.parametrize("where, reason", [
    ("missing/dir/x.plan", "the directory missing/dir does not exist"),
    ("fleet/fleet.yaml/x.plan", "fleet/fleet.yaml is a file, not a directory"),
    ("/dev/full", "it is a character device"),
])
def test_plan_out_to_a_path_that_cannot_be_written_is_refused_at_once(fleet, where, reason):
    result = fleet.cli("plan", "-out", where)
    assert result.code == 1, result.both
    assert f"Error: cannot write the plan to {where}: {reason}" in result.err, result.err
    assert "Saved the plan" not in result.both and "Traceback" not in result.both
    assert not (fleet.path / ".shardctl").exists()  # refused before anything was started
    assert (fleet.path / "fleet.yaml").is_file()


def test_plan_out_that_runs_out_of_space_says_so_and_leaves_no_file(fleet, tmp_path):
    """ENOSPC for real: a 16 KiB tmpfs (needs the right to mount; skipped without it), and the
    same path of failure as an unprivileged user meets it: a file size limit (EFBIG)."""
    import resource
    import subprocess
    import sys

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(tiny)],
                             capture_output=True).returncode == 0
    try:
        if mounted:
            (tiny / "filler").write_bytes(b"x" * 12288)
            result = fleet.cli("plan", "-out", str(tiny / "x.plan"))
            assert result.code == 1, result.both
            assert f"Error: cannot write the plan to {tiny / 'x.plan'}: No space left on device" in result.err
            assert "Saved the plan" not in result.both and "Traceback" not in result.both
            _no_stray_files(tiny, {"filler"})
    finally:
        if mounted:
            subprocess.run(["umount", str(tiny)], check=True)
    assert fleet.cli("up").code == 0  # the servers run already: the limit applies to shardctl alone
    limit = tmp_path / "limited"
    limit.mkdir()
    proc = subprocess.run([sys.executable, "-m", "engine", "-C", "fleet", "plan", "-out", str(limit / "x.plan")],
                          cwd=fleet.base, capture_output=True, text=True,
                          # no bytecode: under the limit Python would leave truncated .pyc files behind
                          env={"NO_COLOR": "1", "PATH": "/usr/bin", "PYTHONDONTWRITEBYTECODE": "1"},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"Error: cannot write the plan to {limit / 'x.plan'}: File too large" in proc.stderr
    assert "Saved the plan" not in proc.stdout + proc.stderr
    _no_stray_files(limit, set())


def test_a_saved_plan_is_whole_and_said_saved_only_once_written(fleet):
    result = fleet.cli("plan", "-out", "ok.plan")
    assert result.code == 0
    assert result.out.index("Saved the plan to: ok.plan") > result.out.index("Plan: 1 to add")
    assert json.loads((fleet.base / "ok.plan").read_text())["format_version"] == 3
    _no_stray_files(fleet.base, {"fleet", "ok.plan"})
