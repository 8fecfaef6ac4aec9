"""Online splits and merges on two real servers, under a concurrent writer and with the apply
process killed at every journaled step: nothing lost, duplicated or misplaced."""

import itertools
import json

import pytest

from engine.catalog.journal import FAILPOINT_ENV
from engine.servers.embedded import EmbeddedServer
from movers import Writer, active_shards, all_rows, checksum, cold_file, floor_below_shards, hot_file, preload

SPLIT = "split orders/40-80"
MERGE = "merge orders/-80"


@pytest.fixture
def loaded(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet)
    hot_file(fleet.base / "hot.json")
    cold_file(fleet.base / "cold.json")
    return fleet


def _catalog_params(fleet):
    return EmbeddedServer("a", fleet.path / ".shardctl" / "servers" / "a").conninfo("shardctl")


def _allow_merges(fleet):
    floor_below_shards(fleet, 2)


def _no_replication_left(fleet):
    for server in ("a", "b"):
        with fleet.connect(server) as conn:
            assert conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall() == []


def _moved_under_load(fleet, metrics: str):
    before, problems = all_rows(fleet)
    assert not problems
    writer = Writer(_catalog_params(fleet), start_id=max(before, default=0) + 1_000_000)
    writer.start(before)
    try:
        result = fleet.cli("apply", "--auto-approve", "--metrics", metrics)
        if result.code == 0:  # (else the assertion below says why)
            writer.goes_on()  # writes continue on the new shards after the cutover
    finally:
        writer.stop()
    assert result.code == 0, result.both
    assert writer.errors == [], writer.errors
    rows, problems = all_rows(fleet)
    assert problems == []
    assert rows == writer.expected  # 0 lost, 0 duplicated, 0 misplaced, every update kept
    assert writer.writes > 100
    _no_replication_left(fleet)
    assert fleet.cli("plan", "--detailed-exitcode", "--metrics", metrics).code in (0, 2)
    return result, writer


def test_a_split_under_a_concurrent_writer_loses_nothing(loaded):
    result, _writer = _moved_under_load(loaded, "hot.json")
    assert "Split complete" in result.out
    names = [s[0] for s in active_shards(loaded)]
    assert names == ["-40", "40-60", "60-80", "80-c0", "c0-"]
    with loaded.catalog() as conn:
        assert conn.execute("SELECT epoch FROM shardctl.state").fetchone() == (2,)
        (event,) = conn.execute("SELECT detail FROM shardctl.history WHERE event = 'split_shard'").fetchone()
        assert event["verification"] and event["evidence"][0]["metric"] == "queries_per_second"
        assert 0 < event["pause_ms"] < 5000 and "verified_changed_keys" in event
        _pause_breakdown_kept(conn, event)
    _flip_recorded_the_targets_schema(loaded)
    # the retired source is read-only, and a later plan drops it when the grace period is over
    with loaded.connect("b", "orders_40_80") as conn, pytest.raises(Exception, match="read-only"):
        conn.execute("INSERT INTO customers VALUES (-1, 'x')")
    loaded.write("fleet.yaml", loaded.read("fleet.yaml") + "policies:\n  default:\n    autosplit: {retire_after: 0s}\n")
    plan = loaded.cli("plan")
    assert "# shard.orders/40-80 will be destroyed" in plan.out
    assert loaded.cli("apply", "--auto-approve").code == 0
    assert "orders_40_80" not in loaded.databases("b")


def test_a_merge_under_a_concurrent_writer_loses_nothing(loaded):
    _allow_merges(loaded)
    result, _ = _moved_under_load(loaded, "cold.json")
    assert "Merge complete" in result.out
    assert [s[0] for s in active_shards(loaded)] == ["-80", "80-c0", "c0-"]
    with loaded.catalog() as conn:
        (event,) = conn.execute("SELECT detail FROM shardctl.history WHERE event = 'merge_shards'").fetchone()
        _pause_breakdown_kept(conn, event)
    _flip_recorded_the_targets_schema(loaded)


# the points inside the pause, in the order the move reaches them
PAUSE_POINTS = ["armed", "drained", "marked", "fence recorded", "catch up begun", "confirmed",
                "catch up recorded", "verify begun", "decoded", "compared", "sequences set", "verify recorded",
                "flip begun", "flip written", "flip committed"]


def _pause_breakdown_kept(conn, event: dict) -> None:
    """The history keeps where the pause went and the flip's own duration; the journal still
    has every step behind the fence, though their rows no longer wait for the catalog's flush."""
    marks = event["pause_marks"]
    assert set(marks) == {*PAUSE_POINTS, "changes taken ahead", "sources read ahead"}, marks
    assert all(marks[a] <= marks[b] for a, b in itertools.pairwise(PAUSE_POINTS)), marks
    # the work ahead runs beside the mark and the catch-up: from the drain, done by the comparison
    assert marks["drained"] <= marks["changes taken ahead"] <= marks["sources read ahead"] <= marks["compared"], marks
    assert marks["flip committed"] <= event["pause_ms"], (marks, event["pause_ms"])
    assert event["timings"]["flip"] > 0
    steps = conn.execute("SELECT step, status FROM shardctl.journal WHERE operation = %s ORDER BY seq",
                         (event["operation"],)).fetchall()
    for step in ("fence", "catch up", "verify", "flip"):
        assert [s for name, s in steps if name.endswith(f": {step}")] == ["begin", "done"], steps


def _flip_recorded_the_targets_schema(fleet) -> None:
    """The schema the flip recorded for the new shards (read before the fence) is theirs."""
    from engine.observe import introspect

    with fleet.catalog() as conn:
        recorded = conn.execute("SELECT server, dbname, schema_fingerprint FROM shardctl.shards"
                                " WHERE database = 'orders' AND state = 'active'").fetchall()
    for server, dbname, fingerprint in recorded:
        with fleet.connect(server, dbname) as conn:
            assert introspect.fingerprint(introspect.snapshot(conn)) == fingerprint, dbname


@pytest.mark.parametrize("step", ["record", "targets", "publish", "subscribe", "guard", "sync", "compare", "converge",
                                  "fence", "arm", "catch up", "verify", "flip", "cleanup"])
def test_a_split_killed_at_each_step_converges_on_rerun(loaded, step):
    before, _ = all_rows(loaded)
    killed = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json", env={FAILPOINT_ENV: f"{SPLIT}: {step}"})
    assert killed.code == -9, killed.both
    plan = loaded.cli("plan", "--metrics", "hot.json")
    assert plan.code == 0, plan.both
    if step != "record":
        assert "was interrupted at step" in plan.out
    if step == "sync":
        # while some process holds the apply lock, the operation is its, not interrupted
        from engine.catalog.lock import apply_lock

        with loaded.catalog() as conn, apply_lock(conn, "apply"):
            busy = loaded.cli("plan", "--metrics", "hot.json")
            status = loaded.cli("status")
        assert "is in progress, at step 'split orders/40-80: sync', run by" in busy.out, busy.out
        assert "was interrupted" not in busy.out
        assert "In progress: operation" in status.out and "Interrupted:" not in status.out
    resumed = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json")
    assert resumed.code == 0, resumed.both
    rows, problems = all_rows(loaded)
    assert problems == [] and rows == before
    assert [s[0] for s in active_shards(loaded)] == ["-40", "40-60", "60-80", "80-c0", "c0-"]
    _no_replication_left(loaded)
    with loaded.catalog() as conn:
        assert conn.execute("SELECT count(*) FROM shardctl.operations WHERE state = 'running'").fetchone() == (0,)


@pytest.mark.parametrize("step", ["publish", "fence", "flip"])
def test_a_merge_killed_at_a_step_converges_on_rerun(loaded, step):
    _allow_merges(loaded)
    before, _ = all_rows(loaded)
    killed = loaded.cli("apply", "--auto-approve", "--metrics", "cold.json", env={FAILPOINT_ENV: f"{MERGE}: {step}"})
    assert killed.code == -9, killed.both
    assert loaded.cli("apply", "--auto-approve", "--metrics", "cold.json").code == 0
    rows, problems = all_rows(loaded)
    assert problems == [] and rows == before
    _no_replication_left(loaded)


def test_abort_before_the_fence_leaves_the_source_as_it_was(loaded):
    source_before = checksum(loaded, "b", "orders_40_80")
    killed = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json", env={FAILPOINT_ENV: f"{SPLIT}: sync"})
    assert killed.code == -9
    (op,) = json.loads(loaded.cli("status", "--json").out)["interrupted"]
    aborted = loaded.cli("abort", str(op["id"]))
    assert aborted.code == 0, aborted.both
    assert checksum(loaded, "b", "orders_40_80") == source_before
    assert not {"orders_40_60", "orders_60_80"} & (loaded.databases("a") | loaded.databases("b"))
    _no_replication_left(loaded)
    with loaded.connect("b", "orders_40_80") as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'shardctl_fence%'").fetchone() == (0,)
        conn.execute("UPDATE customers SET name = name WHERE customer_id = 1")  # writable
    assert [s[0] for s in active_shards(loaded)] == ["-40", "40-80", "80-c0", "c0-"]
    again = loaded.cli("plan", "--metrics", "hot.json")
    assert "# shard.orders/40-80 will be split" in again.out


def test_a_table_without_the_shard_key_in_its_primary_key_refuses_the_split(loaded):
    events = "CREATE TABLE events (id bigint PRIMARY KEY, customer_id bigint);\n"
    (loaded.path / "schema" / "002_events.sql").write_text(events)
    original = loaded.read("fleet.yaml")
    loaded.write("fleet.yaml", original.replace(
        "schema: schema/001_init.sql", "schema: [schema/001_init.sql, schema/002_events.sql]"))
    refused = loaded.cli("validate")  # declared in the YAML, it never reaches a shard
    assert refused.code == 1 and "table events has (id); its primary key must include" in refused.err
    loaded.write("fleet.yaml", original)
    for _name, _lo, _hi, server, dbname in active_shards(loaded):  # made outside shardctl: drift
        with loaded.connect(server, dbname) as conn:
            conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, customer_id bigint)")
    plan = loaded.cli("plan", "--metrics", "hot.json", "--detailed-exitcode")
    assert plan.code == 0
    assert ("shard.orders/40-80: hot, but it cannot be split: table public.events has no primary key that contains"
            " the shard key customer_id") in plan.out


def _drop_retired(fleet):
    with fleet.catalog() as conn:
        conn.execute("UPDATE shardctl.shards SET retired_at = now() - interval '2 hours' WHERE state = 'retired'")
    load_file_neutral = fleet.base / "neutral.json"
    from movers import load_file

    load_file(load_file_neutral, fleet)
    result = fleet.cli("apply", "--auto-approve", "--metrics", "neutral.json")
    assert result.code == 0 and "Destruction complete" in result.out, result.both


@pytest.mark.stress
@pytest.mark.slow  # ten moves in a row (minutes): one split and one merge under writers run in the suite
def test_ten_moves_under_a_concurrent_writer(loaded):
    """Five cycles of splitting a hot shard and merging its halves back, each under the writer."""
    from movers import load_file

    loaded.write("fleet.yaml", loaded.read("fleet.yaml") + "policies:\n  default:\n    autosplit: {cooldown: 0s}\n")
    assert loaded.cli("apply", "--auto-approve").code == 0  # the policy change first: it holds load actions back
    moves = 0
    for _ in range(5):
        load_file(loaded.base / "split.json", loaded, hot=("orders/40-80",))
        _moved_under_load(loaded, "split.json")
        assert [s[0] for s in active_shards(loaded)] == ["-40", "40-60", "60-80", "80-c0", "c0-"]
        _drop_retired(loaded)  # a retired shard's range name is free again only once it is dropped
        load_file(loaded.base / "merge.json", loaded, cold=("orders/40-60", "orders/60-80"))
        _moved_under_load(loaded, "merge.json")
        assert [s[0] for s in active_shards(loaded)] == ["-40", "40-80", "80-c0", "c0-"]
        _drop_retired(loaded)
        moves += 2
    assert moves == 10


def test_a_schema_change_waits_for_an_interrupted_move(loaded):
    killed = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json", env={FAILPOINT_ENV: f"{SPLIT}: sync"})
    assert killed.code == -9
    (loaded.path / "schema" / "002_note.sql").write_text("ALTER TABLE customers ADD COLUMN note text;\n")
    loaded.write("fleet.yaml", loaded.read("fleet.yaml").replace(
        "schema: schema/001_init.sql", "schema: [schema/001_init.sql, schema/002_note.sql]"))
    plan = loaded.cli("plan", "--metrics", "hot.json")
    assert "new schema steps wait until the interrupted split or merge of orders is finished" in plan.out
    assert "# schema.orders will be updated" not in plan.out
    assert loaded.cli("apply", "--auto-approve", "--metrics", "hot.json").code == 0  # finishes the split
    assert loaded.cli("apply", "--auto-approve", "--metrics", "hot.json").code == 0  # then the schema step
    for _name, _lo, _hi, server, dbname in active_shards(loaded):
        with loaded.connect(server, dbname) as conn:
            assert conn.execute("SELECT count(*) FROM information_schema.columns"
                                " WHERE table_name = 'customers' AND column_name = 'note'").fetchone() == (1,)


def test_a_copy_whose_wal_the_source_removed_is_undone_with_the_reason(loaded):
    """The source invalidated the move's slots (max_slot_wal_keep_size exceeded before the copy
    could use them): the workers would retry forever; apply instead stops at once, names the
    server, the slot and the setting, removes what it created, and the next apply moves afresh."""
    before, _ = all_rows(loaded)
    killed = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json", env={FAILPOINT_ENV: f"{SPLIT}: subscribe"})
    assert killed.code != 0
    _name, _lo, _hi, server, dbname = next(s for s in active_shards(loaded) if s[0] == "40-80")
    with loaded.connect(server) as conn:  # the slots wait unread; the source writes 48 MB of WAL past them
        conn.autocommit = True
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CREATE TABLE IF NOT EXISTS wal_filler (x int)")
        for _ in range(3):
            conn.execute("INSERT INTO wal_filler SELECT generate_series(1, 1000)")
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        lost = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE wal_status = 'lost'").fetchone()[0]
        assert lost >= 1
        conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        conn.execute("SELECT pg_reload_conf()")
    failed = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json")
    assert failed.code == 1, failed.both
    assert f"{dbname} on server {server} removed WAL the move still needed" in failed.err
    assert "max_slot_wal_keep_size = 2GB of WAL" in failed.err and "Raise max_slot_wal_keep_size" in failed.err
    assert "Traceback" not in failed.both and "bug" not in failed.both
    with loaded.connect(server, dbname) as conn:  # nothing of the move is left on the source
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'shardctl_op%%'"
                            ).fetchone()[0] == 0
    assert {s[0] for s in active_shards(loaded)} >= {"40-80"}
    moved = loaded.cli("apply", "--auto-approve", "--metrics", "hot.json")
    assert moved.code == 0, moved.both
    assert {"40-60", "60-80"} <= {s[0] for s in active_shards(loaded)}
    rows, problems = all_rows(loaded)
    assert problems == [] and rows == before
