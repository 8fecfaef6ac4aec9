"""`shardctl status`: what runs where, read from the servers and the catalog. Read-only."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from engine.catalog import journal, store
from engine.config.loader import Desired
from engine.errors import UserError
from engine.observe.observer import _server
from engine.servers.fleet import Fleet


def collect(desired: Desired) -> dict[str, Any]:
    fleet = Fleet(desired)
    servers = []
    for name, handle in sorted(fleet.servers.items()):
        embedded = handle.embedded
        if embedded is not None and not embedded.running_pid():
            servers.append(dict(name=name, kind="embedded", state="stopped", version=None,
                                connection=handle.describe()))
            continue
        live = _server(fleet, name)
        servers.append(dict(name=name, kind="embedded" if embedded else "external",
                            state="running" if live.reachable else f"unreachable: {live.error}",
                            version=live.version, connection=handle.describe()))
    report: dict[str, Any] = {"servers": servers, "catalog": None, "databases": [], "interrupted": []}
    catalog_state = next(s for s in servers if s["name"] == desired.catalog_server)["state"]
    if catalog_state != "running":
        report["catalog"] = {"server": desired.catalog_server, "state": f"server {catalog_state}"}
        return report
    with fleet.catalog(create=False) as conn:
        if conn is None:
            report["catalog"] = {"server": desired.catalog_server, "state": "not created yet (run shardctl apply)"}
            return report
        state = store.read(conn)
        report["catalog"] = {"server": desired.catalog_server, "database": desired.catalog_database,
                             "state": "ok", "serial": state.serial, "epoch": state.epoch,
                             "schema_version": state.schema_version}
        for db in state.databases.values():
            report["databases"].append(dict(
                name=db.name, shard_key=f"{db.key_column} ({db.key_type})", state=db.state, protect=db.protect,
                policy=db.policy_name, schema_steps=[s.name for s in db.schema_steps],
                shards=[dict(name=s.name, lo=s.lo, hi=s.hi, server=s.server, dbname=s.dbname, state=s.state)
                        for s in db.shards],
            ))
        report["interrupted"] = journal.interrupted(conn)
    return report


def render_status(report: dict[str, Any], colour: bool) -> None:
    console = Console(no_color=not colour, highlight=False, soft_wrap=True)
    servers = Table(title="Servers", title_justify="left")
    for col in ("server", "kind", "state", "version", "connection"):
        servers.add_column(col)
    for s in report["servers"]:
        servers.add_row(s["name"], s["kind"], s["state"], s["version"] or "-", s["connection"])
    console.print(servers)
    cat = report["catalog"]
    console.print(f"Catalog: server {cat['server']}, {cat['state']}"
                  + (f", serial {cat['serial']}, routing epoch {cat['epoch']}" if cat.get("serial") is not None else ""))
    for db in report["databases"]:
        table = Table(title=f"Database {db['name']}: key {db['shard_key']}, {len(db['shards'])} shards, "
                            f"policy {db['policy']}{', protected' if db['protect'] else ''}, {db['state']}",
                      title_justify="left")
        for col in ("shard", "server", "database", "state"):
            table.add_column(col)
        for s in db["shards"]:
            table.add_row(f"{db['name']}/{s['name']}", s["server"], s["dbname"], s["state"])
        console.print(table)
    for op in report["interrupted"]:
        console.print(f"Interrupted: operation {op['id']} {op['kind']} {op['address']} at step {op['last_step']!r};"
                      " run `shardctl apply` to finish it")
    if not report["databases"] and cat.get("state") == "ok":
        console.print("No databases yet.")
