"""Placement: which runner gets a task, and which of its GPUs. Pure logic.

Given the live node records and their reservations (both read from etcd by
the transfer job), pick a runner with enough free GPUs and container slots,
preferring one that already holds the image, then the least loaded. The
caller commits the choice as a compare-and-swap on the node's reservation
record, so two workers placing at once can never double-book a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    node: str
    gpus: list[str]


def free_gpus(node: dict, alloc: dict) -> list[str]:
    used = {gpu for entry in alloc.values() for gpu in entry.get("gpus", [])}
    return [gpu for gpu in node.get("gpus", []) if gpu not in used]


def fits(node: dict, alloc: dict, gpus: int) -> bool:
    if node.get("state", "ready") != "ready":
        return False
    if len(alloc) >= node.get("max_containers", 1):
        return False
    return len(free_gpus(node, alloc)) >= gpus


def choose(task: dict, nodes: list[dict], allocs: dict[str, dict]) -> Choice | None:
    """The best runner for `task`, or None when none fits now."""
    want = task["params"]["gpus"]
    sha = task["image"]["sha256"]
    candidates = [n for n in nodes if fits(n, allocs.get(n["name"], {}), want)]
    if not candidates:
        return None

    def rank(node):
        alloc = allocs.get(node["name"], {})
        has_image = sha in node.get("images", [])
        return (not has_image, len(alloc) / max(node.get("max_containers", 1), 1), node["name"])

    best = min(candidates, key=rank)
    return Choice(node=best["name"], gpus=free_gpus(best, allocs.get(best["name"], {}))[:want])


def why_waiting(task: dict, nodes: list[dict]) -> str:
    """A sentence for people saying why no runner fits."""
    want = task["params"]["gpus"]
    ready = [n for n in nodes if n.get("state", "ready") == "ready"]
    if not nodes:
        return "no runner is registered"
    if not ready:
        return "no runner is accepting tasks"
    if not any(len(n.get("gpus", [])) >= want for n in ready):
        return f"no runner has {want} GPUs"
    return f"no runner with {want} free GPUs" if want else "every runner is full"
