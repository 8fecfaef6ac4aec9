"""A fence that cannot go up gives way, names who is in the way, and leaves the source as it
was; once the blocker ends, apply finishes the same move. The fence takes no table lock
(engine/actions/fence.py): what it waits for before arming is a transaction that has written
for longer than DRAIN_LIMIT; one that wrote just before it is refused at its commit."""

import time

import psycopg
import pytest

from engine.actions.fence import DRAIN_LIMIT
from engine.client import hashint8extended
from movers import HeldApply, Probe, active_shards, all_rows, hot_file, preload


def test_a_fence_blocked_by_an_idle_transaction_gives_up_naming_it(fleet):
    """A transaction writes the source once its guard is up and then stays idle, longer than
    DRAIN_LIMIT before the fence: the fence never arms (a long transaction is not refused at
    its commit by a fence that can wait for it), the source takes writes throughout, and after
    moves.fence_timeout the move gives up naming it."""
    fleet.write("fleet.yaml", fleet.read("fleet.yaml")
                + "policies:\n  default:\n    moves: {fence_timeout: 2s}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    hot_file(fleet.base / "hot.json")
    before, _ = all_rows(fleet)
    _name, lo, hi, server, dbname = next(s for s in active_shards(fleet) if s[0] == "40-80")
    params = {**fleet_params(fleet, server, dbname), "application_name": "stuck-app"}
    held = HeldApply(fleet, "split orders/40-80: fence", "--metrics", "hot.json")  # the fence's step begins
    blocker = psycopg.connect(**params)  # a transaction left open after a write: it keeps its lock
    try:
        with Probe(fleet_params(fleet, server, dbname), lo, hi) as probe:
            blocker.execute("UPDATE customers SET name = 'secret-value-42' WHERE customer_id = -1")
            pid = blocker.info.backend_pid
            _until_older_than(blocker, DRAIN_LIMIT)
            held.release()
            code, out, err = held.finish()
        assert code == 1, out + err
        assert f"could not fence writes on {dbname}" in err
        assert f"pid {pid} (stuck-app, idle in transaction" in err
        assert f"SELECT pg_terminate_backend({pid})" in err and "takes writes as before" in err
        assert "secret-value-42" not in out + err  # a blocker is named by its statement, never its values
        assert "Traceback" not in out + err and "bug" not in out + err
        assert probe.refused_windows() == []  # never armed: the range took writes all along
        assert probe.errors == [] and probe.accepted
        with fleet.catalog() as conn:
            (error,) = conn.execute("SELECT detail->>'error' FROM shardctl.journal WHERE step LIKE '%%: fence'"
                                    " AND status = 'failed'").fetchone()
        assert f"blocked by pid {pid}" in error  # the journal says why
        status = fleet.cli("status")
        assert "shardctl abort" in status.out  # before its cutover: abort is offered
    finally:
        blocker.rollback()
        blocker.close()
    finished = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json")
    assert finished.code == 0, finished.both
    assert "Resuming operation" in finished.out
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == {**before, **{k: "probe" for _, k in probe.accepted}}


def test_a_transaction_that_wrote_just_before_the_fence_is_refused_at_its_commit_not_waited_for(fleet):
    """A transaction updates a row of the range just before the fence arms, then stays idle:
    the fence does not wait for it (it is young: the drain waits only for commits under way),
    the split finishes, and the transaction's commit is refused with the fence's 25006, which
    tells its client to run it again on the new owner. Its row is as it was, everywhere."""
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    hot_file(fleet.base / "hot.json")
    before, _ = all_rows(fleet)
    _name, lo, hi, server, dbname = next(s for s in active_shards(fleet) if s[0] == "40-80")
    key = next(k for k in sorted(before) if lo <= hashint8extended(k) < hi)
    held = HeldApply(fleet, "split orders/40-80: arm", "--metrics", "hot.json")
    writer = psycopg.connect(**fleet_params(fleet, server, dbname))
    try:
        writer.execute("UPDATE customers SET name = 'written-before-the-fence' WHERE customer_id = %s", (key,))
        held.release()
        code, out, err = held.finish()
        assert code == 0, out + err
        assert "Split complete" in out
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="re-resolve the route"):
            writer.commit()
    finally:
        writer.close()
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == before


def _until_older_than(conn: psycopg.Connection, seconds: float) -> None:
    """Until CONN's transaction has been open longer than SECONDS, by the server's clock."""
    with psycopg.connect(conn.info.dsn, password=conn.info.password, autocommit=True) as watcher:
        while not watcher.execute("SELECT clock_timestamp() - xact_start > make_interval(secs => %s)"
                                  " FROM pg_stat_activity WHERE pid = %s",
                                  (seconds, conn.info.backend_pid)).fetchone()[0]:
            time.sleep(0.02)


def fleet_params(fleet, server, dbname):
    from engine.servers.embedded import EmbeddedServer

    return EmbeddedServer(server, fleet.path / ".shardctl" / "servers" / server).conninfo(dbname)


def next_key(lo, hi):
    from engine.client import hashint8extended

    key = 9_000_000
    while not ((lo is None or hashint8extended(key) >= lo) and (hi is None or hashint8extended(key) < hi)):
        key += 1
    return key


def test_a_merge_fence_never_holds_one_source_while_the_other_is_blocked(fleet):
    """A blocker that keeps a write lock on one source since before the move: the guard cannot be
    installed on it (its lock is held), no source is ever armed, the other source goes on taking
    writes, and when the move gives up both are as they were; once the blocker ends, apply
    finishes the same merge."""
    import threading
    import time

    from movers import load_file

    fleet.write("fleet.yaml", fleet.read("fleet.yaml")
                + "policies:\n  default:\n    moves: {fence_timeout: 2s}\n    automerge: {enabled: true}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    from movers import floor_below_shards

    floor_below_shards(fleet, 2)  # load merges may go down to 2
    load_file(fleet.base / "cold.json", fleet, cold=("orders/-40", "orders/40-80"))
    before, _ = all_rows(fleet)
    shards = {s[0]: s for s in active_shards(fleet)}
    _, free_lo, free_hi, free_server, free_db = shards["-40"]
    _, _, _, busy_server, busy_db = shards["40-80"]
    blocker = psycopg.connect(**{**fleet_params(fleet, busy_server, busy_db), "application_name": "stuck-app"})
    blocker.execute("UPDATE customers SET name = name WHERE customer_id = -1")  # keeps its lock, uncommitted
    refused: list[str] = []
    written: list[int] = []
    stop = threading.Event()

    def write_the_free_source() -> None:
        key = next_key(free_lo, free_hi)
        with psycopg.connect(**fleet_params(fleet, free_server, free_db), autocommit=True) as conn:
            while not stop.is_set():
                key += 1
                while not ((free_lo is None or hashint8extended(key) >= free_lo) and hashint8extended(key) < free_hi):
                    key += 1
                try:
                    conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'during')", (key,))
                    written.append(key)
                except psycopg.errors.ReadOnlySqlTransaction as exc:
                    refused.append(str(exc))
                time.sleep(0.01)

    writer = threading.Thread(target=write_the_free_source, daemon=True)
    try:
        writer.start()
        result = fleet.cli("apply", "--auto-approve", "--metrics", "cold.json")
        stop.set()
        writer.join()
        assert result.code == 1, result.both
        assert "could not fence writes on" in result.err and "stuck-app" in result.err
        assert "(installing its guard on public.customers)" in result.err
        assert refused == []  # the unblocked source never stood fenced while the other waited
        assert len(written) > 50  # and it was written throughout the fence's tries
    finally:
        stop.set()
        blocker.rollback()
        blocker.close()
    finished = fleet.cli("apply", "--auto-approve", "--metrics", "cold.json")
    assert finished.code == 0, finished.both
    assert "-80" in {s[0] for s in active_shards(fleet)}
    rows, problems = all_rows(fleet)
    assert problems == []
    assert {k: v for k, v in rows.items() if v != "during"} == before
    assert {k for k, v in rows.items() if v == "during"} == set(written)


def test_an_autovacuum_holding_the_lock_is_cancelled_not_waited_out(fleet):
    """Autovacuum holds a lock that installing the fence's guard needs, for as long as it runs.
    PostgreSQL cancels it for a waiter only after deadlock_timeout, which the guard's short
    waits never reach; the move cancels it itself (it runs again later) instead of retrying
    until its budget is spent. (The fence itself takes no table lock: no autovacuum is in its way.)"""
    import time

    from engine.catalog.journal import SLOWPOINT_ENV

    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + "policies:\n  default:\n    moves: {fence_timeout: 20s}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=20000)
    hot_file(fleet.base / "hot.json")
    before, _ = all_rows(fleet)
    _name, _lo, _hi, server, dbname = next(s for s in active_shards(fleet) if s[0] == "40-80")
    with fleet.connect(server) as conn:
        conn.autocommit = True
        conn.execute("ALTER SYSTEM SET autovacuum_naptime = '1s'")
        conn.execute("SELECT pg_reload_conf()")
    with fleet.connect(server, dbname) as conn:  # an autovacuum that crawls: it holds its lock for minutes
        conn.autocommit = True
        conn.execute("ALTER TABLE customers SET (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,"
                     " autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1)")
        conn.execute("UPDATE customers SET name = name")
        deadline = time.monotonic() + 60
        while not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
                               " AND datname = current_database()").fetchone()[0]:
            assert time.monotonic() < deadline, "no autovacuum started"
            time.sleep(0.2)
    # publishing waits without a lock timeout, so PostgreSQL cancels that autovacuum; the pause
    # before the guard lets the next one start (naptime 1 s) and hold the lock the guard needs
    result = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json",
                       env={SLOWPOINT_ENV: "split orders/40-80: guard=4"})
    assert result.code == 0, result.both
    assert "cancelled an autovacuum" in result.out + result.err, result.both
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == before
