"""The leader's repair of jobs: each live task gets the job its state calls for.

`Repair.run` settles what a loss left (`queue_workers.losses`), then
enqueues the job `pink.pipeline` says a task lacks (Redis lost its data, a
worker died mid-job), holds a failed job back for its backoff or fails its
task for good, and puts back at the head of its queue a job a dead worker
took. `clean_registries_if_due` moves the started jobs of dead workers to
RQ's failed registry. Writes are fenced by the leader key (`Repair.fence`,
set by `Leader` for each term).
"""

from __future__ import annotations

import logging
import time

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from pink import archive, fate, lifecycle, pipeline, scheduler
from pink import config as pink_config
from pink.errors import PinkError, Unavailable
from pink.store import Record, Store
from pink.tasks import State, Task, job_id
from queue_workers.losses import Losses
from queue_workers.queues import (LIVE, enqueue, missing_from_queues, push_back, queue_of, queues_for,
                                  seconds_since, statuses)

log = logging.getLogger("pink.leader")

REGISTRY_CLEANUP_INTERVAL = 10.0  # seconds between sweeps of RQ's started-job registries
MAX_BACKOFF = 300  # seconds: the longest wait before a failed job is tried again
JOB_SETTLE = 10.0  # seconds after a job ended during which the record it changed may not be mirrored yet


class Repair:
    def __init__(self, config: pink_config.Config, store: Store, redis: Redis, losses: Losses):
        self.config = config
        self.store = store
        self.redis = redis
        self.losses = losses
        self.fence: tuple[str, int] | None = None
        self.repaired = float("-inf")  # when the last full repair ran (`Leader` resets it for each term)
        self._cleaned = 0.0
        self._checked: dict[str, int] = {}  # task key -> mod_revision whose job was last made sure of
        self._missing: dict[str, float] = {}  # job id `queued` in no queue -> when a full repair first saw it

    def run(self, snap: scheduler.Snapshot, lease) -> None:
        """Settle the losses (`Losses.settle`), and give each task the job its state calls for."""
        full = time.monotonic() - self.repaired >= self.config.reconcile_interval
        if full:
            self.repaired = time.monotonic()
            self._checked = {}
        due = []
        for rec in snap.tasks:
            if lease.lost.is_set():
                return
            try:
                if self.losses.settle(rec, snap):
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

    def _database_answers(self) -> bool:
        try:
            with archive.connection(self.config.db) as conn:
                conn.ping(reconnect=False)
            return True
        except (Unavailable, PinkError) as exc:
            log.warning("holding finalize jobs: %s", exc)
            return False

    def clean_registries_if_due(self) -> None:
        """Every REGISTRY_CLEANUP_INTERVAL, move jobs of dead workers to the
        failed registry so they can be re-enqueued."""
        if time.monotonic() - self._cleaned > REGISTRY_CLEANUP_INTERVAL:
            names = set(queues_for(self.config.host))
            names.update(q.name for q in Queue.all(connection=self.redis))
            for name in names:
                StartedJobRegistry(name, connection=self.redis).cleanup()
            self._cleaned = time.monotonic()
