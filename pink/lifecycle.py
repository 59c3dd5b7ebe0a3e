"""Moving a task together with the records that hang off it, atomically.

A transition often has to change three keys at once: the task record, the
node's reservations (`/pink/alloc/<node>`) and the assignment key the runner
watches. `move()` commits them in one etcd transaction that compares the
task's mod_revision (and optionally a fence), retrying only when the
reservation record changed under it. `place()` commits a batch of
placements on one node (the leader); `retire()` removes an archived task.
Used by jobs, the runner, the leader and the web API's cancel.
"""

from __future__ import annotations

from dataclasses import dataclass

from pink.errors import Unavailable
from pink.store import Record, Store
from pink.tasks import Task


MAX_TXN_COMPARES = 120  # comparisons in one transaction: etcd allows 128 (--max-txn-ops)


@dataclass
class Placement:
    """One task placed on a node: its record as read, the placed record, its reservation."""

    rec: Record
    new: Task
    entry: dict


def move(store: Store, rec: Record, new: Task, *, release: str | None = None, free_gpus: str | None = None,
         fence: tuple[str, int] | None = None,
         assign: dict | None = None, assign_lease: int = 0, unassign: str | None = None,
         attempts: int = 50) -> bool:
    """Commit `new` for the task read as `rec`; False if the task moved first.

    release: node whose reservation for this task is dropped.
    free_gpus: node whose reservation for this task keeps its slot but no GPUs.
    fence: (key, create_revision) that must still be the same incarnation.
    assign / unassign: assignment key to write (for new.node) / node to delete it for.
    """
    keys = store.keys
    task_id = new.id
    for _ in range(attempts):
        txn = store.txn().expect(rec).put(rec.key, new)
        if fence:
            txn.fence(*fence)
        if release or free_gpus:
            _change_reservation(store, txn, release or free_gpus, task_id, keep_slot=not release)
        if assign is not None:
            txn.put(keys.assignment(new.node, task_id), assign, assign_lease)
        if unassign:
            txn.delete(keys.assignment(unassign, task_id))
        if txn.commit():
            return True
        current = store.get(rec.key)
        if current is None or current.mod_revision != rec.mod_revision:
            return False
        if fence:
            holder = store.get(fence[0])
            if holder is None or holder.create_revision != fence[1]:
                return False
    raise Unavailable(f"could not move task {task_id}: reservations kept changing")


@dataclass
class NodeBatch:
    """Placements on one node, with the node's epoch and its reservations as read."""

    node: str
    epoch: int
    alloc: Record | None
    placements: list[Placement]

    @property
    def compares(self) -> int:
        """What the batch adds to a transaction's comparisons (its puts are one fewer)."""
        return len(self.placements) + 2


def batches_per_txn(batches: list[NodeBatch]) -> list[list[NodeBatch]]:
    """Group node batches into transactions within etcd's limit on operations."""
    groups, group, size = [], [], 1  # 1: the placer's fence
    for batch in batches:
        if group and size + batch.compares > MAX_TXN_COMPARES:
            groups.append(group)
            group, size = [], 1
        group.append(batch)
        size += batch.compares
    return groups + [group] if group else groups


def place(store: Store, batches: list[NodeBatch], fence: tuple[str, int]) -> bool:
    """Commit the placements on one or more nodes in one transaction.

    Fenced by each node's incarnation (`epoch`) and the placer's own fence,
    and compared against every task record and each node's reservations as
    read: if anything moved (a cancel, a release), nothing is written and the
    caller tries the nodes one by one or plans again. This is how the leader
    places thousands of tasks in a few dozen round trips.
    """
    txn = store.txn().fence(*fence)
    for batch in batches:
        key = store.keys.alloc(batch.node)
        txn.fence(store.keys.node(batch.node), batch.epoch)
        txn.expect(batch.alloc) if batch.alloc else txn.expect(key, 0)
        entries = dict(batch.alloc.value) if batch.alloc else {}
        for p in batch.placements:
            txn.expect(p.rec).put(p.rec.key, p.new)
            entries[p.new.id] = p.entry
        txn.put(key, entries)
    return txn.commit()


def retire(store: Store, rec: Record) -> Record | None:
    """Remove an archived task from etcd; returns the record removed, or None
    if another attempt took its place.

    Called only once the task's archive row is committed: etcd holds live
    tasks only. A record that changed without moving on (a delete request
    added a field) is read again and removed; the caller looks at what it
    removed, so such a request is not lost.
    """
    for _ in range(20):
        owner = store.keys.owner(rec.value.user, rec.value.id)  # its index entry goes with it
        if store.txn().expect(rec).delete(rec.key).delete(owner).commit():
            return rec
        current = store.get(rec.key)
        if current is None:
            return rec
        if current.value.attempt != rec.value.attempt or current.value.state != rec.value.state:
            return None
        rec = current
    raise Unavailable(f"could not remove task {rec.key} from etcd: it kept changing")


def _change_reservation(store: Store, txn, node: str, task_id: str, keep_slot: bool) -> None:
    """Drop the task's reservation on `node`, or with `keep_slot` only its GPUs."""
    key = store.keys.alloc(node)
    alloc = store.get(key)
    if alloc is None or task_id not in alloc.value:
        return
    if keep_slot:
        remaining = {**alloc.value, task_id: {**alloc.value[task_id], "gpus": []}}
    else:
        remaining = {k: v for k, v in alloc.value.items() if k != task_id}
    txn.expect(alloc)
    if remaining:
        txn.put(key, remaining)
    else:
        txn.delete(key)
