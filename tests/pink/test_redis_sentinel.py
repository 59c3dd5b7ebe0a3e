"""PINK's Redis client through Redis Sentinel (`pink.redisconn`), against
real servers: a master, a replica and a sentinel. When the master dies the
sentinel promotes the replica and the same client goes on writing, RQ
included, without being rebuilt."""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import time

import pytest
from redis import Redis
from rq import Queue

from devcluster.ports import free_port
from devcluster.processes import wait_until
from pink import redisconn

PASSWORD = "sentinel-test-" + "x" * 16


def _server(tmp, name: str, port: int, *extra: str) -> subprocess.Popen:
    (tmp / name).mkdir()
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp / name), "--requirepass", PASSWORD,
                             "--masterauth", PASSWORD, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def sentinel_redis(tmp_path):
    master_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    procs = {"master": _server(tmp_path, "master", master_port),
             "replica": _server(tmp_path, "replica", replica_port, "--replicaof", "127.0.0.1", str(master_port))}
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\nrequirepass {PASSWORD}\n"
                    f"sentinel monitor pink 127.0.0.1 {master_port} 1\n"
                    f"sentinel auth-pass pink {PASSWORD}\n"
                    "sentinel down-after-milliseconds pink 1000\nsentinel failover-timeout pink 5000\n")
    procs["sentinel"] = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    replica = Redis(port=replica_port, password=PASSWORD)
    assert wait_until(lambda: replica.info("replication")["master_link_status"] == "up", 30), \
        "the replica never synced"
    sentinel = Redis(port=sentinel_port, password=PASSWORD)
    # A sentinel learns the replicas from the master's INFO (every 10 s): it can
    # only fail over to one it knows.
    assert wait_until(lambda: sentinel.execute_command("SENTINEL", "REPLICAS", "pink"), 30, 0.5), \
        "the sentinel never learnt of the replica"
    yield procs, master_port, replica_port, sentinel_port
    for proc in procs.values():
        proc.kill()
        proc.wait()


def test_a_client_through_sentinel_follows_a_failover(sentinel_redis, pink_config):
    procs, master_port, replica_port, sentinel_port = sentinel_redis
    config = dataclasses.replace(pink_config, redis_url=f"redis://:{PASSWORD}@127.0.0.1:1/3",
                                 redis_sentinels=[f"127.0.0.1:{sentinel_port}"], redis_master="pink")
    client = redisconn.connect(config)
    client.set("before", "1")
    assert Redis(port=master_port, password=PASSWORD, db=3).get("before") == b"1"  # the master, database 3
    # Replication is asynchronous: a write the replica has not received is lost
    # with the master (the leader then rebuilds missing jobs from etcd).
    assert client.wait(1, 5000) == 1

    procs["master"].send_signal(signal.SIGKILL)
    procs["master"].wait()
    started = time.monotonic()

    def writes() -> bool:
        client.set("after", "2")
        return True

    assert wait_until(writes, 60, 0.5), "the client never reached a new master"
    assert client.connection_pool.get_master_address() == ("127.0.0.1", replica_port)
    assert client.get("before") == b"1"  # replicated before the failover
    Queue("pink-test", connection=client).enqueue("builtins.len", [1])
    assert Queue("pink-test", connection=client).count == 1
    assert time.monotonic() - started < 60


def test_a_sentinel_on_a_host_that_is_gone_is_passed_over(sentinel_redis, pink_config):
    """A dead host drops the SYNs to its sentinel: the client asks the next sentinel after one
    short try, where redis-py's defaults (4 tries of the whole socket timeout, with backoff) made
    the first command after web1 died in the lab wait 53 s."""
    _, master_port, _, sentinel_port = sentinel_redis
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))
    gone.listen(0)
    filler = socket.create_connection(gone.getsockname())  # the backlog is full: later SYNs are dropped
    try:
        config = dataclasses.replace(pink_config, redis_url=f"redis://:{PASSWORD}@127.0.0.1:1/5",
                                     redis_sentinels=[f"127.0.0.1:{gone.getsockname()[1]}",
                                                      f"127.0.0.1:{sentinel_port}"], redis_master="pink")
        client = redisconn.connect(config)
        started = time.monotonic()
        assert client.ping()
        waited = time.monotonic() - started
        assert client.connection_pool.get_master_address() == ("127.0.0.1", master_port)
        assert waited < 3 * redisconn.CONNECT_TIMEOUT, f"{waited:.1f} s to pass over the dead sentinel"
    finally:
        filler.close()
        gone.close()


def test_without_sentinels_the_url_is_used_as_it_is(pink_config):
    client = redisconn.connect(pink_config)
    assert client.connection_pool.connection_kwargs["port"] == int(pink_config.redis_url.rsplit(":", 1)[1]
                                                                  .split("/")[0])
    assert client.ping()


def test_a_worker_through_sentinel_stops_when_asked(sentinel_redis, config_variant, cluster, tmp_path):
    """SIGTERM (systemd's stop, a deploy's restart) ends an idle pink-worker
    through Sentinel at once: the interrupted dequeue must not leave its
    reply in the way of the worker's last writes (it waited for minutes)."""
    _, _, _, sentinel_port = sentinel_redis
    config = config_variant("sentinel-worker", redis_url=f"redis://:{PASSWORD}@127.0.0.1:1/4",
                            redis_sentinels=[f"127.0.0.1:{sentinel_port}"], redis_master="pink")
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([cluster.executable("pink-worker"), "--config", config, "--name", "sentinel-w"],
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: "Listening on" in log.read_text(), 30), log.read_text()
        time.sleep(1)  # inside the blocking dequeue
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)  # RQ's dequeue would have blocked for minutes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
