"""What the notification tests share: a real HTTP receiver that records what
it gets and answers as told, listening in a network namespace of its own (an
address that is none of this host's, as a real receiver's is: PINK refuses
its hosts' own addresses), PINK started with a notify worker, a real SMTP
mailbox, and reading a task's deliveries through the API.

The namespace is joined to this host by a veth pair (`devcluster.netns`); the
receiver's socket is made by a thread that entered the namespace (setns), so
the receiver itself runs in the test process. The tests' configs allow the
receiver's one address in `[notifications] allow_private`. Without `ip`
netns support (not root), the receiver falls back to this host's address on
its default route, which PINK then refuses only where pink-web binds a
wildcard address (the tests bind 127.0.0.1): that limitation is the fallback's.
"""

from __future__ import annotations

import ctypes
import http.server
import ipaddress
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass

import pytest

from devcluster.netns import NetnsHost
from tests.helpers import Api, make_user

CLONE_NEWNET = 0x40000000
FAST_RETRIES = {"first_retry": 0.5, "max_retry_interval": 1.0, "max_attempts": 3}


def host_address() -> str:
    """This machine's address on its default route (no packet is sent); skips without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))
            address = probe.getsockname()[0]
        except OSError:
            address = ""
    if not address or ipaddress.ip_address(address).is_loopback:
        pytest.skip("this machine has no non-loopback IPv4 address for a webhook receiver")
    return address


def receiver_host() -> NetnsHost | None:
    """A namespace for a receiver, on a /30 of 198.18.0.0/15 (benchmarking space, no
    one's real network) chosen by pid, so concurrent test runs do not collide; None
    where namespaces cannot be made here."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return None
    pid = os.getpid()
    base = ipaddress.ip_address("198.18.0.0") + (pid % 32768) * 4
    host = NetnsHost(name=f"pinkrx{pid}", host_veth=f"pinkrx{pid % 100000}", host_addr=str(base + 1),
                     ns_addr=str(base + 2), prefix=30)
    try:
        host.up()
    except Exception:  # noqa: BLE001 - no namespaces here: the fallback's limitation applies
        host.down()
        return None
    return host


def _listening_in(netns: str, address: str) -> socket.socket:
    """A listening TCP socket made inside namespace `netns` (it stays there)."""
    made: dict = {}

    def make():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, 0))
            sock.listen(64)
            made["sock"] = sock
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread
            made["error"] = exc

    thread = threading.Thread(target=make)  # only this thread enters the namespace, and then ends
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["sock"]


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """Records every POST; answers a path's scripted statuses in turn, then 204.

    `answers[path]` is a list of (status, headers) popped one per request."""

    def __init__(self, address: str, netns: str | None = None):
        self.got: list[Delivery] = []
        self.answers: dict[str, list[tuple[int, dict]]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.got.append(Delivery(self.path, dict(self.headers), body, time.time()))
                    script = receiver.answers.get(self.path) or []
                    status, headers = script.pop(0) if script else (204, {})
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *args):
                pass

        if netns:
            self.server = http.server.ThreadingHTTPServer((address, 0), Handler, bind_and_activate=False)
            self.server.socket.close()
            self.server.socket = _listening_in(netns, address)
            self.server.server_address = self.server.socket.getsockname()
        else:
            self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return self.server.server_address[0]

    def url(self, path: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{path}"

    @property
    def origin(self) -> str:
        return self.url("")

    def wait(self, count: int, timeout: float = 90, path: str | None = None) -> list[Delivery]:
        """The first `count` deliveries (to `path`, if given), once they have come."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                got = [d for d in self.got if path is None or d.path == path]
            if len(got) >= count:
                return got
            assert time.monotonic() < deadline, f"only {len(got)} of {count} deliveries came: {got}"
            time.sleep(0.2)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    """A Receiver at an address none of this host's (a namespace's), else at the host's own."""
    host = receiver_host()
    try:
        r = Receiver(host.ns_addr, netns=host.name) if host else Receiver(host_address())
        yield r
        r.close()
    finally:
        if host:
            host.down()


def start_pink(pink_processes, config_variant, name: str, **notify) -> str:
    """web, a pipeline worker, a notify worker, the leader and a runner on a config
    whose `[notifications]` is `notify`; returns the config's path."""
    path = config_variant(name, notifications=notify)
    pink_processes.web(path)
    pink_processes.worker(config_path=path)
    pink_processes.notify_worker(path)
    pink_processes.leader(path)
    pink_processes.runner(config_path=path)
    return path


def start_for_ada(pink_processes, config_variant, **notify) -> Api:
    start_pink(pink_processes, config_variant, "notify", **notify)
    return Api(pink_processes.config, make_user(pink_processes.config, "ada"))


def deliveries(api: Api, task_id: str, settled: bool = True, timeout: float = 60) -> list[dict]:
    """The task's deliveries as the API shows them, once none is pending (with `settled`)."""
    deadline = time.monotonic() + timeout
    while True:
        found = api.task(task_id)["notifications"]
        if found and (not settled or all(n["state"] != "pending" for n in found)):
            return found
        assert time.monotonic() < deadline, f"deliveries never settled: {found}"
        time.sleep(0.3)


class Mailbox:
    """An aiosmtpd handler keeping every message it is given."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope)
        return "250 OK"
