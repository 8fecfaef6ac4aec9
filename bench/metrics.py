"""One metric collection round over 300 shard databases on one server, against the naive way
(a new connection per database), measured in the same run.

    python bench/metrics.py [--databases 300] [--rounds 20]

Prints medians and the ratio. The naive baseline runs the same per-database counters query the
round answers for all databases at once.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config.models import Server  # noqa: E402
from engine.observe.sampling import LiveSampler  # noqa: E402
from engine.servers.fleet import Fleet  # noqa: E402
from engine.observe.models import CatalogShard  # noqa: E402
from engine.servers.connect import ServerHandle  # noqa: E402
from engine.servers.embedded import bin_dir  # noqa: E402

NAIVE = """
SELECT s.xact_commit + s.xact_rollback, s.active_time, s.numbackends, pg_database_size(current_database())
FROM pg_stat_database s WHERE s.datname = current_database()
"""


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--databases", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="shardctl-bench-") as tmp:
        handle = ServerHandle("bench", Server(embedded=True), Path(tmp))
        server = handle.embedded
        server.start()
        try:
            names = [f"bench_{i:04d}" for i in range(args.databases)]
            started = time.perf_counter()
            with handle.connect() as conn:
                for name in names:
                    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
            print(f"created {len(names)} databases in {time.perf_counter() - started:.1f}s")
            shards = [CatalogShard(database="bench", name=f"{i:04d}", lo=None, hi=None, server="bench", dbname=n,
                                   state="active") for i, n in enumerate(names)]
            sampler = LiveSampler(Fleet.__new__(Fleet))
            sampler.fleet.servers = {"bench": handle}

            def round_interval():  # what the daemon does every interval, on its warm connection
                sampler.read(shards, full=False)

            def round_full():  # plus tier 3, at most once a minute
                sampler.read(shards, full=True)

            def cold_round():  # what a one-shot CLI command pays: a new connection, then the round
                with LiveSampler(sampler.fleet) as once:
                    once.read(shards, full=False)

            def naive():
                for name in names:
                    with handle.connect(name) as conn:
                        conn.execute(NAIVE).fetchone()

            for label in ("idle", "under load"):
                bench = None
                if label == "under load":
                    script = Path(tmp) / "select1.sql"
                    script.write_text("SELECT 1;\n")
                    bench = [subprocess.Popen(
                        [str(bin_dir() / "pgbench"), "-n", "-c", "1", "-T", "600", "-f", str(script),
                         "-h", str(server.socket_dir), "-p", "5432", "-U", "postgres", names[i]],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in (0, 1, 2)]
                    time.sleep(2)
                try:
                    round_interval()  # warm the pool
                    interval = statistics.median(timed(round_interval, args.rounds))
                    full = statistics.median(timed(round_full, max(3, args.rounds // 4)))
                    cold = statistics.median(timed(cold_round, 5))
                    per_db = statistics.median(timed(naive, 3))
                finally:
                    for p in bench or []:
                        p.terminate()
                        p.wait()
                print(f"{label}:")
                print(f"  connection per database (baseline) {per_db * 1000:9.1f} ms")
                print(f"  interval round, warm connection     {interval * 1000:9.1f} ms   {per_db / interval:7.1f}x cheaper")
                print(f"  interval round, new connection      {cold * 1000:9.1f} ms   {per_db / cold:7.1f}x cheaper")
                print(f"  full round (+ sizes, buffer cache)  {full * 1000:9.1f} ms   {per_db / full:7.1f}x cheaper")
            sampler.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
