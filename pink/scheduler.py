"""The queue as etcd holds it, run through `placement.plan` (no I/O here).

etcd holds live tasks only, so a snapshot costs what the queue holds. The
leader plans from its mirror of etcd (`Mirror.snapshot`) on each pass,
commits the placements in batches and publishes each waiting task's
position; the user limits come from `[limits]`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pink import nodes, placement, sweeps
from pink.store import Keys, Record
from pink.tasks import State, Task, holds_gpus


@dataclass
class Snapshot:
    """The live state one leader pass works from, all read at one etcd revision."""

    tasks: list[Record]
    nodes: dict[str, Record]  # runner records by name (their create_revision is the epoch)
    allocs: dict[str, Record]  # reservations by runner name
    live: list[nodes.NodeView]  # runners with epoch, operator state and reservations
    webs: set[str] | None  # web nodes up (their presence key exists); None: not read, assume all

    @classmethod
    def of(cls, keys: Keys, parts: dict[str, list[Record]]) -> "Snapshot":
        """From records by prefix (`Mirror.snapshot`)."""
        def by_name(prefix: str) -> dict[str, Record]:
            return {r.key.rsplit("/", 1)[1]: r for r in parts[prefix]}

        runners, allocs = by_name(keys.nodes), by_name(keys.allocs)
        wishes = {name: r.value for name, r in by_name(keys.controls).items()}
        live = nodes.merge(list(runners.values()), wishes, {n: r.value for n, r in allocs.items()})
        webs = set(by_name(keys.webs)) if keys.webs in parts else None
        return cls(tasks=parts[keys.tasks], nodes=runners, allocs=allocs, live=live, webs=webs)


def limits(config) -> placement.Limits:
    return placement.Limits(gpus_per_user=config.limits.gpus_per_user or None)


def gpus_in_use(tasks: list[Task]) -> dict[str, int]:
    held = Counter()
    for task in tasks:
        if holds_gpus(task):
            held[task.user] += len(task.gpus)
    return dict(held)


def plan(config, snap: Snapshot) -> placement.Plan:
    """The plan of the queue; a task whose web node (its upload) is not up waits unplanned."""
    tasks = [r.value for r in snap.tasks]
    queued = [t for t in tasks if t.state == State.QUEUED and (snap.webs is None or t.web_host in snap.webs)]
    return placement.plan(queued, snap.live, {n: r.value for n, r in snap.allocs.items()}, gpus_in_use(tasks),
                          limits(config), sweeps.slots_held(tasks))
