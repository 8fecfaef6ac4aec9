"""Stray rows: rows written straight into a shard's database whose key hashes outside its
range. The plan shows them as drift and holds the move back; a saved plan's move refuses to
start; `shardctl strays --move` puts them where they belong; nothing is lost."""

from engine.client import hashint8extended
from movers import active_shards, all_rows, hot_file, preload


def _strays_for(lo, hi, count):
    """Customer ids whose hash lies outside [lo, hi): rows that do not belong to that shard."""
    out, cid = [], 5_000_000
    while len(out) < count:
        h = hashint8extended(cid)
        if not ((lo is None or h >= lo) and (hi is None or h < hi)):
            out.append(cid)
        cid += 1
    return out


def _databases_now(fleet):
    return fleet.databases("a") | fleet.databases("b")


def test_strays_show_as_drift_hold_the_split_and_move_home(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    hot_file(fleet.base / "hot.json")
    saved = fleet.cli("plan", "--metrics", "hot.json", "-out", "split.plan")  # made before the strays exist
    assert saved.code == 0 and "will be split" in saved.out

    _name, lo, hi, server, dbname = next(s for s in active_shards(fleet) if s[0] == "40-80")
    planted = _strays_for(lo, hi, 3)
    with fleet.connect(server, dbname) as conn:  # an application writing past routing
        for cid in planted:
            conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'stray')", (cid,))
        conn.execute("INSERT INTO orders (customer_id, order_id, amount) VALUES (%s, 1, 9.5)", (planted[0],))

    plan = fleet.cli("plan", "--metrics", "hot.json")
    assert "shard.orders/40-80" in plan.out and "4 rows were written outside the shard's range" in plan.out
    assert "public.customers: 3 rows" in plan.out and "public.orders: 1 row" in plan.out
    assert "will be split" not in plan.out
    assert "hot, but it cannot be split: orders/40-80 holds 4 rows whose key hashes outside its range" in plan.out

    before = _databases_now(fleet)
    refused = fleet.cli("apply", "split.plan", "--metrics", "hot.json")
    assert refused.code == 1 and "holds 4 rows whose key hashes outside its range" in refused.both
    assert "Traceback" not in refused.both and "bug" not in refused.both
    assert _databases_now(fleet) == before  # nothing was created
    with fleet.connect(server) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)

    listed = fleet.cli("strays", "orders/40-80")
    assert listed.code == 2 and "public.customers: 3" in listed.out
    moved = fleet.cli("strays", "orders/40-80", "--move")
    assert moved.code == 0, moved.both
    assert "every stray row moved" in moved.out
    rows, problems = all_rows(fleet)
    assert problems == [] and all(rows[cid] == "stray" for cid in planted)  # home, and nothing lost

    split = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json")
    assert split.code == 0, split.both
    rows_after, problems = all_rows(fleet)
    assert problems == [] and rows_after == rows


def test_a_stray_written_during_a_move_fails_it_and_leaves_the_source_as_it_was(fleet):
    import os
    import subprocess
    import sys
    import time

    from engine.catalog.journal import SLOWPOINT_ENV

    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=2000)
    hot_file(fleet.base / "hot.json")
    before, _ = all_rows(fleet)
    _name, lo, hi, server, dbname = next(s for s in active_shards(fleet) if s[0] == "40-80")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCTL_")}
    env.update({"NO_COLOR": "1", SLOWPOINT_ENV: "split orders/40-80: converge=4"})
    proc = subprocess.Popen([sys.executable, "-m", "engine", "-C", "fleet", "apply", "--auto-approve", "--metrics",
                             "hot.json"], cwd=fleet.base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    with fleet.catalog() as conn:  # wait until the comparison is done and the move waits before its fence
        deadline = time.monotonic() + 120
        while not conn.execute("SELECT 1 FROM shardctl.journal WHERE step LIKE '%%: converge'").fetchone():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
    (cid,) = _strays_for(lo, hi, 1)
    with fleet.connect(server, dbname) as conn:
        conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'late stray')", (cid,))
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, out
    assert "1 rows were written into orders_40_80 during the move" in out and "Traceback" not in out
    with fleet.connect(server, dbname) as conn:  # writable again, nothing left behind
        conn.execute("UPDATE customers SET name = name WHERE customer_id = %s", (cid,))
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
    assert [s[0] for s in active_shards(fleet)] == ["-40", "40-80", "80-c0", "c0-"]
    assert "orders_40_60" not in fleet.databases("a") and "orders_60_80" not in fleet.databases("b")
    rows, _ = all_rows(fleet)
    assert {k: v for k, v in rows.items() if k != cid} == before
