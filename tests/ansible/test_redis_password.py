"""Rotating the Redis password (issue 19): Redis and Sentinel rewrite their
own config files with copies of the password (CONFIG REWRITE after a
failover), below PINK's include, where an old copy would win over the new
one. The redis role's password tasks, run by ansible-playbook on files as
a real Redis 7 and Sentinel rewrote them, leave both answering to the new
password only, keep what they learned, and change nothing on a second run."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

ROLE_TASKS = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "redis" / "tasks" / "password.yml"
OLD, NEW = "old-secret-0123", "new-secret-4567"

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, f"{argv[0]} did not start"
            time.sleep(0.05)


def _rewritten(tmp: Path) -> tuple[int, int]:
    """redis.conf and sentinel.conf as Redis and Sentinel rewrite them while
    the password is OLD (a replica that followed a failover; a Sentinel that
    learned its master's state). Returns their ports."""
    rport, sport = _port(), _port()
    (tmp / "pink.conf").write_text(f"requirepass {OLD}\nmasterauth {OLD}\n")
    (tmp / "redis.conf").write_text(f"port {rport}\nbind 127.0.0.1\ndir {tmp}\ninclude {tmp}/pink.conf\n")
    (tmp / "sentinel.conf").write_text(
        f'port {sport}\nbind 127.0.0.1\nrequirepass "{OLD}"\ndir {tmp}\nsentinel resolve-hostnames no\n'
        f"sentinel monitor pink 127.0.0.1 {rport} 1\nsentinel auth-pass pink {OLD}\n")
    server = _start(["redis-server", str(tmp / "redis.conf")], rport)
    sentinel = _start(["redis-server", str(tmp / "sentinel.conf"), "--sentinel"], sport)
    try:
        r = redis.Redis(port=rport, password=OLD)
        r.replicaof("127.0.0.1", _port())  # what a failover does, then CONFIG REWRITE
        r.config_rewrite()
        r.replicaof("NO", "ONE")
        redis.Redis(port=sport, password=OLD).execute_command("SENTINEL", "SET", "pink", "quorum", "1")
    finally:
        for proc in (sentinel, server):
            proc.terminate()
            proc.wait(10)
    (tmp / "pink.conf").write_text(f"requirepass {NEW}\nmasterauth {NEW}\n")  # what the role templates
    return rport, sport


def _apply(tmp: Path) -> int:
    """Run the role's password tasks on `tmp`; how many tasks changed something."""
    playbook = tmp / "play.yml"
    playbook.write_text(json.dumps([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {"redis_conf_dir": str(tmp), "redis_requirepass": NEW, "redis_sentinel_master": "pink",
                 "redis_replicated": True},
        "tasks": [{"ansible.builtin.import_tasks": str(ROLE_TASKS)}],
        "handlers": [{"name": n, "ansible.builtin.debug": {"msg": n}} for n in ("Restart Redis", "Restart Sentinel")],
    }]))
    out = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", str(playbook)],
                         capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), "ANSIBLE_NOCOLOR": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    return int(re.search(r"^localhost\s+:.*changed=(\d+)", out.stdout, re.M).group(1))


def _answers(port: int, password: str) -> bool:
    try:
        return redis.Redis(port=port, password=password, socket_timeout=2).ping()
    except redis.AuthenticationError:
        return False


def test_a_rotated_password_reaches_the_copies_redis_and_sentinel_rewrote(tmp_path):
    rport, sport = _rewritten(tmp_path)
    sentinel_before = (tmp_path / "sentinel.conf").read_text()
    assert f'requirepass "{OLD}"' in (tmp_path / "redis.conf").read_text()  # the copy that would win
    assert "sentinel myid" in sentinel_before and "user default on #" in sentinel_before
    assert _apply(tmp_path) == 2
    server = _start(["redis-server", str(tmp_path / "redis.conf")], rport)
    sentinel = _start(["redis-server", str(tmp_path / "sentinel.conf"), "--sentinel"], sport)
    try:
        assert _answers(rport, NEW) and not _answers(rport, OLD)
        assert _answers(sport, NEW) and not _answers(sport, OLD)
        myid = next(line for line in sentinel_before.splitlines() if line.startswith("sentinel myid"))
        assert myid in (tmp_path / "sentinel.conf").read_text()  # what Sentinel learned stays
    finally:
        for proc in (sentinel, server):
            proc.terminate()
            proc.wait(10)
    assert _apply(tmp_path) == 0  # a second deploy touches nothing
