"""The `proc` collector: real CPU time of each shard's backends, from this host's /proc.

PostgreSQL has no per-database CPU counter; `active_time` is a busy share that includes lock
waits. Where the server runs on this host (embedded servers), the utime+stime ticks of every
client backend, grouped by database, measure real CPU. Backends that start and end between two
rounds are missed, so the figure is a lower bound; the label says so.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from engine.collect.collectors.base import Collector, register
from engine.observe.metrics import Reading
from engine.observe.models import CatalogShard
from engine.servers.connect import ServerHandle

PIDS = """
SELECT datname, pid FROM pg_stat_activity
WHERE backend_type = 'client backend' AND datname = ANY(%s) AND pid <> pg_backend_pid()
  AND application_name IS DISTINCT FROM 'shardctl-inventory'
"""


def _ticks(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return float(fields[11]) + float(fields[12])  # utime, stime (fields 14 and 15 of stat)


@register
class ProcCollector(Collector):
    name = "proc"

    def applies_to(self, server: ServerHandle) -> bool:
        return server.embedded is not None and Path("/proc/self/stat").exists()

    def collect(self, server: ServerHandle, conn: psycopg.Connection, shards: list[CatalogShard],
                readings: dict[str, Reading], full: bool) -> dict[str, Reading]:
        by_db = {s.dbname: s for s in shards}
        ticks: dict[str, dict[str, float]] = {n: {} for n in by_db}
        for datname, pid in conn.execute(PIDS, (sorted(by_db),)):
            t = _ticks(pid)
            if t is not None:
                ticks[datname][str(pid)] = t
        out = dict(readings)
        for dbname, shard in by_db.items():
            reading = out.get(shard.address)
            if reading is None:
                continue
            out[shard.address] = reading.model_copy(update={
                "per_pid_ticks": ticks[dbname], "notes": {**reading.notes, "proc": "1"}})
        return out
