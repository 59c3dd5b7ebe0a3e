"""RQ queues and the one way to enqueue a task's stage.

Queues: `pink-transfer.<web host>` (the upload lives on that host, so its
transfer and spool cleanup run there), shared `pink-run` and `pink-finalize`.
Job ids are `<task>-<stage>-<attempt>`, so enqueueing a stage that already
has a live job does nothing; every job begins with a compare-and-swap on the
task, so a job that does run twice does nothing the second time. Called by
the web node (first job), by jobs (next stage) and by the leader (repair).
"""

from __future__ import annotations

from redis import Redis
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from pink import defaults
from pink.tasks import job_id

LIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}

STAGES = {
    # stage: (job function, queue name for a task record, seconds the job may take)
    "transfer": ("queue_workers.jobs.transfer", lambda task: transfer_queue(task["web_host"]),
                 defaults.JOB_TIMEOUT),
    "cleanup": ("queue_workers.jobs.cleanup", lambda task: transfer_queue(task["web_host"]), 60),
    "run": ("queue_workers.jobs.run", lambda task: defaults.QUEUE_RUN, 60),
    "finalize": ("queue_workers.jobs.finalize", lambda task: defaults.QUEUE_FINALIZE,
                 defaults.JOB_TIMEOUT),
}


def transfer_queue(host: str) -> str:
    return defaults.QUEUE_TRANSFER_PREFIX + host


def queues_for(host: str) -> list[str]:
    """What a worker on web node `host` listens to, most urgent first."""
    return [defaults.QUEUE_FINALIZE, defaults.QUEUE_RUN, transfer_queue(host)]


def job_status(redis: Redis, jid: str) -> JobStatus | None:
    """The job's status; a job started by a worker that has since died counts as failed.

    RQ itself would only notice when the job's timeout (hours, for a big
    transfer) ran out; a worker's own key expires within its TTL of its death.
    """
    try:
        job = Job.fetch(jid, connection=redis)
    except NoSuchJobError:
        return None
    status = job.get_status(refresh=False)
    if status == JobStatus.STARTED and job.worker_name and \
            Worker.find_by_key(Worker.redis_worker_namespace_prefix + job.worker_name,
                               connection=redis) is None:
        return JobStatus.FAILED
    return status


def enqueue(redis: Redis, task: dict, stage: str) -> bool:
    """Make sure the task's current attempt has a live job for `stage`.

    Returns True when a job was created. A finished or failed job with the
    same id is replaced, which is how the leader retries a stage.
    """
    func, queue_of, timeout = STAGES[stage]
    jid = job_id(task["id"], stage, task["attempt"])
    status = job_status(redis, jid)
    if status in LIVE:
        return False
    if status is not None:
        Job.fetch(jid, connection=redis).delete()
    Queue(queue_of(task), connection=redis).enqueue(
        func, task["id"], task["attempt"], job_id=jid, job_timeout=timeout,
        result_ttl=600, failure_ttl=7 * 86400, description=f"{stage} task {task['id']}")
    return True
