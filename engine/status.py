"""`shardctl status`: what runs where, read from the servers and the catalog. Read-only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC
from typing import Any

from rich.console import Console
from rich.table import Table

from engine import backups
from engine.catalog import control, journal, store
from engine.collect import history
from engine.collect.observer import inspect_servers, observe
from engine.config.loader import Desired
from engine.detect.forecast import shard_outlook
from engine.durations import span
from engine.observe import replication
from engine.observe.metrics import METRICS, UNITS, Reading, Sample
from engine.observe.recorded import Recording
from engine.observe.replica_links import broken_text, replica_links
from engine.observe.series import as_series
from engine.plan import rightsizing
from engine.plan.checks import metric_gaps
from engine.plan.forecast import lineages
from engine.plan.load_rules import assessments
from engine.plan.models import MOVE_KINDS
from engine.servers.fleet import Fleet

SPARKS = "▁▂▃▄▅▆▇█"
# The q/s history column is this many characters at most, however long the history: each
# character stands for an equal share of the window (its busiest sample, so that a spike stays
# visible). Unbounded, hours of history squeezed every other column to nothing.
SPARK_WIDTH = 12
# Past this many shards a database's table lists only the shards worth a look (not normal,
# or among the BUSIEST by q/s) and counts the others, without the database column (the shard's
# range names it): `status --json` lists every shard.
COMPACT_AFTER = 64
BUSIEST = 10


def sparkline(values: Sequence[float | None], width: int = SPARK_WIDTH) -> str:
    if len(values) > width:
        buckets = [values[len(values) * i // width:len(values) * (i + 1) // width] for i in range(width)]
        values = [max((v for v in b if v is not None), default=None) for b in buckets]
    known = [v for v in values if v is not None]
    top = max(known, default=0.0)
    if top <= 0:
        return "".join("▁" if v is not None else "·" for v in values)
    return "".join("·" if v is None else SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5))]
                   for v in values)


def _cell(value: float | None) -> str:
    return "?" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")


def state_line(pairs: dict[str, tuple[Reading, Sample]]) -> str:
    """One line per recorded round: how many shards, and the busiest."""
    if not pairs:
        return "no shards to sample (no active shards on reachable servers)"
    busiest = max(pairs.values(), key=lambda p: p[1].value("queries_per_second") or -1.0)[1]
    qps = busiest.value("queries_per_second")
    return (f"{len(pairs)} shards sampled; busiest {busiest.shard} at "
            + ("unknown query rate" if qps is None else f"{qps:,.1f} queries/s"))


def collect(desired: Desired, metrics_file: str | Recording | None = None) -> dict[str, Any]:
    fleet = Fleet(desired)
    stopped = {name for name, handle in fleet.servers.items()
               if handle.embedded is not None and not handle.embedded.running_pid()}
    inventory = inspect_servers(fleet, sorted(set(fleet.servers) - stopped))  # at once, each within a deadline
    servers = _server_rows(desired, fleet, stopped, inventory)
    # servers the YAML no longer declares: named, never managed (`down` stops an embedded one)
    undeclared = [dict(name=e.name, kind="embedded", state="running" if e.running_pid() else "stopped",
                       where=str(e.root)) for e in fleet.undeclared_embedded()]
    report: dict[str, Any] = {"servers": servers, "catalog": None, "databases": [], "interrupted": [],
                              "undeclared_servers": undeclared}
    catalog_handle = fleet.servers.get(desired.catalog_server or "")
    # what shardctl.route() and engine.client.ShardClient connect to; describe() never shows a password
    catalog_connection = catalog_handle.describe(desired.catalog_database) if catalog_handle else None
    catalog_state = next(s for s in servers if s["name"] == desired.catalog_server)["state"]
    if catalog_state != "running":
        report["catalog"] = {"server": desired.catalog_server, "state": f"server {catalog_state}",
                             "connection": catalog_connection}
        return report
    with fleet.catalog(create=False) as conn:
        if conn is None:
            report["catalog"] = {"server": desired.catalog_server, "state": "not created yet (run shardctl apply)",
                                 "connection": catalog_connection}
            return report
        _from_the_catalog(report, desired, fleet, conn, inventory, metrics_file, catalog_connection)
    return report


def _server_rows(desired: Desired, fleet: Fleet, stopped: set[str], inventory) -> list[dict[str, Any]]:
    servers: list[dict[str, Any]] = []
    for name, handle in sorted(fleet.servers.items()):
        embedded = handle.embedded
        if name in stopped:
            servers.append(dict(name=name, kind="embedded", state="stopped", version=None,
                                connection=handle.describe()))
            continue
        live = inventory[name]
        servers.append(dict(name=name, kind="embedded" if embedded else "external",
                            state="running" if live.reachable else f"unreachable: {live.error}",
                            version=live.version, connection=handle.describe(),
                            unknown_metrics=metric_gaps(name, desired.servers[name], live) if live.reachable else {}))
    return servers


def _from_the_catalog(report: dict[str, Any], desired: Desired, fleet: Fleet, conn, inventory,
                      metrics_file: str | Recording | None, catalog_connection: str | None) -> None:
    """What the catalog (and the observation made through it) adds to REPORT, in place."""
    state = store.read(conn)
    known = {u["name"] for u in report["undeclared_servers"]}
    report["undeclared_servers"] += [
        dict(name=name, kind=kind, state="recorded by the catalog", where=connection)
        for name, kind, connection in conn.execute("SELECT name, kind, connection FROM shardctl.servers ORDER BY name")
        if name not in fleet.servers and name not in known]
    observation = history.with_metrics(desired, fleet, conn, observe(fleet, conn, inspect_schemas=False),
                                       metrics_file)
    report["metrics_source"] = observation.metrics_source
    report["advice"] = [{"server": a.server, "moves": [m.model_dump() for m in a.moves], "blocked": a.blocked,
                         "text": a.describe()} for a in rightsizing.fleet_advice(desired, observation)]
    report["catalog"] = {
        "server": desired.catalog_server,
        "database": desired.catalog_database,
        "state": "ok",
        "serial": state.serial,
        "epoch": state.epoch,
        "connection": catalog_connection,
        "schema_version": state.schema_version,
    }
    report["databases"] += _database_rows(desired, state, observation)
    report["replicas"] = [dict(branch=r.branch, parent=r.parent, server=r.server,
                               max_lag_bytes=r.max_lag_bytes, missing=list(r.missing),
                               broken=[link.shard for link in r.broken],
                               links=[link.model_dump() for link in r.links])
                          for r in replica_links(state, inventory)]
    report["orphans"] = [orphan_row(o) for o in replication.orphans(state, inventory)]
    _operations(report, conn, state, inventory)
    report["backups"] = [dict(vars(b), age_seconds=None if b.last_backup_at is None else
                              round((observation.now() - b.last_backup_at).total_seconds()))
                         for b in backups.states(desired, fleet, conn)]
    if state.schema_version >= 4:
        report["automation"] = _automation(conn)


def _database_rows(desired: Desired, state, observation) -> list[dict[str, Any]]:
    verdicts = assessments(desired, observation)
    families = lineages(observation)
    return [dict(name=db.name, shard_key=f"{db.key_column} ({db.key_type})", state=db.state, protect=db.protect,
                 policy=db.policy_name, schema_steps=[s.name for s in db.schema_steps],
                 shards=[dict(_shard_row(s, observation.metrics.get(s.address, ()), verdicts.get(s.address)),
                              outlook=outlook(desired, s, observation, families)) for s in db.shards])
            for db in state.databases.values()]


def _operations(report: dict[str, Any], conn, state, inventory) -> None:
    """Recent moves, and the operations interrupted or in progress with what each still holds."""
    # with the apply lock held elsewhere, running operations are that process's, not interrupted
    running, in_flight = journal.interrupted(conn), state.apply_in_flight
    for op in running:  # what each still holds on the servers that answered (a cleanup left it)
        op["objects"] = [dict(server=server, kind=o.kind, name=o.name, database=o.database,
                              retained_bytes=o.retained_bytes, text=replication.describe(o))
                         for server, o in replication.of_operation(inventory, op["id"])]
    report["recent_moves"] = recent_moves(conn)
    report["interrupted"] = [] if in_flight else running
    report["in_progress"] = [dict(op, by=in_flight) for op in running] if in_flight else []
    _backups_in_flight(report, conn)


def _automation(conn) -> dict[str, Any]:
    switch, leader = control.read_control(conn), control.read_leader(conn)
    return {
        "paused": switch.paused, "reason": switch.reason if switch.paused else "",
        "paused_by": switch.changed_by if switch.paused else None, "changed_by": switch.changed_by,
        "daemon": None if leader is None else {"who": leader.who, "listen": leader.listen,
                                               "heartbeat": leader.heartbeat},
    }


def _backups_in_flight(report: dict[str, Any], conn) -> None:
    """A `backups create` holds a lock of its own, not the apply lock: while another process holds
    it, its operation is in progress, not interrupted."""
    mine = [op for op in report["interrupted"] + report["in_progress"] if op["kind"] == backups.KIND]
    if not mine:
        return
    busy = backups.backup_in_flight(conn)
    report["interrupted"] = [op for op in report["interrupted"] if op["kind"] != backups.KIND]
    report["in_progress"] = [op for op in report["in_progress"] if op["kind"] != backups.KIND]
    for op in mine:
        if busy:
            report["in_progress"].append(dict(op, by="another `shardctl backups create`"))
        else:
            report["interrupted"].append({k: v for k, v in op.items() if k != "by"})


RECENT_MOVES = 5


def recent_moves(conn) -> list[dict[str, Any]]:
    """The last finished moves, newest first, with the pause their history records (fence to
    routing flip committed: the figure apply printed)."""
    rows = conn.execute("SELECT at, event, address, detail -> 'pause_ms' FROM shardctl.history WHERE event = ANY(%s)"
                        " ORDER BY id DESC LIMIT %s", (list(MOVE_KINDS), RECENT_MOVES)).fetchall()
    return [dict(at=at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"), event=event, address=address,
                 pause_ms=float(pause) if isinstance(pause, (int, float)) else None)
            for at, event, address, pause in rows]


def orphan_row(orphan: replication.Orphan) -> dict[str, Any]:
    o = orphan.object
    return dict(server=orphan.server, kind=o.kind, name=o.name, database=o.database, operation=orphan.operation,
                retained_bytes=o.retained_bytes, why=orphan.why, text=orphan.text)


def _shard_row(shard, window: Sequence[Sample], verdict) -> dict[str, Any]:
    if shard.state != "active":
        # a retired (or retiring) shard takes no traffic: its last samples are history, not its load
        window = ()
    latest = window[-1] if window else None
    notes = verdict_notes(verdict) if verdict else []
    return dict(
        name=shard.name, lo=shard.lo, hi=shard.hi, server=shard.server, dbname=shard.dbname, state=shard.state,
        load=(verdict.state if verdict else "unknown") if shard.state == "active" else shard.state,
        evidence=[e.describe() for e in verdict.evidence] if verdict else [],
        summary=([e.describe() for e in verdict.evidence] if verdict.state == "hot" else
                 [cold_summary(list(verdict.evidence))] if verdict.state == "cold" and verdict.evidence else [])
        if verdict and shard.state == "active" else [],
        near=[n["text"] for n in notes if n["kind"] == "near"],
        notes=notes,
        metrics={m: _metric(latest, m) for m in METRICS},
        observed_at=latest.at if latest else None,
        samples=len(window),
        query_rate_history=as_series(window).values("queries_per_second"),
    )


def outlook(desired: Desired, shard, observation, families: dict) -> list[str]:
    """What the forecast says of an active shard (engine.detect.forecast.shard_outlook)."""
    db = desired.databases.get(shard.database)
    if db is None or shard.state != "active":
        return []
    return shard_outlook(shard.address, observation.hourly.get(shard.address, ()), db.effective_policy,
                         observation.metrics_at or observation.now(), families.get(shard.address))[0]


def _metric(latest: Sample | None, metric: str) -> dict[str, Any] | None:
    value = latest.metrics.get(metric) if latest is not None else None
    return None if value is None else asdict(value)


def verdict_notes(verdict) -> list[dict[str, str]]:
    """The detector's remarks, each labelled by what it is: `near` (within the tolerance under a
    hot threshold), `rising` (over a threshold, not yet for the sustain), or the reason for a
    `stale` or `unknown` verdict."""
    notes = [{"kind": "rising" if " over the hot threshold " in line else "near", "text": line}
             for line in verdict.near]
    if verdict.why:
        notes.append({"kind": verdict.state, "text": verdict.why})
    return notes


NOTE_LABELS = {"near": "near", "rising": "over, not sustained yet", "stale": "stale", "unknown": "unknown"}


def cold_summary(evidence: list) -> str:
    """One line for a cold shard: every metric under its cold threshold (one line each was five
    lines per idle shard)."""
    first = evidence[0]
    parts = []
    for e in evidence:
        unit = UNITS.get(e.metric, "")
        parts.append(f"{e.metric} {_num(e.high)}{unit} < {_num(e.threshold)}{unit}")
    return (f"{first.shard}: under every cold threshold for {span(round((first.until - first.since).total_seconds()))}"
            f" (cold_for {span(first.window_seconds)}, {first.samples} samples): {', '.join(parts)};"
            f" thresholds from {', '.join(sorted({e.policy_location for e in evidence}))}")


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def render_status(report: dict[str, Any], colour: bool, width: int | None = None) -> None:
    import shutil
    import sys

    if width is None:
        width = shutil.get_terminal_size((160, 40)).columns if sys.stdout.isatty() else 160
    # no colour means no escape codes at all: rich's no_color still sends bold and italic
    console = Console(color_system="auto" if colour else None, highlight=False, width=width)
    _print_servers(console, report)
    for db in report["databases"]:
        _print_database(console, db)
    if report.get("metrics_source"):
        sources = sorted(
            {v["source"] for db in report["databases"] for s in db["shards"] for v in s["metrics"].values() if v}
        )
        console.print(f"Metrics: {report['metrics_source']}; ? = unknown (never counted as zero)")
        for source in sources:
            console.print(f"  source: {source}")
    _print_advice(console, report.get("advice") or [])
    _print_replicas(console, report.get("replicas") or [])
    _print_backups(console, report.get("backups") or [])
    _print_orphans(console, report.get("orphans") or [])
    _print_operations(console, report)
    _print_moves(console, report.get("recent_moves") or [])
    _print_automation(console, report.get("automation"))
    if not report["databases"] and report["catalog"].get("state") == "ok":
        console.print("No databases yet.")


def _print_replicas(console: Console, replicas: list[dict[str, Any]]) -> None:
    """Per replica branch: the bytes of each shard's WAL its link has not confirmed, the worst,
    and the links that are missing (the replica misses that shard's writes until it is reset)."""
    for r in replicas:
        worst = r["max_lag_bytes"]
        console.print(f"Replica {r['branch']} (of {r['parent']}, on {r['server']}): lag "
                      + (f"{worst:,} bytes at most" if worst is not None else "unknown"), markup=False)
        for link in r["links"]:
            what = {"ok": f"{link['lag_bytes']:,} bytes behind" if link["lag_bytes"] is not None else "lag unknown",
                    "missing": "LINK MISSING: its writes do not reach the replica; reset it"
                               f" (shardctl branches reset {r['branch']})",
                    "unknown": f"unknown (server {link['server']} did not answer)",
                    "broken": "LINK BROKEN: " + broken_text(r["branch"], r["server"], link["shard"], link["server"],
                                                             link["error"])}[link["state"]]
            console.print(f"  {link['shard']}: {what}", markup=False)


def _print_backups(console: Console, rows: list[dict[str, Any]]) -> None:
    """Per backed-up server: the age of its newest base backup (against backups.every) and how far
    its WAL has reached the backups."""
    for b in rows:
        age = b["age_seconds"]
        backup = ("no base backup yet (`shardctl backups create`)" if age is None else
                  f"last base backup {span(max(age, 0))} ago"
                  + (f" (OVERDUE: backups.every is {span(b['every_seconds'])})" if age > b["every_seconds"] else ""))
        if b["streaming"] is None:
            wal = "WAL streaming unknown (the server did not answer)"
        elif b["streaming"]:
            wal = f"WAL streaming, {b['wal_lag_bytes']:,} bytes behind" if b["wal_lag_bytes"] is not None \
                else "WAL streaming"
        else:
            wal = "WAL NOT STREAMING" + (f" ({b['wal_lag_bytes']:,} bytes not received)" if b["wal_lag_bytes"]
                                         else "") + ": the watch daemon keeps it running"
        point = f"; newest restore point {b['last_point']}" if b["last_point"] else ""
        console.print(f"Backups of {b['server']}: {backup}; {wal}{point}", markup=False)


def _print_orphans(console: Console, orphans: list[dict[str, Any]]) -> None:
    """Replication objects of shardctl's naming that no running operation owns."""
    if not orphans:
        return
    console.print(f"Leftover replication: {len(orphans)} object{'s' if len(orphans) != 1 else ''} of shardctl's that no"
                  " running operation owns (a slot keeps its server's WAL); `shardctl orphans --remove` drops them:",
                  markup=False)
    for orphan in orphans:
        console.print(f"  {orphan['text']}", markup=False)


def _print_servers(console: Console, report: dict[str, Any]) -> None:
    servers = Table(title="Servers", title_justify="left")
    for col in ("server", "kind", "state", "version", "connection"):
        servers.add_column(col)
    for s in report["servers"]:
        servers.add_row(s["name"], s["kind"], s["state"], s["version"] or "-", s["connection"])
    console.print(servers)
    for s in report["servers"]:
        for metric, why in sorted((s.get("unknown_metrics") or {}).items()):
            console.print(f"  server {s['name']}: {metric} is unknown (?) for its shards: {why}", markup=False)
    for u in report.get("undeclared_servers") or []:
        console.print(f"  server {u['name']}: no longer declared in the configuration ({u['kind']}, {u['state']}):"
                      " shardctl no longer manages it" + ("; `shardctl down` stops it" if u["state"] == "running"
                                                          else ""), markup=False)
    cat = report["catalog"]
    console.print(
        f"Catalog: server {cat['server']}, {cat['state']}"
        + (f", serial {cat['serial']}, routing epoch {cat['epoch']}" if cat.get("serial") is not None else "")
    )
    if cat.get("connection"):
        # for shardctl.route() and engine.client.ShardClient; the password, if any, comes from the environment
        console.print(f"  connection: {cat['connection']}", markup=False)


LOAD_STYLES = {"hot": "bold red", "cold": "cyan", "unknown": "dim", "stale": "yellow"}


def _print_database(console: Console, db: dict[str, Any]) -> None:
    active = sum(1 for s in db["shards"] if s["state"] == "active")
    others = len(db["shards"]) - active  # retired copies and shards of an unfinished move
    table = Table(
        title=f"Database {db['name']}: key {db['shard_key']}, {active} shards"
        f"{f' (+{others} retired or moving)' if others else ''}, "
        f"policy {db['policy']}{', protected' if db['protect'] else ''}, {db['state']}",
        title_justify="left",
    )
    listed, hidden = _listed(db["shards"])
    for col in (
        "shard",
        "server",
        *(("database",) if not hidden else ()),
        "load",
        "q/s",
        "cpu %",
        "mem %",
        "disk %",
        "conns",
        "latency ms",
        "q/s history",
    ):
        table.add_column(
            col, justify="right" if col not in ("shard", "server", "database", "load") else "left", no_wrap=True
        )
    for s in listed:
        table.add_row(*_shard_cells(db["name"], s, with_database=not hidden))
    console.print(table)
    if hidden:
        rates = [r for s in hidden if (r := (s["metrics"].get("queries_per_second") or {}).get("value")) is not None]
        console.print(f"  {len(hidden)} more shards of {db['name']} in normal load not listed"
                      + (f" (q/s {_cell(min(rates))} to {_cell(max(rates))})" if rates else "")
                      + ": `shardctl status --json` lists every shard", markup=False)
    for s in db["shards"]:
        _print_shard_lines(console, db["name"], s)


def _shard_cells(database: str, s: dict[str, Any], with_database: bool) -> list[str]:
    """One shard's row of its database's table."""
    latest = {
        m: _cell(v["value"] if v else None) if s["state"] == "active" else "-" for m, v in s["metrics"].items()
    }  # a retired shard has no live load
    load = s["load"] if s["state"] == "active" else s["state"]
    style = LOAD_STYLES.get(load, "")
    return [
        f"{database}/{s['name']}",
        s["server"],
        *((s["dbname"],) if with_database else ()),
        f"[{style}]{load}[/]" if style else load,
        latest["queries_per_second"],
        latest["cpu_percent"],
        latest["memory_percent"],
        latest["storage_percent"],
        latest["connections"],
        latest["latency_ms"],
        sparkline(s["query_rate_history"]),
    ]


def _print_shard_lines(console: Console, database: str, s: dict[str, Any]) -> None:
    """What is said of one shard under the table: why it is hot or cold, notes, its forecast."""
    for line in s["summary"]:
        console.print(f"  {'HOT' if s['load'] == 'hot' else 'COLD'} {line}")
    for note in s["notes"]:
        console.print(f"  {NOTE_LABELS[note['kind']]}: {database}/{s['name']}: {note['text']}")
    for line in s.get("outlook", []):
        console.print(f"  FORECAST {database}/{s['name']}: {line}")


def _listed(shards: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The shards a database's table lists, and those it only counts (COMPACT_AFTER): every shard
    of a small database; of a large one, those not active in normal load and the BUSIEST."""
    if len(shards) <= COMPACT_AFTER:
        return shards, []

    def rate(s: dict[str, Any]) -> float:
        value = (s["metrics"].get("queries_per_second") or {}).get("value")
        return -1.0 if value is None else value

    busiest = {id(s) for s in sorted(shards, key=rate, reverse=True)[:BUSIEST] if rate(s) >= 0}
    keep = {id(s) for s in shards if s["state"] != "active" or s["load"] != "normal"} | busiest
    return [s for s in shards if id(s) in keep], [s for s in shards if id(s) not in keep]


def _print_advice(console: Console, advice: list[dict[str, Any]]) -> None:
    """Right-sizing: servers that stay far under their capacity; advice, never an action."""
    if not advice:
        return
    console.print("Right-sizing advice (nothing is applied by itself):")
    for item in advice:
        console.print(f"  {item['text']}", markup=False)


def _print_operations(console: Console, report: dict[str, Any]) -> None:
    for op in report.get("in_progress", []):
        console.print(f"In progress: operation {op['id']} {op['kind']} {op['address']} at step {op['last_step']!r},"
                      f" run by {op['by']}")
        if (op.get("progress") or {}).get("text"):
            console.print(f"  {op['progress']['text']}")
    for op in report["interrupted"]:
        hint = "run `shardctl apply` to finish it"
        if op["kind"] in ("split_shard", "merge_shards", "move_shard"):
            hint = (
                "past its cutover: the new shards own the range; run `shardctl apply` to finish its cleanup"
                if op.get("past_cutover")
                else hint + f", or `shardctl abort {op['id']}` to roll it back (the source still owns the range)"
            )
        elif op["kind"] in ("create_branch", "reset_branch"):
            hint += f" (the branch is rebuilt), or `shardctl abort {op['id']}` to drop the half-built copy"
        elif op["kind"] == backups.KIND:
            hint = "run `shardctl backups create` to finish it (servers already backed up are not backed up again)"
        console.print(
            f"Interrupted: operation {op['id']} {op['kind']} {op['address']} at step {op['last_step']!r}; {hint}"
        )
        if op.get("error"):
            console.print(f"  it stopped on: {op['error']}", markup=False)
        for o in op.get("objects") or []:
            console.print(f"  still held: {o['kind']} {o['name']} on server {o['server']} (database {o['database']}):"
                          f" {o['text']}", markup=False)


def _print_moves(console: Console, moves: list[dict[str, Any]]) -> None:
    for m in moves:
        pause = (f"writes to the range paused {m['pause_ms']:.1f} ms" if m["pause_ms"] is not None
                 else "pause not recorded")
        console.print(f"Moved: {m['event'].replace('_', ' ')} {m['address']} at {m['at']}: {pause}", markup=False)


def _print_automation(console: Console, automation: dict[str, Any] | None) -> None:
    if not automation:
        return
    daemon = automation["daemon"]
    console.print(
        (
            "Automation: PAUSED by "
            + automation["changed_by"]
            + (f" ({automation['reason']})" if automation["reason"] else "")
            + "; `shardctl resume` lifts it"
        )
        if automation["paused"]
        else "Automation: on (`shardctl pause` stops it)"
    )
    if daemon:
        console.print(
            f"Watch daemon: last leader {daemon['who']}"
            + (f" at http://{daemon['listen']}/" if daemon["listen"] else "")
            + f", heartbeat {daemon['heartbeat']:%Y-%m-%d %H:%M:%S %Z}"
        )
