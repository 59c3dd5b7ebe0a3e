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
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone

import click
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from pink import archive, defaults, lifecycle, pipeline, scheduler
from pink import config as pink_config
from pink import nodes as pink_nodes
from pink.errors import PinkError, Unavailable
from pink.store import Record, Store
from pink.tasks import FINAL, ON_RUNNER, State, advance, exported, job_id
from queue_workers.queues import enqueue, enqueue_next, enqueue_sweep, job_status, queues_for, transfer_hosts

log = logging.getLogger("pink.leader")

REGISTRY_CLEANUP_INTERVAL = 10.0  # seconds between sweeps of RQ's started-job registries
MAX_BACKOFF = 300  # seconds: the longest wait before a failed job is tried again


class Leader:
    def __init__(self, config: pink_config.Config):
        self.config = config
        self.store = Store.from_config(config)
        self.redis = Redis.from_url(config.redis_url)
        self.identity = f"{config.host}/{socket.gethostname()}/{os.getpid()}"
        self.changed = threading.Event()
        self.fence: tuple[str, int] | None = None
        self._cleaned = 0.0
        self._swept = 0.0
        self._published: dict | None = None

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                lease = self._campaign()
                if lease is None:
                    stop.wait(1.0)
                    continue
                self._lead(lease, stop)
            except PinkError as exc:
                log.warning("leader: %s", exc.message)
                stop.wait(1.0)
            except Exception:  # noqa: BLE001 - a leader must outlive any one failure
                log.exception("leader: unexpected error; campaigning again")
                stop.wait(1.0)

    def _campaign(self):
        lease = self.store.lease(self.config.leader_ttl)
        if not self.store.create(self.store.keys.leader, {"holder": self.identity, "since": time.time()},
                                 lease.id):
            lease.revoke()
            return None
        self.fence = (self.store.keys.leader, self.store.get(self.store.keys.leader).create_revision)
        log.info("leading as %s (fence %d)", self.identity, self.fence[1])
        return lease

    def _lead(self, lease, stop: threading.Event) -> None:
        cancels = [self.store.watch_prefix(prefix, self.changed.set)
                   for prefix in (self.store.keys.tasks, self.store.keys.nodes, self.store.keys.allocs,
                                  self.store.keys.controls)]
        try:
            while not stop.is_set() and not lease.lost.is_set():
                self.changed.clear()
                self.reconcile(lease)
                self.changed.wait(self.config.reconcile_interval)
        finally:
            for cancel in cancels:
                cancel()
            if stop.is_set():
                lease.revoke()
            else:
                lease.stop()
            log.info("no longer leading")

    def reconcile(self, lease) -> None:
        """One pass over the live tasks: repair missing jobs, re-queue lost tasks.

        etcd holds live tasks only (finished ones are archived and removed),
        so a pass costs what the queue holds, never what history holds.
        """
        if time.monotonic() - self._cleaned > REGISTRY_CLEANUP_INTERVAL:
            self._clean_started_registries()
            self._cleaned = time.monotonic()
        # Tasks before nodes: any epoch a task carries already exists when nodes are read.
        tasks = self.store.list(self.store.keys.tasks)
        nodes = {r.key.rsplit("/", 1)[1]: r for r in self.store.list(self.store.keys.nodes)}
        allocs = {r.key.rsplit("/", 1)[1]: r for r in self.store.list(self.store.keys.allocs)}
        live = pink_nodes.view(self.store)
        plan = scheduler.plan(self.config, [r.value for r in tasks], live, allocs)
        self._place(plan, tasks, live, allocs)
        try:
            self._publish_queue(plan)
        except PinkError as exc:  # positions are a courtesy: never stop leading for them
            log.warning("publishing queue positions: %s", exc.message)
        finalize_ok = self._database_answers() if any(
            r.value["state"] == State.EXPORTED for r in tasks) else True
        for rec in tasks:
            if lease.lost.is_set():
                return
            try:
                self._reconcile_task(rec, nodes, finalize_ok)
            except (PinkError, RedisError) as exc:
                log.warning("task %s: %s", rec.value.get("id"), exc)
        self._sweep_if_due()

    def _reconcile_task(self, rec: Record, nodes: dict[str, Record], finalize_ok: bool) -> None:
        task = rec.value
        state = State(task["state"])
        if state in FINAL:
            self._retire_final(rec)
            return
        if state in ON_RUNNER:
            node = nodes.get(task["node"])
            if node is None or node.create_revision != task["epoch"]:
                self._lost(rec)
                return
        stage = pipeline.stage_for(task)
        if stage == "finalize" and not finalize_ok:
            return  # held in `exported` until the database answers; other queues go on
        if stage and self._hold_failed(rec, stage):
            return
        if stage and enqueue(self.redis, task, stage):
            log.info("enqueued %s for task %s (attempt %d)", stage, task["id"], task["attempt"])

    def _place(self, plan, tasks: list[Record], live: list[dict], allocs: dict[str, Record]) -> int:
        """Commit the plan's placements, one transaction per node, and enqueue their transfers.

        The plan was made from one read of the live queue, runners and
        reservations; each node's batch is compared against that read and
        fenced by the node's epoch and by our leadership, so a placement made
        on stale data fails as a whole and the next pass plans again.
        Returns how many tasks were placed.
        """
        if not plan.choices:
            return 0
        by_id = {r.value["id"]: r for r in tasks}
        epochs = {n["name"]: n["epoch"] for n in live}
        batches: dict[str, list[lifecycle.Placement]] = {}
        for task_id, choice in plan.choices.items():
            rec = by_id[task_id]
            task = rec.value
            new = advance(task, State.PLACED, f"placed on {choice.node}", node=choice.node,
                          epoch=epochs[choice.node], gpus=choice.gpus, waiting=None)
            entry = {"gpus": choice.gpus, "attempt": task["attempt"], "image": task["image"]["sha256"]}
            batches.setdefault(choice.node, []).append(lifecycle.Placement(rec, new, entry))
        placed = 0
        for node, batch in batches.items():
            for start in range(0, len(batch), lifecycle.MAX_TXN_PLACEMENTS):
                chunk = batch[start:start + lifecycle.MAX_TXN_PLACEMENTS]
                if not lifecycle.place(self.store, node, epochs[node], allocs.get(node), chunk, self.fence):
                    log.info("placements on %s changed under the plan; planning again", node)
                    self.changed.set()
                    break
                if start + len(chunk) < len(batch):
                    allocs[node] = self.store.get(self.store.keys.alloc(node))
                placed += len(chunk)
                self._enqueue_transfers(chunk)
        return placed

    def _enqueue_transfers(self, placed: list) -> None:
        try:
            for p in placed:
                enqueue_next(self.redis, p.new)
        except RedisError as exc:  # placed is recorded in etcd: the next pass enqueues them
            log.warning("enqueueing transfers: %s", exc)

    def _retire_final(self, rec: Record) -> None:
        """A final record left in etcd by a version that kept them there:
        archive it if it never was (its log is gone with that version), then
        remove it and its upload."""
        task = rec.value
        with archive.connection(self.config.db) as conn:
            if archive.archived_attempt(conn, task["id"]) is None:
                archive.archive_task(conn, task, b"")
        if lifecycle.retire(self.store, rec) is not None:
            enqueue(self.redis, task, "cleanup")
            log.info("task %s: final record moved out of etcd", task["id"])

    def _publish_queue(self, plan) -> None:
        """Write each waiting task's position and reason to one key, when they change.

        The API answers position questions from this key instead of running
        a plan of the whole queue on every GET.
        """
        reasons: list[str] = []
        index: dict[str, int] = {}
        entries = {}
        waiting = [t for t in plan.order if t in plan.waiting][:defaults.PUBLISHED_POSITIONS]
        for position, task_id in enumerate(waiting, start=1):
            reason = plan.waiting[task_id]
            entries[task_id] = [position, index.setdefault(reason, len(reasons))]
            if index[reason] == len(reasons):
                reasons.append(reason)
        summary = {"tasks": entries, "reasons": reasons}
        if summary != self._published and self.store.txn().fence(*self.fence).put(
                self.store.keys.queue, {**summary, "at": time.time()}).commit():
            self._published = summary

    def _database_answers(self) -> bool:
        try:
            with archive.connection(self.config.db) as conn:
                conn.ping(reconnect=False)
            return True
        except (Unavailable, PinkError) as exc:
            log.warning("holding finalize jobs: %s", exc)
            return False

    def _sweep_if_due(self) -> None:
        """Expire old outputs in the archive, and have every web host delete its expired files."""
        if time.monotonic() - self._swept < self.config.retention.sweep_interval:
            return
        self._swept = time.monotonic()
        try:
            with archive.connection(self.config.db) as conn:
                expired = archive.expire(conn, time.time(), self.config.retention.max_output_bytes_per_user,
                                         self.config.retention.output_days)
            if expired:
                log.info("retention: %d outputs expired", expired)
            for host in transfer_hosts(self.redis):
                enqueue_sweep(self.redis, host)
        except (PinkError, RedisError) as exc:
            log.warning("retention sweep: %s", exc)

    def _hold_failed(self, rec: Record, stage: str) -> bool:
        """For a job that failed: True while its retry must wait (backoff) or
        when the task has now failed for good; False to retry it now.

        Transfer and run give up after max_job_failures; finalize backs off
        for ever (up to MAX_BACKOFF): a database outage must not fail tasks.
        """
        task = rec.value
        jid = job_id(task["id"], stage, task["attempt"])
        if job_status(self.redis, jid) != JobStatus.FAILED:
            return False
        job = Job.fetch(jid, connection=self.redis)
        failures = (task.get("job_failures") or {}).get(stage, 0) + 1
        ended = job.ended_at.replace(tzinfo=timezone.utc) if job.ended_at else None
        if ended and (datetime.now(timezone.utc) - ended).total_seconds() < min(2 ** failures, MAX_BACKOFF):
            return True
        if stage in pipeline.GIVES_UP and failures >= self.config.max_job_failures:
            reason = (job.exc_info or "").strip().splitlines()[-1:] or ["no error recorded"]
            why = f"{stage} failed {failures} times; last: {reason[0][:500]}"
            new = exported(task, State.FAILED, why, error=why)
            lifecycle.move(self.store, rec, new, release=task.get("node"), unassign=task.get("node"),
                           fence=self.fence)
            log.warning("task %s: %s", task["id"], why)
            return True
        new = {**task, "job_failures": {**(task.get("job_failures") or {}), stage: failures}}
        return not lifecycle.move(self.store, rec, new, fence=self.fence)

    def _lost(self, rec: Record) -> None:
        task = rec.value
        why = f"runner {task['node']} lost (lease expired or restarted)"
        new = pipeline.after_loss(task, why, self.config.max_attempts)
        if lifecycle.move(self.store, rec, new, release=task["node"], unassign=task["node"],
                          fence=self.fence):
            log.info("task %s: %s -> %s (attempt %d)", task["id"], why, new["state"], new["attempt"])

    def _clean_started_registries(self) -> None:
        """Move jobs of dead workers to the failed registry so they can be re-enqueued."""
        names = set(queues_for(self.config.host))
        names.update(q.name for q in Queue.all(connection=self.redis))
        for name in names:
            StartedJobRegistry(name, connection=self.redis).cleanup()


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
