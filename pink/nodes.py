"""Runners as the rest of PINK sees them: live records plus operator control.

A runner's own record (`/pink/nodes/<name>`) lives and dies with its lease;
an operator's wish (`/pink/control/<name>`: draining or stopped) must
survive the runner restarting, so it is a separate key without a lease.
`view()` merges the two; placement only considers nodes whose state is
`ready`. Called by the transfer job, the web API (node drain/stop/resume)
and the runner (which stops its containers when told to stop).
"""

from __future__ import annotations

import time

from pink import lifecycle
from pink.errors import BadRequest
from pink.store import Record, Store
from pink.tasks import State, requeue

READY, DRAINING, STOPPED = "ready", "draining", "stopped"
# Tasks placed on a node but not started there yet; drain --now and stop move them.
WAITING_THERE = {State.PLACED, State.TRANSFERRED, State.ASSIGNED}


def controls(store: Store) -> dict[str, dict]:
    return {r.key.rsplit("/", 1)[1]: r.value for r in store.list(store.keys.controls)}


def view(store: Store) -> list[dict]:
    """Live runners with their epoch, operator state and reservations."""
    wishes = controls(store)
    allocs = {r.key.rsplit("/", 1)[1]: r.value for r in store.list(store.keys.allocs)}
    return merge(store.list(store.keys.nodes), wishes, allocs)


def merge(records: list[Record], wishes: dict[str, dict], allocs: dict[str, dict]) -> list[dict]:
    """`view` from records already read (the leader's mirror)."""
    out = []
    for rec in records:
        node = dict(rec.value)
        node["epoch"] = rec.create_revision
        node["lease"] = rec.lease
        node["state"] = wishes.get(node["name"], {}).get("state", READY)
        node["tasks"] = sorted(allocs.get(node["name"], {}))
        out.append(node)
    return out


def control_state(store: Store, name: str) -> str:
    rec = store.get(store.keys.control(name))
    return rec.value["state"] if rec else READY


def set_state(store: Store, name: str, state: str, by: str, now: bool = False) -> int:
    """Record the operator's wish; with `now` (and always for stop) move the
    tasks waiting on that node elsewhere. Returns how many were moved."""
    if state not in (READY, DRAINING, STOPPED):
        raise BadRequest(f"unknown node state {state}")
    if state == READY:
        store.delete(store.keys.control(name))
        return 0
    store.txn().put(store.keys.control(name), {"state": state, "by": by, "since": time.time(),
                                               "now": now}).commit()
    return move_waiting_off(store, name) if now or state == STOPPED else 0


def move_waiting_off(store: Store, name: str) -> int:
    """Send tasks placed on `name` but not started back to the queue."""
    moved = 0
    for rec in store.list(store.keys.tasks):
        task = rec.value
        if task.get("node") != name or State(task["state"]) not in WAITING_THERE:
            continue
        new = requeue(task, f"moved off node {name} by an operator", lost=False)
        if lifecycle.move(store, rec, new, release=name, unassign=name):
            moved += 1
    return moved
