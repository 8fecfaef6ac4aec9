"""Config files parsed before are not parsed again by plan and apply (engine.collect.yaml_cache):
a plan of unchanged files never imports ruamel, and its start imports nothing a plan does not use;
the documents read from the cache are the parsed ones, positions included; a changed file is
parsed again, a file with a problem is never remembered, and validate parses everything."""

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine import workflow
from engine.collect import yaml_cache
from engine.config import loader, yamlread
from engine.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
databases:
  orders:
    shard_key: {column: id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE t (id bigint PRIMARY KEY);"}
    shards: SHARDS
    placement: [a, b]
"""

# What `shardctl plan` imports before it plans (engine/cli.py `plan`), then its config load.
PLAN_START = """\
import sys
import engine.cli
from engine.collect.early import EarlyConnections
from engine import workflow
from engine.render import renderers
workflow.load(sys.argv[1])
print(sorted(sys.modules))
"""
# Modules of other commands, or of a plan's first load: a plan of unchanged files needs none of them.
NOT_FOR_PLAN = ("ruamel", "pglast", "rich", "watchfiles", "psycopg_pool", "engine.actions", "engine.watch",
                "engine.render.dashboard", "engine.backups", "engine.status", "engine.doctor", "engine.plan.whatif",
                "engine.detect.backtest", "engine.config.yamlread", "engine.config.sqlcheck")


def _fleet(path: Path, shards: int = 2) -> Path:
    (path / "fleet.yaml").write_text(FLEET.replace("SHARDS", str(shards)))
    (path / ".shardctl").mkdir(exist_ok=True)  # what plan and apply make: only there is the cache written
    return path


def _plan_start_modules(path: Path) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PLAN_START, str(path)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out.replace("'", '"')))


def _reached(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_FOR_PLAN))


def test_a_plan_of_unchanged_files_imports_only_what_it_uses(tmp_path):
    _fleet(tmp_path)
    first = _plan_start_modules(tmp_path)
    assert "ruamel.yaml" in first and "pglast" in first  # the first load parses the YAML and checks the SQL
    assert stat.S_IMODE((tmp_path / yaml_cache.FILE).stat().st_mode) == 0o600
    written = (tmp_path / yaml_cache.FILE).stat().st_mtime_ns
    assert _reached(_plan_start_modules(tmp_path)) == []
    assert (tmp_path / yaml_cache.FILE).stat().st_mtime_ns == written  # nothing new: not rewritten


def _same(a: loader.Desired, b: loader.Desired) -> None:
    assert a == b
    assert a.sources == b.sources  # every key's file:line:column (not compared by ==)


EXAMPLES = sorted(p.name for p in (ROOT / "examples").iterdir() if any(p.glob("*.yaml")))
CORPUS = ROOT / "tests" / "corpus"
REFUSED = [f"{kind}/{p.name}" for kind in ("hostile", "invalid") for p in sorted((CORPUS / kind).iterdir())
           if p.is_dir()]


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_documents_from_the_cache_are_the_parsed_ones(tmp_path, monkeypatch, example):
    directory = tmp_path / example
    shutil.copytree(ROOT / "examples" / example, directory)
    (directory / ".shardctl").mkdir(exist_ok=True)
    monkeypatch.chdir(directory)
    parsed = loader.load(directory)
    cache = yaml_cache.ParsedYaml.for_config(directory)
    _same(loader.load(directory, parsed=cache), parsed)
    cache.save()

    def no_parse(*_args):
        raise AssertionError("parsed again")

    monkeypatch.setattr(yamlread, "read_text", no_parse)
    _same(loader.load(directory, parsed=yaml_cache.ParsedYaml.for_config(directory)), parsed)


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_config_is_refused_alike_from_the_cache(tmp_path, monkeypatch, case):
    """Every case of the corpora: the same refusal, word for word and place for place, whether
    the files were parsed (no cache, the first load with one) or read from the cache."""
    work = tmp_path / "case"
    shutil.copytree(CORPUS / case, work, symlinks=True)
    (work / ".shardctl").mkdir(exist_ok=True)
    monkeypatch.chdir(work)

    def refusal(parsed: yaml_cache.ParsedYaml | None) -> str:
        with pytest.raises(ConfigError) as info:
            loader.load(".", parsed=parsed)
        if parsed is not None:
            parsed.save()
        return info.value.render()

    expected = refusal(None)
    assert refusal(yaml_cache.ParsedYaml.for_config(work)) == expected
    assert refusal(yaml_cache.ParsedYaml.for_config(work)) == expected


def test_a_changed_file_is_parsed_again_and_the_old_entry_dropped(tmp_path):
    _fleet(tmp_path, shards=2)
    assert workflow.load(str(tmp_path)).databases["orders"].spec.shards == 2
    _fleet(tmp_path, shards=3)
    assert workflow.load(str(tmp_path)).databases["orders"].spec.shards == 3
    files = json.loads((tmp_path / yaml_cache.FILE).read_text())["files"]
    assert len(files) == 2  # the fleet file as it is now and the shipped policies: no stale entry
    assert workflow.load(str(tmp_path)).databases["orders"].spec.shards == 3


def _refusal(directory: Path) -> tuple[str, dict]:
    """A load with the cache as plan makes it, saved even though the load fails (plan's is not):
    what it says, and what the cache then holds."""
    cache = yaml_cache.ParsedYaml.for_config(directory)
    with pytest.raises(ConfigError) as info:
        loader.load(directory, parsed=cache)
    cache.save()
    return info.value.render(), json.loads((directory / yaml_cache.FILE).read_text())["files"]


def test_a_file_with_a_problem_is_never_remembered(tmp_path):
    _fleet(tmp_path)
    (tmp_path / "broken.yaml").write_text("databases:\n  other: [unclosed\n")
    for _ in range(2):
        said, files = _refusal(tmp_path)
        assert "broken.yaml:2:" in said
        assert len(files) == 2  # the fleet file and the shipped policies, never the broken one


def test_a_mapping_key_json_would_change_is_not_remembered(tmp_path):
    _fleet(tmp_path)
    (tmp_path / "odd.yaml").write_text("policies:\n  1: {}\n")
    first, files = _refusal(tmp_path)
    assert len(files) == 2  # parsed without a problem, but `1` would come back from JSON as "1"
    assert _refusal(tmp_path)[0] == first


def test_a_broken_cache_is_no_cache_and_validate_never_reads_it(tmp_path):
    _fleet(tmp_path)
    workflow.load(str(tmp_path))
    path = tmp_path / yaml_cache.FILE
    data = json.loads(path.read_text())
    key = yaml_cache.ParsedYaml.for_config(tmp_path)._key((tmp_path / "fleet.yaml").read_text())
    assert key in data["files"]
    data["files"][key][0]["data"]["databases"]["orders"]["shards"] = 7  # a forged document
    path.write_text(json.dumps(data))
    assert loader.load(tmp_path).databases["orders"].spec.shards == 2  # validate's load parses the file
    data["files"][key] = [{"data": {}}]  # not what the cache writes: parsed again
    path.write_text(json.dumps(data))
    assert workflow.load(str(tmp_path)).databases["orders"].spec.shards == 2
    path.write_text("{not json")
    assert workflow.load(str(tmp_path)).databases["orders"].spec.shards == 2
