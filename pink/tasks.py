"""The task: its record in etcd (`/pink/tasks/<id>`), states and transitions.

A task is one JSON record. Every actor moves it with `advance()`, which checks
the transition is allowed and appends to the record's history (the audit
trail the finalizer archives), then commits it as a compare-and-swap through
`pink.store`. Called by the web API, queue jobs, the leader and runners.
"""

from __future__ import annotations

import os
import secrets
import shlex
import time
from dataclasses import dataclass, field
from enum import Enum

from pink import defaults
from pink.errors import BadRequest, Conflict


class State(str, Enum):
    QUEUED = "queued"  # uploaded and validated; waiting for a runner
    PLACED = "placed"  # a runner and its GPUs are reserved; image being copied
    TRANSFERRED = "transferred"  # the image is on the runner
    ASSIGNED = "assigned"  # handed to the runner (assignment key + epoch)
    RUNNING = "running"
    EXPORTED = "exported"  # the runner is done; `result` says how it ended
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


FINAL = frozenset({State.SUCCEEDED, State.FAILED, State.TIMED_OUT, State.CANCELLED})
FINAL_NAMES = frozenset(s.value for s in FINAL)  # as JSON carries them (the CLI, tests)
# States in which a runner holds (or is about to hold) the task: losing the
# runner's lease in one of them sends the task back to the queue.
ON_RUNNER = {State.PLACED, State.TRANSFERRED, State.ASSIGNED, State.RUNNING}
NOT_STARTED = {State.QUEUED, State.PLACED, State.TRANSFERRED, State.ASSIGNED}

TRANSITIONS = {
    State.QUEUED: {State.PLACED, State.EXPORTED},
    State.PLACED: {State.TRANSFERRED, State.QUEUED, State.EXPORTED},
    State.TRANSFERRED: {State.ASSIGNED, State.QUEUED, State.EXPORTED},
    State.ASSIGNED: {State.RUNNING, State.QUEUED, State.EXPORTED},
    State.RUNNING: {State.EXPORTED, State.QUEUED},
    State.EXPORTED: FINAL | {State.QUEUED},
}

COMPRESSIONS = {"zstd": ".tar.zst", "gzip": ".tar.gz"}


def now() -> float:
    return time.time()


def new_id() -> str:
    return secrets.token_hex(6)


@dataclass
class Params:
    """What the user asked for; validated before anything is stored."""

    name: str = ""
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 0
    timeout: int = defaults.DEFAULT_TIMEOUT
    output: str = "full"
    compression: str = "zstd"
    priority: int = 0  # higher goes first; only admins may go above 0

    @classmethod
    def parse(cls, args) -> "Params":
        """Build Params from a query string (a werkzeug MultiDict or plain dict)."""
        get = args.get
        env = {}
        for item in (args.getlist("env") if hasattr(args, "getlist") else args.get("env", [])):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise BadRequest(f"env must be KEY=VALUE, got {item!r}", code="bad_param")
            env[key] = value
        params = cls(name=(get("name") or "")[:200], env=env,
                     cmd=_words(get("cmd"), "cmd"), entrypoint=_words(get("entrypoint"), "entrypoint"),
                     gpus=_int(get("gpus"), "gpus", 0, 0, 64),
                     timeout=_int(get("timeout"), "timeout", defaults.DEFAULT_TIMEOUT, 1, 30 * 86400),
                     output=get("output") or "full", compression=get("compression") or "zstd",
                     priority=_int(get("priority"), "priority", 0, -10, 10))
        if params.output != "full" and not params.output.startswith("/"):
            raise BadRequest("output must be 'full' or an absolute path inside the container",
                             code="bad_param")
        if params.compression not in COMPRESSIONS:
            raise BadRequest(f"compression must be one of {', '.join(COMPRESSIONS)}", code="bad_param")
        return params


def _words(text, name):
    if not text:
        return None
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise BadRequest(f"{name} is not valid shell words: {exc}", code="bad_param") from None


def _int(text, name, default, low, high):
    if text in (None, ""):
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, got {text!r}", code="bad_param") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", code="bad_param")
    return value


def spool_file(spool_dir: str, task_id: str) -> str:
    """Where a task's upload lies on its web host (`web_host`) until it is final."""
    return os.path.join(spool_dir, f"{task_id}.tar")


def new_record(task_id: str, user: str, params: Params, image: dict, web_host: str) -> dict:
    t = now()
    return {
        "id": task_id, "name": params.name or task_id, "user": user,
        "state": State.QUEUED.value, "attempt": 1,
        "created_at": t, "updated_at": t,
        "image": image, "params": params.__dict__.copy(),
        "web_host": web_host,
        "node": None, "epoch": None, "gpus": [],
        "result": None, "exit_code": None, "error": None, "waiting": None,
        "output": None, "cancel_requested": False,
        "timings": {"submitted": t},
        "history": [[t, State.QUEUED.value, f"uploaded to {web_host}"]],
    }


def state_of(record: dict) -> State:
    return State(record["state"])


def is_final(record: dict) -> bool:
    return state_of(record) in FINAL


def advance(record: dict, to: State, detail: str = "", **changes) -> dict:
    """Return a copy of `record` moved to state `to`, or raise Conflict.

    The copy carries the transition in its history so the audit trail is
    written by the same compare-and-swap as the state itself.
    """
    current = state_of(record)
    if to not in TRANSITIONS.get(current, set()):
        raise Conflict(f"task {record['id']} cannot go from {current.value} to {to.value}")
    t = now()
    new = dict(record)
    new.update(changes)
    new["state"] = to.value
    new["updated_at"] = t
    new["timings"] = dict(record.get("timings") or {})
    new["timings"][to.value] = t
    new["history"] = list(record.get("history") or []) + [[t, to.value, detail]]
    return new


def requeue(record: dict, why: str, lost: bool = True) -> dict:
    """The record for another attempt elsewhere.

    `lost` counts towards the retry limit (the runner died or was cut off);
    an operator moving work off a node (drain --now, stop) does not.
    """
    return advance(record, State.QUEUED, why, attempt=record["attempt"] + 1, node=None,
                   epoch=None, gpus=[], waiting=None, output=None, exit_code=None, error=None,
                   job_failures={}, losses=record.get("losses", 0) + (1 if lost else 0))


def retries_left(record: dict, max_attempts: int) -> bool:
    """May a task that lost its runner once more be tried again?"""
    return record.get("losses", 0) + 1 < max_attempts


def exported(record: dict, result: State, detail: str, **changes) -> dict:
    """Move to EXPORTED carrying the final result the finalizer will apply."""
    return advance(record, State.EXPORTED, detail, result=result.value, **changes)


def job_id(task_id: str, stage: str, attempt: int) -> str:
    """Deterministic RQ job id: enqueueing a stage twice finds the first job.

    RQ 3 allows only letters, digits, `-` and `_` in ids, hence not `:`.
    """
    return f"{task_id}-{stage}-{attempt}"


def output_filename(record: dict) -> str:
    return record["id"] + COMPRESSIONS[record["params"]["compression"]]


def public_view(record: dict) -> dict:
    """The task as the API shows it: no host paths, times in ISO 8601."""
    out = {k: record.get(k) for k in ("id", "name", "user", "state", "attempt", "node", "exit_code",
                                      "error", "export_error", "waiting", "result", "cancel_requested",
                                      "gpus")}
    out["created_at"] = iso(record["created_at"])
    out["updated_at"] = iso(record["updated_at"])
    out["image"] = {k: record["image"].get(k) for k in ("sha256", "size", "image_id", "repo_tags", "layout")}
    out["params"] = record["params"]
    output = record.get("output")
    out["output"] = ({"size": output["size"], "compression": record["params"]["compression"],
                      "filename": output_filename(record)}
                     if output and output.get("stored") and not record.get("expired_at") else None)
    out["timings"] = {k: iso(v) if isinstance(v, float) and v > 1e9 else v
                      for k, v in (record.get("timings") or {}).items()}
    out["expires_at"] = iso(record.get("expires_at"))
    out["expired_at"] = iso(record.get("expired_at"))
    out["logs_truncated"] = record.get("logs_truncated") or 0
    return out


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
