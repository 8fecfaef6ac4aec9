"""The daemon's HTTP listener: read-only JSON API, pause/resume with a token, /metrics, dashboard.

Bound to 127.0.0.1 unless `--listen` says otherwise. Everything served comes from the
daemon's snapshot; only pause/resume write (to the catalog, through the daemon), and only with
the bearer token from the environment variable the daemon was told (SHARDCTL_DAEMON_TOKEN by
default). Without that variable set, the write endpoints are off.

The standard library's ThreadingHTTPServer is enough for a handful of loopback routes and adds
no dependency; a web framework would bring an async server and its stack for nothing more.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from engine.errors import UserError, redact
from engine.observe.metrics import METRICS
from engine.render.dashboard import render_dashboard
from engine.render.renderers import plan_document
from engine.watch import prometheus
from engine.watch.view import View


class Served(Protocol):
    """What the listener needs of the daemon it serves. The daemon imports this module to start
    it; this module never imports the daemon (the two used to import each other)."""

    view: View

    @property
    def options(self) -> Any: ...  # the daemon's WatchOptions: token_env names the token's variable

    def set_paused(self, paused: bool, reason: str, by: str) -> Any: ...




def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise UserError(f"--listen {listen!r} is not HOST:PORT", "for example --listen 127.0.0.1:8470")
    return host.strip("[]") or "127.0.0.1", int(port)


def api_status(daemon: Served) -> dict:
    snap = daemon.view.get()
    return {
        "who": snap.who, "role": snap.role, "leader": snap.leader, "config_dir": snap.config_dir,
        # who paused and why belong to a pause in force, not to one lifted since
        "paused": snap.paused, "pause_reason": snap.pause_reason if snap.paused else "",
        "paused_by": snap.paused_by if snap.paused else None,
        "config_error": snap.config_error, "activity": snap.activity, "progress": snap.progress,
        "started_at": snap.started_at,
        "last_collect_at": snap.last_collect_at, "last_collect_seconds": snap.last_collect_seconds,
        "planned_at": snap.planned_at, "last_error": snap.last_error, "alerts": list(snap.alerts),
        "shards": len(snap.shards), "autonomous": list(snap.autonomous), "pending": len(snap.pending),
        "actions": [{"kind": k, "result": r, "count": n} for (k, r), n in sorted(daemon.view.action_counts().items())],
    }


def api_shards(daemon: Served) -> dict:
    out = []
    for shard in daemon.view.get().shards:
        doc = shard.model_dump(mode="json")
        doc["series"] = [
            {"at": point[0], **dict(zip(METRICS, point[1:], strict=True))}
            for point in daemon.view.series(shard.address)
        ]
        out.append(doc)
    return {"shards": out}


def api_plan(daemon: Served) -> dict:
    snap = daemon.view.get()
    return {
        "planned_at": snap.planned_at, "plan": plan_document(snap.plan) if snap.plan else None,
        "autonomous": list(snap.autonomous), "pending": [p.model_dump() for p in snap.pending],
        "notes": list(snap.notes), "advice": list(snap.advice), "paused": snap.paused, "text": snap.plan_text,
    }


ROUTES = {
    "/api/status": api_status,
    "/api/shards": api_shards,
    "/api/plan": api_plan,
    "/api/history": lambda d: {"history": [h.model_dump(mode="json") for h in d.view.get().history]},
    "/api/branches": lambda d: {"branches": [b.model_dump(mode="json") for b in d.view.get().branches],
                                "replica_links": [link.model_dump(mode="json") for link in d.view.get().branch_links]},
    # replica links (broken ones with why) and leftover replication, as of the last collection round
    "/api/replication": lambda d: {
        "replica_links": [link.model_dump(mode="json") for link in d.view.get().branch_links],
        "orphans": [o.model_dump(mode="json") for o in d.view.get().orphans]},
}


WRITE_ROUTES = ("/api/pause", "/api/resume")


class Handler(BaseHTTPRequestHandler):
    daemon: Served  # set on the subclass made by serve()
    server_version = "shardctl"

    def log_message(self, format: str, *args) -> None:  # the daemon's log is for events, not requests
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: dict) -> None:
        body = redact(json.dumps(doc, default=str, indent=2, sort_keys=True)).encode()
        self._send(status, body + b"\n", "application/json")

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/":
            snap = self.daemon.view.get()
            html = render_dashboard(snap, {s.address: self.daemon.view.series(s.address) for s in snap.shards})
            self._send(200, redact(html).encode(), "text/html; charset=utf-8")
        elif path == "/metrics":
            self._send(200, prometheus.exposition(self.daemon.view), prometheus.CONTENT_TYPE)
        elif path in ROUTES:
            self._json(200, ROUTES[path](self.daemon))
        elif path in WRITE_ROUTES:
            self._not_allowed(path, "POST")
        else:
            self._json(404, {"error": f"no such endpoint {path}", "endpoints": sorted([*ROUTES, "/", "/metrics"])})

    do_HEAD = do_GET

    def _not_allowed(self, path: str, allowed: str) -> None:
        """405 with the method that works: the endpoint exists, the method is wrong."""
        body = (
            redact(
                json.dumps({"error": f"{path} takes {allowed} only", "allow": allowed}, indent=2, sort_keys=True)
            ).encode()
            + b"\n"
        )
        self.send_response(405)
        self.send_header("Allow", allowed)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path not in WRITE_ROUTES:
            if path in ROUTES or path in ("/", "/metrics"):
                self._not_allowed(path, "GET, HEAD")
            else:
                self._json(404, {"error": f"no such endpoint {path}"})
            return
        env = self.daemon.options.token_env
        token = os.environ.get(env, "")
        if not token:
            self._json(403, {"error": f"pause and resume over HTTP are off: start the daemon with {env} set",
                             "hint": "or run `shardctl pause` / `shardctl resume`"})
            return
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            self._json(401, {"error": "missing or wrong token", "hint": "send 'Authorization: Bearer <token>'"})
            return
        length = min(int(self.headers.get("Content-Length") or 0), 65536)
        try:
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        except json.JSONDecodeError:
            self._json(400, {"error": 'the body must be JSON, e.g. {"reason": "maintenance"}'})
            return
        reason = str(body.get("reason", "")) if isinstance(body, dict) else ""
        state = self.daemon.set_paused(path == "/api/pause", reason, f"http {self.client_address[0]}")
        self._json(200, {"paused": state.paused, "reason": state.reason, "by": state.changed_by})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a request in flight never holds the daemon's exit


class Server:
    def __init__(self, httpd: ThreadingHTTPServer):
        self.httpd = httpd
        self.thread = threading.Thread(target=httpd.serve_forever, name="shardctl-http", daemon=True)

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(daemon: Served, listen: str) -> Server:
    host, port = parse_listen(listen)
    handler = type("BoundHandler", (Handler,), {"daemon": daemon})
    try:
        httpd = _HTTPServer((host, port), handler)
    except OSError as exc:
        raise UserError(
            f"cannot listen on {listen}: {exc.strerror}", "pick another port with --listen HOST:PORT"
        ) from None
    server = Server(httpd)
    server.thread.start()
    return server
