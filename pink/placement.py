"""Placement and the queue: which task goes next, to which runner and GPUs. Pure logic.

Given the live node records and their reservations (both read from etcd by
the transfer job), pick a runner with enough free GPUs and container slots,
preferring one that already holds the image, then the least loaded. The
caller commits the choice as a compare-and-swap on the node's reservation
record, so two workers placing at once can never double-book a GPU.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class Limits:
    """Per-user limits the queue enforces (None: no limit)."""

    gpus_per_user: int | None = None  # GPUs one user's tasks may hold at once


@dataclass
class Plan:
    """One pass over the queue: who is placed where, who waits and why, in what order."""

    choices: dict[str, Choice] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def position(self, task_id: str) -> int | None:
        """1-based place among the tasks still waiting, or None if placed or unknown."""
        waiting = [t for t in self.order if t in self.waiting]
        return waiting.index(task_id) + 1 if task_id in self.waiting else None


def queue_key(task: dict) -> tuple:
    """FIFO within a priority (higher first)."""
    return (-task["params"].get("priority", 0), task["created_at"], task["id"])


def plan(queued: list[dict], nodes: list[dict], allocs: dict[str, dict], in_use: dict[str, int],
         limits: Limits = Limits()) -> Plan:
    """Serve the queue as one scheduler would, without side effects.

    Each user's tasks stay in FIFO order within a priority; across users the
    next placement goes to the highest priority, then to the user holding the
    fewest GPUs now (fair share). A task that does not fit is passed over
    (others may backfill) with the reason recorded. Every transfer job runs
    the same plan and commits only its own task's line of it.
    """
    allocs = {name: dict(entries) for name, entries in allocs.items()}
    in_use = dict(in_use)
    queues: dict[str, list[dict]] = defaultdict(list)
    for task in sorted(queued, key=queue_key, reverse=True):
        queues[task["user"]].append(task)  # reversed: pop() takes the head
    result = Plan()
    while queues:
        user = min(queues, key=lambda u: (queue_key(queues[u][-1])[0], in_use.get(u, 0),
                                          queue_key(queues[u][-1])[1:]))
        task = queues[user].pop()
        if not queues[user]:
            del queues[user]
        result.order.append(task["id"])
        want = task["params"]["gpus"]
        limit = limits.gpus_per_user
        if want and limit is not None and in_use.get(user, 0) + want > limit:
            result.waiting[task["id"]] = f"user limit: {in_use.get(user, 0)} GPUs in use (limit {limit})"
            continue
        choice = choose(task, nodes, allocs)
        if choice is None:
            result.waiting[task["id"]] = why_waiting(task, nodes)
            continue
        result.choices[task["id"]] = choice
        allocs.setdefault(choice.node, {})[task["id"]] = {"gpus": choice.gpus}
        in_use[user] = in_use.get(user, 0) + want
    return result
