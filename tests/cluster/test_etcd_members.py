"""etcd members leave and join by deploy (issue 19): `make etcd-remove`
takes db out of the cluster and wipes its etcd, PINK goes on with two
members, and the next `make deploy` (db still in [etcd]) adds it back with
`member add`, so the cluster is three again. The lab must be up."""

from __future__ import annotations

import json
import time

from tests.cluster.lab import make

MEMBER = "/etc/etcd/pki/member"  # the members' certificate: enough for member list and health


def _members(lab) -> set[str]:
    listed = json.loads(lab.etcdctl("web2", "member list -w json", MEMBER,
                                    endpoints="https://10.77.0.12:2379"))["members"]
    return {m.get("name") or "(unstarted)" for m in listed}


def _a_task_runs(lab, archive) -> None:
    task = lab.client.submit(archive, name="etcd-members", env={"SECONDS": "1"})
    deadline = time.monotonic() + 180
    while (state := lab.client.get(task["id"])["state"]) not in ("succeeded", "failed", "cancelled", "timed_out"):
        assert time.monotonic() < deadline, f"the task is still {state}"
        time.sleep(1)
    assert state == "succeeded", lab.client.get(task["id"])


def test_a_member_removed_and_added_back_by_deploy(lab, archive):
    assert _members(lab) == {"web1", "web2", "db"}
    make("etcd-remove", "MEMBER=db")
    assert _members(lab) == {"web1", "web2"}
    assert lab.sh("db", "test -e /var/lib/etcd/pink && echo kept || echo gone").strip() == "gone"
    _a_task_runs(lab, archive)
    make("deploy")  # db is still in [etcd]: it joins the running cluster
    assert _members(lab) == {"web1", "web2", "db"}
    health = lab.etcdctl("web2", "endpoint health", MEMBER)
    assert health.count("is healthy") == 3, health
    _a_task_runs(lab, archive)
