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


HIDDEN = "hunter2-TOP"


def test_every_echoed_line_is_redacted_by_what_it_is(tmp_path):
    lines = [
        f"    password: {HIDDEN}",
        f"    PGPASSWORD: '{HIDDEN}'",
        f"    db_password: \"{HIDDEN}\"",
        f"    api_token: {HIDDEN}",
        f"    client_secret: {HIDDEN}",
        f"    pgpass: {HIDDEN}",
    ]
    for i, line in enumerate(lines):
        work = tmp_path / str(i)
        work.mkdir()
        (work / "fleet.yaml").write_text("servers:\n  a:\n    embedded: true\n" + line + "\n")
        result = run_cli("-C", ".", "validate", cwd=work)
        assert result.code == 1 and "fleet.yaml:4:5: error: unknown key" in result.err, result.err
        assert HIDDEN not in result.both, result.err
        assert "********" in result.err


def test_urls_and_services_and_pairs_are_redacted(tmp_path):
    for i, value in enumerate([f"postgresql+psycopg://app:{HIDDEN}@db/x", f"https://{HIDDEN}@git.example/x",
                               f"host=db password={HIDDEN}", HIDDEN + "!"]):
        work = tmp_path / str(i)
        work.mkdir()
        (work / "fleet.yaml").write_text(f"servers:\n  a:\n    service: '{value}'\n")
        result = run_cli("-C", ".", "validate", cwd=work)
        assert result.code == 1 and "fleet.yaml:3:14: error:" in result.err, result.err
        assert HIDDEN not in result.both, result.err


def test_a_dsn_env_value_never_appears_even_when_it_does_not_parse(tmp_path):
    (tmp_path / "fleet.yaml").write_text(FLEET)
    try:
        for dsn in (f"postgresql://app:{HIDDEN}%zz@127.0.0.1:9/x", f"host=127.0.0.1 password='{HIDDEN}",
                    f"host=127.0.0.1 {HIDDEN}"):
            for command in (("plan",), ("status", "--json")):
                result = run_cli("-C", ".", *command, cwd=tmp_path, env={"REMOTE_DSN": dsn})
                assert HIDDEN not in result.both, (dsn, result.both)
                assert "Traceback" not in result.both
        assert "REMOTE_DSN is not a valid DSN" in run_cli("-C", ".", "plan", cwd=tmp_path, env={"REMOTE_DSN": dsn}).err
    finally:
        run_cli("-C", ".", "down", cwd=tmp_path)


def test_credentials_without_a_scheme_and_sql_password_literals_are_masked():
    for line in (f"    dsn_env: app:{HIDDEN}@db.example:5432/x", f"    dsn_env: 'app:{HIDDEN}@db/x'",
                 f"app:p@{HIDDEN}@db/x", f"db.example:5432:orders:app:{HIDDEN}", f"*:*:*:app:{HIDDEN}",
                 f"db:5432:*:app:{HIDDEN}\\:more", f"CREATE ROLE evil LOGIN PASSWORD '{HIDDEN}';",
                 f"ALTER ROLE app WITH ENCRYPTED PASSWORD E'{HIDDEN}';",
                 f"CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'app', password '{HIDDEN}');",
                 f"    sql: 'CREATE ROLE x PASSWORD ''{HIDDEN}'';'", f"OPTIONS (sslpassword '{HIDDEN}')"):
        shown = redact(line)
        assert HIDDEN not in shown and "********" in shown, (line, shown)
    # what only looks alike stays readable: times, addresses, locations, host:port
    for line in ("at 2026-11-26T10:00:00Z, 10:00:00", "mail alice@example.com", "fleet.yaml:3:5: error: unknown key",
                 "server a at 127.0.0.1:5432 refused", "s2.sql:1:1: error: roles belong to the whole server",
                 "CREATE ROLE app NOLOGIN;"):
        assert redact(line) == line, (line, redact(line))
