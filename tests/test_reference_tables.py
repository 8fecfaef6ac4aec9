"""Reference tables on real servers, the way a user meets them: `countries` declared in
`reference_tables:`, written through the reference source (ShardClient.reference) while another
writer changes sharded rows, and carried through a split: every shard's copy, the new ones
included, is the source's, and the sharded rows are exact."""

import random
import threading
import time
from dataclasses import dataclass, field

import psycopg
import pytest

from engine.client import ShardClient
from engine.servers.embedded import EmbeddedServer
from movers import Writer, active_shards, all_rows, hot_file, preload

COUNTRIES = "CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);\n"


def _declare(fleet) -> None:
    fleet.write("schema/002_countries.sql", COUNTRIES)
    text = fleet.read("fleet.yaml")
    text = text.replace("schema: schema/001_init.sql", "schema: [schema/001_init.sql, schema/002_countries.sql]\n"
                        "    reference_tables: [countries]")
    fleet.write("fleet.yaml", text)


def _catalog_params(fleet):
    return EmbeddedServer("a", fleet.path / ".shardctl" / "servers" / "a").conninfo("shardctl")


def _countries(fleet, server: str, dbname: str) -> list[tuple]:
    with fleet.connect(server, dbname) as conn:
        return conn.execute("SELECT code, name FROM countries ORDER BY code").fetchall()


def _copies_match_the_source(fleet, shards, timeout: float = 60.0) -> list[tuple]:
    """Waits until every shard's copy equals the source's (replication is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        source = _countries(fleet, "a", "orders_reference")
        differing = [s[0] for s in shards if _countries(fleet, s[3], s[4]) != source]
        if not differing:
            return source
        assert time.monotonic() < deadline, f"copies of countries still differ from the source on {differing}"
        time.sleep(0.1)


@dataclass
class ReferenceWriter:
    """Inserts, renames and deletes countries through the reference source every few ms."""

    catalog: dict
    writes: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        rng = random.Random(11)
        codes: list[str] = []
        with ShardClient(self.catalog, "orders") as client:
            while not self._stop.is_set():
                roll = rng.random()
                try:
                    if roll < 0.5 or len(codes) < 10:
                        code = f"c{self.writes}"
                        client.reference(lambda c, code=code: c.execute(
                            "INSERT INTO countries VALUES (%s, %s)", (code, code)))
                        codes.append(code)
                    elif roll < 0.8:
                        code = rng.choice(codes)
                        client.reference(lambda c, code=code: c.execute(
                            "UPDATE countries SET name = name || '+' WHERE code = %s", (code,)))
                    else:
                        code = codes.pop(rng.randrange(len(codes)))
                        client.reference(lambda c, code=code: c.execute(
                            "DELETE FROM countries WHERE code = %s", (code,)))
                    self.writes += 1
                except psycopg.Error as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                time.sleep(0.003)


def test_a_reference_table_stays_identical_on_every_shard_through_a_split_under_writers(fleet):
    _declare(fleet)
    applied = fleet.cli("apply", "--auto-approve")
    assert applied.code == 0, applied.both
    assert "orders_reference" in fleet.databases("a")
    shards = active_shards(fleet)
    with ShardClient(_catalog_params(fleet), "orders") as client:
        client.reference(lambda c: c.execute("INSERT INTO countries VALUES ('fr', 'France'), ('jp', 'Japan')"))
    assert _copies_match_the_source(fleet, shards) == [("fr", "France"), ("jp", "Japan")]

    # every copy is the source's: a write on a shard is refused, as is a sharded row in the source
    name, lo, hi, server, dbname = shards[0]
    with fleet.connect(server, dbname) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="public.countries is a reference table:"
                           " write it in orders_reference on server a"):
            conn.execute("INSERT INTO countries VALUES ('de', 'Germany')")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="reference table"):
            conn.execute("TRUNCATE countries")
    with fleet.connect("a", "orders_reference") as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="public.customers is sharded"):
            conn.execute("INSERT INTO customers (customer_id, name) VALUES (1, 'x')")
    assert fleet.cli("plan", "--detailed-exitcode").code == 0  # the fleet matches: nothing pending

    # a split under a writer of sharded rows and a writer of the reference table
    preload(fleet)
    hot_file(fleet.base / "hot.json")
    before, problems = all_rows(fleet)
    assert not problems
    writer = Writer(_catalog_params(fleet), start_id=max(before) + 1_000_000)
    countries = ReferenceWriter(_catalog_params(fleet))
    writer.start(before)
    countries.start()
    try:
        result = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json")
    finally:
        time.sleep(0.5)  # writes continue after the cutover
        writer.stop()
        countries.stop()
    assert result.code == 0, result.both
    assert "Split complete" in result.out
    assert writer.errors == [] and countries.errors == [], (writer.errors, countries.errors)
    assert writer.writes > 100 and countries.writes > 100
    rows, problems = all_rows(fleet)
    assert problems == []
    assert rows == writer.expected  # sharded rows: 0 lost, 0 duplicated, 0 misplaced
    shards = active_shards(fleet)
    assert [s[0] for s in shards] == ["-40", "40-60", "60-80", "80-c0", "c0-"]
    copy = _copies_match_the_source(fleet, shards)
    assert len(copy) >= 10
    # the new shards' copies are guarded too, and the move left only the reference links behind
    with fleet.connect(shards[1][3], shards[1][4]) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="reference table"):
            conn.execute("DELETE FROM countries")
    with fleet.connect("a") as conn:
        slots = {r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots")}
    assert all(s.startswith("shardctl_ref_") for s in slots) and len(slots) == 6  # 5 active + the retired source
    with fleet.connect("b") as conn:
        assert conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall() == []
