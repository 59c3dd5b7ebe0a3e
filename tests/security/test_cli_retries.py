"""The CLI's safe retries: a submit cut off after the server made its task is sent
again with the same Idempotency-Key and makes one task; a server that stays
down is given up on after a bounded number of tries, saying so."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from contextlib import contextmanager
from pathlib import Path

import requests

from pink_cli import client as client_mod
from tests.helpers import Api

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class _Forwarder(http.server.BaseHTTPRequestHandler):
    """Forwards each request to pink-web; drops the connection, unanswered, of the first
    request the server's `drop` predicate picks, after the server has answered it."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        server = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        resp = requests.request(self.command, server.target + self.path, headers=headers, data=body,
                                verify=server.ca, timeout=120, allow_redirects=False)
        server.seen.append((self.command, self.path.split("?")[0], self.headers.get("Idempotency-Key"),
                            resp.status_code))
        if server.drop(self.command, self.path) and not server.dropped:
            server.dropped.append(self.path)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the task exists; the client hears nothing
            return
        self.send_response(resp.status_code)
        for key, value in resp.headers.items():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.content)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _forward


@contextmanager
def _proxy(config, ca: str, drop):
    """A TLS proxy with pink-web's certificate in front of pink-web; yields the server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forwarder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.web.certfile, config.web.keyfile)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.target, server.ca, server.drop = config.web.url.rstrip("/"), ca, drop
    server.seen, server.dropped = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        server.url = f"https://127.0.0.1:{server.server_address[1]}"
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _creates_task(method: str, path: str) -> bool:
    path = path.split("?")[0]
    return method == "POST" and (path.endswith("/commit") or path == "/api/v1/tasks")


def test_a_submit_cut_off_after_the_server_made_the_task_makes_one_task(control_plane, writer_archive):
    """A user's submit whose answer is lost after the server made the task is retried by the CLI
    with the same Idempotency-Key, and exactly one task exists."""
    api = control_plane
    with _proxy(api.config, api.ca, _creates_task) as proxy:
        through = Api(api.config, api.token)
        through.url = proxy.url
        proc = through.cli("submit", str(writer_archive), "--name", "once")
    assert proxy.dropped, proxy.seen
    creating = [s for s in proxy.seen if _creates_task(s[0], s[1])]
    assert len(creating) == 2 and creating[0][2] and creating[0][2] == creating[1][2], creating
    assert [s[3] for s in creating] == [201, 200], creating
    assert "try 2 of 5" in proc.stderr and "POST" in proc.stderr, proc.stderr
    tasks = api("GET", "/tasks").json()["tasks"]
    assert [t["name"] for t in tasks] == ["once"], tasks
    assert tasks[0]["id"] in proc.stdout


class _Down(http.server.BaseHTTPRequestHandler):
    """A router whose web nodes are all down: 503 to everything, or 429 without Retry-After."""

    protocol_version = "HTTP/1.1"
    status = 503

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits += 1
        body = b'{"error": "unavailable", "message": "no web node is up"}'
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def _down(status: int):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Down)
    server.hits, server.status = 0, status
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _cli(url: str, *args: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PINK_URL": url, "PINK_TOKEN": "t", "PINK_CLI_CONFIG": "/nonexistent/pink-cli.toml"}
    pink = str(Path(sys.executable).parent / "pink")
    return subprocess.run([pink, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_cli_gives_up_after_bounded_tries_when_the_server_stays_down():
    """A user whose server stays down gets a clear error after TRIES tries, each retry announced,
    not a hang: for a refused connection (submit) and for a router answering 503 (status)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = _cli(closed, "status")
    assert proc.returncode == 1
    assert f"cannot reach the PINK server at {closed}" in proc.stderr
    assert f"gave up after {client_mod.TRIES} tries" in proc.stderr
    assert proc.stderr.count("try ") == client_mod.TRIES - 1
    with _down(503) as server:
        proc = _cli(f"http://127.0.0.1:{server.server_address[1]}", "status")
    assert proc.returncode == 1 and server.hits == client_mod.TRIES
    assert "no web node is up" in proc.stderr and f"gave up after {client_mod.TRIES} tries" in proc.stderr
    assert "503" in proc.stderr


def test_a_429_without_retry_after_is_not_retried():
    """A user refused by a limit (429 without Retry-After) hears it at once: no retries."""
    with _down(429) as server:
        proc = _cli(f"http://127.0.0.1:{server.server_address[1]}", "status")
    assert proc.returncode == 1 and server.hits == 1 and "try " not in proc.stderr
