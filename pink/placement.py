"""Placement and the queue: which task goes next, to which runner and GPUs. Pure logic.

Given the live node records and their reservations (the leader's view of
etcd), pick a runner with enough free GPUs and container slots, preferring
one that already holds the image, then the least loaded. The caller commits
the choice as a compare-and-swap on the node's reservation record, so two
placers can never double-book a GPU.

A pass over 10,000 waiting tasks and 1,000 runners must take well under a
second (the leader plans the whole queue on every change), so runners are
indexed, not scanned: `_Pool` keeps them in heaps by free GPU count, ranked
by load, and a choice looks at one heap top per GPU count.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

from pink import sweeps
from pink.nodes import READY, NodeView
from pink.tasks import Task


@dataclass(frozen=True)
class Choice:
    node: str
    gpus: list[str]


def free_gpus(node: NodeView, alloc: dict) -> list[str]:
    used = {gpu for entry in alloc.values() for gpu in entry.get("gpus", [])}
    return [gpu for gpu in node.gpus if gpu not in used]


@dataclass
class _Runner:
    """What one ready runner has left while a plan hands it out."""

    name: str
    free: list[str]
    used: int
    slots: int
    images: set[str]
    spool_free: int | None  # bytes for images not loaded yet (None: not reported, not checked)
    spool_room: int | None  # images the spool may still take (None: no cap)
    version: int = 0  # bumped on every change: heap entries of older versions are stale
    rank: tuple = ()  # least loaded first; set by `changed`

    def __post_init__(self):
        self.changed()

    def changed(self) -> None:
        self.version += 1
        self.rank = (self.used / self.slots, self.name)

    @property
    def open(self) -> bool:
        return self.used < self.slots

    def spool_fits(self, size: int) -> bool:
        return ((self.spool_free is None or size <= self.spool_free)
                and (self.spool_room is None or self.spool_room > 0))


class _Pool:
    """A set of runners, least loaded first, by how many GPUs each has free.

    Heaps hold (rank, version, name); an entry whose version is not the
    runner's current one is dropped when it reaches the top (lazy deletion),
    so a change costs one push per pool the runner is in.
    """

    def __init__(self, runners: dict[str, _Runner], members):
        self.runners = runners
        self.heaps: dict[int, list] = defaultdict(list)
        for r in members:
            self.push(r)

    def push(self, r: _Runner) -> None:
        if r.open:
            heapq.heappush(self.heaps[len(r.free)], (r.rank, r.version, r.name))

    def _top(self, heap: list):
        while heap:
            _, version, name = heap[0]
            if self.runners[name].version == version:
                return heap[0]
            heapq.heappop(heap)
        return None

    def best(self, want: int, accept: Callable[[_Runner], bool] | None = None) -> _Runner | None:
        """The least loaded runner with `want` GPUs free (and accepted), or None."""
        best = None
        for free, heap in self.heaps.items():
            if free < want:
                continue
            top = self._top(heap) if accept is None else self._top_accepted(heap, accept)
            if top is not None and (best is None or top < best):
                best = top
        return None if best is None else self.runners[best[2]]

    def _top_accepted(self, heap: list, accept) -> tuple | None:
        refused = []
        try:
            while (top := self._top(heap)) is not None:
                if accept(self.runners[top[2]]):
                    return top
                refused.append(heapq.heappop(heap))
            return None
        finally:
            for entry in refused:
                heapq.heappush(heap, entry)


class Capacity:
    """What is free on each ready runner, updated as a plan hands it out.

    Within one plan capacity only shrinks, so once no runner fits N GPUs no
    later task wanting N or more can fit either: `_fails_from` short-cuts
    those (the common case of a full cluster with a long queue).
    """

    def __init__(self, nodes: list[NodeView], allocs: dict[str, dict]):
        self.runners: dict[str, _Runner] = {}
        for n in nodes:
            if n.state != READY:
                continue
            alloc = allocs.get(n.name, {})
            self.runners[n.name] = _Runner(
                name=n.name, free=free_gpus(n, alloc), used=len(alloc), slots=max(n.max_containers, 1),
                images=set(n.images), spool_free=n.spool_free,
                spool_room=(n.max_spool_images - n.spool_images) if n.max_spool_images else None)
        self.every = _Pool(self.runners, self.runners.values())
        self.holding: dict[str, _Pool] = {}  # image sha256 -> the runners holding it (built when asked)
        self.everywhere: set[str] = set()  # images every runner holds: `every` is their pool
        self._fails_from: int | None = None

    def _holders(self, sha: str) -> _Pool:
        if sha in self.everywhere:
            return self.every
        if sha not in self.holding:
            holders = [r for r in self.runners.values() if sha in r.images]
            if len(holders) == len(self.runners):  # held by all (a plan only adds images): no pool of its own
                self.everywhere.add(sha)
                return self.every
            self.holding[sha] = _Pool(self.runners, holders)
        return self.holding[sha]

    def choose(self, task: Task) -> Choice | None:
        """The best runner for `task`: holding its image, then least loaded."""
        want = task.params.gpus
        if self._fails_from is not None and want >= self._fails_from:
            return None
        size = task.image["size"]
        best = (self._holders(task.image["sha256"]).best(want)
                or self.every.best(want, lambda r: r.spool_fits(size)))
        if best is None:
            if self.every.best(want) is None:  # not a matter of this image's size: nothing that big is free
                self._fails_from = want if self._fails_from is None else min(self._fails_from, want)
            return None
        return Choice(node=best.name, gpus=best.free[:want])

    def take(self, choice: Choice, task: Task) -> None:
        r = self.runners[choice.node]
        taken = set(choice.gpus)
        r.free = [g for g in r.free if g not in taken]
        r.used += 1
        sha = task.image["sha256"]
        if sha not in r.images:
            if r.spool_free is not None:
                r.spool_free -= task.image["size"]
            if r.spool_room is not None:
                r.spool_room -= 1
            r.images.add(sha)
        r.changed()
        self.every.push(r)
        if len(r.images) < len(self.holding):
            pools = [p for s in r.images if (p := self.holding.get(s)) is not None]
        else:
            pools = [p for s, p in self.holding.items() if s in r.images]
        for pool in pools:
            pool.push(r)


def choose(task: Task, nodes: list[NodeView], allocs: dict[str, dict]) -> Choice | None:
    """The best runner for `task` given the current reservations, or None."""
    return Capacity(nodes, allocs).choose(task)


def why_waiting(task: Task, nodes: list[NodeView]) -> str:
    """A sentence for people saying why no runner fits."""
    want = task.params.gpus
    ready = [n for n in nodes if n.state == READY]
    if not nodes:
        return "no runner is registered"
    if not ready:
        return "no runner is accepting tasks"
    if not any(len(n.gpus) >= want for n in ready):
        return f"no runner has {want} GPUs"
    if not any(_spool_could_fit(n, task) for n in ready):
        return "no runner has room in its spool for this image"
    return f"no runner with {want} free GPUs" if want else "every runner is full"


def _spool_could_fit(node: NodeView, task: Task) -> bool:
    if task.image["sha256"] in node.images:
        return True
    return node.spool_free is None or task.image["size"] <= node.spool_free


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


def queue_key(task: Task) -> tuple:
    """FIFO within a priority (higher first)."""
    return (-task.params.priority, task.created_at, task.id)


def plan(queued: list[Task], nodes: list[NodeView], allocs: dict[str, dict], in_use: dict[str, int],
         limits: Limits = Limits(), sweep_slots: Counter | None = None) -> Plan:
    """Serve the queue as one scheduler would, without side effects.

    Each user's tasks stay in FIFO order within a priority; across users the
    next placement goes to the highest priority, then to the user holding the
    fewest GPUs now (fair share). A task that does not fit is passed over
    (others may backfill) with the reason recorded. `sweep_slots`: each
    sweep's indexes holding a slot (`sweeps.slots_held`), for its cap.
    """
    capacity = Capacity(nodes, allocs)
    in_use = dict(in_use)
    sweep_slots = Counter(sweep_slots or {})
    queues: dict[str, list[Task]] = defaultdict(list)
    for task in sorted(queued, key=queue_key, reverse=True):
        queues[task.user].append(task)  # reversed: pop() takes the head

    def turn(user: str) -> tuple:  # who goes next: priority, then fewest GPUs held, then FIFO
        head = queue_key(queues[user][-1])
        return (head[0], in_use.get(user, 0), *head[1:])

    turns = [(turn(user), user) for user in queues]
    heapq.heapify(turns)  # only the user served changes turn, so the others' entries stay right
    reasons: dict[tuple, str] = {}
    result = Plan()
    while turns:
        user = heapq.heappop(turns)[1]
        task = queues[user].pop()
        result.order.append(task.id)
        want = task.params.gpus
        limit = limits.gpus_per_user
        if want and limit is not None and in_use.get(user, 0) + want > limit:
            result.waiting[task.id] = f"user limit: {in_use.get(user, 0)} GPUs in use (limit {limit})"
        elif capped := sweeps.capped(task, sweep_slots):
            result.waiting[task.id] = capped
        elif (choice := capacity.choose(task)) is None:
            why = (want, task.image["sha256"], task.image["size"])  # all a reason depends on
            if why not in reasons:
                reasons[why] = why_waiting(task, nodes)
            result.waiting[task.id] = reasons[why]
        else:
            result.choices[task.id] = choice
            capacity.take(choice, task)
            in_use[user] = in_use.get(user, 0) + want
            if mark := sweeps.of(task):
                sweep_slots[mark["id"]] += 1
        if queues[user]:
            heapq.heappush(turns, (turn(user), user))
    return result
