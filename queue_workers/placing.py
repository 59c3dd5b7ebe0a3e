"""The leader's placements: committing a plan, and publishing queue positions.

`Placer` commits what `pink.scheduler.plan` chose, fenced by the leader key
(`Placer.fence`, set by `Leader` for each term), and enqueues the transfers
of the tasks placed. `Positions` writes each waiting task's place in the
queue to one key (`Keys.queue`) for the API.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from redis import Redis
from redis.exceptions import RedisError

from pink import fate, lifecycle, scheduler
from pink.errors import PinkError
from pink.store import Store
from pink.tasks import Task
from queue_workers.queues import enqueue_many

log = logging.getLogger("pink.leader")

PLACE_THREADS = 16  # runners whose placements commit at once
PUBLISHED_POSITIONS = 5000  # waiting tasks whose queue position the leader publishes (one etcd value)


class Placer:
    def __init__(self, store: Store, redis: Redis, changed: threading.Event):
        self.store = store
        self.redis = redis
        self.changed = changed  # set when a placement failed: the leader plans again at once
        self.fence: tuple[str, int] | None = None
        self.written: list[tuple[str, int]] = []  # (task key, mod_revision before) placed by the last pass

    def place(self, plan, snap: scheduler.Snapshot) -> list[Task]:
        """Commit the plan's placements; returns the records placed.

        The plan was made from one revision of the live queue, runners and
        reservations; each node's batch is compared against it and fenced by
        the node's epoch and by our leadership, so a placement made on stale
        data fails and the next pass plans again. Several nodes share a
        transaction (`lifecycle.batches_per_txn`) and transactions commit in
        parallel: thousands of placements cost a few dozen round trips.
        """
        if not plan.choices:
            return []
        by_id = {r.value.id: r for r in snap.tasks}
        epochs = {n.name: n.epoch for n in snap.live}
        per_node: dict[str, list[lifecycle.Placement]] = {}
        for task_id, choice in plan.choices.items():
            rec = by_id[task_id]
            task = rec.value
            new = fate.decide(task, fate.Placed(choice.node, epochs[choice.node], choice.gpus)).task
            entry = {"gpus": choice.gpus, "attempt": task.attempt, "image": task.image["sha256"]}
            per_node.setdefault(choice.node, []).append(lifecycle.Placement(rec, new, entry))
        limit = lifecycle.MAX_TXN_COMPARES - 3  # a node with more waits for the next pass
        batches = [lifecycle.NodeBatch(node, epochs[node], snap.allocs.get(node), placements[:limit])
                   for node, placements in per_node.items()]
        with ThreadPoolExecutor(PLACE_THREADS, thread_name_prefix="place") as pool:
            done = list(pool.map(self._commit, lifecycle.batches_per_txn(batches)))
        placed = [p for group in done for batch in group for p in batch.placements]
        self.written = [(p.rec.key, p.rec.mod_revision) for p in placed]
        return [p.new for p in placed]

    def enqueue_transfers(self, placed: list[Task]) -> None:
        try:
            enqueue_many(self.redis, placed)
        except RedisError as exc:  # placed is recorded in etcd: the next full repair enqueues them
            log.warning("enqueueing transfers: %s", exc)

    def _commit(self, group: list[lifecycle.NodeBatch]) -> list[lifecycle.NodeBatch]:
        """Commit a transaction's node batches; if it fails (or is too big for etcd), each node alone.
        Returns those committed."""
        if self._try_place(group):
            return group
        committed = [b for b in group if len(group) > 1 and self._try_place([b])]
        log.info("placements on %d runners changed under the plan; planning again", len(group) - len(committed))
        self.changed.set()
        return committed

    def _try_place(self, batches: list[lifecycle.NodeBatch]) -> bool:
        try:
            return lifecycle.place(self.store, batches, self.fence)
        except PinkError as exc:
            log.warning("placing on %s: %s", ", ".join(b.node for b in batches), exc.message)
            return False


class Positions:
    def __init__(self, store: Store):
        self.store = store
        self.fence: tuple[str, int] | None = None
        self._published: dict | None = None

    def publish(self, plan) -> None:
        """Write each waiting task's position and reason to one key, when they change.

        The API answers position questions from this key instead of running
        a plan of the whole queue on every GET.
        """
        reasons: list[str] = []
        index: dict[str, int] = {}
        entries = {}
        waiting = [t for t in plan.order if t in plan.waiting][:PUBLISHED_POSITIONS]
        for position, task_id in enumerate(waiting, start=1):
            reason = plan.waiting[task_id]
            entries[task_id] = [position, index.setdefault(reason, len(reasons))]
            if index[reason] == len(reasons):
                reasons.append(reason)
        summary = {"tasks": entries, "reasons": reasons}
        if summary != self._published and self.store.txn().fence(*self.fence).put(
                self.store.keys.queue, {**summary, "at": time.time()}).commit():
            self._published = summary
