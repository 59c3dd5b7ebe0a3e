"""Slow clients: a client that begins a request and stalls (a slowloris, a
flaky link) holds no thread of a web node, and its connection no longer
than the stall bound."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

from web import connections


def _stalled_request(url: str) -> socket.socket:
    """A connection that sends the first byte of a TLS handshake and then
    nothing: pink-web waits for the rest (a slowloris)."""
    parts = urlparse(url)
    conn = socket.create_connection((parts.hostname, parts.port), timeout=30)
    conn.sendall(b"\x16")
    return conn


BUFFER = 32 * 2**10  # bytes of socket buffer at each end of the slow reader's connection


def _closed_by_server(conn: socket.socket) -> bool:
    """Read until the server ends the connection (an alert may come first);
    a read timeout means it is still held open."""
    try:
        while conn.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed with a reset: closed all the same
    return True


STALLED = 300  # more than gunicorn's threaded workers had threads (4 x 64): each would have held one
PROMPT = 10  # seconds within which the node must answer beside them


def test_stalled_clients_hold_no_thread_and_are_dropped(web):
    """Hundreds of stalled requests hold no thread: the node answers health
    at once beside them, and each stalled connection is closed by the
    server within the stall bound, not left open."""
    ca = str(Path(web.web.certfile).parent / "ca.pem")
    stalled = [_stalled_request(web.web.url) for _ in range(STALLED)]
    try:
        started = time.monotonic()
        r = requests.get(web.web.url + "/api/v1/health", verify=ca, timeout=PROMPT)
        assert r.status_code in (200, 503), r.text  # answered (503: a service degraded, still an answer)
        waited = time.monotonic() - started
        for conn in (stalled[0], stalled[-1]):
            conn.settimeout(max(1.0, 2 * connections.STALL_SECONDS - waited))
            assert _closed_by_server(conn)
    finally:
        for conn in stalled:
            conn.close()


def test_a_slow_but_steady_reader_is_not_cut(monkeypatch, tmp_path):
    """A client that keeps reading, slowly, gets a whole answer: the stall
    bound applies to each slice of it, not to one big write (the bound is
    shrunk to 1 s here; the test above covers its shipped value)."""
    import subprocess
    import threading

    monkeypatch.setattr(connections, "STALL_SECONDS", 1)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    server = connections.ssl_context(None, lambda: server)
    answer = bytes(range(256)) * 8192  # 2 MiB in one write, as an archived log is
    listener = socket.create_server(("127.0.0.1", 0))
    failures = []

    def serve():
        raw, _ = listener.accept()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)  # the kernel takes little of it at once
        with server.wrap_socket(raw, server_side=True) as conn:
            conn.setblocking(True)
            try:
                conn.sendall(answer)
            except OSError as exc:
                failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = ssl.create_default_context(cafile=str(cert))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    raw.connect(listener.getsockname())
    with client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        got = bytearray()
        while len(got) < len(answer):
            chunk = conn.recv(64 * 2**10)
            if not chunk:
                break
            got += chunk
            time.sleep(0.05)  # one TLS record (16 KiB) at a time: 2 MiB take ~6 s, six times the bound
    thread.join(10)
    listener.close()
    assert not failures and bytes(got) == answer, (failures, len(got))
