"""The redis role's rolling restart (issue 19): a deploy that changes every
Redis host's settings restarts them one at a time, and RQ's queues survive.
Redis persists nothing, so a master restarted in place would come back empty
and its replicas would copy the emptiness; `files/redis-restart.sh` has
Sentinel fail a master over first. Run here against a real Redis 7 master,
two replicas and three Sentinels, with their config files (Sentinel rewrites
them, as on a host), restarted with SIGTERM and their own config as systemd
would, at the role's Sentinel settings."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from redis import Redis

from devcluster.ports import free_port
from devcluster.processes import wait_until

SCRIPT = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "redis" / "files" / "redis-restart.sh"
PASSWORD = "restart-test-" + "y" * 16
DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS = 5000, 30000  # the role's defaults
TURN_TIMEOUT = 120  # redis_restart_timeout's default

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")

RESTART = """#!/bin/sh
# What `systemctl restart` does to {name}: SIGTERM, then the same config again.
pid=$(cat {pidfile})
kill "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
exec redis-server {conf} {extra}
"""


def _node(tmp: Path, name: str, port: int, own: str, sentinel: bool = False, follow: str = "") -> Path:
    """A host's config files (a Redis: redis.conf including pink.conf at its
    end, as the role writes them), a restart script, and the daemon started."""
    home = tmp / name
    home.mkdir()
    pidfile, conf = home / "pid", home / "redis.conf"
    run = f"daemonize yes\npidfile {pidfile}\nlogfile {home}/log\n"
    if sentinel:
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {home}\nrequirepass {PASSWORD}\n{run}{own}")
    else:
        (home / "pink.conf").write_text(own.format(port=port, home=home))
        conf.write_text(f"# the role's marker\n{run}{follow}include {home}/pink.conf\n")
    restart = home / "restart.sh"
    restart.write_text(RESTART.format(name=name, pidfile=pidfile, conf=conf, extra="--sentinel" if sentinel else ""))
    restart.chmod(0o755)
    subprocess.run(["redis-server", str(conf), *(["--sentinel"] if sentinel else [])], check=True)
    return restart


PINK_CONF = ("bind 127.0.0.1\nport {port}\nrequirepass " + PASSWORD + "\nmasterauth " + PASSWORD +
             "\nsave \"\"\nappendonly no\nmaxmemory {maxmemory}\ndir {home}\n")


def _stop_all(tmp: Path) -> None:
    for pidfile in tmp.glob("*/pid"):
        try:
            os.kill(int(pidfile.read_text()), 9)
        except (OSError, ValueError):
            pass


@pytest.fixture
def replicated(tmp_path):
    """{name: (port, restart script)} of a master, two replicas and three sentinels."""
    ports = {name: free_port() for name in ("r1", "r2", "r3", "s1", "s2", "s3")}
    master = ports["r1"]
    nodes = {}
    try:
        for name in ("r1", "r2", "r3"):
            follow = f"replicaof 127.0.0.1 {master}\n" if name != "r1" else ""
            nodes[name] = (ports[name], _node(tmp_path, name, ports[name], PINK_CONF.replace("{maxmemory}", "512mb"),
                                              follow=follow))
        for name in ("s1", "s2", "s3"):
            nodes[name] = (ports[name], _node(tmp_path, name, ports[name], (
                "sentinel resolve-hostnames no\n"
                f"sentinel monitor pink 127.0.0.1 {master} 2\nsentinel auth-pass pink {PASSWORD}\n"
                f"sentinel down-after-milliseconds pink {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout pink {FAILOVER_TIMEOUT_MS}\nsentinel parallel-syncs pink 1\n"),
                sentinel=True))
        for name in ("r2", "r3"):
            replica = Redis(port=ports[name], password=PASSWORD)
            assert wait_until(lambda: replica.info("replication").get("master_link_status") == "up", 30)
        yield nodes
    finally:
        _stop_all(tmp_path)


def _turn(nodes: dict, name: str) -> subprocess.CompletedProcess:
    """One host's turn, as tasks/restart.yml runs it."""
    port, restart = nodes[name]
    unit = "redis-sentinel" if name.startswith("s") else "redis-server"
    out = subprocess.run(["bash", str(SCRIPT), unit, str(nodes["r1"][0] if unit == "redis-sentinel" else port),
                          str(port if unit == "redis-sentinel" else nodes["s1"][0]), "pink", str(TURN_TIMEOUT),
                          str(restart.parent), str(restart)],
                         # A Redis's turn reads the password from its pink.conf, as on a host.
                         env={**os.environ, **({"REDISCLI_AUTH": PASSWORD} if unit == "redis-sentinel" else {})},
                         capture_output=True, text=True, timeout=TURN_TIMEOUT + 30)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _master(nodes: dict) -> Redis:
    found = [n for n in ("r1", "r2", "r3")
             if Redis(port=nodes[n][0], password=PASSWORD).info("replication")["role"] == "master"]
    assert len(found) == 1, found
    return Redis(port=nodes[found[0]][0], password=PASSWORD)


@pytest.mark.timeout(900)
def test_restarting_every_redis_host_in_turn_keeps_the_queues(replicated):
    nodes = replicated
    first = Redis(port=nodes["r1"][0], password=PASSWORD)
    first.rpush("rq:queue:pink-transfer", *[f"job-{i}" for i in range(100)])
    first.set("rq:job:job-1", "a job")
    assert first.wait(2, 5000) == 2
    for name in ("r1", "r2", "r3"):  # the deploy's change to every host's pink.conf
        home = nodes[name][1].parent
        (home / "pink.conf").write_text(PINK_CONF.format(port=nodes[name][0], home=home, maxmemory="1gb"))

    said = [_turn(nodes, name).stderr for name in ("r1", "r2", "r3", "s1", "s2", "s3")]

    assert "the master: Sentinel fails it over first" in said[0]  # r1 was the master
    master = _master(nodes)
    assert master.llen("rq:queue:pink-transfer") == 100 and master.get("rq:job:job-1") == b"a job"
    assert master.info("replication")["connected_slaves"] == 2
    for name in ("r1", "r2", "r3"):  # the failover's rewrite copied maxmemory 512mb into r1's redis.conf
        assert Redis(port=nodes[name][0], password=PASSWORD).config_get("maxmemory") == {"maxmemory": str(1 << 30)}
    for name in ("s1", "s2", "s3"):
        sentinel = Redis(port=nodes[name][0], password=PASSWORD)
        assert sentinel.execute_command("SENTINEL", "CKQUORUM", "pink").startswith(b"OK")


def test_a_rotated_password_restarts_in_place(replicated):
    """A Redis that refuses the password the script was given (the deploy
    rotates it) is restarted in place: no failover can be asked of it."""
    nodes = replicated
    port, restart = nodes["r2"]
    out = subprocess.run(["bash", str(SCRIPT), "redis-server", str(port), str(nodes["s1"][0]), "pink", "30",
                          str(restart.parent), str(restart)], env={**os.environ, "REDISCLI_AUTH": "not-the-password-0000"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "answers to the current password" in out.stderr, out.stderr
    assert Redis(port=port, password=PASSWORD).ping()  # restarted, with its own (old) password
