"""The daemon's HTTP listener, spoken to with raw sockets as a hostile page or client would: a
foreign Host (DNS rebinding), bodies with a negative, malformed, missing-when-needed or huge
Content-Length, and a flood of idle connections. Each is refused or timed out, and the daemon
still answers a request for its own address."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

import pytest

from engine.snapshot import Snapshot
from engine.watch import http
from engine.watch.view import View, now

TOKEN = "t0ken-for-the-gate-test"
ROUTES = [("GET", "/"), ("GET", "/metrics"), ("GET", "/api/status"), ("GET", "/api/plan"), ("HEAD", "/"),
          ("POST", "/api/pause"), ("POST", "/api/status"), ("PUT", "/"), ("GET", "/nope")]


@pytest.fixture
def daemon(monkeypatch):
    monkeypatch.setenv("SHARDCTL_TEST_GATE_TOKEN", TOKEN)
    monkeypatch.setattr(http.Handler, "timeout", 1.0)  # idle connections give up within a second here
    calls: list = []

    def set_paused(paused, reason, by):
        calls.append((paused, reason, by))
        return SimpleNamespace(paused=paused, reason=reason, changed_by=by)

    served = SimpleNamespace(view=View(Snapshot(who="t", config_dir="/secret/config/dir", started_at=now())),
                             options=SimpleNamespace(token_env="SHARDCTL_TEST_GATE_TOKEN"), set_paused=set_paused)
    server = http.serve(served, "127.0.0.1:0", allow_hosts=("Dash.Example.org",))
    port = server.httpd.server_address[1]
    yield SimpleNamespace(port=port, calls=calls)
    server.shutdown()


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send RAW, read the whole answer (the listener closes each connection after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, answer.partition(b"\r\n\r\n")[2]


def request(method: str, path: str, host: str | None, headers: str = "", body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "") + headers
    return head.encode() + b"\r\n" + body


def test_its_own_address_and_allowed_names_are_answered(daemon):
    for host in (f"127.0.0.1:{daemon.port}", f"localhost:{daemon.port}", f"LOCALHOST:{daemon.port}",
                 "dash.example.org", f"dash.example.org:{daemon.port}"):
        status, body = exchange(daemon.port, request("GET", "/api/status", host))
        assert status == 200, (host, body)
        assert json.loads(body)["who"] == "t"


@pytest.mark.parametrize("method, path", ROUTES)
def test_a_foreign_host_is_refused_on_every_route_and_learns_nothing(daemon, method, path):
    for host in ("evil.example", f"evil.example:{daemon.port}", f"127.0.0.1:{daemon.port + 1}", "127.0.0.1",
                 f"127.0.0.2:{daemon.port}", f"[::1]:{daemon.port}", f"dash.example.org.evil:{daemon.port}"):
        status, body = exchange(daemon.port, request(method, path, host, f"Authorization: Bearer {TOKEN}\r\n"
                                                     "Content-Length: 2\r\n", b"{}"))
        assert status == 421, (host, status, body)
        assert b"/secret/config/dir" not in body and b"who" not in body
    for raw in (request(method, path, None), request(method, path, f"127.0.0.1:{daemon.port}",
                                                     f"Host: evil.example:{daemon.port}\r\n")):
        status, body = exchange(daemon.port, raw)  # no Host, or two of them
        assert status == 400, (raw, status, body)
    assert daemon.calls == []


@pytest.mark.parametrize("length, expected", [("-1", 400), ("+5", 400), ("0x10", 400), ("1 000", 400),
                                              (str(10**12), 413), (str(http.MAX_BODY + 1), 413)])
def test_a_bad_or_huge_content_length_is_refused_before_the_body_is_read(daemon, length, expected):
    """Content-Length: -1 used to read the body to its end, past the 64 KiB limit (a 2 MB pause
    reason was stored)."""
    big = json.dumps({"reason": "x" * 2_000_000}).encode()
    own = f"127.0.0.1:{daemon.port}"
    for method, path in ROUTES:
        raw = request(method, path, own, f"Authorization: Bearer {TOKEN}\r\nContent-Length: {length}\r\n",
                      big[:100_000])
        status, _ = exchange(daemon.port, raw)
        assert status == expected, (method, path, length, status)
    assert daemon.calls == []  # nothing paused


def test_two_lengths_or_a_chunked_body_are_refused(daemon):
    own = f"127.0.0.1:{daemon.port}"
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    twice = request("POST", "/api/pause", own, auth + "Content-Length: 2\r\nContent-Length: 60\r\n", b"{}")
    assert exchange(daemon.port, twice)[0] == 400
    chunked = request("POST", "/api/pause", own, auth + "Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n")
    assert exchange(daemon.port, chunked)[0] == 411
    assert daemon.calls == []
    fine = request("POST", "/api/pause", own, auth + "Content-Length: 21\r\n", b'{"reason": "gate ok"}')
    status, body = exchange(daemon.port, fine)
    assert status == 200 and json.loads(body)["reason"] == "gate ok"
    assert daemon.calls == [(True, "gate ok", "http 127.0.0.1")]
    bare = request("POST", "/api/resume", own, auth)  # no body, no length: an empty body, as HTTP says
    assert exchange(daemon.port, bare)[0] == 200


def test_idle_connections_time_out_or_make_room_and_the_daemon_still_answers(daemon):
    own = f"127.0.0.1:{daemon.port}"
    idle = []
    for i in range(3 * http.MAX_CONNECTIONS):
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        if i % 2:  # a trickle: a request line and never the end of its headers
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {own}\r\n".encode())
        idle.append(sock)
    # while they are all open, the operator's request is answered
    started = time.monotonic()
    status, body = exchange(daemon.port, request("GET", "/api/status", own))
    assert status == 200 and json.loads(body)["who"] == "t"
    assert time.monotonic() - started < 5
    # and every idle one was cut to make room, or timed out (after a second here): the listener
    # closed each of them, none holds a thread any more
    for sock in idle:
        with sock:
            try:
                answer = sock.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert answer == b"" or answer.startswith(b"HTTP/1.0 503"), answer
    status, _ = exchange(daemon.port, request("GET", "/metrics", own))
    assert status == 200
