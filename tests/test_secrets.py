"""Passwords from DSNs never appear in plans, errors, status or JSON."""

import json

from conftest import run_cli
from engine.errors import redact

SECRET = "s3cr3t-pa55"
FLEET = """\
servers:
  local: {embedded: true}
  remote: {dsn_env: REMOTE_DSN}
databases:
  orders:
    shard_key: {column: id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE t (id bigint PRIMARY KEY);"}
    placement: [remote]
"""


def test_redact_covers_keyword_and_uri_forms():
    assert SECRET not in redact(f"host=x password={SECRET} user=y")
    assert SECRET not in redact(f"host=x password='{SECRET}' user=y")
    assert SECRET not in redact(f"postgresql://app:{SECRET}@db.example:5432/x")


def test_an_unreachable_server_with_a_password_never_shows_it(tmp_path):
    (tmp_path / "fleet.yaml").write_text(FLEET)
    env = {"REMOTE_DSN": f"host=127.0.0.1 port=9 user=app password={SECRET} connect_timeout=2"}
    try:
        plan = run_cli("-C", ".", "plan", cwd=tmp_path, env=env)
        assert SECRET not in plan.both
        status = run_cli("-C", ".", "status", "--json", cwd=tmp_path, env=env)
        assert SECRET not in status.both
        remote = next(s for s in json.loads(status.out)["servers"] if s["name"] == "remote")
        assert remote["state"].startswith("unreachable")
        assert "password" not in remote["connection"]
        uri = {"REMOTE_DSN": f"postgresql://app:{SECRET}@127.0.0.1:9/postgres?connect_timeout=2"}
        assert SECRET not in run_cli("-C", ".", "plan", "--format", "json", cwd=tmp_path, env=uri).both
    finally:
        run_cli("-C", ".", "down", cwd=tmp_path)


def test_a_missing_dsn_variable_names_the_variable(tmp_path):
    (tmp_path / "fleet.yaml").write_text(FLEET)
    try:
        result = run_cli("-C", ".", "plan", cwd=tmp_path)
        assert result.code == 1
        assert "environment variable REMOTE_DSN is not set" in result.err
        assert "Traceback" not in result.err
    finally:
        run_cli("-C", ".", "down", cwd=tmp_path)
