"""Reference tables in the YAML: `validate` accepts a table without the shard key when the
database declares it in `reference_tables:`, refuses an undeclared one as before (naming the way
out), and refuses a declaration that could not be kept by replication (no such table, no primary
key, a table that carries the shard key), each at its line."""

import pytest

from conftest import run_cli

FLEET = """\
servers:
  a: {embedded: true}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: s1.sql
    placement: [a]
REFERENCE"""

SCHEMA = """\
CREATE TABLE orders (customer_id bigint, id bigint, country text, PRIMARY KEY (customer_id, id));
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
"""


def _validate(tmp_path, reference, schema=SCHEMA):
    (tmp_path / "fleet.yaml").write_text(FLEET.replace("REFERENCE", reference))
    (tmp_path / "s1.sql").write_text(schema)
    return run_cli("-C", ".", "validate", cwd=tmp_path)


@pytest.mark.parametrize("reference", [
    "    reference_tables: [countries]\n",
    "    reference_tables: [public.countries]\n",
])
def test_a_declared_reference_table_is_accepted(tmp_path, reference):
    result = _validate(tmp_path, reference)
    assert result.code == 0, result.both


def test_an_undeclared_table_without_the_key_is_refused_with_the_way_out(tmp_path):
    result = _validate(tmp_path, "")
    assert result.code == 1
    assert result.err.startswith("s1.sql:2:1: error: table countries has no column customer_id, the shard key"), \
        result.err
    assert "reference_tables" in result.err  # the hint names the declaration
    assert "Traceback" not in result.both


@pytest.mark.parametrize("reference,schema,expected", [
    ("    reference_tables: [currencies]\n", SCHEMA,
     "fleet.yaml:8:24: error: reference table currencies is not created by the schema steps"),
    ("    reference_tables: [countries]\n", "CREATE TABLE countries (code text, name text);\n",
     "s1.sql:1:1: error: reference table countries has no primary key"),
    ("    reference_tables: [orders, countries]\n", SCHEMA,
     "fleet.yaml:8:24: error: reference table orders has the shard key column customer_id"),
    ("    reference_tables: [Countries]\n", SCHEMA, "fleet.yaml:8:"),
    ("    reference_tables: [countries, countries]\n", SCHEMA, "fleet.yaml:8:"),
])
def test_a_reference_declaration_replication_could_not_keep_is_refused(tmp_path, reference, schema, expected):
    result = _validate(tmp_path, reference, schema)
    assert result.code == 1, result.both
    assert result.err.startswith(expected), result.err
    assert "Traceback" not in result.both


def test_a_reference_link_of_no_shard_the_catalog_knows_is_an_orphan():
    from engine.observe.models import CatalogDatabase, CatalogShard, CatalogState, LiveServer, ReplicationObject
    from engine.observe.replication import orphans, reference_link

    shard = CatalogShard(database="orders", name="-80", lo=None, hi=0, server="b", dbname="orders_min_80",
                         state="active")
    database = CatalogDatabase(name="orders", key_column="customer_id", key_type="bigint", protect=False,
                               policy_name="default", policy={}, placement=("a", "b"), state="active",
                               schema_steps=(), shards=(shard,), reference_tables=("public.countries",))
    kept, gone = reference_link("b", "orders_min_80"), reference_link("b", "orders_min_40")
    slots = tuple(ReplicationObject(kind="slot", name=n, database="orders_reference", active=False)
                  for n in (kept, gone))
    found = orphans(CatalogState(exists=True, databases={"orders": database}),
                    {"a": LiveServer(name="a", reachable=True, replication=slots)})
    assert [(o.object.name, o.why) for o in found] == [
        (gone, "a shard's link to its reference tables' source, and no shard in the catalog owns it")]
