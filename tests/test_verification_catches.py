"""A target that does not hold what its source holds fails the move, naming the rows: the
comparison (engine/actions/move/compare.py) is what stands between a copy and the retirement
of the source, so it is tried here against a real difference, made on a real target behind
replication's back while the move is held before its comparison."""

from __future__ import annotations

from movers import HeldApply, active_shards, all_rows, hot_file, preload

SPLIT = "split orders/40-80"


def _targets(fleet) -> list[tuple[str, str]]:
    """The split's targets, being made: (server, database)."""
    with fleet.catalog() as conn:
        return conn.execute("SELECT server, dbname FROM shardctl.shards WHERE database = 'orders'"
                            " AND state <> 'active' AND name <> '40-80' ORDER BY name").fetchall()


def test_a_row_changed_on_a_target_alone_fails_the_move_and_keeps_the_source(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=3000)
    hot_file(fleet.base / "hot.json")
    before, problems = all_rows(fleet)
    assert not problems
    held = HeldApply(fleet, f"{SPLIT}: compare", "--metrics", "hot.json")
    try:
        (server, dbname), *_ = _targets(fleet)
        with fleet.connect(server, dbname) as conn:
            key, = conn.execute("UPDATE customers SET name = 'not what the source holds'"
                                " WHERE customer_id = (SELECT min(customer_id) FROM customers)"
                                " RETURNING customer_id").fetchone()
    finally:
        held.release()
    code, out, err = held.finish()

    assert code == 1, out + err
    said = out + err
    assert "verification failed" in said and f"customer_id {key}" in said and dbname in said, said
    assert "Traceback" not in said
    # the source still holds and routes the range, every row as it was
    assert [s[0] for s in active_shards(fleet)] == ["-40", "40-80", "80-c0", "c0-"]
    after, problems = all_rows(fleet)
    assert problems == [] and after == before
