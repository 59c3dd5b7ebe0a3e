"""What the leader does for a task after a loss, before any job is due.

A runner gone (its lease expired, or it restarted) sends its tasks back to
the queue or, past `max_attempts`, to failed. A web node gone takes the
uploads it held: a task that still needs its upload fails, one whose runner
already holds the image is handed over, as is a task an earlier version
left `transferred`. Every write is fenced by the leader key (`Losses.fence`, set by
`Leader` for each term).
"""

from __future__ import annotations

import logging
import time

from pink import fate, lifecycle, scheduler
from pink import config as pink_config
from pink.store import Record, Store
from pink.tasks import ON_RUNNER, State, Task

log = logging.getLogger("pink.leader")

# States in which the image may still be only on its web node: a placed
# task whose runner already holds the image does not need it (`_needs_upload`).
UPLOAD_NEEDED = {State.QUEUED, State.PLACED}


class Losses:
    def __init__(self, config: pink_config.Config, store: Store):
        self.config = config
        self.store = store
        self.fence: tuple[str, int] | None = None
        self._webs_missing: dict[str, float] = {}  # web host -> when this leader first missed its key

    def webs_back(self, snap: scheduler.Snapshot) -> None:
        """Forget the web nodes that are back (pink-web restarted): their tasks wait no more."""
        for host in [h for h in self._webs_missing if snap.webs is None or h in snap.webs]:
            del self._webs_missing[host]

    def settle(self, rec: Record, snap: scheduler.Snapshot) -> bool:
        """Fail a task whose upload went with its web node, re-queue one whose
        runner is gone, or hand over one left `transferred`. True when the
        task needs nothing more this pass (also while its web node is briefly
        missing: its transfer could not run anyway).

        Only a task that still needs its upload can lose it: one whose image
        is on its runner goes on whatever became of its web node."""
        task = rec.value
        state = task.state
        if state in UPLOAD_NEEDED and snap.webs is not None and task.web_host not in snap.webs:
            if self._web_gone(task.web_host):
                if self._needs_upload(task, snap):
                    self._upload_lost(rec)
                else:
                    self._hand_over(rec, snap.nodes[task.node],
                                    f"runner already holds the image; web node {task.web_host} is gone")
            return True
        if state in ON_RUNNER:
            node = snap.nodes.get(task.node)
            if node is None or node.create_revision != task.epoch:
                self._lost(rec)
                return True
            if state == State.TRANSFERRED:
                self._hand_over(rec, node, "handed over by the leader")
                return True
        return False

    def _web_gone(self, host: str) -> bool:
        """Has web node `host` been missing for a lease (`node_ttl`) as this
        leader saw it? Counted on this leader's own clock from the first pass
        that missed it (not from the task's submit, stamped by another
        host's clock), and read again from etcd before saying so.

        This is the evidence that its uploads are gone: the key is kept by
        pink-web itself, which holds them (`pink.nodes.WebPresence`), and
        vanishes only when no pink-web process of that host has been up for
        a whole lease: the node is down, not a helper. Restarting its leader
        or its workers never removes it, and a restart of pink-web within a
        lease does not either (the lease is not revoked)."""
        missing = self._webs_missing.setdefault(host, time.monotonic())
        if time.monotonic() - missing < self.config.node_ttl:
            return False
        if self.store.get(self.store.keys.web(host)) is not None:
            self._webs_missing.pop(host, None)
            return False
        return True

    @staticmethod
    def _needs_upload(task: Task, snap: scheduler.Snapshot) -> bool:
        """Does the task's image still have to come from its web node? Queued:
        yes. Placed: unless its runner (this epoch) already holds the image."""
        if task.state != State.PLACED:
            return True
        node = snap.nodes.get(task.node)
        return node is None or node.create_revision != task.epoch or \
            task.image["sha256"] not in (node.value.get("images") or [])

    def _hand_over(self, rec: Record, node: Record, why: str) -> None:
        """Assign a task to its runner, which holds its image, without a
        transfer job: a placed task whose web node is gone (its transfer
        job, on that node's queue, will never run, and there is nothing to
        copy), or one an earlier version left `transferred`."""
        if lifecycle.apply(self.store, rec, fate.Transferred(why, node.lease), fence=self.fence):
            log.info("task %s: %s; assigned", rec.value.id, why)

    def _upload_lost(self, rec: Record) -> None:
        """The task's upload was on a web node that is gone: it cannot reach a
        runner, so it fails (or ends cancelled, if its user asked) now,
        releasing its reservation, instead of waiting for ever on that node's
        queue."""
        task = rec.value
        why = f"upload lost with {task.web_host}; submit again"
        if lifecycle.apply(self.store, rec, fate.UploadLost(why), fence=self.fence):
            log.warning("task %s: %s", task.id, why)

    def _lost(self, rec: Record) -> None:
        task = rec.value
        why = f"runner {task.node} lost (lease expired or restarted)"
        if new := lifecycle.apply(self.store, rec, fate.RunnerLost(why), fate.Rules.of(self.config),
                                  fence=self.fence):
            log.info("task %s: %s -> %s (attempt %d)", task.id, why, new.state.value, new.attempt)
