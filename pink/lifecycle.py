"""The one writer of task records: `apply` commits what `pink.fate` decided.

A move often changes three keys at once: the task record, the node's
reservations (`/pink/alloc/<node>`) and the assignment key the runner
watches. `apply()` commits them in one etcd transaction that compares the
task's mod_revision (and the actor's fence, and the runner's incarnation
where the decision asks for it). It retries, up to CAS_TRIES times, only
what a retry cannot get wrong: a reservation record that changed under it,
or the task record itself for events that still hold on the record as it
is now (`Event.follows_record`). `place()` commits a batch of placements on
several nodes (the leader's).
"""

from __future__ import annotations

from dataclasses import dataclass

from pink import fate
from pink.errors import Conflict, Unavailable
from pink.fate import Decision, Event, Refused, Rules
from pink.store import Record, Store
from pink.tasks import Task


MAX_TXN_COMPARES = 120  # comparisons in one transaction: etcd allows 128 (--max-txn-ops)
CAS_TRIES = 50  # commits one move tries before it gives up (etcd too busy, or the task kept changing)


def apply(store: Store, rec: Record, event: Event, rules: Rules = Rules(),
          fence: tuple[str, int] | None = None) -> Task | None:
    """Decide `event` for the task read as `rec` and commit it with its side effects.

    Returns the record committed (for `Archived`, the one removed; for an
    event already in the record, the record), or None when the task moved
    first or `fence` (key, create_revision) is no longer the same holder.
    Refused when the event does not apply to `rec`'s state; Conflict when the
    task kept changing under an event that follows it, Unavailable when its
    reservations did.
    """
    decision = fate.decide(rec.value, event, rules)
    churn = ""  # what changed under the last commit: the task record, or its reservations
    for _ in range(CAS_TRIES):
        if decision.unchanged:
            return rec.value
        if decision.task is not None and decision.task.final:
            raise Refused(f"task {rec.value.id}: a final record goes to the archive, not etcd")
        fences = [f for f in (fence, _node_fence(store, decision)) if f]
        if _commit(store, rec, decision, fences):
            return decision.task or rec.value
        current = store.get(rec.key)
        if current is None:
            return rec.value if decision.task is None else None
        if any(_fence_gone(store, f) for f in fences):
            return None
        churn = "reservations"
        if current.mod_revision != rec.mod_revision:
            if not event.follows_record:
                return None
            rec, churn = current, "record"
            try:
                decision = fate.decide(rec.value, event, rules)
            except Refused:
                return None
    if churn == "record":
        raise Conflict(f"task {rec.value.id} kept changing; try again")
    raise Unavailable(f"could not move task {rec.value.id}: its reservations kept changing")


def _commit(store: Store, rec: Record, d: Decision, fences: list[tuple[str, int]]) -> bool:
    keys, task = store.keys, rec.value
    txn = store.txn().expect(rec)
    for key, revision in fences:
        txn.fence(key, revision)
    if d.task is None:
        txn.delete(rec.key).delete(keys.owner(task.user, task.id))  # its index entry goes with it
        if isinstance(sweep := task.extra.get("sweep"), dict) and sweep.get("id"):
            txn.delete(keys.sweep_member(sweep["id"], task.id))  # and its sweep's
    else:
        txn.put(rec.key, d.task)
    if d.release or d.free_gpus:
        _change_reservation(store, txn, d.release or d.free_gpus, task.id, keep_slot=not d.release)
    if d.assign is not None:
        txn.put(keys.assignment(d.task.node, task.id), d.assign, d.assign_lease)
    if d.unassign:
        txn.delete(keys.assignment(d.unassign, task.id))
    return txn.commit()


def _node_fence(store: Store, d: Decision) -> tuple[str, int] | None:
    return (store.keys.node(d.task.node), d.task.epoch) if d.fence_node else None


def _fence_gone(store: Store, fence: tuple[str, int]) -> bool:
    holder = store.get(fence[0])
    return holder is None or holder.create_revision != fence[1]


@dataclass
class Placement:
    """One task placed on a node: its record as read, the placed record
    (`fate.Placed` decided), its reservation."""

    rec: Record
    new: Task
    entry: dict


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
