"""Settings that are each valid but contradict each other are refused at file:line."""

import pytest

from engine.config import loader
from engine.errors import ConfigError

BASE = """\
servers:
  a: {embedded: true}
databases:
  orders:
    shard_key: {column: id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE t (id bigint PRIMARY KEY);"}
    placement: [a]
    shards: SHARDS
    policy: p
policies:
  p:
POLICY"""


def _err(tmp_path, policy: str, shards: int = 1, extra: str = "") -> str:
    (tmp_path / "fleet.yaml").write_text(BASE.replace("SHARDS", str(shards)).replace("POLICY", policy) + extra)
    with pytest.raises(ConfigError) as info:
        loader.load(tmp_path, cwd=tmp_path)
    return info.value.render()


@pytest.mark.parametrize("policy,expected", [
    ("    hot: {cpu_percent: 5}\n", "fleet.yaml:11:3: error: policy 'p' with what it inherits is invalid:"
                                  " cold.cpu_percent (10) is not under hot.cpu_percent (5) by the 10% tolerance"),
    ("    cold: {queries_per_second: 20000}\n", "fleet.yaml:11:3: error: policy 'p' with what it inherits is invalid:"
                                              " cold.queries_per_second (20000) is not under hot.queries_per_second"),
    ("    autosplit: {check_every: 1s}\n", "fleet.yaml:12:17: error: autosplit.check_every (1s)"
                                         " is shorter than metrics.interval (10s)"),
    ("    metrics: {interval: 2m}\n", "fleet.yaml:12:15: error: autosplit.check_every (60s)"
                                    " is shorter than metrics.interval (120s)"),
    ("    metrics: {history: 5}\n", "fleet.yaml:12:5: error: metrics.history (5 samples, 50s at 10s) cannot cover"),
    ("    autosplit: {max_shards: 2}\n", "fleet.yaml:8:5: error: shards (4) is above autosplit.max_shards (2)"),
])
def test_contradictions_are_refused_at_their_line(tmp_path, policy, expected):
    err = _err(tmp_path, policy, shards=4)
    assert err.startswith(expected), err


def test_a_database_override_below_the_cold_threshold_is_refused_at_the_override(tmp_path):
    (tmp_path / "fleet.yaml").write_text(BASE.replace("SHARDS", "1").replace("POLICY", "    description: x\n")
                                         .replace("    policy: p\n", "    policy: p\n    thresholds:\n"
                                                  "      hot: {connections: 10}\n"))
    with pytest.raises(ConfigError) as info:
        loader.load(tmp_path, cwd=tmp_path)
    assert info.value.render().startswith("fleet.yaml:11:13: error: the hot threshold of connections (10)")


def test_a_branch_or_catalog_named_like_a_shard_is_refused(tmp_path):
    (tmp_path / "fleet.yaml").write_text(BASE.replace("SHARDS", "1").replace("POLICY", "    description: x\n")
                                         .replace("orders", "branch").replace("policy: p", "policy: p")
                                         + "branches:\n  min_max:\n    from: branch\n    server: a\n"
                                         "catalog: {database: branch_min_80}\n")
    with pytest.raises(ConfigError) as info:
        loader.load(tmp_path, cwd=tmp_path)
    err = info.value.render()
    assert "branch 'min_max' would be database branch_min_max, which is named like a shard of database 'branch'" in err
    assert "the control database 'branch_min_80' is named like a shard of database 'branch'" in err
