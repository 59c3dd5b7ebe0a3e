"""A task's fate: every move a task makes, decided in one place.

Actors report what happened as events, never the state a task goes to:
the leader that it placed a task or that a runner (or a web node with the
upload) is gone, a transfer job that the image is on the runner, a runner
that it started the container, that the container exited and how the run
ended, a finalize job what it fetched, a user that they cancel, an operator
that a node is being emptied. `decide(task, event)` turns that into the next
record and the side effects that go with it (a reservation released or its
GPUs freed, the runner's assignment written or dropped). It is pure: no
I/O, so each (state, event) pair is a table row in tests/pink/test_fate.py.
`pink.lifecycle.apply` commits a decision; it is the only writer of a task
record once `Store.create_task` made it (the leader's batches of placements
go through `lifecycle.place`).

    queued --Placed--> placed --Transferred--> (transferred) assigned
    --Started--> running --Exited--> running, GPUs freed
    --Reported--> exported --Fetched / ExportLost / FinalizeGaveUp--> final
    --Archived--> the record leaves etcd (the archive holds it)

RunnerLost, OperatorMove, UploadLost, JobGaveUp and Cancel cut the way
short (`_RULES` says from which states each event may come); `after_loss`
says where a task goes once its runner is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable

from pink import failures
from pink.config import Config
from pink.errors import Conflict
from pink.gpu_usage import GpuUsage
from pink.tasks import FINAL, NOT_STARTED, ON_RUNNER, State, Task, advance


class Refused(Conflict):
    """The event does not apply to the task as it is (another actor moved it first)."""


@dataclass(frozen=True)
class Rules:
    """The configured limits decisions follow."""

    max_attempts: int = Config.max_attempts  # runner losses a task survives

    @classmethod
    def of(cls, config: Config) -> "Rules":
        return cls(max_attempts=config.max_attempts)


@dataclass(frozen=True)
class Decision:
    """The next record and what changes with it, on the node the task was on.

    `task` None: the record leaves etcd. A final `task` is never written to
    etcd: finalize archives it, then `Archived` removes the record.
    """

    task: Task | None
    release: str | None = None  # node whose reservation for the task goes
    free_gpus: str | None = None  # node whose reservation keeps its slot but no GPUs
    unassign: str | None = None  # node whose assignment key for the task goes
    assign: dict | None = None  # the assignment to write for task.node
    assign_lease: int = 0  # the runner's lease the assignment is bound to
    fence_node: bool = False  # only while the runner is the incarnation placed (task.epoch)
    unchanged: bool = False  # nothing to write: the event is already in the record (a second cancel)


# -- events ------------------------------------------------------------------

class Event:
    """What an actor saw. `follows_record`: when the record moved under a
    commit, the event is decided again on the record as it is now (it still
    holds); otherwise the actor's view is stale and the event is dropped."""

    follows_record = False


@dataclass(frozen=True)
class Placed(Event):
    """The leader reserved a runner's GPUs for the task."""

    node: str
    epoch: int
    gpus: list[str]


@dataclass(frozen=True)
class Transferred(Event):
    """The task's image is on its runner: the task is handed to it (the
    assignment, bound to the runner's lease)."""

    detail: str
    lease: int
    sent: int | None = None  # bytes copied (None: nobody copied, e.g. a repair)
    seconds: float | None = None


@dataclass(frozen=True)
class Started(Event):
    """The runner took the assignment and starts the container."""

    runner: str
    logfile: dict


@dataclass(frozen=True)
class Exited(Event):
    """The container exited; its export is still to come. The GPUs go back now."""

    attempt: int
    at: float
    follows_record = True  # a cancel request landing meanwhile changes nothing here


class Ending(str, Enum):
    """How a run ended, as the runner saw it."""

    EXITED = "exited"  # the container exited by itself: its exit code decides
    TIMED_OUT = "timed_out"  # stopped at its deadline
    CANCELLED = "cancelled"  # stopped on its user's request
    BROKEN = "broken"  # could not run, or wrote more than it may keep: `error` says why


@dataclass(frozen=True)
class Reported(Event):
    """The runner is done with `attempt` and left its export (and log) in its outbox."""

    ending: Ending
    attempt: int = field(kw_only=True)
    exit_code: int | None = None
    error: str | None = None
    export: dict | None = None
    export_error: str | None = None
    cause: str | None = None  # why a run failed, when the exit code does not say (`pink.failures`)
    timings: dict[str, float] = field(default_factory=dict)
    gpu_usage: GpuUsage | None = None  # what the run did with its GPUs; None: not measured
    follows_record = True  # a cancel request landing meanwhile must not lose the result


@dataclass(frozen=True)
class RunnerLost(Event):
    """The runner holding the task is gone (lease expired, restarted), or
    could not run it here. `counts`: toward the task's max_attempts (a
    runner that merely lost track of it, or was stopped by an operator, does
    not count)."""

    why: str
    counts: bool = True


@dataclass(frozen=True)
class OperatorMove(Event):
    """An operator empties the node: the task, not started, waits for another."""

    node: str


@dataclass(frozen=True)
class Because(Event):
    """An event told by why it happened alone (the task's history and error say it)."""

    why: str


class UploadLost(Because):
    """The image cannot reach a runner: its web node is gone, or its layers there are damaged."""


@dataclass(frozen=True)
class JobFailed(Event):
    """A stage's job failed once more; the leader retries it after a backoff."""

    stage: str


class JobGaveUp(Because):
    """A stage's job failed too often: the task fails."""


@dataclass(frozen=True)
class Cancel(Event):
    """The task's user (or an admin) asks it to end; for an exported task, to be deleted."""

    follows_record = True


@dataclass(frozen=True)
class Fetched(Event):
    """Finalize took the export (`output`, None without one) and the log's end.
    `refused`: why the export can never be stored (the task fails)."""

    output: dict | None
    logs_truncated: int = 0
    refused: str | None = None


class ExportLost(Because):
    """Finalize found the runner's export gone."""


@dataclass(frozen=True)
class FinalizeGaveUp(Event):
    """Finalize kept failing: the task is archived failed, without an output."""

    why: str
    logs_truncated: int = 0


@dataclass(frozen=True)
class Archived(Event):
    """The archive row of this attempt is committed: the record leaves etcd.
    A record that changed without moving on (a delete request added a flag)
    is removed too."""

    attempt: int
    state: State
    follows_record = True


# -- decisions ---------------------------------------------------------------

def decide(task: Task, event: Event, rules: Rules = Rules()) -> Decision:
    """The next record for `task` after `event`, with its side effects; Refused
    if the event does not apply to the task's state."""
    states, rule = _RULES[type(event)]
    if task.state not in states:
        raise Refused(f"task {task.id} is {task.state.value}: {type(event).__name__} does not apply")
    return rule(task, event, rules)


def _placed(task: Task, e: Placed, _: Rules) -> Decision:
    return Decision(advance(task, State.PLACED, f"placed on {e.node}", node=e.node, epoch=e.epoch,
                            gpus=list(e.gpus), waiting=None))


def _transferred(task: Task, e: Transferred, _: Rules) -> Decision:
    if task.state == State.PLACED:
        task = advance(task, State.TRANSFERRED, e.detail)
        if e.sent is not None:
            task.timings.update(transfer_bytes=e.sent, transfer_seconds=round(e.seconds or 0.0, 3))
    new = advance(task, State.ASSIGNED, f"assigned to {task.node} epoch {task.epoch}")
    return Decision(new, assign={"task": task.id, "attempt": task.attempt, "epoch": task.epoch},
                    assign_lease=e.lease, fence_node=True)


def _started(task: Task, e: Started, _: Rules) -> Decision:
    return Decision(advance(task, State.RUNNING, f"started on {e.runner}", logfile=e.logfile))


def _exited(task: Task, e: Exited, _: Rules) -> Decision:
    if task.attempt != e.attempt:
        raise Refused(f"task {task.id} is at attempt {task.attempt}, not {e.attempt}")
    return Decision(replace(task, timings={**task.timings, "exited": e.at}), free_gpus=task.node)


RESULT_OF = {Ending.TIMED_OUT: State.TIMED_OUT, Ending.CANCELLED: State.CANCELLED, Ending.BROKEN: State.FAILED}


def _reported(task: Task, e: Reported, rules: Rules) -> Decision:
    if task.attempt != e.attempt:
        raise Refused(f"task {task.id} is at attempt {task.attempt}, not {e.attempt}")
    result = RESULT_OF.get(e.ending) or (State.SUCCEEDED if e.exit_code == 0 else State.FAILED)
    error = e.error or e.export_error
    if e.ending == Ending.EXITED and e.exit_code != 0 and not e.error:
        error = f"container exited with code {e.exit_code}"
    failure = _failure(e, result)
    if failures.retried(failure):  # after_loss ends a cancelled task cancelled
        return Decision(after_loss(task, error or failure, rules.max_attempts, failure=failure, export=e.export,
                                   gpu_usage=e.gpu_usage), release=task.node, unassign=task.node)
    new = exported(task, result, error or f"exit code {e.exit_code}", exit_code=e.exit_code, error=error,
                   export=e.export, export_error=e.export_error, failure=failure, gpu_usage=e.gpu_usage)
    new.timings.update({k: v for k, v in e.timings.items() if v is not None})  # 0: the image was cached
    return Decision(new, release=task.node, unassign=task.node)


def _failure(e: Reported, result: State) -> str | None:
    """The cause of a run that failed: the runner's word, else what the ending says."""
    if result == State.TIMED_OUT:
        return "timed_out"
    if result != State.FAILED:
        return None
    return e.cause or ("exit_code" if e.ending == Ending.EXITED else "runner_error")


def _runner_lost(task: Task, e: RunnerLost, rules: Rules) -> Decision:
    return Decision(after_loss(task, e.why, rules.max_attempts, counts=e.counts),
                    release=task.node, unassign=task.node)


def _operator_move(task: Task, e: OperatorMove, _: Rules) -> Decision:
    if task.node != e.node:
        raise Refused(f"task {task.id} is on {task.node}, not {e.node}")
    return Decision(requeue(task, f"moved off node {e.node} by an operator", counts=False),
                    release=e.node, unassign=e.node)


def _upload_lost(task: Task, e: UploadLost, _: Rules) -> Decision:
    if task.cancel_requested:
        return Decision(exported(task, State.CANCELLED, e.why, error=e.why), release=task.node, unassign=task.node)
    return Decision(exported(task, State.FAILED, e.why, error=e.why, failure="upload_lost"),
                    release=task.node, unassign=task.node)


def _job_failed(task: Task, e: JobFailed, _: Rules) -> Decision:
    return Decision(replace(task, job_failures={**task.job_failures, e.stage: task.job_failures.get(e.stage, 0) + 1}))


def _job_gave_up(task: Task, e: JobGaveUp, _: Rules) -> Decision:
    return Decision(exported(task, State.FAILED, e.why, error=e.why, failure="transfer_failed"),
                    release=task.node, unassign=task.node)


def _cancel(task: Task, _: Cancel, __: Rules) -> Decision:
    if task.state in NOT_STARTED:
        why = "cancelled before it started"
        return Decision(exported(task, State.CANCELLED, why, error=why, cancel_requested=True),
                        release=task.node, unassign=task.node)
    if task.state == State.RUNNING and not task.cancel_requested:
        return Decision(replace(task, cancel_requested=True))
    if task.state == State.EXPORTED and not task.delete_requested:
        return Decision(replace(task, delete_requested=True))
    return Decision(task, unchanged=True)


def _fetched(task: Task, e: Fetched, _: Rules) -> Decision:
    if task.delete_requested:
        return Decision(advance(task, State(task.result), "deleted by its user before it was archived"))
    if e.refused:
        return Decision(advance(task, State.FAILED, e.refused, error=e.refused, export_error=e.refused,
                                logs_truncated=e.logs_truncated, failure="output_too_big"))
    detail = f"exit code {task.exit_code}" if task.exit_code is not None else task.error or task.result
    return Decision(advance(task, State(task.result), detail, output=e.output, logs_truncated=e.logs_truncated))


def _export_lost(task: Task, e: ExportLost, rules: Rules) -> Decision:
    """A cancelled or timed-out task is not run again for its output: it ends
    as it was going to, without one. Others run again while attempts are left."""
    if task.result in (State.CANCELLED, State.TIMED_OUT) or (task.failure and not failures.retried(task.failure)):
        return Decision(advance(task, State(task.result), e.why, export_error=e.why))
    if not task.cancel_requested and retries_left(task, rules.max_attempts):
        return Decision(requeue(task, e.why))
    if task.cancel_requested:
        return Decision(advance(task, State.CANCELLED, e.why, error=e.why, export_error=e.why))
    return Decision(advance(task, State.FAILED, e.why, error=e.why, export_error=e.why, failure="export_lost"))


def _finalize_gave_up(task: Task, e: FinalizeGaveUp, _: Rules) -> Decision:
    return Decision(advance(task, State.FAILED, e.why, error=e.why, export_error=e.why,
                            logs_truncated=e.logs_truncated, failure="finalize_failed"))


def _archived(task: Task, e: Archived, _: Rules) -> Decision:
    if task.attempt != e.attempt or task.state != e.state:
        raise Refused(f"task {task.id} moved on to attempt {task.attempt}, {task.state.value}")
    return Decision(None)


LIVE = frozenset(State) - FINAL
_RULES: dict[type, tuple[frozenset, Callable[[Task, Any, Rules], Decision]]] = {
    Placed: (frozenset({State.QUEUED}), _placed),
    Transferred: (frozenset({State.PLACED, State.TRANSFERRED}), _transferred),
    Started: (frozenset({State.ASSIGNED}), _started),
    Exited: (frozenset({State.RUNNING}), _exited),
    Reported: (frozenset({State.RUNNING}), _reported),
    RunnerLost: (frozenset(ON_RUNNER), _runner_lost),
    OperatorMove: (frozenset({State.PLACED, State.TRANSFERRED, State.ASSIGNED}), _operator_move),
    UploadLost: (frozenset({State.QUEUED, State.PLACED}), _upload_lost),
    JobFailed: (LIVE, _job_failed),
    JobGaveUp: (frozenset({State.PLACED, State.TRANSFERRED}), _job_gave_up),
    Cancel: (frozenset(State), _cancel),
    Fetched: (frozenset({State.EXPORTED}), _fetched),
    ExportLost: (frozenset({State.EXPORTED}), _export_lost),
    FinalizeGaveUp: (frozenset({State.EXPORTED}), _finalize_gave_up),
    Archived: (frozenset(State), _archived),
}
EVENTS = tuple(_RULES)


# -- the record after a loss -------------------------------------------------

def after_loss(task: Task, why: str, max_attempts: int, counts: bool = True,
               failure: str = "runner_lost", export: dict | None = None,
               gpu_usage: GpuUsage | None = None) -> Task:
    """The record for a task that lost its attempt to the infrastructure
    (`failure`: its runner gone, by default; `export`: what the runner left
    of the attempt, when it could still say; `gpu_usage`: what the attempt
    measured, kept when the task ends here as `_reported` keeps it).

    A task its user cancelled ends `cancelled`: running it again would undo
    the cancel. Others go back to the queue while attempts are left (`counts`
    False: an operator or the runner itself moved it, which does not count),
    then end `failed`.
    """
    if task.cancel_requested:
        return exported(task, State.CANCELLED, f"cancelled; {why}", error="cancelled", export=export,
                        gpu_usage=gpu_usage)
    if not counts or retries_left(task, max_attempts):
        return requeue(task, why, counts=counts)
    return exported(task, State.FAILED, why, error=f"{why}; gave up after {task.attempt} attempts",
                    failure=failure, export=export, gpu_usage=gpu_usage)


def requeue(task: Task, why: str, counts: bool = True) -> Task:
    """The record for another attempt elsewhere; `counts` toward the retry limit."""
    carried = {k: v for k, v in task.timings.items() if k != "exited"}  # the next container has not exited
    return advance(replace(task, timings=carried), State.QUEUED, why, attempt=task.attempt + 1, node=None,
                   epoch=None, gpus=[], waiting=None, output=None, exit_code=None, error=None, failure=None,
                   result=None, export=None, export_error=None, logs_truncated=0, logfile=None, job_failures={},
                   gpu_usage=None, losses=task.losses + (1 if counts else 0))


def retries_left(task: Task, max_attempts: int) -> bool:
    """May a task that lost its runner once more be tried again?"""
    return task.losses + 1 < max_attempts


def exported(task: Task, result: State, detail: str, **changes) -> Task:
    """Move to EXPORTED carrying the final result the finalizer will apply."""
    return advance(task, State.EXPORTED, detail, result=result.value, **changes)

