"""Reference tables on real servers, the way a user meets them: `countries` declared in
`reference_tables:`, written through the reference source (ShardClient.reference) while another
writer changes sharded rows, and carried through a split: every shard's copy, the new ones
included, is the source's, and the sharded rows are exact."""

import json
import random
import re
import threading
import time
from dataclasses import dataclass, field

import psycopg
import pytest

from engine.actions.reference import link_name
from engine.catalog.journal import FAILPOINT_ENV
from engine.client import ShardClient
from engine.plan.models import ShardSpec
from engine.servers.embedded import EmbeddedServer
from movers import Writer, active_shards, all_rows, floor_below_shards, hot_file, preload

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
    server, dbname = shards[0][3:]
    with fleet.connect(server, dbname) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match=re.escape(
                "public.countries is a reference table: write it in orders_reference on server a")):
            conn.execute("INSERT INTO countries VALUES ('de', 'Germany')")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="reference table"):
            conn.execute("TRUNCATE countries")
    with fleet.connect("a", "orders_reference") as conn, \
            pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match=re.escape("public.customers is sharded")):
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
        if result.code == 0:  # (else the assertion below says why)
            writer.goes_on()  # writes continue after the cutover
    finally:
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
    with fleet.connect(shards[1][3], shards[1][4]) as conn, \
            pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="reference table"):
        conn.execute("DELETE FROM countries")
    with fleet.connect("a") as conn:
        slots = {r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots")}
    assert all(s.startswith("shardctl_ref_") for s in slots) and len(slots) == 6  # 5 active + the retired source
    with fleet.connect("b") as conn:
        assert conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall() == []


BRANCHES = """
branches:
  mirror:
    from: orders
    data: replica
    server: b
  dev:
    from: orders
    data: full
    server: b
"""


def _replica_matches_the_source(fleet, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _countries(fleet, "b", "branch_mirror") != _countries(fleet, "a", "orders_reference"):
        assert time.monotonic() < deadline, "the replica's countries differ from the source's"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_reference_table_through_a_schema_step_branches_a_merge_a_drop_and_moves(fleet):
    _declare(fleet)
    assert fleet.cli("apply", "--auto-approve").code == 0
    catalog = _catalog_params(fleet)
    with ShardClient(catalog, "orders") as client:
        client.reference(lambda c: c.execute("INSERT INTO countries VALUES ('fr', 'France'), ('jp', 'Japan')"))
    # a schema step that changes the reference table reaches the source and every copy
    fleet.write("schema/003_region.sql", "ALTER TABLE countries ADD COLUMN region text;\n")
    text = fleet.read("fleet.yaml").replace("schema/002_countries.sql]", "schema/002_countries.sql,"
                                            " schema/003_region.sql]")
    fleet.write("fleet.yaml", text)
    assert fleet.cli("apply", "--auto-approve").code == 0
    with ShardClient(catalog, "orders") as client:
        client.reference(lambda c: c.execute("INSERT INTO countries VALUES ('br', 'Brazil', 'americas')"))
    _copies_match_the_source(fleet, active_shards(fleet))
    for _name, _lo, _hi, server, dbname in active_shards(fleet):
        with fleet.connect(server, dbname) as conn:
            assert conn.execute("SELECT region FROM countries WHERE code = 'br'").fetchone() == ("americas",)

    # a replica follows the source for the reference table; a full branch copies it once, its own to write
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + BRANCHES)
    made = fleet.cli("apply", "--auto-approve")
    assert made.code == 0, made.both
    _replica_matches_the_source(fleet)
    assert _countries(fleet, "b", "branch_dev") == _countries(fleet, "a", "orders_reference")
    with fleet.connect("b", "branch_dev") as conn:
        conn.execute("INSERT INTO countries VALUES ('it', 'Italy', 'europe')")

    # a merge by hand while the reference table is written (`shards: 2` keeps it)
    floor_below_shards(fleet, 2)
    countries = ReferenceWriter(catalog)
    countries.start()
    try:
        merged = fleet.cli("apply", "--auto-approve", "-merge", "orders/-40,40-80")
    finally:
        countries.stop()
    assert merged.code == 0, merged.both
    assert "Merge complete" in merged.out and countries.errors == [] and countries.writes > 20
    shards = active_shards(fleet)
    assert [s[0] for s in shards] == ["-80", "80-c0", "c0-"]
    assert len(_copies_match_the_source(fleet, shards)) > 10
    with ShardClient(catalog, "orders") as client:
        client.reference(lambda c: c.execute("UPDATE countries SET name = 'République française' WHERE code = 'fr'"))
    _copies_match_the_source(fleet, shards)
    _replica_matches_the_source(fleet)

    # the retired shards dropped: their links to the source go with them
    fleet.write("fleet.yaml", fleet.read("fleet.yaml") + "policies:\n  default:\n    autosplit: {retire_after: 0s}\n")
    dropped = fleet.cli("apply", "--auto-approve")
    assert dropped.code == 0 and "orders_min_40" not in fleet.databases("a"), dropped.both
    assert _reference_slots(fleet) == _links_of(shards)
    assert fleet.cli("plan", "--detailed-exitcode").code == 0

    # shards moved to another server (placement changed) get their copy before they take over
    fleet.write("fleet.yaml", fleet.read("fleet.yaml").replace("placement: [a, b]", "placement: [b]"))
    moved = fleet.cli("apply", "--auto-approve")
    assert moved.code == 0, moved.both
    shards = active_shards(fleet)
    assert {s[3] for s in shards} == {"b"}
    with ShardClient(catalog, "orders") as client:
        client.reference(lambda c: c.execute("DELETE FROM countries WHERE code = 'jp'"))
    assert ("jp", "Japan", None) not in _copies_match_the_source(fleet, shards)


@pytest.mark.slow
def test_a_reference_table_declared_later_is_copied_everywhere_and_one_dropped_leaves_nothing(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    _declare(fleet)
    plan = fleet.cli("plan")
    assert "~ reference_tables" in plan.out and "002_countries" in plan.out, plan.out
    assert fleet.cli("apply", "--auto-approve").code == 0
    with ShardClient(_catalog_params(fleet), "orders") as client:
        client.reference(lambda c: c.execute("INSERT INTO countries VALUES ('fr', 'France')"))
    assert _copies_match_the_source(fleet, active_shards(fleet)) == [("fr", "France")]
    assert fleet.cli("plan", "--detailed-exitcode").code == 0

    # dropped by a schema step and no longer declared: the source and every link go
    fleet.write("schema/003_drop.sql", "DROP TABLE countries;\n")
    text = fleet.read("fleet.yaml").replace("schema/002_countries.sql]", "schema/002_countries.sql,"
                                            " schema/003_drop.sql]")
    fleet.write("fleet.yaml", re.sub(r"\n    reference_tables: \[countries\][^\n]*", "", text))
    dropped = fleet.cli("apply", "--auto-approve")
    assert dropped.code == 0, dropped.both
    assert "orders_reference" not in fleet.databases("a")
    for server in ("a", "b"):
        with fleet.connect(server) as conn:
            assert conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall() == []
            assert conn.execute("SELECT subname FROM pg_subscription").fetchall() == []
    assert fleet.cli("plan", "--detailed-exitcode").code == 0


def _reference_slots(fleet) -> list[str]:
    with fleet.connect("a") as conn:
        return sorted(r[0] for r in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'shardctl_ref_%%'"))


def _links_of(shards) -> list[str]:
    return sorted(link_name(ShardSpec(name=s[0], lo=s[1], hi=s[2], server=s[3], dbname=s[4])) for s in shards)


@pytest.mark.slow
def test_a_split_killed_after_its_targets_got_their_copy_aborts_without_leaving_their_links(fleet):
    _declare(fleet)
    assert fleet.cli("apply", "--auto-approve").code == 0
    with ShardClient(_catalog_params(fleet), "orders") as client:
        client.reference(lambda c: c.execute("INSERT INTO countries VALUES ('fr', 'France')"))
    preload(fleet, customers=2000)
    hot_file(fleet.base / "hot.json")
    before = active_shards(fleet)
    killed = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json",
                       env={FAILPOINT_ENV: "split orders/40-80: publish"})
    assert killed.code == -9, killed.both
    assert len(_reference_slots(fleet)) == 6  # the 4 shards' and the 2 targets'
    (op,) = json.loads(fleet.cli("status", "--json").out)["interrupted"]
    aborted = fleet.cli("abort", str(op["id"]))
    assert aborted.code == 0, aborted.both
    assert _reference_slots(fleet) == _links_of(before)
    # killed at the same point again, the rerun resumes and finishes with every copy the source's
    assert fleet.cli("apply", "--auto-approve", "--metrics", "hot.json",
                     env={FAILPOINT_ENV: "split orders/40-80: publish"}).code == -9
    resumed = fleet.cli("apply", "--auto-approve", "--metrics", "hot.json")
    assert resumed.code == 0 and "Split complete" in resumed.out, resumed.both
    shards = active_shards(fleet)
    assert _copies_match_the_source(fleet, shards) == [("fr", "France")]
    assert set(_links_of(shards)) <= set(_reference_slots(fleet))
