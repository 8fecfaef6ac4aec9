"""A replica link that cannot connect is loud, never only a growing lag.

The parent's shards live on a PostgreSQL 18 reached by DSN as the least-privileged role, with a
password (scram); the replica branch lives on an embedded server, whose subscriptions carry that
password. The password is rotated (shardctl is given the new one, the daemon restarted with it)
and the links reconnect: they fail. The next collection round of the daemon shows them broken on
/metrics, the dashboard and /api/replication, with the subscriber's own error text; `status`
shows it too, with the way forward, and following that way (`shardctl branches reset`) mends it.
"""

from __future__ import annotations

import shutil
import time

import pytest
from psycopg import sql

import pgservers
from conftest import EXAMPLES, FleetDir, run_cli
from engine.servers.embedded import EmbeddedServer
from test_watch_daemon import Watch

FLEET = """\
servers:
  a: {embedded: true}
  p: {dsn_env: P_DSN}
catalog: {server: a, database: shardctl}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: schema/001_init.sql
    shards: 2
    placement: [p]
    policy: quick
policies:
  quick:
    extends: default
    metrics: {interval: 2s}
branches:
  mirror: {from: orders, data: replica, server: a}
"""


class DsnFleet(FleetDir):
    def __init__(self, base, server: pgservers.Server):
        self.base = base
        self.path = base / "fleet"
        self.path.mkdir()
        shutil.copytree(EXAMPLES / "quickstart" / "schema", self.path / "schema")
        self.write("fleet.yaml", FLEET)
        self.server = server
        self.env = {"P_DSN": server.dsn}

    def cli(self, *args, **kw):
        return run_cli("-C", "fleet", *args, cwd=self.base, env={**self.env, **kw.pop("env", {})}, **kw)


@pytest.fixture
def replicated(tmp_path):
    server = pgservers.start_pg18(tmp_path)
    fleet = DsnFleet(tmp_path, server)
    try:
        for _ in range(2):  # the database, then its replica (made from the shards that exist)
            applied = fleet.cli("apply", "--auto-approve")
            assert applied.code == 0, applied.both
        assert "No changes." in fleet.cli("plan").out
        yield fleet
    finally:
        fleet.stop()
        server.shutdown()


def _broken_series(metrics: str) -> dict[str, float]:
    return {line.split('shard="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines() if line.startswith("shardctl_branch_replica_link_broken{")}


def _last_round(metrics: str) -> float:
    """When the daemon's last collection round ended (0 before its first)."""
    found = [x for x in metrics.splitlines() if x.startswith("shardctl_last_collection_timestamp_seconds ")]
    return float(found[0].split()[1]) if found else 0.0


def test_a_rotated_password_shows_as_a_broken_link_within_one_metrics_interval(replicated):
    fleet = replicated
    watch = Watch(fleet, env=fleet.env)
    try:
        watch.wait("both links streaming", lambda: _broken_series(watch.text("/metrics")) == {
            "orders/-80": 0.0, "orders/80-": 0.0}, timeout=90)
    finally:
        assert watch.stop() == 0
    # the operator rotates the role's password and gives shardctl (and its daemon) the new one
    new = "rotated-" + fleet.server.password[::-1]
    with fleet.server.admin_connect() as admin:
        verifier = admin.pgconn.encrypt_password(new.encode(), b"shardctl", b"scram-sha-256").decode()
        admin.execute(sql.SQL("ALTER ROLE shardctl PASSWORD {}").format(sql.Literal(verifier)))  # a verifier
    fleet.env = {"P_DSN": fleet.server.dsn.replace(fleet.server.password, new)}
    watch = Watch(fleet, env=fleet.env)
    try:
        watch.wait("leadership", lambda: watch.status()["role"] == "leader", timeout=60)
        # the links' connections end (a network blip, a restart): they reconnect with the old password
        with fleet.server.admin_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                          " WHERE slot_name LIKE 'shardctl_rep_%' AND active_pid IS NOT NULL")
        log = EmbeddedServer("a", fleet.path / ".shardctl" / "servers" / "a").log_file
        deadline = time.monotonic() + 60
        while "could not connect to the publisher" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the replica's subscriptions never failed to connect"
            time.sleep(0.1)
        broke = time.time()
        # the first collection round that ends after the break shows it: within one metrics interval
        metrics = watch.wait("a round after the break", lambda: (m := watch.text("/metrics")) and
                             _last_round(m) > broke and m, timeout=30)
        assert _broken_series(metrics) == {"orders/-80": 1.0, "orders/80-": 1.0}, metrics
        def reasons():
            found = watch.get("/api/replication")["replica_links"]
            return found if found and all(link["error"] and "password authentication failed" in link["error"]
                                          for link in found) else None

        links = watch.wait("the reason", reasons, timeout=30)
        assert {link["state"] for link in links} == {"broken"}
        assert "`shardctl branches reset mirror`" in links[0]["error"]
        page = watch.text("/")
        assert "<strong>broken</strong>" in page and "password authentication failed for user" in page
        assert "Replica mirror: the replica&#39;s subscription cannot reach orders/" in page  # among the alerts
        status = fleet.cli("status")
        assert status.code == 0, status.both
        said = " ".join(status.out.split())  # long lines wrap at the terminal's width
        assert "orders/-80: LINK BROKEN: the replica's subscription cannot reach orders/-80 on server p:" in said
        assert 'password authentication failed for user "shardctl"' in said, status.out
        assert "run `shardctl branches reset mirror`" in said
        assert fleet.server.password not in status.both and new not in status.both
        drift = fleet.cli("drift", "--detailed-exitcode")
        assert drift.code == 2 and "# branch.mirror cannot reach 2 of orders's shards" in drift.out, drift.out
        # the way forward it gave: the links made again, with the password shardctl has now
        reset = fleet.cli("branches", "reset", "mirror")
        assert reset.code == 0, reset.both
        watch.wait("links mended", lambda: _broken_series(watch.text("/metrics")) == {
            "orders/-80": 0.0, "orders/80-": 0.0}, timeout=60)
        assert "LINK BROKEN" not in fleet.cli("status").out
    finally:
        assert watch.stop() == 0
