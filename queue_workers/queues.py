"""RQ queues and the one way to enqueue a task's stage.

Queues: `pink-transfer.<web host>` (the upload lives on that host, so its
transfer runs there) and the shared `pink-finalize`; which
stage runs on which is `pink.pipeline.STAGES`. Notifications have their own
queue (`queue_workers.notify`) and their own workers (`notify_queues`).
Job ids are `<task>-<stage>-<attempt>`, so enqueueing a stage that already
has a live job does nothing; every job begins with a compare-and-swap on the
task, so a job that does run twice does nothing the second time. Called by
the web node (first job), by jobs (next stage) and by the leader (repair).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from redis import Redis
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from pink import pipeline
from pink.pipeline import transfer_queue
from pink.tasks import Task, job_id
from queue_workers.notify import QUEUE as NOTIFY_QUEUE

LIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}

def queues_for(host: str) -> list[str]:
    """What a worker on web node `host` listens to, most urgent first.

    Finalize comes after transfers: it waits on the database, and a database
    outage (or a few slow archives) must not starve the jobs that start
    tasks. Notifications are not here (`notify_queues`).
    """
    return [transfer_queue(host), pipeline.QUEUE_FINALIZE]


def notify_queues() -> list[str]:
    """What a notify worker (`pink-worker --queues notify`) listens to: only
    `pink-notify`, so that a receiver answering slowly holds a notify worker
    at most, never one that transfers or finalizes a task."""
    return [NOTIFY_QUEUE]


def transfer_hosts(redis: Redis) -> list[str]:
    """The web hosts that have a transfer queue (each runs workers for it)."""
    prefix = pipeline.QUEUE_TRANSFER_PREFIX
    return [q.name[len(prefix):] for q in Queue.all(connection=redis) if q.name.startswith(prefix)]


def enqueue_sweep(redis: Redis, host: str, taken_after: float) -> bool:
    """Ask `host`'s workers to delete its expired and orphaned files (once at a
    time). A sweep enqueued over `taken_after` seconds ago (a worker's lease)
    and `queued` in no queue was taken by a worker that died
    (`missing_from_queues`): it goes back."""
    jid = "sweep-" + re.sub(r"[^A-Za-z0-9_-]", "_", host)
    name = transfer_queue(host)
    status = job_status(redis, jid)
    if status == JobStatus.QUEUED and seconds_since(Job.fetch(jid, connection=redis).enqueued_at) > taken_after:
        return push_back(redis, jid, name)
    if status in LIVE:
        return False
    Queue(name, connection=redis).enqueue(
        "queue_workers.jobs.sweep", job_id=jid, job_timeout=600, result_ttl=600, failure_ttl=86400,
        description=f"retention sweep on {host}")
    return True


def job_status(redis: Redis, jid: str) -> JobStatus | None:
    """The job's status; a job started by a worker that has since died counts as failed.

    RQ itself would only notice when the job's timeout (hours, for a big
    transfer) ran out; a pink-worker's key expires a lease (`node_ttl`) after
    its death (queue_workers.worker).
    """
    try:
        job = Job.fetch(jid, connection=redis)
    except NoSuchJobError:
        return None
    status = job.get_status(refresh=False)
    if status == JobStatus.STARTED and job.worker_name and not _worker_runs(redis, job):
        return JobStatus.FAILED
    return status


def _worker_runs(redis: Redis, job: Job) -> bool:
    """Whether the worker named on a started job is alive and still the process that started it.

    A worker restarted under the same name (systemd's units have fixed
    names) is born after the job started, so it cannot be running it.
    Timestamps missing from either record count as alive: only RQ decides then.
    """
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + job.worker_name, connection=redis)
    if worker is None:
        return False
    return worker.birth_date is None or job.started_at is None or worker.birth_date <= job.started_at


def statuses(redis: Redis, jids: list[str]) -> dict[str, JobStatus | None]:
    """`job_status` of many jobs in one round trip (plus one per started job: a few, one per worker)."""
    with redis.pipeline(transaction=False) as pipe:
        for jid in jids:
            pipe.hget(Job.key_for(jid), "status")
        raw = pipe.execute()
    out = {}
    for jid, status in zip(jids, raw):
        status = JobStatus(status.decode()) if status else None
        out[jid] = job_status(redis, jid) if status == JobStatus.STARTED else status
    return out


def missing_from_queues(redis: Redis, queued: dict[str, str]) -> set[str]:
    """Of jobs whose status says queued (job id -> its queue's name), those
    not in their queue: one LRANGE per queue named.

    A worker takes a job id off its queues (BLPOP) before it marks the job
    started; one killed in between leaves the job `queued` in no queue,
    where no worker will ever find it.
    """
    names = sorted(set(queued.values()))
    with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.lrange(Queue(name, connection=redis).key, 0, -1)
        lists = pipe.execute()
    present = {name: {jid.decode() for jid in jids} for name, jids in zip(names, lists)}
    return {jid for jid, name in queued.items() if jid not in present[name]}


def seconds_since(moment: datetime) -> float:
    """Seconds since one of a job's times (RQ stores them in UTC without a zone)."""
    return (datetime.now(timezone.utc) - moment.replace(tzinfo=timezone.utc)).total_seconds()


def push_back(redis: Redis, jid: str, name: str) -> bool:
    """Put a job a dead worker took (`missing_from_queues`) back at the head
    of its queue (it had waited its turn), if it is still `queued` and still
    in no queue: checked and pushed in one Redis script, so a job a live
    worker has meanwhile started, or that is back in its queue, is left
    alone. True when it was pushed."""
    return bool(redis.eval(_PUSH_BACK, 2, Job.key_for(jid), Queue(name, connection=redis).key, jid))


_PUSH_BACK = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' and not redis.call('LPOS', KEYS[2], ARGV[1]) then
    redis.call('LPUSH', KEYS[2], ARGV[1])
    return 1
end
return 0
"""


def queue_of(task: Task, stage: str) -> str:
    """The queue that runs `stage` for the task."""
    return pipeline.STAGES[stage].queue(task)


def enqueue_next(redis: Redis, task: Task) -> bool:
    """Enqueue the job the task's state calls for (`pink.pipeline`), if it calls for one."""
    stage = pipeline.stage_for(task)
    return bool(stage) and enqueue(redis, task, stage)


def enqueue_many(redis: Redis, tasks: list[Task]) -> int:
    """`enqueue_next` for a batch (the leader's placements) in two round trips; returns how many were created.

    A job id never used yet is created in one pipeline; one that exists
    (a retry of the same attempt) takes `enqueue`'s careful path.
    """
    wanted = [(task, stage) for task in tasks if (stage := pipeline.stage_for(task))]
    jids = [job_id(task.id, stage, task.attempt) for task, stage in wanted]
    with redis.pipeline(transaction=False) as pipe:
        for jid in jids:
            pipe.exists(Job.key_for(jid))
        found = pipe.execute()
    fresh: dict[str, list] = {}
    created = 0
    for (task, stage), exists in zip(wanted, found):
        if exists:
            created += enqueue(redis, task, stage)
        else:
            name, data = _job(task, stage)
            fresh.setdefault(name, []).append(data)
    with redis.pipeline() as pipe:
        for name, batch in fresh.items():
            Queue(name, connection=redis).enqueue_many(batch, pipeline=pipe)
        pipe.execute()
    return created + sum(len(batch) for batch in fresh.values())


def enqueue(redis: Redis, task: Task, stage: str) -> bool:
    """Make sure the task's current attempt has a live job for `stage`.

    Returns True when a job was created. A finished or failed job with the
    same id is replaced, which is how the leader retries a stage.
    """
    jid = job_id(task.id, stage, task.attempt)
    status = job_status(redis, jid)
    if status in LIVE:
        return False
    if status is not None:
        Job.fetch(jid, connection=redis).delete()
    name, data = _job(task, stage)
    Queue(name, connection=redis).enqueue_many([data])
    return True


def _job(task: Task, stage: str) -> tuple[str, object]:
    """(queue name, RQ's EnqueueData) of the job running `stage` for the task's current attempt."""
    spec = pipeline.STAGES[stage]
    return spec.queue(task), Queue.prepare_data(
        spec.function, (task.id, task.attempt), job_id=job_id(task.id, stage, task.attempt),
        timeout=spec.timeout, result_ttl=600, failure_ttl=7 * 86400, description=f"{stage} task {task.id}")
