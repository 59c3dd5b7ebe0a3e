"""A Redis setting changed on every Redis host restarts them one at a time
(issue 19; the redis role's tasks/restart.yml): the master is failed over
first, and RQ's queues survive the deploy, while tasks run. The lab must be
up; the test deploys twice (the setting, then the default back)."""

from __future__ import annotations

import time

from pink.tasks import FINAL_NAMES
from tests.cluster.lab import make

CANARY = "pink-lab-canary"  # a key in database 15, which PINK does not use


def _turns(log: str) -> list[str]:
    """The hosts whose Redis the rolling restart restarted, in order."""
    section = log.split("Restart the marked units one host at a time", 1)[1].split("TASK [", 1)[0]
    return [line.split("[", 1)[1].split("]", 1)[0] for line in section.splitlines() if line.startswith("changed:")]


def test_a_redis_setting_on_every_host_restarts_them_in_turn_and_keeps_the_queues(lab, archive):
    lab.redis_cli(_master_host(lab), f"-n 15 SET {CANARY} kept")
    tasks = [lab.client.submit(archive, name=f"redis-restart-{i}", env={"SECONDS": "30"})["id"] for i in range(4)]

    log = make("deploy", "ANSIBLE_ARGS=-e redis_maxmemory=2gb", log="deploy-redis-2gb")
    assert sorted(_turns(log)) == ["db", "web1", "web2"], _turns(log)
    for name in ("db", "web1", "web2"):
        assert lab.redis_cli(name, "CONFIG GET maxmemory").split()[1] == str(2 << 30)
    assert lab.redis_cli(_master_host(lab), f"-n 15 GET {CANARY}").strip() == "kept", "the queues were emptied"

    deadline = time.monotonic() + 300
    while not all(lab.client.get(t)["state"] in FINAL_NAMES for t in tasks):
        assert time.monotonic() < deadline, "tasks never ended"
        time.sleep(2)
    assert [(t["state"], t["attempt"]) for t in map(lab.client.get, tasks)] == [("succeeded", 1)] * 4

    make("deploy", log="deploy-redis-default")  # the default back: another rolling restart
    assert lab.redis_cli(_master_host(lab), "CONFIG GET maxmemory").split()[1] == "0"
    lab.redis_cli(_master_host(lab), f"-n 15 DEL {CANARY}")


def _master_host(lab) -> str:
    """The lab machine whose Redis is the master now."""
    ip = lab.redis_master()
    return next(name for name, h in lab.hosts.items() if h["ip"] == ip)
