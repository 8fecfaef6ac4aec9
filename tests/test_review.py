"""Pull-request review: markdown comments (pinned by golden files, cut to GitHub's limit, a
refusal rendered too), policy what-if against a directory or a git ref, and the CI examples."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import click
import pytest
from ruamel.yaml import YAML

from conftest import EXAMPLES, assert_golden
from engine.cli import cli
from engine.config import loader
from engine.observe.models import Observation
from engine.plan import planner
from engine.render.renderers import GITHUB_COMMENT_LIMIT, render_markdown
from test_load_planning import COLD_FOR, FLEET, SUSTAINED, _observation, _windows
from traces import samples

MIXED = {"orders/-40": 3000, "orders/40-80": 6000, "orders/80-c0": 8000, "orders/c0-": 12000}


def _mixed_windows():
    return {n: samples(n, {"queries_per_second": [q] * SUSTAINED}) for n, q in MIXED.items()}


def test_markdown_for_splits_a_merge_and_branches_is_pinned(tmp_path):
    from datetime import datetime

    from engine.observe.models import CatalogBranch

    (tmp_path / "fleet.yaml").write_text(FLEET + "    policy: busy\npolicies:\n  busy:\n"
                                         "    autosplit: {max_concurrent: 3}\n"
                                         "branches:\n  feature:\n    from: orders\n    data: sample\n"
                                         "    sample_percent: 5\n    server: b\n    ttl: 3d\n"
                                         "  spike:\n    from: orders\n    server: a\n")
    desired = loader.load(tmp_path, cwd=tmp_path)
    windows = _windows(hot_shards=("orders/-40", "orders/40-80"), cold=True)
    windows["orders/40-80"] = samples("orders/40-80", {"queries_per_second": [16000] * COLD_FOR})
    windows["orders/-40"] = samples("orders/-40", {"queries_per_second": [21000] * COLD_FOR})
    observation = _observation(desired, windows)
    expired = CatalogBranch(name="spike", parent="orders", data="schema", sample_percent=None, server="a",
                            dbname="branch_spike", state="active", created_at=datetime(2026, 1, 1, tzinfo=UTC),
                            expires_at=datetime(2026, 1, 8, tzinfo=UTC))
    observation = observation.model_copy(update={"catalog": observation.catalog.model_copy(
        update={"branches": {"spike": expired}})})
    plan = planner.plan(desired, observation)
    assert sorted(a.kind for a in plan.actions) == ["create_branch", "delete_branch", "merge_shards", "split_shard",
                                                    "split_shard"]
    text = render_markdown(plan)
    assert text.startswith("<!-- shardctl-plan -->\n### shardctl plan: 1 branch to delete, 1 merge, 2 splits,"
                           " 1 branch to create\n")
    assert_golden("review.md", text)


def test_a_protected_refusal_is_a_markdown_comment_too(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("    policy: default\n",
                                                               "    policy: default\n    protect: true\n"))
    assert fleet.cli("apply", "--auto-approve").code == 0
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").split("databases:")[0] + "databases: {}\n")
    result = fleet.cli("plan", "--format", "markdown")
    assert result.code == 1
    assert_golden("refused.md", result.out)
    assert "cannot be destroyed: it is protected" in result.err


def test_a_plan_larger_than_a_comment_is_cut_with_a_note(tmp_path):
    fleet = "servers:\n  a: {embedded: true}\ndatabases:\n" + "".join(
        f"  db{i:03d}:\n    shard_key: {{column: k, type: bigint}}\n"
        f"    schema: {{name: init, sql: \"CREATE TABLE t (k bigint PRIMARY KEY);\"}}\n"
        f"    shards: 16\n    placement: [a]\n" for i in range(120))
    (tmp_path / "fleet.yaml").write_text(fleet)
    desired = loader.load(tmp_path, cwd=tmp_path)
    from engine.observe.models import CatalogState

    plan = planner.plan(desired, Observation(catalog=CatalogState(exists=False), servers={}, shards={}))
    assert len(plan.actions) == 120
    text = render_markdown(plan)
    assert len(text.encode()) <= GITHUB_COMMENT_LIMIT
    note = re.search(r"cut to fit GitHub's 65,535-byte limit: (\d+) of 120 action details", text)
    assert note and int(note.group(1)) > 0
    assert text.count("| `+` | created |") == 120  # every action still has its summary row
    small = render_markdown(plan, limit=4000)
    assert len(small.encode()) <= 4000 and "summary rows are left out" in small


def test_what_if_shows_exactly_the_shards_between_the_old_and_new_threshold(tmp_path):
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    for d, qps in ((old_dir, 10000), (new_dir, 5000)):
        d.mkdir()
        (d / "fleet.yaml").write_text(FLEET + "    policy: p\npolicies:\n  p:\n"
                                      f"    hot: {{queries_per_second: {qps}}}\n")
    old, new = loader.load(old_dir, cwd=tmp_path), loader.load(new_dir, cwd=tmp_path)
    from engine.plan.whatif import compare

    result = compare(old, new, _observation(new, _mixed_windows()), "old")
    assert [(c.address, c.change) for c in result.changes] == [
        ("shard.orders/40-80", "now_split"), ("shard.orders/80-c0", "now_split")]
    assert result.hot_both == 1  # 12,000/s is hot under both
    assert result.changes[0].evidence[0].policy_location == "new/fleet.yaml:13:11"
    back = compare(new, old, _observation(old, _mixed_windows()), "proposed")
    assert [c.change for c in back.changes] == ["no_longer_split", "no_longer_split"]
    assert back.changes[0].evidence[0].policy_location.startswith("proposed:new/fleet.yaml")


def test_what_if_against_a_git_ref_through_the_cli(applied_git_fleet):
    fleet = applied_git_fleet
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace(
        "    policy: default\n", "    policy: default\n    thresholds:\n      hot: {queries_per_second: 5000}\n"))
    out = fleet.cli("plan", "--metrics", "mixed.json", "--compare-policy", "HEAD", "--format", "json")
    assert out.code == 0, out.both
    doc = json.loads(out.out)
    assert [(c["address"], c["change"]) for c in doc["what_if"]["changes"]] == [
        ("shard.orders/40-80", "now_split"), ("shard.orders/80-c0", "now_split")]
    assert doc["what_if"]["baseline"] == "HEAD"
    md = fleet.cli("plan", "--metrics", "mixed.json", "--compare-policy", "HEAD", "--format", "markdown").out
    assert "#### Policy what-if: the same load (recorded mixed.json) judged under HEAD" in md
    bad = fleet.cli("plan", "--compare-policy", "no-such-ref")
    assert bad.code == 1 and "git cannot read fleet at that ref" in bad.err


@pytest.fixture
def applied_git_fleet(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    (fleet.base / ".gitignore").write_text(".shardctl/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=fleet.base, check=True)
    subprocess.run([*git, "add", "fleet", ".gitignore"], cwd=fleet.base, check=True)
    subprocess.run([*git, "commit", "-qm", "fleet"], cwd=fleet.base, check=True)
    windows = {n: samples(n, {"queries_per_second": [q] * SUSTAINED}, server="ab"[i % 2])
               for i, (n, q) in enumerate(MIXED.items())}
    (fleet.base / "mixed.json").write_text(json.dumps({"samples": [s.model_dump(mode="json")
                                                                   for w in windows.values() for s in w]}))
    return fleet


def _shardctl_commands(text: str) -> list[list[str]]:
    commands = []
    for line in text.splitlines():
        match = re.search(r"(?:^|[\s;&|(/])shardctl\s+(.*)$", line)
        # a command line, not prose that names shardctl (a step's name, a heading echoed)
        if match and not line.strip().startswith("#") and (
                match.group(1).startswith("-") or match.group(1).split()[0] in cli.commands):
            command = re.sub(r"\$\{\{[^}]*\}\}", "X", match.group(1))  # workflow expressions
            commands.append(shlex.split(re.split(r"\s*\d*>", command)[0].split("|")[0].split(";")[0]))
    return commands


def _check_command(words: list[str]) -> None:
    """Parse a command line with the real CLI's parser, without running it."""
    first = next(i for i, w in enumerate(words) if w in cli.commands)
    ctx = cli.make_context("shardctl", words[:first] or ["--no-color"])
    command, rest = cli.commands[words[first]], words[first + 1:]
    while isinstance(command, click.Group):
        ctx = command.make_context(command.name, [rest[0]], parent=ctx)
        command, rest = command.commands[rest[0]], rest[1:]
    command.make_context(command.name, rest, parent=ctx)  # raises on an unknown option or a bad value


def test_the_ci_examples_use_only_commands_and_flags_that_exist():
    files = sorted((EXAMPLES / "ci").glob("*.yml"))
    assert {f.name for f in files} >= {"github-actions.yml", "pre-commit-config.yml"}
    seen = set()
    for file in files:
        YAML(typ="safe").load(file.read_text())  # valid YAML
        for words in _shardctl_commands(file.read_text()):
            _check_command(words)
            seen.add(words[next(i for i, w in enumerate(words) if w in cli.commands)])
    assert seen >= {"validate", "plan", "drift"}
    with pytest.raises(click.UsageError):
        _check_command(["-C", "fleet", "plan", "--no-such-flag"])


def test_the_systemd_unit_runs_a_real_watch_command_and_lets_a_cutover_finish():
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((EXAMPLES / "ci" / "shardctl-watch.service").read_text())
    (words,) = _shardctl_commands(unit["Service"]["ExecStart"])
    _check_command(words)
    assert "watch" in words and "127.0.0.1:8470" in words
    assert unit["Service"]["KillSignal"] == "SIGTERM" and unit["Service"]["TimeoutStopSec"] == "10min"


def test_the_systemd_unit_is_hardened():
    import configparser

    text = (EXAMPLES / "ci" / "shardctl-watch.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(text)
    service = unit["Service"]
    for key, value in {"ProtectSystem": "strict", "PrivateTmp": "true", "UMask": "0077", "ProtectHome": "true",
                       "NoNewPrivileges": "true", "CapabilityBoundingSet": "", "PrivateDevices": "true",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}.items():
        assert service.get(key) == value, key
    assert "ReadWritePaths" not in service  # reads its config and environment file only
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the exposure score was not measured")
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager",
                             str(EXAMPLES / "ci" / "shardctl-watch.service")], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for shardctl-watch.service: (\d+\.\d+)", result.stdout + result.stderr)
    if match is None and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot score a unit file offline: {result.stderr.strip()[:200]}")
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(match.group(1)) <= 2.0, result.stdout  # it was 9.0 UNSAFE


def _workflow():
    return YAML(typ="safe").load((EXAMPLES / "ci" / "github-actions.yml").read_text())


def test_the_ci_example_installs_shardctl_from_a_pinned_checkout_never_from_pypi():
    text = (EXAMPLES / "ci" / "github-actions.yml").read_text()
    doc = _workflow()
    assert re.fullmatch(r"[0-9a-f]{40}", doc["env"]["SHARDCTL_REF"])
    for name, job in doc["jobs"].items():
        steps = job["steps"]
        runs = [s.get("run", "") for s in steps]
        assert not any(re.search(r"pip install\s+(-\S+\s+)*shardctl\b", r) for r in runs), name
        checkout = next(i for i, s in enumerate(steps) if s.get("with", {}).get("path") == ".shardctl-src")
        assert steps[checkout]["with"]["ref"] == "${{ env.SHARDCTL_REF }}"
        install = next(i for i, s in enumerate(steps) if "pip install ./.shardctl-src" in s.get("run", ""))
        assert install > checkout
        # no step up to and including the install sees a secret
        for step in steps[:install + 1]:
            assert "secrets." not in json.dumps(step), (name, step)
    assert "pip install shardctl\n" not in text


def test_the_ci_comment_says_so_when_validate_fails(tmp_path):
    steps = _workflow()["jobs"]["plan"]["steps"]
    names = [s.get("name") for s in steps]
    validate = steps[names.index("Validate")]
    comment = steps[names.index("Comment")]
    assert comment.get("if") == "always()"
    # a placeholder comment is written before anything can fail, so the last plan never stands
    first = next(i for i, s in enumerate(steps) if "plan.md" in s.get("run", ""))
    assert first < names.index("Validate") and "<!-- shardctl-plan -->" in steps[first]["run"]
    # run the step's own script against an invalid config, with this shardctl on PATH
    shutil.copytree(EXAMPLES / "quickstart", tmp_path / "fleet", ignore=shutil.ignore_patterns(".shardctl"))
    fleet = tmp_path / "fleet" / "fleet.yaml"
    fleet.write_text(fleet.read_text().replace("shards: 4", "shardz: 4"))
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NO_COLOR": "1", "HOME": str(tmp_path)}
    failed = subprocess.run(["bash", "-e", "-c", validate["run"]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 1, failed.stderr
    body = (tmp_path / "plan.md").read_text()
    assert body.startswith("<!-- shardctl-plan -->\n### shardctl validate: the configuration is invalid")
    assert "fleet/fleet.yaml:18:5: error: unknown key 'shardz'" in body and "~~~~text" in body
    # and a valid config passes the step without touching the comment
    (tmp_path / "plan.md").unlink()
    fleet.write_text(fleet.read_text().replace("shardz: 4", "shards: 4"))
    passed = subprocess.run(["bash", "-e", "-c", validate["run"]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert passed.returncode == 0, passed.stderr
    assert not (tmp_path / "plan.md").exists()
