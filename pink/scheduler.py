"""The queue as etcd holds it, run through `placement.plan`.

etcd holds live tasks only, so a snapshot costs what the queue holds. The
leader plans from it on each pass, commits the placements in batches and
publishes each waiting task's position; the user limits come from `[limits]`.
"""

from __future__ import annotations

from collections import Counter

from pink import nodes, placement
from pink.store import Store
from pink.tasks import ON_RUNNER, State


def limits(config) -> placement.Limits:
    return placement.Limits(gpus_per_user=config.limits.gpus_per_user or None)


def snapshot(store: Store) -> tuple[list[dict], list[dict], dict]:
    """(tasks, live nodes, reservations by node) read from etcd."""
    tasks = [r.value for r in store.list(store.keys.tasks)]
    allocs = {r.key.rsplit("/", 1)[1]: r for r in store.list(store.keys.allocs)}
    return tasks, nodes.view(store), allocs


def gpus_in_use(tasks: list[dict]) -> dict[str, int]:
    held = Counter()
    for task in tasks:
        if State(task["state"]) in ON_RUNNER:
            held[task["user"]] += len(task.get("gpus") or [])
    return dict(held)


def plan(config, tasks: list[dict], live: list[dict], allocs: dict) -> placement.Plan:
    queued = [t for t in tasks if t["state"] == State.QUEUED]
    return placement.plan(queued, live, {n: r.value for n, r in allocs.items()}, gpus_in_use(tasks),
                          limits(config))
