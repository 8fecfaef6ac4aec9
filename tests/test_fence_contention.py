"""A fence that cannot take its locks gives way, names who holds them, and leaves the source
as it was; once the blocker ends, apply finishes the same move."""

import psycopg

from engine.client import hashint8extended
from movers import active_shards, all_rows, hot_file, preload


def test_a_fence_blocked_by_an_idle_transaction_gives_up_naming_it(fleet):
    fleet.write("fleet.yaml", fleet.read("fleet.yaml")
                + "policies:\n  default:\n    moves: {fence_timeout: 2s}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    hot_file(fleet.base / "hot.json")
    before, _ = all_rows(fleet)
    name, lo, hi, server, dbname = next(s for s in active_shards(fleet) if s[0] == "40-80")
    params = {**fleet_params(fleet, server, dbname), "application_name": "stuck-app"}
    blocker = psycopg.connect(**params)  # a transaction left open after a write: it keeps its lock
    blocker.execute("UPDATE customers SET name = 'secret-value-42' WHERE customer_id = -1")
    pid = blocker.info.backend_pid
    try:
        result = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json")
        assert result.code == 1, result.both
        assert f"could not fence writes on {dbname}" in result.err
        assert f"pid {pid} (stuck-app, idle in transaction" in result.err
        assert f"SELECT pg_terminate_backend({pid})" in result.err and "takes writes as before" in result.err
        assert "secret-value-42" not in result.both  # a blocker is named by its statement, never its values
        assert "Traceback" not in result.both and "bug" not in result.both
        with fleet.connect(server, dbname) as conn:  # the source takes writes: no fence left behind
            conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'after')", (next_key(lo, hi),))
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
    assert problems == [] and {k: v for k, v in rows.items() if v != "after"} == before


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
    """A merge locks its sources together and commits only when both hold their locks: while a
    blocker keeps one source's lock, the other source goes on taking writes, and when the fence
    gives up both are as they were; once the blocker ends, apply finishes the same merge."""
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
    """Autovacuum holds a lock the fence needs for as long as it runs. PostgreSQL cancels it for
    a waiter only after deadlock_timeout, which the fence's short waits never reach; the fence
    cancels it itself (it runs again later) instead of retrying until its budget is spent."""
    import time

    from engine.catalog.journal import SLOWPOINT_ENV

    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + "policies:\n  default:\n    moves: {fence_timeout: 20s}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=20000)
    hot_file(fleet.base / "hot.json")
    before, _ = all_rows(fleet)
    name, lo, hi, server, dbname = next(s for s in active_shards(fleet) if s[0] == "40-80")
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
    # before the fence lets the next one start (naptime 1 s) and hold the lock the fence needs
    result = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json", env={SLOWPOINT_ENV: "split orders/40-80: converge=4"})
    assert result.code == 0, result.both
    assert "cancelled an autovacuum" in result.out + result.err, result.both
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == before
