"""README's "Running against your own servers" gives the SQL the suite's real-server tests run."""

from pathlib import Path

import pgservers

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_quotes_the_role_sql_the_tests_run():
    section = README.split("## Running against your own servers", 1)[1].split("\n## ", 1)[0]
    assert pgservers.ROLE_SQL.strip() in section


def test_readme_lists_doctor_among_the_commands():
    assert "| `shardctl doctor [--json]` |" in README
