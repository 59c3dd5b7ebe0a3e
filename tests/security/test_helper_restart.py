"""Restarting a helper process fails nobody's work.

A web node's presence in etcd (`Keys.web`) belongs to what holds its uploads:
pink-web and its store (`pink.nodes.WebPresence`). The leader fails a task as
"upload lost" only when that presence has been missing for a lease, i.e. no
pink-web of the host has been up for `node_ttl` (the upload is gone: nothing
can serve it), and only while the task still needs the upload (queued, or
placed on a runner that lacks the image). A task whose image is on its
runner goes on whatever becomes of its web node.

The runner here takes one container at a time, so one task runs while the
next waits in the queue with its upload on web1.
"""

from __future__ import annotations

import time

import pytest

from pink import config as pink_config_module
from devcluster.ports import free_port
from tests import images
from tests.helpers import Api, make_user

LEASES_DOWN = 3  # a helper stays down this many leases (node_ttl) in these tests
RUN_SECONDS = 25  # the running task's length: it outlives every stop below


@pytest.fixture
def one_slot(config_variant):
    """web1's config with a runner that runs one container at a time."""
    return config_variant("one-slot", runner={"max_containers": 1})


@pytest.fixture
def busybox(docker_client, tmp_path):
    return images.save_image(docker_client, images.ensure_busybox_image(docker_client), tmp_path / "bb.tar")


def running_and_waiting(api: Api, archive) -> tuple[str, str]:
    """Submit a long task and wait until it runs, then one that waits behind it."""
    first = api.submit(archive, cmd=f"sh -c 'sleep {RUN_SECONDS}; echo one > /one.txt'")
    assert first.status_code == 201, first.text
    running = first.json()["task"]["id"]
    api.wait(running, states={"running"}, timeout=90)
    second = api.submit(archive, cmd="sh -c 'echo two > /two.txt'")
    assert second.status_code == 201, second.text
    waiting = second.json()["task"]["id"]
    time.sleep(1)
    assert api.task(waiting)["state"] == "queued", api.task(waiting)
    return running, waiting


def test_stopping_a_web_nodes_leader_fails_no_task(pink_processes, config_variant, pink_config, one_slot,
                                                    busybox):
    """A user's tasks do not fail because a helper process of their web node
    (its leader) was stopped for several leases while another leader led:
    the running task and the one waiting with its upload there both succeed."""
    for start in (pink_processes.web, pink_processes.worker):
        start(config_path=one_slot)
    leader1 = pink_processes.leader(one_slot, role="leader1")
    web2 = config_variant("web2", host="web2", web_port=free_port())
    pink_processes.leader(web2, role="leader2")  # leads while web1's is down
    pink_processes.runner(config_path=one_slot)
    api = Api(pink_config_module.load(one_slot), make_user(pink_config, "alice"))
    running, waiting = running_and_waiting(api, busybox)

    pink_processes.stop(leader1)
    time.sleep(LEASES_DOWN * pink_config.node_ttl + 1)
    assert api.task(waiting)["state"] == "queued", api.task(waiting)
    pink_processes.leader(one_slot, role="leader1")

    for task_id in (running, waiting):
        task = api.wait(task_id, timeout=120)
        assert task["state"] == "succeeded", task


def test_a_web_node_gone_for_a_lease_fails_only_tasks_needing_its_upload(pink_processes, pink_config, one_slot,
                                                                         busybox):
    """pink-web restarted within a lease loses nothing. pink-web down for
    several leases is its web node gone: the waiting task whose upload is
    there fails with "upload lost", and the task already on its runner
    finishes succeeded."""
    web = pink_processes.web(one_slot)
    pink_processes.worker(config_path=one_slot)
    pink_processes.leader(one_slot)
    pink_processes.runner(config_path=one_slot)
    api = Api(pink_config_module.load(one_slot), make_user(pink_config, "alice"))
    running, waiting = running_and_waiting(api, busybox)

    pink_processes.stop(web)  # a quick restart: not a loss
    web = pink_processes.web(one_slot)
    time.sleep(2 * pink_config.node_ttl)
    assert api.task(waiting)["state"] == "queued", api.task(waiting)

    pink_processes.stop(web)
    time.sleep(LEASES_DOWN * pink_config.node_ttl + 1)
    pink_processes.web(one_slot)

    task = api.wait(waiting, timeout=60)
    assert task["state"] == "failed" and task["error"] == "upload lost with web1; submit again", task
    task = api.wait(running, timeout=120)
    assert task["state"] == "succeeded", task


def test_a_placed_task_whose_runner_holds_its_image_outlives_its_web_node(pink_processes, pink_config,
                                                                         config_variant, one_slot, busybox):
    """A task placed on a runner that already holds its image needs nothing
    from its web node: with that node gone for several leases (before its
    transfer job ran), it is handed over through the shared run queue and
    succeeds instead of failing as "upload lost"."""
    web = pink_processes.web(one_slot)
    worker1 = pink_processes.worker(config_path=one_slot)
    pink_processes.leader(one_slot)
    pink_processes.runner(config_path=one_slot)
    api = Api(pink_config_module.load(one_slot), make_user(pink_config, "alice"))
    warm = api.wait(api.submit(busybox, cmd="echo warm").json()["task"]["id"], timeout=120)
    assert warm["state"] == "succeeded", warm  # the runner holds the image now

    pink_processes.stop(worker1)  # web1's transfer queue is served no more
    pink_processes.worker(2, config_variant("web2", host="web2"))  # serves the shared run and finalize queues
    task_id = api.submit(busybox, cmd="sh -c 'echo again > /again.txt'").json()["task"]["id"]
    assert api.wait(task_id, states={"placed"}, timeout=30)["state"] == "placed"
    pink_processes.stop(web)
    time.sleep(LEASES_DOWN * pink_config.node_ttl + 1)
    pink_processes.web(one_slot)

    task = api.wait(task_id, timeout=120)
    assert task["state"] == "succeeded", task
    assert any("web node web1 is gone" in entry["detail"] for entry in task["history"]), task["history"]
