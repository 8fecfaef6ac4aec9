"""Which config directory a catalog belongs to, and the catalog's record of how to reach each
server, kept true at every run.

The catalog's `servers` table is what applications and `shardctl.route()` readers use to reach
the shards (engine/client.py). It is refreshed from the YAML and the embedded servers' actual
sockets whenever a command opens the catalog, not only by an apply that changes something: a
server's socket directory can change (a private one claimed anew, a directory moved).

A catalog that lives in an embedded server under the config directory's .shardctl/ belongs to
that directory; it records which (`shardctl.meta` key `directory`, beside the fleet identity of
V10_OWNERSHIP). Opened from another directory:
- the recorded one is gone: the directory was MOVED. The catalog is adopted on the spot, said on
  standard error: the record and the server connections follow, the subscriptions of its
  servers are pointed at their new sockets, and the fleet keeps its identity (plans made before
  the move still apply).
- the recorded one still exists: it was COPIED. Refused, with the way forward, until `shardctl
  adopt` makes the copy a fleet of its own: a new fleet identity (a plan of the original is
  refused by the copy and the reverse), the connections and subscriptions pointed at the copy's
  own servers, so that nothing of the copy (a ShardClient, a replica's link, a move) reaches the
  original fleet.
A catalog on a server that is not embedded belongs to no directory (two checkouts of one
repository share it): only its connections are refreshed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from engine.catalog import schema, store
from engine.errors import UserError

DIRECTORY_KEY = "directory"


class CopiedCatalog(UserError):
    def __init__(self, recorded: str, here: Path):
        super().__init__(
            f"this directory's catalog belongs to {recorded}: the config directory was copied with its .shardctl/,"
            " and using it here could reach the original fleet",
            "to make this copy a fleet of its own (a new identity; its catalog, replication and clients pointed at"
            f" this directory's servers), run `shardctl adopt` in {here}; to work on the original fleet, run"
            f" shardctl from {recorded}")


def settle(fleet, conn: psycopg.Connection, adopt: bool = False) -> None:
    """At every opening of the catalog: check that it belongs here (module doc), then make its
    record of the servers' connections the YAML's and the sockets' of now."""
    if schema.installed_version(conn) < 1:
        return
    here = fleet.desired.directory.resolve()
    catalog_handle = fleet.catalog_server
    if catalog_handle.embedded is not None:
        row = conn.execute("SELECT value FROM shardctl.meta WHERE key = %s", (DIRECTORY_KEY,)).fetchone()
        recorded = row[0] if row else None
        if (recorded is not None and Path(recorded) != here) or (adopt and recorded is None):
            # a catalog of an older shardctl records no directory: `adopt` is asked for a copy
            where = Path(recorded) if recorded is not None else None
            copied = where is None or (where / ".shardctl" / "servers" / catalog_handle.name / "data"
                                       / "PG_VERSION").exists()
            if copied and not adopt:
                raise CopiedCatalog(str(recorded), here)
            _adopt(fleet, conn, copied=copied)
            print(f"This config directory was {'copied' if copied else 'moved'}"
                  + (f" from {recorded}" if recorded else "") + f": its catalog now belongs to {here}, and its"
                  " servers' connections and subscriptions point at this directory's servers"
                  + (" (a new fleet identity)" if copied else ""), file=sys.stderr)
        if recorded is None or Path(recorded) != here:
            conn.execute("INSERT INTO shardctl.meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE"
                         " SET value = excluded.value", (DIRECTORY_KEY, str(here)))
    refresh(fleet, conn)


def refresh(fleet, conn: psycopg.Connection) -> None:
    """The declared servers' connections, as reached now (a row written only when it changed)."""
    have = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT name, kind, connection FROM shardctl.servers")}
    for name, handle in sorted(fleet.servers.items()):
        now = ("embedded" if handle.embedded else "external", handle.describe())
        if now[1].startswith("(from $"):
            continue  # its DSN variable is not set here: what the catalog knows stays
        if have.get(name) != now:
            store.record_server(conn, name, *now)


def _adopt(fleet, conn: psycopg.Connection, copied: bool) -> None:
    """Point every subscription of the embedded servers that reaches a server through the socket
    the catalog recorded for it at that server's socket here; a copy gets a new identity."""
    moved: dict[str, str] = {}  # recorded host -> the host here, per embedded server
    for name, connection in conn.execute("SELECT name, connection FROM shardctl.servers"):
        handle = fleet.servers.get(name)
        if handle is None or handle.embedded is None:
            continue
        old = str(conninfo_to_dict(connection).get("host") or "")
        new = str(handle.embedded.socket_dir)
        if old and old != new:
            moved[old] = new
    for _, handle in sorted(fleet.servers.items()):
        if handle.embedded is None or not handle.embedded.running_pid():
            continue
        with handle.connect() as admin:
            databases = [r[0] for r in admin.execute(
                "SELECT d.datname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid GROUP BY 1")]
        for dbname in databases:
            with handle.connect(dbname) as db:
                db.execute("SET default_transaction_read_only = off")  # a replica is read-only for its readers
                for sub, conninfo in db.execute(
                        "SELECT subname, subconninfo FROM pg_subscription WHERE subdbid = (SELECT oid FROM"
                        " pg_database WHERE datname = current_database())").fetchall():
                    params = {k: str(v) for k, v in conninfo_to_dict(conninfo).items() if v is not None}
                    if params.get("host") in moved:
                        params["host"] = moved[params["host"]]
                        db.execute(sql.SQL("ALTER SUBSCRIPTION {} CONNECTION {}").format(
                            sql.Identifier(sub), sql.Literal(make_conninfo("", **params))))
    if copied:
        conn.execute("UPDATE shardctl.meta SET value = gen_random_uuid()::text WHERE key = 'fleet_id'")
