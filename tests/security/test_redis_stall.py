"""A Redis master that goes silent without closing its sockets (power loss,
a partition) stalls a worker for a bounded time, not minutes: RQ would
raise the worker's socket timeout to 415 s, and `pink-worker` dequeues in
short waits on a connection whose timeout outlasts them.

The silent master is a redis-server of this test's own, stopped with
SIGSTOP: its sockets stay open and nothing answers on them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from redis import Redis

from devcluster.ports import free_port

NOTICED = ("could not connect to Redis instance", "Redis connection timeout")
BOUND = 45  # seconds: two socket timeouts of 10 s and the BLPOP in flight, with room; RQ's own was 415 s


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server only this test talks to; yields its URL and process."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url, socket_timeout=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except Exception:  # noqa: BLE001 - still starting
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
    client.close()
    try:
        yield url, proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


def test_a_silent_redis_master_is_noticed_within_seconds(own_redis, pink_processes, config_variant):
    """A worker does not hang on a Redis master that stopped answering
    without closing its sockets: it notices (its log says it lost Redis)
    within BOUND seconds, not RQ's 415 s socket timeout."""
    url, server = own_redis
    path = config_variant("silent-redis", redis_url=url)
    name = pink_processes.worker(config_path=path)
    deadline = time.monotonic() + 20
    while "Listening on" not in pink_processes.log(name):  # idle in its BLPOP
        assert time.monotonic() < deadline, pink_processes.log(name)[-3000:]
        time.sleep(0.2)
    time.sleep(1)
    os.kill(server.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    while not any(line in pink_processes.log(name) for line in NOTICED):
        assert time.monotonic() - stopped < BOUND, \
            f"the worker did not notice a silent Redis in {BOUND} s:\n{pink_processes.log(name)[-3000:]}"
        time.sleep(0.5)
