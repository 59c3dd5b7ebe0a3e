"""The pipeline: which stage follows which state, and where a task goes after a loss.

One owner for the order of a task's life, called by the queue jobs (to
enqueue the next stage), the leader (to repair missing jobs and re-queue
lost tasks) and node control (moving tasks off a node):

    queued -> (leader) placed -> transfer job -> (transferred) assigned
    -> (runner) running -> exported -> finalize job -> archived in MariaDB,
    then removed from etcd; the final state lives only there.

The transfer job ends by assigning the task (transferred and assigned in one
transaction, both in its history); the run job only repairs a task found
`transferred`.

A queued task needs no job: the leader places waiting tasks in batches
from its pass over the queue, and enqueues the transfer of each it placed.
"""

from __future__ import annotations

from pink.tasks import State, Task, exported, requeue, retries_left

# The job each state needs; states absent here wait on the leader (queued)
# or on a runner.
STAGE_FOR = {State.PLACED: "transfer", State.TRANSFERRED: "run", State.EXPORTED: "finalize"}
# Stages that give up after max_job_failures; finalize only backs off (a
# database outage must hold tasks in `exported`, never fail them).
GIVES_UP = {"transfer", "run"}


def stage_for(task: Task) -> str | None:
    return STAGE_FOR.get(task.state)


def after_loss(task: Task, why: str, max_attempts: int, lost: bool = True) -> Task:
    """The record for a task whose runner (or export) is gone.

    A task its user cancelled ends `cancelled`: running it again would undo
    the cancel. Others go back to the queue while attempts are left (`lost`
    False: an operator moved it, which does not count), then end `failed`.
    """
    if task.cancel_requested:
        return exported(task, State.CANCELLED, f"cancelled; {why}", error="cancelled")
    if not lost or retries_left(task, max_attempts):
        return requeue(task, why, lost=lost)
    return exported(task, State.FAILED, why, error=f"{why}; gave up after {task.attempt} attempts")
