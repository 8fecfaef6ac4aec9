"""The schema cache on real servers (engine/collect/schema_cache.py): a plan reads each shard's
signature, and its schema and ledger of steps only when the signature changed since they were
cached; a change made by hand, to the schema or to the ledger, is read again once the session
that made it has ended."""

import json
import stat
import time

from engine import workflow
from engine.collect.schema_cache import FILE

SHARD = ("a", "orders_min_40", "orders/-40")


def _observed(fleet):
    """The shards as a plan observes them (in this process: the ledger is not rendered)."""
    return workflow.make_plan(workflow.load(str(fleet.path))).observation.shards


def _until(check, timeout: float = 30.0):
    """`check()` until it returns something true (a hand-made change reaches the statistics when
    the session that made it ends), or its last answer."""
    deadline = time.monotonic() + timeout
    while not (found := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_schemas_and_ledgers_are_read_once_and_again_after_a_change_by_hand(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    cache = fleet.path / FILE
    assert fleet.cli("plan", "--detailed-exitcode").code == 0
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    entries = json.loads(cache.read_text())["shards"]
    assert len(entries) == 4
    with fleet.connect(SHARD[0], SHARD[1]) as conn:
        ledger = [r[0] for r in conn.execute("SELECT sha256 FROM _shardctl.schema_steps ORDER BY seq")]
    assert ledger and entries[f"{SHARD[0]}/{SHARD[1]}"]["steps"] == ledger

    # nothing changed: every shard's schema and ledger come from the cache, which is not rewritten
    written = cache.stat().st_mtime_ns
    assert fleet.cli("plan", "--detailed-exitcode").code == 0
    assert cache.stat().st_mtime_ns == written
    assert _observed(fleet)[SHARD[2]].applied_steps == tuple(ledger)

    # the ledger changed by hand (no schema change): read again
    with fleet.connect(SHARD[0], SHARD[1]) as conn:
        conn.execute("DELETE FROM _shardctl.schema_steps")
    assert _until(lambda: _observed(fleet)[SHARD[2]].applied_steps == ())
    # the schema changed by hand: read again, and shown as changed outside shardctl
    with fleet.connect(SHARD[0], SHARD[1]) as conn:
        conn.execute("ALTER TABLE orders ADD COLUMN sneaky int")
    plan = _until(lambda: (p := fleet.cli("plan")).code == 0 and "sneaky" in p.out and p)
    assert plan, "the column added by hand never showed"
    assert f"shard.{SHARD[2]} has changed outside shardctl (schema)" in plan.out
