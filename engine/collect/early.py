"""The shards' connections opened early: while `plan` still imports and reads its config.

A plan looks into every shard on a connection of its own (engine.collect.observer), and opening
256 connections is most of what the inspection costs; the half second of imports and config
before it runs on one core and leaves the other idle. So `plan` starts opening, at once, the
connections the last inspection used, in the order it used them: the databases and how each
server was reached are kept in `.shardctl/cache/connect.json` (mode 0600; no secret: a DSN is
kept as the name of its environment variable, read again now). Nothing is run on them: the
inspection takes a connection only when it was opened with exactly the parameters the fleet
gives now for that database (else it connects as before), and runs its statements after the
metric sampler's first reading, as before. What this changes is only when the connections open.

Bounded: per server, open and not yet taken, at most half the connections it had free at the
last inventory (max_connections less the reserved and the sessions then open) and at most
MAX_AHEAD (DEFAULT_AHEAD when it was not known); WORKERS at once, each connect within
CONNECT_TIMEOUT; a server that fails GIVE_UP times is not tried again (the inspection then
connects, and reports, as before), and the inspection never waits for a connect in flight beyond that
timeout. What is not taken is closed at the end.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

FILE = Path(".shardctl") / "cache" / "connect.json"
VERSION = 1
APPLICATION = "shardctl-inventory"  # the metric readings leave these sessions out (engine.collect.collectors)
MAX_AHEAD = 128  # connections per server opened and not yet taken
DEFAULT_AHEAD = 16  # the same for a server whose free connections were not known
WORKERS = 8
CONNECT_TIMEOUT = "2"  # seconds (libpq's least)
GIVE_UP = 3  # failed connects after which a server is not tried again
WAIT = 2.5  # seconds `take` waits for a connect in flight (it ends within CONNECT_TIMEOUT anyway)

_QUEUED, _CONNECTING, _FAILED, _TAKEN = "queued", "connecting", "failed", "taken"


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _params(recipe: dict[str, Any], dbname: str) -> dict[str, Any] | None:
    """A database's parameters as ServerHandle.params would give them, from a remembered recipe."""
    if "dsn_env" in recipe:
        raw = os.environ.get(str(recipe["dsn_env"]))
        if not raw:
            return None
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = {k: str(v) for k, v in conninfo_to_dict(raw).items()}
        except Exception:  # an invalid DSN is the inspection's to report
            return None
    elif isinstance(recipe.get("params"), dict):
        params = dict(recipe["params"])
    else:
        return None
    params["dbname"] = dbname
    return params


def recipe(handle, free: int | None) -> dict[str, Any]:
    """How a server is reached, without a secret (a DSN by the name of its variable), and how many
    connections may be opened ahead on it, from `free`: those it had free just now."""
    ahead = DEFAULT_AHEAD if free is None else max(0, min(MAX_AHEAD, free // 2))
    if handle.spec.dsn_env:
        return {"dsn_env": handle.spec.dsn_env, "ahead": ahead}
    return {"params": {k: v for k, v in handle.params().items() if k != "dbname"}, "ahead": ahead}


def remember(directory: Path, servers: dict[str, tuple[dict[str, Any], list[str]]]) -> None:
    """Keep, for the next plan, each server's recipe and its databases in the inspection's order.
    Written only where `.shardctl/` is, and only when it changed; a failure to write is no error."""
    path = directory / FILE
    if not (directory / ".shardctl").is_dir():
        return
    text = json.dumps({"version": VERSION, "servers": {name: {"recipe": r, "databases": d}
                                                       for name, (r, d) in sorted(servers.items())}})
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    from engine.servers import private

    try:
        path.parent.mkdir(exist_ok=True, mode=0o700)
        private.write_private(path, text, None)
    except OSError:
        return


class EarlyConnections:
    def __init__(self, queue: list[tuple[str, dict[str, Any]]], ahead: dict[str, int]):
        self._queue = queue  # (server, params) in the order they will be asked for
        self._ahead = ahead
        self._cond = threading.Condition()
        self._state: dict[str, Any] = {_key(p): _QUEUED for _, p in queue}
        self._open: dict[str, int] = {}
        self._failed: set[str] = set()
        self._failures: dict[str, int] = {}
        self._next = 0
        self._closed = False

    @classmethod
    def start(cls, directory: Path) -> EarlyConnections | None:
        """Start opening what the last inspection of this config used; None without a record."""
        try:
            data = json.loads((directory.resolve() / FILE).read_text())
            servers = data["servers"] if data.get("version") == VERSION else {}
            lists = [[(name, p) for db in entry["databases"] if (p := _params(entry["recipe"], db)) is not None]
                     for name, entry in sorted(servers.items())]
            ahead = {name: min(MAX_AHEAD, int(entry["recipe"].get("ahead", DEFAULT_AHEAD)))
                     for name, entry in servers.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        # the servers in turn, as the inspection takes them (engine.observe.fanout.fan_out_grouped)
        queue = [item for turn in _interleave(lists) for item in turn]
        if not queue:
            return None
        early = cls(queue, ahead)
        for _ in range(min(WORKERS, len(queue))):
            threading.Thread(target=early._work, name="shardctl-early", daemon=True).start()
        return early

    def _pick(self) -> tuple[str, str, dict[str, Any]] | None:
        """Under the lock: the next connection to open, waiting for room; None when done."""
        while not self._closed:
            waiting = False
            for i in range(self._next, len(self._queue)):
                server, params = self._queue[i]
                key = _key(params)
                if self._state.get(key) != _QUEUED or server in self._failed:
                    if i == self._next:
                        self._next += 1
                    continue
                if self._open.get(server, 0) >= self._ahead.get(server, 0):
                    waiting = True
                    continue
                self._state[key] = _CONNECTING
                self._open[server] = self._open.get(server, 0) + 1
                return server, key, params
            if not waiting:
                return None
            self._cond.wait()  # for a connection to be taken
        return None

    def _work(self) -> None:
        import psycopg

        while True:
            with self._cond:
                picked = self._pick()
            if picked is None:
                return
            server, key, params = picked
            try:
                conn = psycopg.connect(**{**params, "connect_timeout": CONNECT_TIMEOUT,
                                          "application_name": APPLICATION}, autocommit=True)
            except Exception:  # any failure: the inspection connects, and reports, itself
                with self._cond:
                    # one database may be gone since (a shard retired by apply); a server that
                    # fails GIVE_UP times is down or refuses: it is not tried again
                    self._failures[server] = self._failures.get(server, 0) + 1
                    if self._failures[server] >= GIVE_UP:
                        self._failed.add(server)
                    self._state[key] = _FAILED
                    self._open[server] -= 1
                    self._cond.notify_all()
                continue
            with self._cond:
                unwanted = self._closed or self._state.get(key) == _TAKEN  # given up on by `take`
                if unwanted:
                    self._open[server] -= 1
                else:
                    self._state[key] = conn
                self._cond.notify_all()
            if unwanted:
                conn.close()

    def take(self, server: str, params: dict[str, Any], timeout: float):
        """The connection opened for exactly these parameters, or None (then the caller
        connects): one in flight is waited for, at most `timeout` and WAIT seconds."""
        key = _key(params)
        with self._cond:
            self._cond.wait_for(lambda: self._state.get(key) != _CONNECTING, timeout=min(timeout, WAIT))
            found = self._state.get(key)
            self._state[key] = _TAKEN
            if found is None or isinstance(found, str):
                return None
            self._open[server] = self._open.get(server, 1) - 1
            self._cond.notify_all()
            return found

    def close(self) -> None:
        """Close what was not taken; connects still in flight close theirs when they end."""
        with self._cond:
            self._closed = True
            left = [c for c in self._state.values() if not isinstance(c, str)]
            self._state = dict.fromkeys(self._state, _TAKEN)
            self._cond.notify_all()
        for conn in left:
            conn.close()


def _interleave(lists: list[list]) -> list[list]:
    """[[a1, a2], [b1]] -> [[a1, b1], [a2]]: one of each in turn."""
    return [[lst[i] for lst in lists if i < len(lst)] for i in range(max((len(x) for x in lists), default=0))]
