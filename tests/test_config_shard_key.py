"""`validate` knows what plan would refuse: every sharded table carries the shard key column, of
the declared type, in its primary key; reported at the statement's line in the schema file."""

import pytest

from conftest import run_cli

FLEET = """\
servers:
  a: {embedded: true}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: [s1.sql, s2.sql]
    placement: [a]
"""


def _validate(tmp_path, s1, s2="SELECT 1;\n", key="{column: customer_id, type: bigint}"):
    (tmp_path / "fleet.yaml").write_text(FLEET.replace("{column: customer_id, type: bigint}", key))
    (tmp_path / "s1.sql").write_text(s1)
    (tmp_path / "s2.sql").write_text(s2)
    return run_cli("-C", ".", "validate", cwd=tmp_path)


@pytest.mark.parametrize("s1,s2", [
    ("CREATE TABLE t (customer_id bigint PRIMARY KEY);\n", "SELECT 1;\n"),
    ("CREATE TABLE t (customer_id bigserial, id int, PRIMARY KEY (customer_id, id));\n", "SELECT 1;\n"),
    ("CREATE TABLE t (id int);\n",
     "ALTER TABLE t ADD COLUMN customer_id int8;\nALTER TABLE t ADD PRIMARY KEY (customer_id, id);\n"),
    ("CREATE TABLE t (id int PRIMARY KEY);\n", "DROP TABLE t;\n"),
    ("CREATE TABLE p (customer_id bigint, PRIMARY KEY (customer_id)) PARTITION BY HASH (customer_id);\n",
     "CREATE TABLE p0 PARTITION OF p FOR VALUES WITH (MODULUS 2, REMAINDER 0);\n"),
])
def test_tables_that_carry_the_key_pass(tmp_path, s1, s2):
    result = _validate(tmp_path, s1, s2)
    assert result.code == 0, result.both


@pytest.mark.parametrize("s1,s2,expected", [
    ("-- header\n\nCREATE TABLE t (id bigint PRIMARY KEY);\n", "SELECT 1;\n",
     "s1.sql:3:1: error: table t has no column customer_id, the shard key"),
    ("CREATE TABLE t (customer_id text PRIMARY KEY);\n", "SELECT 1;\n",
     "s1.sql:1:1: error: column t.customer_id is text, but the shard key is declared bigint"),
    ("CREATE TABLE t (customer_id bigint, id int PRIMARY KEY);\n", "SELECT 1;\n",
     "s1.sql:1:1: error: table t has (id); its primary key must include the shard key customer_id"),
    ("CREATE TABLE t (customer_id bigint);\n", "SELECT 1;\n",
     "s1.sql:1:1: error: table t has no primary key; its primary key must include the shard key customer_id"),
    ("CREATE TABLE t (customer_id bigint PRIMARY KEY);\n", "SELECT 1;\nALTER TABLE t DROP COLUMN customer_id;\n",
     "s1.sql:1:1: error: table t has no column customer_id"),
])
def test_tables_without_the_key_are_refused_at_their_line(tmp_path, s1, s2, expected):
    result = _validate(tmp_path, s1, s2)
    assert result.code == 1
    assert result.err.startswith(expected), result.err
    assert "Traceback" not in result.both


def test_a_mistyped_key_column_is_caught_by_validate(tmp_path):
    result = _validate(tmp_path, "CREATE TABLE t (customer_id bigint PRIMARY KEY);\n",
                       key="{column: customer, type: bigint}")
    assert result.code == 1
    assert "s1.sql:1:1: error: table t has no column customer, the shard key" in result.err
    assert "fix shard_key.column if it is mistyped" in result.err
