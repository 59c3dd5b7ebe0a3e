"""Why a task failed, and whose failure it was.

A task fails by itself (its command's exit code, an out-of-memory kill, its
time limit, an output over its limit) or because PINK's machinery failed it
(a runner lost, an image a runner could not load, a web node gone with the
upload). Only the second kind is tried again (`pink.fate`): running a task
that failed by itself again gives the same failure, and costs a GPU. A task
record carries the cause's code (`Task.failure`); people see its class, what
happened and what to do, from this table, so the advice can improve without
touching the records.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Blame(str, Enum):
    TASK = "task"  # the task's own doing: running it again gives the same
    INFRASTRUCTURE = "infrastructure"  # PINK's machinery: tried again while attempts are left


@dataclass(frozen=True)
class Cause:
    code: str
    blame: Blame
    summary: str  # what happened, as a clause
    advice: str  # what to do, as a sentence


_AGAIN = "Nothing to fix in the task: submit it again, and tell an admin if it happens again."
# code: (whose, what happened, what to do); `pink.fate` sets the codes
_TABLE = {
    "exit_code": (Blame.TASK, "the command exited with an error",
                  "Read the task's log, fix the command or the image, and submit again."),
    "runner_lost": (Blame.INFRASTRUCTURE, "the GPU server running it was lost on every attempt", _AGAIN),
    "oom_killed": (Blame.TASK, "the container ran out of memory and was killed",
                   "Use less memory (smaller batches or inputs), then submit again."),
    "timed_out": (Blame.TASK, "it ran past its time limit",
                  "Submit again with a longer --timeout (up to the GPU servers' cap: the error says what it "
                  "was allowed), or have it save checkpoints."),
    "runner_error": (Blame.INFRASTRUCTURE, "the GPU server's runner failed while running it", _AGAIN),
    "output_too_big": (Blame.TASK, "it wrote more than a task may keep",
                       "Write less, or keep one directory with --output PATH."),
    "transfer_failed": (Blame.INFRASTRUCTURE, "its image could not be copied to a GPU server", _AGAIN),
    "image_refused": (Blame.TASK, "the GPU server refused the image as it is",
                      "Read the error, save the image again (docker save, or pink submit IMAGE) and submit it."),
    "export_lost": (Blame.INFRASTRUCTURE, "its output was lost on the GPU server on every attempt", _AGAIN),
    "start_failed": (Blame.TASK, "the container could not start",
                     "Check the image's command and entrypoint (docker run it on your machine), then submit "
                     "again."),
    "finalize_failed": (Blame.INFRASTRUCTURE, "its output could not be collected from the GPU server", _AGAIN),
    "image_load": (Blame.INFRASTRUCTURE, "no GPU server could load the image",
                   "Submit again; if it fails the same way, check that `docker load` takes the image, and "
                   "tell an admin."),
    "disk_full": (Blame.INFRASTRUCTURE, "the GPU server's disk filled up while it saved the output",
                  "Nothing to fix in the task unless its output is huge: submit it again, and tell an admin."),
    "gpu_idle": (Blame.TASK, "its GPUs stayed idle past the GPU servers' limit and it was stopped, its output kept",
                 "Make the task use its GPUs (check that it runs on CUDA), or submit it with --gpus 0."),
    "upload_lost": (Blame.INFRASTRUCTURE, "the web node holding its upload went away before a GPU server had "
                    "the image", "Submit the image again."),
}
CAUSES = {code: Cause(code, *row) for code, row in _TABLE.items()}


def retried(code: str | None) -> bool:
    """Is a failure of this cause worth another attempt?"""
    cause = CAUSES.get(code or "")
    return cause is not None and cause.blame is Blame.INFRASTRUCTURE


def describe(code: str | None) -> dict | None:
    """The failure as the API, the CLI and the pages show it; None for none.
    A code this version does not know (a newer PINK wrote it) is shown as it is."""
    if not code:
        return None
    cause = CAUSES.get(code)
    if cause is None:
        return {"cause": code, "class": "unknown", "summary": code, "advice": ""}
    return {"cause": code, "class": cause.blame.value, "summary": cause.summary, "advice": cause.advice}
