"""A fence that cannot take its locks gives way, names who holds them, and leaves the source
as it was; once the blocker ends, apply finishes the same move."""

import psycopg

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
