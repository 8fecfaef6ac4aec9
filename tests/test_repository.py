"""The repository keeps its promises: a fresh schema, working examples, a true README."""

import re
import shutil

import pytest

from conftest import EXAMPLES, ROOT, run_cli
from engine.config.schema import json_schema_text

EXAMPLE_DIRS = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and list(p.glob("*.yaml")))


def test_the_checked_in_json_schema_is_not_stale():
    checked_in = (ROOT / "schemas" / "shardctl.schema.json").read_text()
    assert checked_in == json_schema_text(), "run: shardctl schema --out schemas/shardctl.schema.json"


def test_the_schema_validates_the_examples_and_presets():
    import json

    import jsonschema
    from ruamel.yaml import YAML

    schema = json.loads((ROOT / "schemas" / "shardctl.schema.json").read_text())
    files = list(EXAMPLES.rglob("*.yaml")) + list((ROOT / "policies").glob("*.yaml"))
    assert files
    for file in files:
        for doc in YAML(typ="safe").load_all(file.read_text()):
            jsonschema.validate(doc, schema)


def test_every_yaml_file_carries_the_language_server_modeline():
    for file in list(EXAMPLES.rglob("*.yaml")) + list((ROOT / "policies").glob("*.yaml")):
        first = file.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), file
        target = (file.parent / first.split("$schema=", 1)[1]).resolve()
        assert target == (ROOT / "schemas" / "shardctl.schema.json").resolve(), file


@pytest.mark.parametrize("example", EXAMPLE_DIRS)
def test_every_example_validates_plans_and_applies(example, tmp_path):
    work = tmp_path / example
    shutil.copytree(EXAMPLES / example, work, ignore=shutil.ignore_patterns(".shardctl"))
    try:
        assert run_cli("-C", ".", "validate", cwd=work).code == 0
        plan = run_cli("-C", ".", "plan", "--detailed-exitcode", cwd=work)
        assert plan.code == 2, plan.both
        assert "to add" in plan.out and "Traceback" not in plan.both
        applied = run_cli("-C", ".", "apply", "--auto-approve", cwd=work)
        assert applied.code == 0, applied.both
        assert run_cli("-C", ".", "plan", "--detailed-exitcode", cwd=work).code == 0
    finally:
        run_cli("-C", ".", "down", cwd=work)


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_quick_start_is_two_commands_and_ci_runs_them():
    commands = _quick_start_commands()
    assert len(commands) == 2
    assert "pip install" in commands[0] and "examples/quickstart" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci, ".ci/run must take the commands from the README, not a copy"


def test_help_teaches_every_command():
    result = run_cli("--help", cwd=ROOT)
    for command in ("validate", "plan", "show", "apply", "up", "down", "status", "schema", "watch", "pause", "resume"):
        assert re.search(rf"^\s+{command}\s+\S", result.out, re.M), command
