"""No value a user gives reaches another program as an option: `plan --compare-policy=--output=FILE`
was handed to `git archive` as one and truncated FILE. A ref that begins with '-' is refused as
such (exit 1, nothing written, no server started); a ref git knows reaches `git archive` only as
the commit id it resolves to."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import EXAMPLES, run_cli
from engine.config.loader import load_baseline
from engine.errors import UserError

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES / "quickstart", repo / "fleet", ignore=shutil.ignore_patterns(".shardctl"))
    subprocess.run([*GIT, "init", "-q", str(repo)], check=True)
    subprocess.run([*GIT, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*GIT, "-C", str(repo), "commit", "-qm", "fleet"], check=True)
    return repo


@pytest.mark.parametrize("value", ["--output={victim}", "-o{victim}", "--remote=file:///nonexistent",
                                   "--exec=touch {victim}.ran", "-"])
def test_a_compare_policy_value_that_begins_with_a_dash_is_refused_and_writes_nothing(repo, tmp_path, value):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    value = value.format(victim=victim)
    result = run_cli("-C", "fleet", "plan", f"--compare-policy={value}", "-out", str(tmp_path / "saved.plan"),
                     cwd=repo)
    assert result.code == 1, result.both
    assert f"Error: --compare-policy {value}: not a directory, and a git ref cannot begin with '-'" in result.err
    assert "./" in result.err and "Traceback" not in result.both
    assert victim.read_text() == "precious\n"  # not truncated
    assert not (tmp_path / "victim.txt.ran").exists() and not (tmp_path / "saved.plan").exists()
    assert not (repo / "fleet" / ".shardctl").exists()  # refused before any server was started


def test_a_ref_reaches_git_archive_as_the_commit_it_names(repo, monkeypatch):
    seen: list[list[str]] = []
    real_run = subprocess.run

    def recording(argv, *args, **kwargs):
        seen.append(list(argv))
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording)
    desired, label = load_baseline(str(repo / "fleet"), "HEAD")
    assert label == "HEAD" and "orders" in desired.databases
    head = real_run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (archive,) = [argv for argv in seen if "archive" in argv]
    assert archive[-3:] == [head, "--", "fleet"]  # a commit id before `--`, the path after it
    with pytest.raises(UserError) as unknown:
        load_baseline(str(repo / "fleet"), "no-such-ref")
    assert "git cannot read fleet at that ref" in unknown.value.render()
