"""Runners as the rest of PINK sees them: live records plus operator control.

A runner's own record (`/pink/nodes/<name>`) lives and dies with its lease;
an operator's wish (`/pink/control/<name>`: draining or stopped) must
survive the runner restarting, so it is a separate key without a lease.
`view()` merges the two; placement only considers nodes whose state is
`ready`. Called by the transfer job, the web API (node drain/stop/resume)
and the runner (which stops its containers when told to stop).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pink import fate, lifecycle
from pink.errors import BadRequest, Conflict, PinkError
from pink.store import Record, Store
from pink.tasks import State

log = logging.getLogger("pink.nodes")

READY, DRAINING, STOPPED = "ready", "draining", "stopped"
# Tasks placed on a node but not started there yet; drain --now and stop move them.
WAITING_THERE = {State.PLACED, State.TRANSFERRED, State.ASSIGNED}


@dataclass
class NodeView:
    """A runner as placement, the leader and the API see it: what it
    registered, its epoch (the node key's create_revision, which changes when
    the runner restarts), the operator's state and its reservations."""

    name: str
    epoch: int
    state: str = READY  # READY, DRAINING or STOPPED (`/pink/control/<name>`)
    tasks: list[str] = field(default_factory=list)  # ids holding a reservation there
    gpus: list[str] = field(default_factory=list)  # GPU uuids
    max_containers: int = 1
    images: list[str] = field(default_factory=list)  # archive sha256s it has loaded
    spool_free: int | None = None  # bytes free in its spool (None: not reported)
    spool_images: int = 0
    max_spool_images: int | None = None
    lease: int = 0
    record: dict[str, Any] = field(default_factory=dict)  # the runner's record as registered (ssh, inventory)

    @classmethod
    def of(cls, rec: Record, wish: dict | None = None, alloc: dict | None = None) -> "NodeView":
        node = rec.value
        return cls(name=node["name"], epoch=rec.create_revision, lease=rec.lease,
                   state=(wish or {}).get("state", READY), tasks=sorted(alloc or {}),
                   gpus=list(node.get("gpus") or []), max_containers=node.get("max_containers", 1),
                   images=list(node.get("images") or []), spool_free=node.get("spool_free"),
                   spool_images=node.get("spool_images", 0), max_spool_images=node.get("max_spool_images"),
                   record=node)


class WebPresence:
    """This web node's key in etcd (`Keys.web`), under a lease of `node_ttl`.

    Uploads and outputs live on their web node, so the rest of the cluster
    must see that node go: its key vanishes a lease after the node dies, and
    the leader then fails the tasks still needing an upload there. The key
    therefore belongs to what holds the uploads: pink-web, which serves the
    blob store (DESIGN.md: restarting a helper process loses nothing). Each
    gunicorn worker keeps one (`keep`, started after the fork by
    `web.serve`): every third of a TTL it creates the key if nobody holds it
    and leaves alone a key held under another lease (another worker, or a
    pink-web restarted within the TTL). A worker that dies takes its lease
    with it; the key vanishes and another worker takes it over within a
    third of a TTL, well before the leader counts the node gone (a whole
    TTL). So a missing key means no pink-web process of the host has been
    up for a lease: the node, not a helper, is down. A clean stop does not
    revoke the lease, so a restart within the TTL is not a loss either.
    """

    def __init__(self, store: Store, host: str, url: str, ttl: int):
        self.store, self.host, self.url, self.ttl = store, host, url, ttl
        self.lease = None

    def ensure(self) -> bool:
        """One look: create the key under our lease if no one holds it. True
        when the key is ours."""
        key = self.store.keys.web(self.host)
        rec = self.store.get(key)
        if rec is not None:
            return self.lease is not None and rec.lease == self.lease.id
        if self.lease is None or self.lease.lost.is_set():
            self.lease = self.store.lease(self.ttl)
        return self.store.create(key, {"host": self.host, "url": self.url, "since": time.time()},
                                 self.lease.id)

    def keep(self, stop: threading.Event) -> threading.Thread:
        """`ensure` every third of a TTL in a daemon thread, until `stop`."""
        thread = threading.Thread(target=self._keep, args=(stop,), daemon=True, name="web-presence")
        thread.start()
        return thread

    def _keep(self, stop: threading.Event) -> None:
        while True:
            try:
                self.ensure()
            except PinkError as exc:  # etcd away for a moment: the next look tries again
                log.warning("announcing web node %s: %s", self.host, exc.message)
            if stop.wait(self.ttl / 3):
                break
        self.stop()

    def stop(self) -> None:
        if self.lease is not None:
            self.lease.stop()


def web_url(store: Store, host: str) -> str | None:
    """The base URL of web node `host` while it is up (None: not registered)."""
    rec = store.get(store.keys.web(host))
    return rec.value.get("url") if rec else None


def web_urls(store: Store) -> dict[str, str]:
    """{host: base URL} of every web node that is up (one read of a few keys)."""
    return {r.key.rsplit("/", 1)[1]: r.value["url"] for r in store.list(store.keys.webs)
            if isinstance(r.value, dict) and r.value.get("url")}


def controls(store: Store) -> dict[str, dict]:
    return {r.key.rsplit("/", 1)[1]: r.value for r in store.list(store.keys.controls)}


def view(store: Store) -> list[NodeView]:
    """Live runners with their epoch, operator state and reservations."""
    wishes = controls(store)
    allocs = {r.key.rsplit("/", 1)[1]: r.value for r in store.list(store.keys.allocs)}
    return merge(store.list(store.keys.nodes), wishes, allocs)


def merge(records: list[Record], wishes: dict[str, dict], allocs: dict[str, dict]) -> list[NodeView]:
    """`view` from records already read (the leader's mirror)."""
    return [NodeView.of(rec, wishes.get(rec.value["name"]), allocs.get(rec.value["name"])) for rec in records]


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


def forget(store: Store, name: str) -> list[str]:
    """Remove what etcd keeps of a runner that is gone for good (its
    operator's drain or stop, leftover assignments); the keys removed.

    Refused while the runner is registered (a restart takes its node over
    again) or while a task still holds a reservation there: the leader
    re-queues those within `node_ttl` of the runner's end.
    """
    if store.get(store.keys.node(name)) is not None:
        raise Conflict(f"runner {name} is up: stop pink-runner on it first (drain it before, so that "
                       "its tasks end), then forget it", code="node_up")
    alloc = store.get(store.keys.alloc(name))
    if alloc is not None and alloc.value:
        raise Conflict(f"{len(alloc.value)} task(s) still hold a reservation on {name}; the leader "
                       "re-queues them shortly after a runner ends: try again in a minute", code="node_busy")
    keys = [rec.key for rec in store.list(store.keys.assignments(name))]
    keys += [key for key in (store.keys.control(name), store.keys.alloc(name)) if store.get(key) is not None]
    for key in keys:
        store.delete(key)
    log.info("forgot runner %s: %s", name, ", ".join(keys) or "nothing was left")
    return keys


def move_waiting_off(store: Store, name: str) -> int:
    """Send tasks placed on `name` but not started back to the queue."""
    moved = 0
    for rec in store.list(store.keys.tasks):
        task = rec.value
        if task.node != name or task.state not in WAITING_THERE:
            continue
        if lifecycle.apply(store, rec, fate.OperatorMove(name)):
            moved += 1
    return moved
