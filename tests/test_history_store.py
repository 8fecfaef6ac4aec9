"""The long metric history in a real catalog: raw samples for a few hours, 1-minute and 1-hour
rollups upserted each round, retention per policy, unknown never counted as zero."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from engine.catalog import schema, store
from engine.collect import history
from engine.config.models import Retention
from engine.observe import rollup
from engine.observe.metrics import Reading
from engine.servers.embedded import EmbeddedServer
from traces import START, samples


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    server = EmbeddedServer("hist", tmp_path_factory.mktemp("hist") / "hist")
    server.start()
    try:
        with psycopg.connect(**server.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE shardctl")
        with psycopg.connect(**server.conninfo("shardctl"), autocommit=True) as conn:
            schema.migrate(conn)
            yield conn
    finally:
        server.stop()


def _rounds(conn, address: str, values: list[float | None], keep: int, retention: Retention) -> list:
    window = samples(address, {"queries_per_second": values, "latency_ms": [None] * len(values)})
    for s in window:  # one round at a time, as a daemon stores them
        store.save_samples(conn, [(Reading(shard=s.shard, server=s.server, dbname="x", at=s.at), s)],
                           {address: keep}, {address: retention})
    return list(window)


def test_rounds_roll_up_into_minutes_and_hours_and_raw_samples_keep_only_their_retention(catalog):
    retention = Retention(raw=1800, minute=7200, hour=86400 * 30)
    values = [float(i % 37) for i in range(3 * 360)]  # three hours at 10 s
    window = _rounds(catalog, "h/a", values, keep=10, retention=retention)
    newest = window[-1].at

    raw = catalog.execute("SELECT min(at), count(*) FROM shardctl.metric_samples WHERE shard = 'h/a'").fetchone()
    assert raw[0] > newest - timedelta(seconds=1800) and raw[1] == 180  # 30 minutes of 10 s samples

    stored_hours = history.rolled_up(catalog, 3600, START - timedelta(hours=1), ["h/a"])["h/a"]
    expected = rollup.means(window, 3600)["h/a"]
    assert [(s.at, s.value("queries_per_second")) for s in stored_hours] == \
        [(s.at, s.value("queries_per_second")) for s in expected]
    assert all(s.value("latency_ms") is None for s in stored_hours)  # unknown stays unknown, not 0

    minutes = history.rolled_up(catalog, 60, START - timedelta(hours=1), ["h/a"])["h/a"]
    assert minutes[0].at >= newest - timedelta(seconds=7200)  # older minutes are gone
    assert len(minutes) == 120
    maxima = catalog.execute("SELECT max(queries_per_second_max), sum(samples) FROM shardctl.metric_rollups"
                             " WHERE shard = 'h/a' AND resolution = 3600").fetchone()
    assert maxima == (36.0, len(values))


def test_without_raw_retention_only_the_window_is_kept_and_a_plan_reads_only_that(catalog):
    _rounds(catalog, "h/b", [1.0] * 50, keep=7, retention=Retention(raw=0))
    assert catalog.execute("SELECT count(*) FROM shardctl.metric_samples WHERE shard = 'h/b'").fetchone()[0] == 7
    loaded, _ = history.stored_history(catalog, per_shard=5)
    assert len(loaded["h/b"]) == 5 and len(loaded["h/a"]) == 5
    assert loaded["h/b"][-1].at == START + timedelta(seconds=490)


def test_a_renamed_database_keeps_its_long_history(catalog):
    _rounds(catalog, "old/c", [2.0] * 3, keep=5, retention=Retention())
    store.rename_database(catalog, "old", "new")
    assert set(history.rolled_up(catalog, 3600, START)) >= {"new/c"}
    assert "old/c" not in history.rolled_up(catalog, 3600, START)
