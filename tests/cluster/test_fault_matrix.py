"""The fault matrix: a steady stream of tasks through the router while one
machine or service of the lab is lost, then brought back.

Every test prints its row of docs/faults.md (submitted, succeeded, failed
with reasons, lost, accepted twice, archived, recovery seconds) and asserts
that nothing was lost, no result was accepted twice, and every task reached
the archive.
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.lab import Stream, assert_nothing_lost, report

pytestmark = pytest.mark.timeout(1800)


def stream_with_fault(lab, archive, inject, heal, *, before: int = 10, hold: float = 0.0):
    """Start the stream, inject the fault once `before` tasks are in, hold
    it for `hold` seconds, heal, and count when every task has ended."""
    stream = Stream(lab, archive).start()
    stream.wait_submitted(before)
    fault_at = time.monotonic()
    inject()
    time.sleep(hold)
    heal()
    return stream.finish(fault_at)


def test_runner_killed_mid_task(healed, archive):
    lab = healed
    counts = stream_with_fault(lab, archive, lambda: lab.kill("run1"), lambda: None, hold=20)
    report("1. `docker kill` run1 mid-task", counts)
    assert_nothing_lost(counts)


def test_runner_cut_off_for_30s_is_fenced(healed, archive):
    lab = healed
    counts = stream_with_fault(lab, archive, lambda: lab.disconnect("run1"), lambda: lab.connect("run1"),
                               hold=30)
    report("2. run1 off the network for 30 s", counts)
    assert_nothing_lost(counts)


def test_worker_killed_while_copying_a_256mib_image(healed, archive, big_lab_archive):
    lab = healed
    stream = Stream(lab, archive).start()
    stream.wait_submitted(5)
    big = lab.client.submit(big_lab_archive, name="big", env={"SECONDS": "1"})
    holder = big["history"][0]["detail"].removeprefix("uploaded to ")  # the web host its layers are on
    deadline = time.monotonic() + 120
    while not lab.copying(big["id"]):
        assert time.monotonic() < deadline, "the big image's copy never started"
        time.sleep(0.2)
    fault_at = time.monotonic()
    lab.sh(holder, "pkill -KILL -f '[p]ink-worker --config'")  # systemd starts them again
    stream.ids.append(big["id"])
    stream.submitted_at[big["id"]] = fault_at
    counts = stream.finish(fault_at)
    report("3. kill -9 the workers copying a 256 MiB image", counts)
    assert_nothing_lost(counts)
    assert lab.client.get(big["id"])["state"] == "succeeded"


def test_web1_killed_while_it_leads_and_holds_redis_uploads_and_outputs(healed, archive, tmp_path):
    lab = healed
    roles = {"leader": lab.lead_from("web1"), "Redis master": lab.redis_master_on("web1")}
    done_before = Stream(lab, archive, total=4, interval=0.2).start()
    before = done_before.finish(time.monotonic())
    counts = stream_with_fault(lab, archive, lambda: lab.kill("web1"), lambda: None, hold=30)
    report(f"4. `docker kill` web1 ({', '.join(r for r, held in roles.items() if held) or 'no role'})",
           counts)
    assert_nothing_lost(counts, explained=("upload lost with web1; submit again",))
    assert all(roles.values()), f"web1 did not hold every role when it was killed: {roles}"
    for task_id in done_before.ids:  # outputs finished before: a copy lives on web2
        path = lab.client.download(task_id, tmp_path / task_id)
        assert path, task_id
    assert before.succeeded == before.submitted


def test_an_etcd_member_down_then_a_second(healed, archive):
    lab = healed
    # The lab's three members run no users' code (web1, web2, db); never
    # web1's here: the leader and Redis stay put.
    members = ("db", "web2")
    assert set(members) < set(lab.etcd_members) and len(lab.etcd_members) == 3

    def inject():
        lab.sh(members[0], "systemctl stop etcd")

    counts = stream_with_fault(lab, archive, inject, lambda: None, hold=20)
    # Quorum lost: writes stop, and resume once members return.
    lab.sh(members[1], "systemctl stop etcd")
    time.sleep(15)
    for host in members:
        lab.sh(host, "systemctl start etcd")
    lab.wait_healthy()
    report("5. 1 of 3 etcd members stopped (then a 2nd, 15 s)", counts)
    assert_nothing_lost(counts)
    after = Stream(lab, archive, total=4, interval=0.5).start()
    after_counts = after.finish(time.monotonic())
    report("5b. after quorum came back", after_counts)
    assert_nothing_lost(after_counts)
    assert after_counts.succeeded == after_counts.submitted


def test_database_stopped_for_60s(healed, archive):
    lab = healed
    counts = stream_with_fault(lab, archive, lambda: lab.sh("db", "systemctl stop mariadb"),
                               lambda: lab.sh("db", "systemctl start mariadb"), hold=60)
    report("6. MariaDB stopped for 60 s", counts)
    assert_nothing_lost(counts)


def test_redis_master_killed(healed, archive):
    lab = healed

    def kill_master():
        master = lab.redis_master()
        host = next(h for h, v in lab.hosts.items() if v["ip"] == master)
        lab.sh(host, "systemctl kill -s KILL redis-server")
        return host

    killed = []
    counts = stream_with_fault(lab, archive, lambda: killed.append(kill_master()),
                               lambda: None, hold=15)
    lab.sh(killed[0], "systemctl start redis-server")
    report("7. Redis master killed (Sentinel fails over)", counts)
    assert_nothing_lost(counts)
    assert lab.redis_master() != lab.hosts[killed[0]]["ip"]
