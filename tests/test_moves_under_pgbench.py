"""Splits and merges while PostgreSQL's own pgbench writes the moving shard at full speed, with
transactions that take the tables in the fence's order and in the reverse order: the fence never
deadlocks with them, apply succeeds the first time, and the retired source equals the union of
its targets row for row (so nothing pgbench committed was lost, duplicated or misplaced)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest

from engine.catalog import store
from engine.client import hashint8extended
from engine.render.dashboard import render_dashboard
from engine.servers.embedded import EmbeddedServer, bin_dir
from engine.watch.daemon import _history_entry
from engine.watch.prometheus import exposition
from engine.watch.view import Snapshot, View
from movers import active_shards, load_file, preload

# The fence locks customers, then orders (name order). These two scripts write in both orders.
SAME_ORDER = """\
\\set r random(1, 15000)
\\set o random(1, 9000000000000000000)
BEGIN;
SELECT customer_id AS c FROM customers WHERE customer_id >= :r ORDER BY customer_id LIMIT 1 \\gset
UPDATE customers SET name = name || '.' WHERE customer_id = :c;
INSERT INTO orders (customer_id, order_id, amount) VALUES (:c, :o, 1);
END;
"""
# orders first; its foreign key then takes a lock on customers: the cycle a name-order fence meets
REVERSE_ORDER = """\
\\set r random(1, 15000)
\\set o random(1, 9000000000000000000)
BEGIN;
SELECT customer_id AS c FROM customers WHERE customer_id >= :r ORDER BY customer_id LIMIT 1 \\gset
INSERT INTO orders (customer_id, order_id, amount) VALUES (:c, :o, 2);
UPDATE customers SET name = name || '-' WHERE customer_id = :c;
END;
"""


@pytest.fixture
def loaded(fleet):
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + "policies:\n  default:\n    autosplit: {cooldown: 0s}\n")
    assert fleet.cli("apply", "--auto-approve").code == 0
    preload(fleet, customers=20000)
    return fleet


def start_pgbench(fleet, server: str, dbname: str, seconds: int = 300, rate: int | None = None,
                  scripts: tuple[tuple[str, str], ...] = (("same", SAME_ORDER), ("reverse", REVERSE_ORDER)),
                  clients: int = 4) -> subprocess.Popen:
    args = []
    for name, text in scripts:
        path = fleet.base / f"{dbname}-{name}.sql"
        path.write_text(text)
        args += ["-f", str(path)]
    srv = EmbeddedServer(server, fleet.path / ".shardctl" / "servers" / server)
    return subprocess.Popen(
        [str(bin_dir() / "pgbench"), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "--failures-detailed",
         *(["-R", str(rate)] if rate else []), *args,
         "-h", str(srv.socket_dir), "-p", "5432", "-U", "postgres", dbname],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_pgbench(proc: subprocess.Popen) -> tuple[str, int, int]:
    """pgbench stops on its own when the fence makes the shard read-only (its clients abort).
    Returns its report, the transactions it committed and its failures: deadlocks, retried
    transactions that failed, and clients stopped by anything but the fence's refusal."""
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate()
    report = out + err
    found = re.search(r"number of transactions actually processed: (\d+)", report)
    assert found, report
    processed = int(found.group(1))
    failed = sum(int(n) for n in re.findall(r"number of (?:deadlock failures|failed transactions): (\d+)", report))
    stopped = [line for line in report.splitlines() if "aborted in command" in line and "read-only" not in line]
    return report, processed, failed + len(stopped)


def apply_under(fleet, benches: list[subprocess.Popen], metrics: str):
    """Apply while the pgbench runs write; their reports once the fence stopped them."""
    result = fleet.cli("apply", "--auto-approve", "--metrics", metrics)
    if result.code != 0:
        for b in benches:
            b.terminate()
    assert result.code == 0, result.both
    return result, [finish_pgbench(b) for b in benches]


def rows_of(fleet, server: str, dbname: str, lo=None, hi=None) -> dict[str, set]:
    def inside(cid: int) -> bool:
        h = hashint8extended(cid)
        return (lo is None or h >= lo) and (hi is None or h < hi)

    with fleet.connect(server, dbname) as conn:
        return {
            "customers": {r for r in conn.execute("SELECT customer_id, name FROM customers") if inside(r[0])},
            "orders": {r for r in conn.execute("SELECT customer_id, order_id, amount FROM orders") if inside(r[0])},
        }


def union(parts: list[dict[str, set]]) -> dict[str, set]:
    return {t: set().union(*(p[t] for p in parts)) for t in ("customers", "orders")}


def shard(fleet, name: str):
    return next(s for s in active_shards(fleet) if s[0] == name)


def retired(fleet, name: str):
    with fleet.catalog() as conn:
        return conn.execute("SELECT name, lo, hi, server, dbname FROM shardctl.shards WHERE database = 'orders'"
                            " AND name = %s AND state = 'retired'", (name,)).fetchone()


@pytest.mark.slow  # the 32 clients below cover it, in ~35 s
def test_split_then_merge_under_pgbench_in_both_lock_orders(loaded):
    split_and_merge(loaded, clients=4)


def test_split_then_merge_under_32_clients_in_both_lock_orders(loaded):
    """32 pgbench clients, half their transactions in the reverse of the other half's lock order:
    the fence goes up the first time (it takes no table lock), no client fails but for the
    fence's refusal, and the pause printed is the one kept and shown."""
    split_and_merge(loaded, clients=32)


def split_and_merge(loaded, clients: int) -> None:
    _, _lo, _hi, server, dbname = shard(loaded, "40-80")
    load_file(loaded.base / "split.json", loaded, hot=("orders/40-80",))
    bench = start_pgbench(loaded, server, dbname, clients=clients)
    result = loaded.cli("apply", "--auto-approve", "--metrics", "split.json")
    report, processed, failures = finish_pgbench(bench)
    assert result.code == 0, result.both  # the first time: no retry by hand
    assert failures == 0, report
    assert processed > 100, report  # it really wrote during the move
    printed = float(re.search(r"writes to the range paused for ([\d.]+) ms \(fence to flip committed\)",
                              result.out).group(1))
    with loaded.catalog() as conn:
        (event,) = conn.execute("SELECT detail FROM shardctl.history WHERE event = 'split_shard'").fetchone()
    shown = json.loads(loaded.cli("status", "--json").out)["recent_moves"][0]
    assert printed == event["pause_ms"] == shown["pause_ms"] > 0  # one figure: printed, stored, shown
    with loaded.catalog() as conn:  # and as the daemon reads the history into /metrics and the dashboard
        entry = _history_entry(store.history(conn, 1)[0])
    snapshot = Snapshot(who="d", config_dir="/x", started_at=entry.at, history=(entry,))
    assert (f'shardctl_move_pause_seconds{{address="{entry.address}",event="split_shard"}} {printed / 1000!r}'
            in exposition(View(snapshot)).decode())
    assert f"{printed:.1f} ms" in render_dashboard(snapshot, {}, now=entry.at)
    assert event["fence"]["tries"] >= 1 and event["fence"]["acquired_ms"] < 60_000
    source = rows_of(loaded, server, dbname)
    targets = [rows_of(loaded, s[3], s[4]) for s in (shard(loaded, "40-60"), shard(loaded, "60-80"))]
    assert union(targets) == source  # the retired source, frozen by the fence, equals its targets
    assert len(source["orders"]) == processed  # every committed pgbench transaction inserted one order

    # --- merge the halves back while pgbench writes both of them
    with loaded.catalog() as conn:
        conn.execute("UPDATE shardctl.shards SET retired_at = now() - interval '2 hours' WHERE state = 'retired'")
    load_file(loaded.base / "neutral.json", loaded)
    assert loaded.cli("apply", "--auto-approve", "--metrics", "neutral.json").code == 0  # drops the retired source
    halves = [shard(loaded, "40-60"), shard(loaded, "60-80")]
    load_file(loaded.base / "merge.json", loaded, cold=("orders/40-60", "orders/60-80"))
    benches = [start_pgbench(loaded, h[3], h[4], clients=max(2, clients // 2)) for h in halves]
    result, reports = apply_under(loaded, benches, "merge.json")
    assert [r[2] for r in reports] == [0, 0], [r[0] for r in reports]
    sources = union([rows_of(loaded, h[3], h[4]) for h in halves])
    merged = shard(loaded, "40-80")
    assert rows_of(loaded, merged[3], merged[4]) == sources
    assert len(sources["orders"]) == processed + sum(r[1] for r in reports)


def test_a_merge_under_sustained_full_speed_writes_finishes_and_shows_lag_and_eta(loaded):
    for _, _, _, server, dbname in active_shards(loaded):
        with loaded.connect(server, dbname) as conn:  # 60 orders per customer: a copy that takes a while
            conn.execute("INSERT INTO orders (customer_id, order_id, amount)"
                         " SELECT customer_id, g, 1 FROM customers, generate_series(1, 60) g")
    from movers import floor_below_shards

    floor_below_shards(loaded, 2)  # load merges may go down to 2
    sources = [shard(loaded, "-40"), shard(loaded, "40-80")]
    load_file(loaded.base / "merge.json", loaded, cold=("orders/-40", "orders/40-80"))
    benches = [start_pgbench(loaded, s[3], s[4], clients=2) for s in sources]  # no rate limit
    result, reports = apply_under(loaded, benches, "merge.json")
    assert [r[2] for r in reports] == [0, 0]
    assert all(r[1] > 100 for r in reports), [r[0] for r in reports]  # both wrote throughout
    assert re.search(r"copying: .* rows/s, ETA \d+s", result.out), result.out
    assert re.search(r"caught up: lag [\d,]+ kB", result.out), result.out
    merged = shard(loaded, "-80")
    assert rows_of(loaded, merged[3], merged[4]) == union([rows_of(loaded, s[3], s[4]) for s in sources])


def test_the_copy_throttle_copies_one_link_at_a_time_under_pgbench(loaded):
    """`moves.copy_streams: 1`: a split's two targets are copied one after the other (never two
    table copies of different links at once, as PostgreSQL's own worker list shows), and the
    move is as exact as without it."""
    loaded.write("fleet.yaml", loaded.read("fleet.yaml").replace(
        "autosplit: {cooldown: 0s}", "autosplit: {cooldown: 0s}\n    moves: {copy_streams: 1}"))
    load_file(loaded.base / "neutral.json", loaded)
    assert loaded.cli("apply", "--auto-approve", "--metrics", "neutral.json").code == 0  # the setting first
    _, _lo, _hi, server, dbname = shard(loaded, "40-80")
    with loaded.connect(server, dbname) as conn:  # a copy that takes long enough to watch
        conn.execute("INSERT INTO orders (customer_id, order_id, amount)"
                     " SELECT customer_id, g, 1 FROM customers, generate_series(1, 40) g")
    seen: list[set[str]] = []  # per poll: the subscriptions with a table copy running
    done = threading.Event()

    def watch() -> None:
        conns = [loaded.connect(s) for s in ("a", "b")]
        try:
            while not done.is_set():
                copying = set()
                for conn in conns:
                    copying |= {r[0] for r in conn.execute(
                        "SELECT subname FROM pg_stat_subscription WHERE relid IS NOT NULL")}
                seen.append(copying)
                time.sleep(0.01)
        finally:
            for conn in conns:
                conn.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    load_file(loaded.base / "split.json", loaded, hot=("orders/40-80",))
    bench = start_pgbench(loaded, server, dbname, clients=2)
    try:
        result, reports = apply_under(loaded, [bench], "split.json")
    finally:
        done.set()
        watcher.join()
    assert reports[0][2] == 0, reports[0][0]
    assert max(len(s) for s in seen) == 1, [s for s in seen if len(s) > 1][:5]
    assert result.out.count("copy throttle (1 at a time)") == 1, result.out  # the second link, once
    assert len(set().union(*seen)) == 2  # both links did copy, in turn
    source = rows_of(loaded, server, dbname)
    targets = [rows_of(loaded, s[3], s[4]) for s in (shard(loaded, "40-60"), shard(loaded, "60-80"))]
    assert union(targets) == source
