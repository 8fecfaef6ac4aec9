"""A valid config loads into frozen models with positions, presets and effective policies."""

import pytest
from pydantic import ValidationError

from engine.config import loader, models

FLEET = """\
servers:
  a: {embedded: true}
  prod:
    dsn_env: PROD_DSN
    capacity: {storage: 500GiB, memory: 64GiB, cpus: 16}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: [s1.sql, {name: 002_inline, sql: "ALTER TABLE t ADD COLUMN note text;"}]
    shards: 4
    placement: [a, prod]
    thresholds:
      hot: {queries_per_second: 5000}
"""


@pytest.fixture
def desired(tmp_path):
    (tmp_path / "fleet.yaml").write_text(FLEET)
    (tmp_path / "s1.sql").write_text("CREATE TABLE t (customer_id bigint PRIMARY KEY);\n")
    return loader.load(tmp_path, cwd=tmp_path)


def test_servers_databases_and_schema_steps_load(desired):
    assert list(desired.servers) == ["a", "prod"]
    assert desired.servers["prod"].capacity.storage == 500 * 2**30
    db = desired.databases["orders"]
    assert [s.name for s in db.schema_steps] == ["s1.sql", "002_inline"]
    assert len(db.schema_steps[0].sha256) == 64
    assert desired.catalog_server == "a"  # the first embedded server


def test_the_shipped_default_policy_applies_with_database_overrides(desired):
    policy = desired.databases["orders"].effective_policy
    assert policy.hot.queries_per_second == 5000  # overridden by the database
    assert policy.hot.cpu_percent == 80  # from policies/default.yaml
    assert policy.hot.latency_ms == 100
    assert policy.metrics.interval == 10 and policy.history_samples == 183  # 30m cold_for at 10 s, and margin
    assert (policy.sustain_seconds, policy.cold_for_seconds, policy.max_age_seconds) == (300, 1800, 30)
    assert policy.autosplit.cooldown == 1800 and policy.autosplit.targets == 2
    assert policy.autosplit.check_every == 60


def test_positions_are_kept_for_evidence(desired):
    where = desired.where("databases", "orders", "thresholds", "hot", "queries_per_second")
    assert (where.file, where.line) == ("fleet.yaml", 13)


def test_models_are_frozen(desired):
    with pytest.raises(ValidationError):
        desired.databases["orders"].spec.shards = 8  # type: ignore[misc]


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("30m", 1800), ("1h", 3600), (5, 5), ("250ms", 0.25)])
def test_durations(text, seconds):
    assert models.parse_duration(text) == seconds


@pytest.mark.parametrize("text,size", [("20GiB", 20 * 2**30), ("500MB", 500 * 10**6), (1024, 1024)])
def test_sizes(text, size):
    assert models.parse_size(text) == size


def test_a_policy_inherits_what_it_does_not_say_from_default(tmp_path):
    (tmp_path / "fleet.yaml").write_text(FLEET.replace("    thresholds:\n      hot: {queries_per_second: 5000}\n",
                                                       "    policy: quick\n")
                                         + "policies:\n  quick:\n    hot: {latency_ms: 20}\n"
                                         "  quicker:\n    extends: quick\n    detection: {window: 3, hot_samples: 2}\n")
    (tmp_path / "s1.sql").write_text("CREATE TABLE t (customer_id bigint PRIMARY KEY);\n")
    desired = loader.load(tmp_path, cwd=tmp_path)
    policy = desired.databases["orders"].effective_policy
    assert policy.hot.latency_ms == 20 and policy.hot.queries_per_second == 10000
    assert policy.cold.connections == 20
    assert desired.threshold_location("orders", "hot", "latency_ms") == "fleet.yaml:15:11"
    assert desired.threshold_location("orders", "hot", "queries_per_second") == "policies/default.yaml:10:7"
    quicker = desired.policies["quicker"]
    assert tuple(quicker.chain()) == ("quicker", "quick", "default")
    assert quicker.effective.hot.latency_ms == 20 and quicker.effective.detection.window == 3


def test_a_declared_default_policy_refines_the_shipped_one(tmp_path):
    (tmp_path / "fleet.yaml").write_text(FLEET + "policies:\n  default:\n    hot: {cpu_percent: 60}\n")
    (tmp_path / "s1.sql").write_text("CREATE TABLE t (customer_id bigint PRIMARY KEY);\n")
    policy = loader.load(tmp_path, cwd=tmp_path).databases["orders"].effective_policy
    assert policy.hot.cpu_percent == 60 and policy.hot.latency_ms == 100
