"""The daemon's HTTP listener: read-only JSON API, pause/resume with a token, /metrics, dashboard.

Bound to 127.0.0.1 unless `--listen` says otherwise. Everything served comes from the
daemon's snapshot; only pause/resume write (to the catalog, through the daemon), and only with
the bearer token from the environment variable the daemon was told (SHARDCTL_DAEMON_TOKEN by
default). Without that variable set, the write endpoints are off.

Every request, whatever its route or method, passes the same gate (`Handler.parse_request`)
before anything is read for it:
- its Host must be the address the connection arrived at (with the port; `localhost` too on
  loopback) or a name the operator allowed (`watch --allow-host`): a web page whose name was
  made to resolve to this address (DNS rebinding) is refused with 421 and learns nothing;
- a Content-Length that is not a plain number is 400, one over 64 KiB is 413, a body without
  one (Transfer-Encoding) is 411;
- each connection has a socket timeout, and at most MAX_CONNECTIONS are served at once: beyond
  that, the connection that has waited longest without sending its request is cut to make room
  (so idle connections cannot lock the operator out), and when every one is busy the new one
  gets 503.

The standard library's ThreadingHTTPServer is enough for a handful of loopback routes and adds
no dependency; a web framework would bring an async server and its stack for nothing more.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import os
import socket
import threading
import time
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
    activity, since, progress, _ = snap.running()  # whoever runs it: this daemon or a person's apply
    return {
        "who": snap.who, "role": snap.role, "leader": snap.leader, "config_dir": snap.config_dir,
        # who paused and why belong to a pause in force, not to one lifted since
        "paused": snap.paused, "pause_reason": snap.pause_reason if snap.paused else "",
        "paused_by": snap.paused_by if snap.paused else None,
        "config_error": snap.config_error, "activity": activity, "activity_since": since, "progress": progress,
        "operations": [dict(op.model_dump(mode="json"), in_progress=op.in_progress) for op in snap.operations],
        "started_at": snap.started_at,
        "last_collect_at": snap.last_collect_at, "last_collect_seconds": snap.last_collect_seconds,
        "planned_at": snap.planned_at, "last_error": snap.last_error, "alerts": list(snap.alerts),
        "shards": len(snap.shards), "autonomous": list(snap.autonomous), "pending": len(snap.pending),
        "actions": [{"kind": k, "result": r, "count": n} for (k, r), n in sorted(daemon.view.action_counts().items())],
        "backups": [b.model_dump(mode="json") for b in snap.backups],
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
MAX_BODY = 65536
MAX_CONNECTIONS = 64
TIMEOUT = 10.0  # seconds a connection may stay silent (or not read) before it is closed


def _host_port(value: str) -> tuple[str, int | None] | None:
    """A Host header's name and port (None: no port); None when it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
    if not name or (port and not port.isdigit()):
        return None
    return name, (int(port) if port else None)


class Handler(BaseHTTPRequestHandler):
    daemon: Served  # set on the subclass made by serve()
    server_version = "shardctl"

    allow_hosts: tuple[str, ...] = ()  # names the operator allowed (`watch --allow-host`)
    timeout = TIMEOUT

    def log_message(self, format: str, *args) -> None:  # the daemon's log is for events, not requests
        pass

    def parse_request(self) -> bool:
        """The standard parsing, then the gate every request passes, whatever its method."""
        if not super().parse_request():
            return False
        self.server.request_read(self.connection)  # type: ignore[attr-defined]
        problem = self._host_problem() or self._length_problem()
        if problem is not None:
            status, message = problem
            self.close_connection = True
            self._json(status, {"error": message})
            return False
        return True

    def _host_problem(self) -> tuple[int, str] | None:
        given = self.headers.get_all("Host") or []
        parsed = _host_port(given[0]) if len(given) == 1 else None
        if parsed is None:
            return 400, "a request needs exactly one Host header"
        name, port = parsed
        if name in self.allow_hosts:
            return None
        address, local_port = self.connection.getsockname()[:2]
        ours = {ipaddress.ip_address(address).compressed}
        if ipaddress.ip_address(address).is_loopback:
            ours.add("localhost")
        if name.strip("[]") in ours and port in (local_port, None if local_port == 80 else local_port):
            return None
        return 421, (f"this daemon does not answer to the name {name!r}: use its address, or start it"
                     " with --allow-host NAME")

    def _length_problem(self) -> tuple[int, str] | None:
        if self.headers.get("Transfer-Encoding") is not None:
            return 411, "send the body with a Content-Length (no Transfer-Encoding)"
        given = self.headers.get_all("Content-Length") or []
        if not given:
            return None
        if len(given) > 1 or not given[0].strip().isdigit():
            return 400, "Content-Length must be one non-negative number"
        if int(given[0]) > MAX_BODY:
            return 413, f"a body may hold at most {MAX_BODY} bytes"
        return None

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)  # checked by parse_request
        return self.rfile.read(length) if length else b""

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
        try:
            body = json.loads(self._body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._json(400, {"error": 'the body must be JSON, e.g. {"reason": "maintenance"}'})
            return
        reason = str(body.get("reason", "")) if isinstance(body, dict) else ""
        state = self.daemon.set_paused(path == "/api/pause", reason, f"http {self.client_address[0]}")
        self._json(200, {"paused": state.paused, "reason": state.reason, "by": state.changed_by})


class _HTTPServer(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS connections at once. One more arriving cuts the connection that
    has waited longest without sending its request (an idle or trickling client), else, when
    every connection is being served, it is answered 503 at once."""

    daemon_threads = True  # a request in flight never holds the daemon's exit
    # the kernel's queue of connections not yet accepted (socketserver's default is 5: a burst
    # of connections beyond it waits for the client's SYN retry, a second or more)
    request_queue_size = 2 * MAX_CONNECTIONS

    def __init__(self, *args, **kwargs) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # connections yet to send their request
        self._open = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._lock:
            if self._open >= MAX_CONNECTIONS:
                if not self._waiting:
                    self._refuse(request)
                    return
                oldest = min(self._waiting, key=self._waiting.__getitem__)
                del self._waiting[oldest]
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)  # its thread then ends and closes it
            self._open += 1
            self._waiting[request] = time.monotonic()
        super().process_request(request, client_address)

    def request_read(self, request) -> None:
        with self._lock:
            self._waiting.pop(request, None)

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._open -= 1
            self._waiting.pop(request, None)
        super().shutdown_request(request)

    def _refuse(self, request) -> None:
        body = b'{"error": "too many connections; try again"}\n'
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        super().shutdown_request(request)


class Server:
    def __init__(self, httpd: ThreadingHTTPServer):
        self.httpd = httpd
        self.thread = threading.Thread(target=httpd.serve_forever, name="shardctl-http", daemon=True)

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(daemon: Served, listen: str, allow_hosts: tuple[str, ...] = ()) -> Server:
    host, port = parse_listen(listen)
    handler = type("BoundHandler", (Handler,), {"daemon": daemon,
                                                 "allow_hosts": tuple(h.lower() for h in allow_hosts)})
    try:
        httpd = _HTTPServer((host, port), handler)
    except OSError as exc:
        raise UserError(
            f"cannot listen on {listen}: {exc.strerror}", "pick another port with --listen HOST:PORT"
        ) from None
    server = Server(httpd)
    server.thread.start()
    return server
