"""Placement: pure logic, tested without services."""

from __future__ import annotations

from dataclasses import replace

from pink.nodes import NodeView
from pink.placement import choose, free_gpus, why_waiting
from pink.tasks import Params, new_record


def node(name, gpus=(), images=(), max_containers=4, state="ready"):
    return NodeView(name=name, epoch=1, gpus=list(gpus), images=list(images), max_containers=max_containers,
                    state=state)


def task(gpus=0, sha="a" * 64):
    return new_record("t1", "alice", Params(gpus=gpus), {"sha256": sha, "size": 100}, "web1")


def test_no_runner_means_waiting_with_a_reason():
    assert choose(task(), [], {}) is None
    assert why_waiting(task(), []) == "no runner is registered"


def test_gpus_reserved_by_others_are_not_offered():
    nodes = [node("a", gpus=["g0", "g1"])]
    allocs = {"a": {"t1": {"gpus": ["g0"]}}}
    assert free_gpus(nodes[0], allocs["a"]) == ["g1"]
    assert choose(task(gpus=1), nodes, allocs).gpus == ["g1"]
    assert choose(task(gpus=2), nodes, allocs) is None
    assert why_waiting(task(gpus=2), nodes) == "no runner with 2 free GPUs"
    assert why_waiting(task(gpus=3), nodes) == "no runner has 3 GPUs"


def test_prefers_a_runner_holding_the_image_then_the_least_loaded():
    nodes = [node("a"), node("b", images=["f" * 64]), node("c")]
    allocs = {"a": {"t1": {}}, "c": {}}
    assert choose(task(sha="f" * 64), nodes, allocs).node == "b"
    assert choose(task(), nodes, allocs).node in {"b", "c"}
    assert choose(task(), [node("a"), node("c")], allocs).node == "c"


def test_full_or_draining_runners_take_nothing():
    nodes = [node("a", max_containers=1), node("b", state="draining")]
    assert choose(task(), nodes, {"a": {"t1": {}}}) is None


def test_a_runner_without_spool_room_takes_only_images_it_holds():
    full = replace(node("a", images=["f" * 64]), spool_free=50, spool_images=2, max_spool_images=2)
    assert choose(task(sha="e" * 64), [full], {}) is None
    assert why_waiting(task(sha="e" * 64), [full]) == "no runner has room in its spool for this image"
    assert choose(task(sha="f" * 64), [full], {}).node == "a"
    roomy = replace(full, spool_free=10**9, spool_images=0)
    assert choose(task(sha="e" * 64), [roomy], {}).node == "a"
