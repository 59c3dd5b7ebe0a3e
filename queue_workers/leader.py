"""`pink-leader`: the queue leader, elected through etcd, keeps RQ in step with it.

Every web node runs one; the one holding `/pink/leader` (under a lease it
keeps alive) leads. Leading means, on every change in etcd and at least every
`reconcile_interval`: enqueue the job a task's state calls for when Redis has
none (after Redis lost its data, or a worker died mid-job; `pink.pipeline`
says which), send tasks whose runner's lease expired back to the queue
(attempt + 1) or, past `max_attempts`, to failed, publish each waiting task's
queue position (`Keys.queue`), and every SWEEP_INTERVAL expire old outputs and
have each web host delete its expired and orphaned files. Leadership is revoked the moment the lease cannot
be refreshed, and every write is fenced by the leader key's create_revision,
so a deposed leader that has not noticed yet cannot change anything.

This module holds the election and the pass; what a pass does is in
`queue_workers.placing` (placements, queue positions), `queue_workers.repair`
(the jobs tasks lack, backoff, jobs dead workers took), `queue_workers.losses`
(runners and web nodes gone, records an earlier version left) and
`queue_workers.retention` (the sweep).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import click

from pink import redisconn, scheduler
from pink import config as pink_config
from pink.errors import PinkError, outlive_failure
from pink.store import Store
from queue_workers import notify
from queue_workers.losses import Losses
from queue_workers.placing import Placer, Positions
from queue_workers.repair import Repair
from queue_workers.retention import Retention

log = logging.getLogger("pink.leader")

MIRROR_RESYNC = 120.0  # seconds between two full reads of etcd's live state into the mirror
OWN_WRITES_WAIT = 2.0  # seconds the mirror may take to show the leader's own placements


class Leader:
    def __init__(self, config: pink_config.Config):
        self.config = config
        self.store = Store.from_config(config)
        self.redis = redisconn.connect(config)
        self.identity = f"{config.host}/{socket.gethostname()}/{os.getpid()}"
        self.changed = threading.Event()
        self.fence: tuple[str, int] | None = None
        self.placer = Placer(self.store, self.redis, self.changed)
        self.positions = Positions(self.store)
        self.losses = Losses(config, self.store)
        self.repair = Repair(config, self.store, self.redis, self.losses)
        self.retention = Retention(config, self.store, self.redis)
        self.notices = notify.Notices(config, self.redis)

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._run_once(stop)

    def _run_once(self, stop: threading.Event) -> None:
        """Campaign, and lead while elected. (pink-web announces its web node, not
        this process: stopping a leader loses nothing.)"""
        with outlive_failure(log, "leader", "campaigning again", stop):
            lease = self._campaign()
            if lease is None:
                stop.wait(1.0)
                return
            self._lead(lease, stop)

    def _campaign(self):
        lease = self.store.lease(self.config.leader_ttl)
        if not self.store.create(self.store.keys.leader, {"holder": self.identity, "since": time.time()},
                                 lease.id):
            lease.revoke()
            return None
        self.fence = (self.store.keys.leader, self.store.get(self.store.keys.leader).create_revision)
        for part in (self.placer, self.positions, self.losses, self.repair):
            part.fence = self.fence  # each of this term's writes is fenced by it
        log.info("leading as %s (fence %d)", self.identity, self.fence[1])
        return lease

    def _lead(self, lease, stop: threading.Event) -> None:
        keys = self.store.keys
        self.mirror = self.store.mirror((keys.tasks, keys.nodes, keys.allocs, keys.controls, keys.webs),
                                        self.changed.set)
        self._resynced = self.repair.repaired = float("-inf")
        try:
            while not stop.is_set() and not lease.lost.is_set():
                self.changed.clear()
                try:
                    self.reconcile(lease)
                except PinkError as exc:  # etcd or the database away for a while: try again, still leading
                    log.warning("leader pass: %s", exc.message)
                    stop.wait(1.0)
                self.changed.wait(self.config.reconcile_interval)
        finally:
            self.mirror.close()
            if stop.is_set():
                lease.revoke()
            else:
                lease.stop()
            log.info("no longer leading")

    def reconcile(self, lease) -> None:
        """One pass over the live tasks: place, repair missing jobs, re-queue lost tasks.

        Planned from the mirror of etcd (no read per pass), and the jobs of
        tasks whose record did not change are checked in Redis only once
        every `reconcile_interval`, so a pass costs what the queue holds,
        and a burst of changes costs little more than one.
        """
        self.repair.clean_registries_if_due()
        if self.placer.written and not self.mirror.wait_past(self.placer.written, OWN_WRITES_WAIT):
            self.mirror.invalidate()  # our own commits never showed up: the watch is not delivering
        self.placer.written = []
        if time.monotonic() - self._resynced > MIRROR_RESYNC:
            self.mirror.invalidate()  # a watch can drop without an error: read everything now and then
            self._resynced = time.monotonic()
        self.mirror.fresh()
        snap = scheduler.Snapshot.of(self.store.keys, self.mirror.snapshot())
        self.losses.webs_back(snap)
        started = time.monotonic()
        plan = scheduler.plan(self.config, snap)
        planned = time.monotonic()
        placed = self.placer.place(plan, snap)
        committed = time.monotonic()
        try:
            self.positions.publish(plan)
        except PinkError as exc:  # positions are a courtesy: never stop leading for them
            log.warning("publishing queue positions: %s", exc.message)
        if placed:
            self.placer.enqueue_transfers(placed)
            log.info("placed %d of %d waiting tasks (plan %.2fs, commit %.2fs, enqueue %.2fs)", len(placed),
                     len(plan.order), planned - started, committed - planned, time.monotonic() - committed)
        self.repair.run(snap, lease)
        self.retention.sweep_if_due()
        self.notices.run(snap)  # `running` told (an enqueue per task told, never raises)


@click.command()
@click.option("--config", "config_path", envvar="PINK_CONFIG", required=True,
              type=click.Path(exists=True, dir_okay=False), help="PINK config file.")
def main(config_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Leader(pink_config.load(config_path)).run_forever(stop)


if __name__ == "__main__":
    main()
