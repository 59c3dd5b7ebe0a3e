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


class Capacity:
    """What is free on each ready runner, updated as a plan hands it out.

    Within one plan capacity only shrinks, so once no runner fits N GPUs no
    later task wanting N or more can fit either: `_fails_from` short-cuts
    those (the common case of a full cluster with a long queue).
    """

    def __init__(self, nodes: list[dict], allocs: dict[str, dict]):
        self.ready = [n for n in nodes if n.get("state", "ready") == "ready"]
        self.free = {n["name"]: free_gpus(n, allocs.get(n["name"], {})) for n in self.ready}
        self.used = {n["name"]: len(allocs.get(n["name"], {})) for n in self.ready}
        self.slots = {n["name"]: max(n.get("max_containers", 1), 1) for n in self.ready}
        self.images = {n["name"]: set(n.get("images", [])) for n in self.ready}
        # room in the spool for images not loaded yet (None: not reported, not checked)
        self.spool_free = {n["name"]: n.get("spool_free") for n in self.ready}
        self.spool_room = {n["name"]: (n["max_spool_images"] - n.get("spool_images", 0))
                           if n.get("max_spool_images") else None for n in self.ready}
        self._fails_from: int | None = None

    def choose(self, task: dict) -> Choice | None:
        """The best runner for `task`: holding its image, then least loaded."""
        want = task["params"]["gpus"]
        if self._fails_from is not None and want >= self._fails_from:
            return None
        sha = task["image"]["sha256"]
        best, best_rank, spool_full = None, None, False
        for name, free in self.free.items():
            if self.used[name] >= self.slots[name] or len(free) < want:
                continue
            holds = sha in self.images[name]
            if not holds and not self._spool_fits(name, task["image"]["size"]):
                spool_full = True  # depends on the image, not only on the GPU count
                continue
            rank = (not holds, self.used[name] / self.slots[name], name)
            if best_rank is None or rank < best_rank:
                best, best_rank = name, rank
        if best is None:
            if not spool_full:
                self._fails_from = want if self._fails_from is None else min(self._fails_from, want)
            return None
        return Choice(node=best, gpus=self.free[best][:want])

    def _spool_fits(self, name: str, size: int) -> bool:
        free, room = self.spool_free[name], self.spool_room[name]
        return (free is None or size <= free) and (room is None or room > 0)

    def take(self, choice: Choice, task: dict) -> None:
        taken = set(choice.gpus)
        self.free[choice.node] = [g for g in self.free[choice.node] if g not in taken]
        self.used[choice.node] += 1
        if task["image"]["sha256"] not in self.images[choice.node]:
            if self.spool_free[choice.node] is not None:
                self.spool_free[choice.node] -= task["image"]["size"]
            if self.spool_room[choice.node] is not None:
                self.spool_room[choice.node] -= 1
            self.images[choice.node].add(task["image"]["sha256"])


def choose(task: dict, nodes: list[dict], allocs: dict[str, dict]) -> Choice | None:
    """The best runner for `task` given the current reservations, or None."""
    return Capacity(nodes, allocs).choose(task)


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
    if not any(_spool_could_fit(n, task) for n in ready):
        return "no runner has room in its spool for this image"
    return f"no runner with {want} free GPUs" if want else "every runner is full"


def _spool_could_fit(node: dict, task: dict) -> bool:
    if task["image"]["sha256"] in node.get("images", []):
        return True
    free = node.get("spool_free")
    return free is None or task["image"]["size"] <= free


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
    capacity = Capacity(nodes, allocs)
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
        choice = capacity.choose(task)
        if choice is None:
            result.waiting[task["id"]] = why_waiting(task, nodes)
            continue
        result.choices[task["id"]] = choice
        capacity.take(choice, task)
        in_use[user] = in_use.get(user, 0) + want
    return result
