"""The pipeline's stages: which job a task's state calls for, where it runs, how it fails.

One table (`STAGES`) for the queue jobs (which state they start from), the
leader (which job a task lacks, which failures fail the task) and the queues
(function, queue and timeout):

    queued -> (leader) placed -> transfer job -> (transferred) assigned
    -> (runner) running -> exported -> finalize job -> archived in MariaDB,
    then removed from etcd; the final state lives only there.

A queued task needs no job: the leader places waiting tasks in batches and
enqueues the transfer of each it placed. A task in `assigned` or `running`
waits on its runner. What moves a task between states is `pink.fate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pink.tasks import State, Task

QUEUE_FINALIZE = "pink-finalize"  # shared: finalize pulls the export over SFTP
QUEUE_TRANSFER_PREFIX = "pink-transfer."  # + web host: the upload is on that host
JOB_TIMEOUT = 6 * 3600  # seconds an RQ job may take (a large image transfer)


@dataclass(frozen=True)
class Stage:
    """One kind of queue job."""

    name: str
    state: State  # the state the job works from
    function: str  # the job, as RQ imports it
    queue: Callable[[Task], str]  # the queue it runs on for a task
    timeout: int  # seconds the job may take
    gives_up: bool  # failing max_job_failures times fails the task (finalize only backs off:
    #                 a database outage must hold tasks in `exported`, never fail them)


def transfer_queue(host: str) -> str:
    """The queue of jobs that need web node `host`'s files (its uploads, its spool)."""
    return QUEUE_TRANSFER_PREFIX + host


STAGES = {s.name: s for s in (
    Stage("transfer", State.PLACED, "queue_workers.jobs.transfer", lambda t: transfer_queue(t.web_host),
          JOB_TIMEOUT, gives_up=True),
    Stage("finalize", State.EXPORTED, "queue_workers.jobs.finalize", lambda t: QUEUE_FINALIZE,
          JOB_TIMEOUT, gives_up=False),
)}
_BY_STATE = {s.state: s.name for s in STAGES.values()}


def stage_for(task: Task) -> str | None:
    """The job the task's state calls for; None while it waits on the leader or a runner."""
    return _BY_STATE.get(task.state)
