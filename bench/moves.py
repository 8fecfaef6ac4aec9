"""Shards moved per minute: one move at a time against two at a time, on four embedded servers.

    python bench/moves.py [--rows 400000] [--rounds 2]

Four embedded servers a, b, c, d and one database of 4 shards (`--rows` customers spread over
them), placed on [a, b]. Each round moves all four shards from [a, b] to [c, d] and back, once
with `moves.parallel: 1` (one move at a time: the baseline) and once with `moves.parallel: 2`
(a->c beside b->d), alternating which goes first so that neither always meets warm caches. The
same rows move each time. Timed: the apply that moves the shards (observe, plan, four moves);
the apply that drops the retired copies between them is not. Prints shards moved per minute
for each setting and the ratio, from the same run, and writes its record (bench/record.py) to
docs/bench/moves.json: every apply's seconds (the ratio of seconds is the inverse of the rate's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import workflow
from engine.servers.fleet import Fleet
from record import Record

FLEET = """\
servers:
  a: {embedded: true}
  b: {embedded: true}
  c: {embedded: true}
  d: {embedded: true}
databases:
  orders:
    shard_key: {column: customer_id, type: bigint}
    schema: {name: init, sql: "CREATE TABLE customers (customer_id bigint PRIMARY KEY, name text NOT NULL,
      balance numeric(12,2) NOT NULL DEFAULT 0);"}
    shards: 4
    placement: PLACEMENT
policies:
  default:
    autosplit: {retire_after: 0s}
    moves: {parallel: PARALLEL}
"""


def write(fleet_dir: Path, placement: str, parallel: int) -> None:
    (fleet_dir / "fleet.yaml").write_text(FLEET.replace("PLACEMENT", placement).replace("PARALLEL", str(parallel)))


def apply(fleet_dir: Path) -> None:
    workflow.apply(workflow.load(str(fleet_dir)), None)


def load(fleet: Fleet, rows: int) -> None:
    with fleet.catalog() as conn:
        shards = conn.execute("SELECT lo, hi, server, dbname FROM shardctl.shards WHERE state = 'active'").fetchall()
    for lo, hi, server, dbname in shards:
        with fleet.servers[server].connect(dbname) as conn:
            conn.execute(
                "INSERT INTO customers (customer_id, name) SELECT g, 'customer ' || g FROM generate_series(1, %s) g"
                " WHERE (%s::bigint IS NULL OR hashint8extended(g::bigint, 0) >= %s)"
                " AND (%s::bigint IS NULL OR hashint8extended(g::bigint, 0) < %s)", (rows, lo, lo, hi, hi))
            conn.execute("VACUUM ANALYZE customers")


def timed_move(fleet_dir: Path, to: str, parallel: int) -> float:
    """Move all four shards onto `to`; then drop the retired copies (not timed)."""
    write(fleet_dir, to, parallel)
    started = time.monotonic()
    apply(fleet_dir)
    seconds = time.monotonic() - started
    apply(fleet_dir)  # retire_after 0s: the copies left behind are dropped
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="customers over the 4 shards")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    record = Record("moves")
    with tempfile.TemporaryDirectory(prefix="shardctl-moves-") as tmp:
        fleet_dir = Path(tmp) / "fleet"
        fleet_dir.mkdir()
        write(fleet_dir, "[a, b]", 1)
        desired = workflow.load(str(fleet_dir))
        workflow.apply(desired, None)
        fleet = Fleet(desired)
        try:
            load(fleet, args.rows)
            seconds: dict[int, list[float]] = {1: [], 2: []}
            for i in range(args.rounds):
                for parallel in ((1, 2) if i % 2 == 0 else (2, 1)):
                    there = timed_move(fleet_dir, "[c, d]", parallel)
                    back = timed_move(fleet_dir, "[a, b]", parallel)
                    seconds[parallel] += [there, back]
                    print(f"round {i + 1}, parallel {parallel}: 4 shards to [c, d] in {there:.1f}s,"
                          f" back to [a, b] in {back:.1f}s", flush=True)
        finally:
            for handle in fleet.servers.values():
                if handle.embedded is not None:
                    handle.embedded.stop()
    rate = {p: 4 * 60 / statistics.median(s) for p, s in seconds.items()}
    print(f"\n{args.rows:,} rows over 4 shards; median of {len(seconds[1])} applies of 4 moves each")
    print(f"one move at a time (moves.parallel 1): {rate[1]:.1f} shards/min")
    print(f"two at a time      (moves.parallel 2): {rate[2]:.1f} shards/min")
    print(f"ratio: {rate[2] / rate[1]:.2f}x")
    record.fact("rows", args.rows)
    record.measure("parallel1", "baseline: one apply of 4 moves, one move at a time (`moves.parallel: 1`)",
                   seconds[1], "s")
    record.measure("parallel2", "one apply of 4 moves, two at a time (`moves.parallel: 2`)", seconds[2], "s",
                   baseline="parallel1", paired=True)
    record.measure("rate1", "baseline: shards moved per minute, one at a time", [4 * 60 / v for v in seconds[1]],
                   "shards/min")
    record.measure("rate2", "shards moved per minute, two at a time", [4 * 60 / v for v in seconds[2]],
                   "shards/min", baseline="rate1", paired=True)
    record.write()


if __name__ == "__main__":
    main()
