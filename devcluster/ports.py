"""Loopback ports: finding free ones, and keeping each service on its own.

Every service of a local cluster listens on 127.0.0.1 on a port chosen when
it first starts and kept in cluster.json, so that many clusters (a demo, a
test session, a benchmark) share one machine without fixed numbers clashing.
Tests use free_port and tcp_answers for servers of their own.
"""

from __future__ import annotations

import socket

from devcluster.processes import ProcessTable


def free_port() -> int:
    """A port the kernel considers free now (bind to port 0 on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def tcp_answers(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class PortBook(ProcessTable):
    """The ports the cluster's services listen on, by service name, kept in
    cluster.json so that a restarted service is found where clients look."""

    def port(self, key: str, prefer: int | None = None) -> int:
        """The port recorded for `key`, or `prefer` when free, or a newly chosen free one.

        A recorded port that something else took meanwhile is replaced, so a
        restart after a reboot does not fail on a stranger's listener; one
        recorded while `prefer` was taken moves back to `prefer` once it is free.
        """
        port = self.state["ports"].get(key)
        idle = port is not None and not self._owner_alive(key)
        if port is None or (idle and not port_is_free(port)) or (
                idle and prefer and port != prefer and port_is_free(prefer)):
            port = prefer if prefer and port_is_free(prefer) else free_port()
            self.state["ports"][key] = port
            self._save()
        return port

    def _owner_alive(self, key: str) -> bool:
        """Whether the process that uses port `key` (same name, minus a
        `-peer` suffix) is one of ours and alive."""
        return self.alive(key.removesuffix("-peer"))
