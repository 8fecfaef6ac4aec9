"""Every malformed config is refused with file:line:column, the offending line, exit 1, no
traceback, and nothing written: not by validate, not by plan."""

import shutil
from pathlib import Path

import pytest

from conftest import run_cli

CORPUS = Path(__file__).parent / "corpus" / "invalid"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES)
def test_malformed_config_is_refused_with_its_location(case, tmp_path):
    work = tmp_path / case
    shutil.copytree(CORPUS / case, work)
    expected = (work / "expect.txt").read_text().strip()
    before = sorted(p.name for p in work.rglob("*"))

    for command in ("validate", "plan"):
        result = run_cli("-C", ".", command, cwd=work)
        assert result.code == 1, (command, result.both)
        first_line = result.err.splitlines()[0]
        assert first_line.startswith(expected), (command, result.err)
        assert "Traceback" not in result.both
        assert "nothing was changed" in result.err

    assert sorted(p.name for p in work.rglob("*")) == before, "a refused config must write nothing"


def test_the_offending_line_is_shown_under_the_error(tmp_path):
    work = tmp_path / "c"
    shutil.copytree(CORPUS / "24-unknown-database-key-typo", work)
    err = run_cli("-C", ".", "validate", cwd=work).err
    assert "   10 |     shard_keys: x" in err
    assert "hint: did you mean 'shard_key'?" in err


def test_all_problems_are_reported_at_once(tmp_path):
    (tmp_path / "a.yaml").write_text("servers:\n  a:\n    embeded: true\n")
    (tmp_path / "b.yaml").write_text("databases:\n  orders:\n    shards: x\n")
    result = run_cli("-C", ".", "validate", cwd=tmp_path)
    assert result.code == 1
    assert "a.yaml:3:5: error: unknown key 'embeded'" in result.err
    assert "b.yaml:3:13: error: input should be a valid integer" in result.err
    assert "b.yaml:2:3: error: missing required key 'shard_key'" in result.err


def test_names_must_be_unique_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text("servers:\n  a:\n    embedded: true\n")
    (tmp_path / "b.yaml").write_text("servers:\n  a:\n    embedded: true\n")
    result = run_cli("-C", ".", "validate", cwd=tmp_path)
    assert result.code == 1
    assert "b.yaml:2:3: error: server 'a' is declared twice" in result.err
    assert "first declared at a.yaml:2:3" in result.err


def test_a_missing_config_directory_is_a_clear_error(tmp_path):
    result = run_cli("-C", "nowhere", "plan", cwd=tmp_path)
    assert result.code == 1
    assert result.err.startswith("nowhere: error: no such config directory")


def test_usage_errors_exit_1_not_2(tmp_path):
    # 2 means "changes" under --detailed-exitcode; a typo must not look like one
    result = run_cli("plan", "--no-such-flag", cwd=tmp_path)
    assert result.code == 1
    assert "No such option" in result.err
