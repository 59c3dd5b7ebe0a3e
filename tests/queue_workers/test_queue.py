"""The queue: FIFO within a priority, fair share across users, backfill, user limits."""

from __future__ import annotations


import pytest

from dataclasses import replace

from pink.nodes import NodeView
from pink.placement import Limits, plan
from pink.tasks import Params, new_record
from tests import images
from tests.helpers import Api, make_user


def node(name, gpus):
    return NodeView(name=name, epoch=1, gpus=[f"{name}-g{i}" for i in range(gpus)], max_containers=8)


def task(tid, user, gpus=1, created=0.0, priority=0):
    return replace(new_record(tid, user, Params(gpus=gpus, priority=priority), {"sha256": "x", "size": 100},
                              "web1"), created_at=created)


def test_fifo_within_a_priority_and_higher_priority_first():
    queued = [task("a", "u", created=1), task("b", "u", created=2), task("c", "u", created=3, priority=5)]
    p = plan(queued, [node("n", 2)], {}, {})
    assert p.order == ["c", "a", "b"]
    assert set(p.choices) == {"c", "a"} and p.waiting == {"b": "no runner with 1 free GPUs"}
    assert p.position("b") == 1 and p.position("a") is None


def test_the_next_gpu_goes_to_the_user_holding_fewest():
    queued = [task("old", "alice", created=1), task("new", "bob", created=2)]
    p = plan(queued, [node("n", 3)], {"n": {"x": {"gpus": ["n-g0", "n-g1"]}}}, {"alice": 2})
    assert list(p.choices) == ["new"] and "old" in p.waiting


def test_a_task_that_does_not_fit_lets_smaller_ones_through():
    queued = [task("big", "u", gpus=2, created=1), task("small", "u", gpus=1, created=2)]
    p = plan(queued, [node("n", 1)], {}, {})
    assert list(p.choices) == ["small"]
    assert p.waiting["big"] == "no runner has 2 GPUs"


def test_user_limit_holds_tasks_with_a_reason():
    queued = [task("a1", "alice", created=1), task("a2", "alice", created=2), task("b1", "bob", created=3)]
    p = plan(queued, [node("n", 4)], {}, {"alice": 1}, Limits(gpus_per_user=2))
    assert set(p.choices) == {"a1", "b1"}
    assert p.waiting["a2"] == "user limit: 2 GPUs in use (limit 2)"


@pytest.fixture
def limited(pink_processes, config_variant):
    path = config_variant("limited", runner={"gpus": ["GPU-a", "GPU-b"]},
                          limits={"gpus_per_user": 1, "queued_per_user": 3})
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start(config_path=path)
    from pink import config as pink_config_module
    config = pink_config_module.load(path)
    return Api(config, make_user(config, "alice")), Api(config, make_user(config, "bob"))


def test_fair_share_and_limits_with_two_users(limited, docker_client, tmp_path):
    alice, bob = limited
    archive = images.save_image(docker_client, images.ensure_busybox_image(docker_client), tmp_path / "bb.tar")
    a1 = alice.submit(archive, cmd="sleep 4", gpus=1).json()["task"]["id"]
    alice.wait(a1, states={"running"})
    a2 = alice.submit(archive, cmd="sleep 1", gpus=1).json()["task"]["id"]
    b1 = bob.submit(archive, cmd="sleep 1", gpus=1).json()["task"]["id"]
    assert bob.wait(b1)["state"] == "succeeded"  # bob got the second GPU although alice asked first
    waiting = alice.task(a2)
    assert waiting["state"] == "queued" and waiting["position"] == 1
    assert waiting["waiting"] == "user limit: 1 GPUs in use (limit 1)"
    assert "user limit" in alice.cli("status", a2).stdout
    more = [alice.submit(archive, cmd="true", gpus=1) for _ in range(3)]
    assert [r.status_code for r in more][-1] == 429 and "limit 3" in more[-1].json()["message"]
    assert alice.wait(a2)["state"] == "succeeded"
    for r in more:
        if r.status_code == 201:
            alice.wait(r.json()["task"]["id"])
