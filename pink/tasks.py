"""The task: its record (`Task`), states and transitions.

A task is one `Task`; `pink.store` turns it into the JSON etcd holds and back,
the archive and the API do the same at their ends, and nothing else sees
JSON. Which state a task goes to after what happened is decided in
`pink.fate`, with `advance()` here: it checks the transition is allowed and
appends to the record's history (the audit trail the finalizer archives).
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

from pink import failures, gpu_env, recipes
from pink.errors import BadRequest, Conflict
from pink.gpu_usage import GpuUsage
from pink.request_input import number


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


OUTPUTS = ("full", "changes")  # besides an absolute path in the container
USER_TEXT = ("name", "cmd", "entrypoint", "env")  # the parameters of free size ([limits] record_bytes)
RECORD_TAGS = 16  # repo tags a task record keeps; only informative, so the rest are dropped, not refused
RECORD_TAG_CHARS = 256  # a longer tag is dropped (a cut name would name another image)
DEFAULT_TIMEOUT = 24 * 3600  # seconds a task may run when it names no timeout


@dataclass
class Params:
    """What the user asked for; validated before anything is stored."""

    name: str = ""
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 0
    timeout: int = DEFAULT_TIMEOUT
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
        check_env(env)
        params = cls(name=(get("name") or "")[:200], env=env,
                     cmd=_words(get("cmd"), "cmd"), entrypoint=_words(get("entrypoint"), "entrypoint"),
                     gpus=number(args, "gpus", int, 0, low=0, high=64),
                     timeout=number(args, "timeout", int, DEFAULT_TIMEOUT, low=1, high=30 * 86400),
                     output=get("output") or "full", compression=get("compression") or "zstd",
                     priority=number(args, "priority", int, 0, low=-10, high=10))
        if params.output not in OUTPUTS and not params.output.startswith("/"):
            raise BadRequest("output must be 'full' (the whole filesystem), 'changes' (only what the task "
                             "added or changed, with a manifest) or an absolute path inside the container",
                             code="bad_param")
        if params.compression not in COMPRESSIONS:
            raise BadRequest(f"compression must be one of {', '.join(COMPRESSIONS)}", code="bad_param")
        return params

    def text_bytes(self) -> int:
        """Bytes the free-size parameters take in the record (as JSON)."""
        return len(json.dumps({k: getattr(self, k) for k in USER_TEXT}).encode())

    def check_size(self, record_bytes: int) -> None:
        """Refuse parameters over `record_bytes` (0: no limit): each is copied into an etcd record."""
        size = self.text_bytes()
        if record_bytes and size > record_bytes:
            raise BadRequest(f"the task's name, env, cmd and entrypoint take {size} bytes; the limit is "
                             f"{record_bytes} (record_bytes = {record_bytes}): pass large inputs inside "
                             "the image instead", code="params_too_large")


def check_env(env: dict[str, str], where: str = "env", code: str = "bad_param") -> None:
    """Refuse env names PINK cannot pass (empty, with '=') and those that would widen
    the task's GPUs. The variables PINK sets from the assignment (gpu_env.ASSIGNED)
    are accepted and overridden at run time; these others could only widen it."""
    for key in env:
        if not key or "=" in key:
            raise BadRequest(f"{where} must be KEY=VALUE with a name without '=', got {key!r}", code=code)
    if refused := gpu_env.widening(env):
        raise BadRequest(f"{where} {', '.join(refused)} not allowed: it would give the task GPU "
                         "devices or controls beyond the GPUs PINK assigns it", code=code)


def _words(text, name):
    if not text:
        return None
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise BadRequest(f"{name} is not valid shell words: {exc}", code="bad_param") from None


@dataclass
class Task:
    """A task as etcd holds it (`/pink/tasks/<id>`) and the archive keeps it.

    `image` is what the upload's inspection found (sha256, size, image_id,
    repo_tags, layout); `output` where finalize stored the export (host, path,
    size, stored) and `export` where the runner left it; `timings` maps each
    state to when it was entered. Keys this version does not know are kept in
    `extra`, so a record written by a newer PINK survives an older one moving it.
    """

    id: str
    user: str
    name: str
    state: State
    attempt: int
    created_at: float
    updated_at: float
    image: dict[str, Any]
    params: Params
    web_host: str
    node: str | None = None
    epoch: int | None = None  # the runner's incarnation (its node key's create_revision) when placed
    gpus: list[str] = field(default_factory=list)
    result: str | None = None  # the final state an `exported` task will take
    exit_code: int | None = None
    error: str | None = None
    export_error: str | None = None
    failure: str | None = None  # a failed or timed-out task's cause (`pink.failures`)
    waiting: str | None = None
    export: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    logfile: dict[str, Any] | None = None  # where the runner writes the log: ssh endpoint and path
    logs_truncated: int = 0  # bytes of the log's start left out of the archive
    cancel_requested: bool = False
    delete_requested: bool = False
    job_failures: dict[str, int] = field(default_factory=dict)
    losses: int = 0  # attempts lost with their runner (an operator's moves do not count)
    timings: dict[str, float] = field(default_factory=dict)
    history: list[list] = field(default_factory=list)
    expires_at: float | None = None  # archived tasks: when the output and logs go
    expired_at: float | None = None  # archived tasks: when they went
    gpu_usage: GpuUsage | None = None  # what the run did with its GPUs (None: not measured)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> "Task":
        """The record from its JSON; ValueError when it is not a task's shape."""
        params, image = data.get("params"), data.get("image")
        if not isinstance(params, dict) or not isinstance(image, dict) or not {"sha256", "size"} <= set(image):
            raise ValueError("a task record needs params and an image with sha256 and size")
        if not isinstance(data.get("history", []), list) or not isinstance(data.get("timings") or {}, dict):
            raise ValueError("a task record's history is a list and its timings a mapping")
        values = {k: v for k, v in data.items() if k in _TASK_FIELDS}
        values["state"] = State(data["state"])
        values["params"] = Params(**{k: v for k, v in params.items() if k in _PARAM_FIELDS})
        for key in ("job_failures", "timings"):
            values[key] = values.get(key) or {}
        values["gpus"] = values.get("gpus") or []
        values["gpu_usage"] = GpuUsage.from_json(values.get("gpu_usage"))
        extra = {k: v for k, v in data.items() if k not in _TASK_FIELDS}
        unknown_params = {k: v for k, v in params.items() if k not in _PARAM_FIELDS}
        if unknown_params:
            extra[_EXTRA_PARAMS] = unknown_params
        return cls(**values, extra=extra)

    def to_json(self) -> dict:
        extra = dict(self.extra)
        out = {f: getattr(self, f) for f in _TASK_FIELDS}
        out["state"] = self.state.value
        out["params"] = {**extra.pop(_EXTRA_PARAMS, {}), **asdict(self.params)}
        out["gpu_usage"] = self.gpu_usage.to_json() if self.gpu_usage else None
        return {**extra, **out}

    @property
    def final(self) -> bool:
        return self.state in FINAL


_TASK_FIELDS = frozenset(f.name for f in fields(Task)) - {"extra"}
_EXTRA_PARAMS = " params"  # where `extra` keeps parameters a newer version added (no JSON key has a space)
_PARAM_FIELDS = frozenset(f.name for f in fields(Params))


def new_record(task_id: str, user: str, params: Params, image: dict, web_host: str) -> Task:
    """A new task's record, its image's informative metadata bounded (`bounded_image`)."""
    t = now()
    return Task(id=task_id, name=params.name or task_id, user=user, state=State.QUEUED, attempt=1,
                created_at=t, updated_at=t, image=bounded_image(image), params=replace(params),
                web_host=web_host,
                timings={"submitted": t}, history=[[t, State.QUEUED.value, f"uploaded to {web_host}"]])


def bounded_image(image: dict) -> dict:
    """The image as a record keeps it: at most RECORD_TAGS repo tags of at most
    RECORD_TAG_CHARS each.

    An image config may carry 100 tags of 512 characters, twice in the record
    (its tags and its recipe's): ~100 KB in etcd per task, rerun for free. Tags
    only name the loaded image, so extra ones are dropped, and the recipe is
    rebuilt with the tags kept (its key, the image's name in spools, follows).
    Layers are bounded by `recipes.MAX_LAYERS` (about 17 KB of digests and sizes).
    """
    tags = list(image.get("repo_tags") or [])
    kept = [tag for tag in tags if len(tag) <= RECORD_TAG_CHARS][:RECORD_TAGS]
    if kept == tags:
        return image
    bounded = {**image, "repo_tags": kept}
    if recipe := image.get("recipe"):
        rebuilt = recipes.Recipe.from_dict({**{k: v for k, v in recipe.items() if k != "key"},
                                            "repo_tags": kept}).to_dict()
        bounded.update(recipe=rebuilt, sha256=rebuilt["key"])
    return bounded


def advance(task: Task, to: State, detail: str = "", **changes) -> Task:
    """Return a copy of `task` moved to state `to`, or raise Conflict.

    The copy carries the transition in its history so the audit trail is
    written by the same compare-and-swap as the state itself.
    """
    if to not in TRANSITIONS.get(task.state, set()):
        raise Conflict(f"task {task.id} cannot go from {task.state.value} to {to.value}")
    t = now()
    return replace(task, **changes, state=to, updated_at=t, timings={**task.timings, to.value: t},
                   history=[*task.history, [t, to.value, detail]])


def holds_gpus(task: Task) -> bool:
    """On a runner with its container not yet exited (an exited one's export
    runs after its GPUs went back: gpu_runner.execution._free_gpus)."""
    return task.state in ON_RUNNER and "exited" not in task.timings


def job_id(task_id: str, stage: str, attempt: int) -> str:
    """Deterministic RQ job id: enqueueing a stage twice finds the first job.

    RQ 3 allows only letters, digits, `-` and `_` in ids, hence not `:`.
    """
    return f"{task_id}-{stage}-{attempt}"


def output_filename(task: Task) -> str:
    return task.id + COMPRESSIONS[task.params.compression]


def public_view(task: Task) -> dict:
    """The task as the API shows it: no host paths, times in ISO 8601."""
    out = {k: getattr(task, k) for k in ("id", "name", "user", "attempt", "node", "exit_code", "error",
                                         "export_error", "waiting", "result", "cancel_requested", "gpus")}
    out["state"] = task.state.value
    out["failure"] = failures.describe(task.failure)
    out["created_at"] = iso(task.created_at)
    out["updated_at"] = iso(task.updated_at)
    out["image"] = {k: task.image.get(k) for k in ("sha256", "size", "image_id", "repo_tags", "layout",
                                                    "platform", "cuda")}
    out["params"] = asdict(task.params)
    output = task.output
    out["output"] = ({"size": output["size"], "compression": task.params.compression,
                      "filename": output_filename(task)}
                     if output and output.get("stored") and not task.expired_at else None)
    out["timings"] = {k: iso(v) if isinstance(v, float) and v > 1e9 else v for k, v in task.timings.items()}
    out["expires_at"] = iso(task.expires_at)
    out["expired_at"] = iso(task.expired_at)
    out["logs_truncated"] = task.logs_truncated or 0
    out["sweep"] = task.extra.get("sweep")  # {id, index, size, max_parallel} for a sweep's index (pink.sweeps)
    out["gpu_usage"] = task.gpu_usage.to_json() if task.gpu_usage else None  # null: not measured
    out["history"] = [{"at": iso(at), "state": state, "detail": detail} for at, state, detail in task.history]
    return out


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
