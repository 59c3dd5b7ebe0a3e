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
from concurrent.futures import ThreadPoolExecutor

import click
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from pink import archive, defaults, fate, lifecycle, pipeline, redisconn, scheduler
from pink import config as pink_config
from pink import nodes as pink_nodes
from pink.errors import PinkError, Unavailable
from pink.store import Record, Store
from pink.tasks import FINAL, ON_RUNNER, State, Task, job_id
from queue_workers.queues import (LIVE, enqueue, enqueue_cleanup, enqueue_many, enqueue_sweep,
                                  missing_from_queues, push_back, queue_of, queues_for, seconds_since, statuses,
                                  transfer_hosts)

log = logging.getLogger("pink.leader")

REGISTRY_CLEANUP_INTERVAL = 10.0  # seconds between sweeps of RQ's started-job registries
MAX_BACKOFF = 300  # seconds: the longest wait before a failed job is tried again
MIRROR_RESYNC = 120.0  # seconds between two full reads of etcd's live state into the mirror
OWN_WRITES_WAIT = 2.0  # seconds the mirror may take to show the leader's own placements
PLACE_THREADS = 16  # runners whose placements commit at once
JOB_SETTLE = 10.0  # seconds after a job ended during which the record it changed may not be mirrored yet
# States in which the image may still be only on its web node: a placed
# task whose runner already holds the image does not need it (`_needs_upload`).
UPLOAD_NEEDED = {State.QUEUED, State.PLACED}


class Leader:
    def __init__(self, config: pink_config.Config):
        self.config = config
        self.store = Store.from_config(config)
        self.redis = redisconn.connect(config)
        self.identity = f"{config.host}/{socket.gethostname()}/{os.getpid()}"
        self.changed = threading.Event()
        self.fence: tuple[str, int] | None = None
        self._cleaned = 0.0
        self._swept = 0.0
        self._published: dict | None = None
        self._written: list[tuple[str, int]] = []  # (task key, mod_revision before) placed by the last pass
        self._checked: dict[str, int] = {}  # task key -> mod_revision whose job was last made sure of
        self._missing: dict[str, float] = {}  # job id `queued` in no queue -> when a full repair first saw it
        self._webs_missing: dict[str, float] = {}  # web host -> when this leader first missed its key

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._run_once(stop)

    def _run_once(self, stop: threading.Event) -> None:
        """Campaign, and lead while elected. (pink-web announces its web node, not
        this process: stopping a leader loses nothing.)"""
        try:
            lease = self._campaign()
            if lease is None:
                stop.wait(1.0)
                return
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
        keys = self.store.keys
        self.mirror = self.store.mirror((keys.tasks, keys.nodes, keys.allocs, keys.controls, keys.webs),
                                        self.changed.set)
        self._resynced = self._repaired = float("-inf")
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
        if time.monotonic() - self._cleaned > REGISTRY_CLEANUP_INTERVAL:
            self._clean_started_registries()
            self._cleaned = time.monotonic()
        if self._written and not self.mirror.wait_past(self._written, OWN_WRITES_WAIT):
            self.mirror.invalidate()  # our own commits never showed up: the watch is not delivering
        self._written = []
        if time.monotonic() - self._resynced > MIRROR_RESYNC:
            self.mirror.invalidate()  # a watch can drop without an error: read everything now and then
            self._resynced = time.monotonic()
        self.mirror.fresh()
        snap = scheduler.Snapshot.of(self.store.keys, self.mirror.snapshot())
        for host in [h for h in self._webs_missing if snap.webs is None or h in snap.webs]:
            del self._webs_missing[host]  # back (pink-web restarted): its tasks wait no more
        started = time.monotonic()
        plan = scheduler.plan(self.config, snap)
        planned = time.monotonic()
        placed = self._place(plan, snap)
        committed = time.monotonic()
        try:
            self._publish_queue(plan)
        except PinkError as exc:  # positions are a courtesy: never stop leading for them
            log.warning("publishing queue positions: %s", exc.message)
        if placed:
            self._enqueue_transfers(placed)
            log.info("placed %d of %d waiting tasks (plan %.2fs, commit %.2fs, enqueue %.2fs)", len(placed),
                     len(plan.order), planned - started, committed - planned, time.monotonic() - committed)
        self._repair(snap, lease)
        self._sweep_if_due()

    def _repair(self, snap: scheduler.Snapshot, lease) -> None:
        """Retire, re-queue lost tasks, and give each task the job its state calls for."""
        full = time.monotonic() - self._repaired >= self.config.reconcile_interval
        if full:
            self._repaired = time.monotonic()
            self._checked = {}
        due = []
        for rec in snap.tasks:
            if lease.lost.is_set():
                return
            try:
                if self._settle(rec, snap):
                    continue
            except (PinkError, RedisError) as exc:
                log.warning("task %s: %s", rec.value.id, exc)
                continue
            if self._checked.get(rec.key) != rec.mod_revision and pipeline.stage_for(rec.value):
                due.append(rec)
        if not due:
            return
        finalize_ok = not any(r.value.state == State.EXPORTED for r in due) or self._database_answers()
        jids = [job_id(r.value.id, pipeline.stage_for(r.value), r.value.attempt) for r in due]
        try:
            jobs = statuses(self.redis, jids)
        except RedisError as exc:  # Redis away for a moment: the next pass repairs
            log.warning("reading job statuses: %s", exc)
            return
        for rec, jid in zip(due, jids):
            try:
                self._give_job(rec, jobs[jid], finalize_ok)
                self._checked[rec.key] = rec.mod_revision
            except (PinkError, RedisError) as exc:
                log.warning("task %s: %s", rec.value.id, exc)
        if full:
            self._push_back_taken({jid: queue_of(rec.value, pipeline.stage_for(rec.value))
                                   for rec, jid in zip(due, jids) if jobs[jid] == JobStatus.QUEUED})

    def _push_back_taken(self, queued: dict[str, str]) -> None:
        """Put back at the head of its queue a job a worker took and died
        holding before it started it (`queues.missing_from_queues`): its task
        would wait for ever. Only once it has been missing for a worker's
        lease (`node_ttl`, after which a worker's own key says it is dead), so
        a worker merely slow to mark it started (a Redis failover) keeps it;
        should it run twice, the second run does nothing (compare-and-swap)."""
        try:
            missing = missing_from_queues(self.redis, queued) if queued else set()
            now = time.monotonic()
            self._missing = {jid: self._missing.get(jid, now) for jid in missing}
            for jid, since in list(self._missing.items()):
                if now - since >= self.config.node_ttl and push_back(self.redis, jid, queued[jid]):
                    log.warning("job %s was taken by a worker that died before starting it: queued again", jid)
                    del self._missing[jid]
        except RedisError as exc:
            log.warning("looking for jobs dead workers took: %s", exc)

    def _settle(self, rec: Record, snap: scheduler.Snapshot) -> bool:
        """Retire a final record, fail a task whose upload went with its web
        node, or re-queue one whose runner is gone. True when the task needs
        nothing more this pass (also while its web node is briefly missing:
        its transfer could not run anyway).

        Only a task that still needs its upload can lose it: one whose image
        is on its runner goes on whatever became of its web node."""
        task = rec.value
        state = task.state
        if state in FINAL:
            self._retire_final(rec)
            return True
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

    def _give_job(self, rec: Record, status: JobStatus | None, finalize_ok: bool) -> None:
        task = rec.value
        stage = pipeline.stage_for(task)
        if status in LIVE or (status == JobStatus.FINISHED and self._just_ended(task, stage)):
            return  # running, or done and its change to the record is on its way to the mirror
        if stage == "finalize" and not finalize_ok:
            return  # held in `exported` until the database answers; other queues go on
        if status == JobStatus.FAILED and self._hold_failed(rec, stage):
            return
        if enqueue(self.redis, task, stage):
            log.info("enqueued %s for task %s (attempt %d)", stage, task.id, task.attempt)

    def _job_ended(self, task: Task, stage: str) -> tuple[Job | None, float | None]:
        """The task's job for `stage` and how many seconds ago it ended (None: not ended, or gone)."""
        try:
            job = Job.fetch(job_id(task.id, stage, task.attempt), connection=self.redis)
        except NoSuchJobError:
            return None, None
        if job.ended_at is None:
            return job, None
        return job, seconds_since(job.ended_at)

    def _just_ended(self, task: Task, stage: str) -> bool:
        ago = self._job_ended(task, stage)[1]
        return ago is not None and ago < JOB_SETTLE

    def _place(self, plan, snap: scheduler.Snapshot) -> list[Task]:
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
        self._written = [(p.rec.key, p.rec.mod_revision) for p in placed]
        return [p.new for p in placed]

    def _enqueue_transfers(self, placed: list[Task]) -> None:
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

    def _retire_final(self, rec: Record) -> None:
        """A final record left in etcd by a version that kept them there:
        archive it if it never was (its log is gone with that version), then
        remove it and its upload."""
        task = rec.value
        with archive.connection(self.config.db) as conn:
            if archive.archived_attempt(conn, task.id) is None:
                archive.archive_task(conn, task, b"")
        if lifecycle.apply(self.store, rec, fate.Archived(task.attempt, task.state)) is not None:
            enqueue_cleanup(self.redis, task)
            log.info("task %s: final record moved out of etcd", task.id)

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
            # Web hosts present in etcd, and any with a transfer queue (one that is down still has files).
            for host in sorted(set(transfer_hosts(self.redis)) | set(pink_nodes.web_urls(self.store))):
                enqueue_sweep(self.redis, host, self.config.node_ttl)
        except (PinkError, RedisError) as exc:
            log.warning("retention sweep: %s", exc)

    def _hold_failed(self, rec: Record, stage: str) -> bool:
        """For a job that failed: True while its retry must wait (backoff) or
        when the task has now failed for good; False to retry it now.

        Transfer gives up after max_job_failures; finalize backs off
        for ever (up to MAX_BACKOFF): a database outage must not fail tasks.
        The count still grows for finalize: past max_job_failures the job
        itself ends the task on an error other than Unavailable (jobs.finalize).
        """
        task = rec.value
        job, ago = self._job_ended(task, stage)
        failures = task.job_failures.get(stage, 0) + 1
        if ago is not None and ago < min(2 ** failures, MAX_BACKOFF):
            return True
        if pipeline.STAGES[stage].gives_up and failures >= self.config.max_job_failures:
            reason = (job and job.exc_info or "").strip().splitlines()[-1:] or ["no error recorded"]
            why = f"{stage} failed {failures} times; last: {reason[0][:500]}"
            lifecycle.apply(self.store, rec, fate.JobGaveUp(why), fence=self.fence)
            log.warning("task %s: %s", task.id, why)
            return True
        return not lifecycle.apply(self.store, rec, fate.JobFailed(stage), fence=self.fence)

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
        rules = fate.Rules(max_attempts=self.config.max_attempts)
        if new := lifecycle.apply(self.store, rec, fate.RunnerLost(why), rules, fence=self.fence):
            log.info("task %s: %s -> %s (attempt %d)", task.id, why, new.state.value, new.attempt)

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
