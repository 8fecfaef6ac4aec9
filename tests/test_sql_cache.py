"""The schema SQL found clean before is not parsed again by plan and apply (engine.collect.sql_cache):
a load of unchanged files never imports pglast, while every change, and every problem, is still
checked and reported where it is; validate checks everything every time."""

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine import workflow
from engine.collect import sql_cache
from engine.config import loader
from engine.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

FLEET = """\
servers:
  a: {embedded: true}
databases:
  orders:
    shard_key: {column: id, type: bigint}
    schema: [s1.sql, {file: s2.sql, allow_outside_database: ALLOWED}]
    placement: [a]
    reference_tables: [countries]
"""
S1 = "CREATE TABLE t (id bigint PRIMARY KEY, v text);\nCREATE TABLE countries (code text PRIMARY KEY);\n"


def _fleet(path: Path, s2: str = "ALTER TABLE t ADD COLUMN w int;", allowed: bool = False) -> Path:
    (path / "fleet.yaml").write_text(FLEET.replace("ALLOWED", str(allowed).lower()))
    (path / "s1.sql").write_text(S1)
    (path / "s2.sql").write_text(s2 + "\n")
    (path / ".shardctl").mkdir(exist_ok=True)  # what plan and apply make: only there is the cache written
    return path


def _clean(path: Path) -> list[str]:
    return json.loads((path / sql_cache.FILE).read_text())["clean"]


def _loads_pglast(path: Path) -> bool:
    """Whether plan's load of this directory imports pglast, in a new process."""
    code = ("import sys; from engine import workflow; workflow.load(sys.argv[1]); "
            "print('pglast' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return out.strip() == "True"


def test_unchanged_sql_is_not_parsed_again_and_the_file_is_private(tmp_path):
    _fleet(tmp_path)
    assert _loads_pglast(tmp_path)  # the first load checks every step
    assert stat.S_IMODE((tmp_path / sql_cache.FILE).stat().st_mode) == 0o600
    assert len(_clean(tmp_path)) == 3  # two steps and the shard key of the schema they make
    written = (tmp_path / sql_cache.FILE).stat().st_mtime_ns
    assert not _loads_pglast(tmp_path)
    assert (tmp_path / sql_cache.FILE).stat().st_mtime_ns == written  # nothing new: not rewritten


def test_a_cache_is_written_only_where_plan_or_apply_made_the_state_directory(tmp_path):
    _fleet(tmp_path)
    (tmp_path / ".shardctl").rmdir()
    workflow.load(str(tmp_path))
    assert not (tmp_path / ".shardctl").exists()


@pytest.mark.parametrize("s2,allowed,expected", [
    ("ALTER TABLE t ADD COLUMN w int", False, "SQL syntax error"),
    ("COPY t FROM '/etc/passwd';", False, "this statement reaches outside its database"),
])
def test_a_changed_step_is_checked_again(tmp_path, s2, allowed, expected):
    _fleet(tmp_path)
    workflow.load(str(tmp_path))
    _fleet(tmp_path, s2 + ("" if s2.endswith(";") else " garbage"), allowed)
    with pytest.raises(ConfigError) as info:
        workflow.load(str(tmp_path))
    assert "/s2.sql:1:" in info.value.render() and expected in info.value.render()


def test_a_step_clean_only_when_allowed_is_checked_again_when_no_longer_allowed(tmp_path):
    _fleet(tmp_path, "COPY t FROM '/srv/seed.csv';", allowed=True)
    workflow.load(str(tmp_path))
    _fleet(tmp_path, "COPY t FROM '/srv/seed.csv';", allowed=False)
    with pytest.raises(ConfigError) as info:
        workflow.load(str(tmp_path))
    assert "/s2.sql:1:1: error: this statement reaches outside its database" in info.value.render()


def test_the_shard_key_is_checked_again_when_any_step_or_the_key_changes(tmp_path):
    _fleet(tmp_path)
    assert workflow.load(str(tmp_path)).key_problems == ()
    # a later step drops the key from the primary key: the same first step, a new verdict
    _fleet(tmp_path, "ALTER TABLE t DROP CONSTRAINT t_pkey; ALTER TABLE t ADD PRIMARY KEY (v);")
    assert [p.message for p in workflow.load(str(tmp_path)).key_problems] == [
        "table t has (v); its primary key must include the shard key id"]
    _fleet(tmp_path)
    (tmp_path / "fleet.yaml").write_text((tmp_path / "fleet.yaml").read_text().replace("column: id", "column: v"))
    assert workflow.load(str(tmp_path)).key_problems  # v is text, not bigint: the key check ran


def test_verdicts_of_other_checking_code_are_not_trusted(tmp_path, monkeypatch):
    _fleet(tmp_path)
    workflow.load(str(tmp_path))
    assert _clean(tmp_path)
    monkeypatch.setattr(sql_cache, "_checker", lambda: "another version of the checks")
    cache = sql_cache.CleanSql.for_config(tmp_path)
    assert all(key not in cache for key in _clean(tmp_path))


def test_validate_checks_everything_whatever_the_cache_holds(tmp_path):
    _fleet(tmp_path)
    workflow.load(str(tmp_path))
    (tmp_path / "s2.sql").write_text("COPY t FROM '/etc/passwd';\n")
    # a forged verdict for the bad step: plan would trust it, validate never reads the file
    cache = sql_cache.CleanSql.for_config(tmp_path)
    cache.add(cache.key("step", "syntax, outside", "COPY t FROM '/etc/passwd';\n"))
    cache.save()
    workflow.load(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        loader.load(tmp_path, cwd=tmp_path)
    assert "reaches outside its database" in info.value.render()
