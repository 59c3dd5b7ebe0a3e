"""The cluster's Redis: the queues RQ's workers take jobs from.

Started without persistence: PINK's queues mirror etcd and are rebuilt from
it, so a restarted Redis loses nothing that matters.
"""

from __future__ import annotations

import socket

from devcluster.ports import PortBook


class RedisService(PortBook):
    """Start the cluster's Redis, with 128 databases so that each concurrent
    test namespace gets one of its own, and tell clients where it is."""

    @property
    def redis_port(self) -> int:
        return self.state["ports"]["redis"]

    def redis_url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/{db}"

    def _redis_answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def start_redis(self) -> str:
        """Redis without persistence (RQ is a mirror of etcd, rebuildable).

        No password: it listens on loopback only, and everything on this one
        machine that could reach it runs as root anyway. A multi-machine
        deployment sets requirepass (see ansible/).
        """
        if self._reuse("redis", self._redis_answers):
            return self.redis_url()
        port = self.port("redis")
        data = self.base / "redis"
        data.mkdir(exist_ok=True)
        self.start_process("redis", [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(data),
            "--databases", "128",  # one per concurrent test namespace
        ])
        self._wait_ready("redis", self._redis_answers)
        return self.redis_url()
