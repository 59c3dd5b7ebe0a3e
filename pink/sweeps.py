"""Sweeps (job arrays): one upload, N tasks, each index with its own env or command.

A sweep is not a record of its own: each index is an ordinary task whose
record carries `sweep: {id, index, size, max_parallel}` (in `Task.extra`, so
it reaches etcd, the archive's `sweep_id` column and the API unchanged).
Indexes share the image, fail, retry and end like any task; attempts count
per index (Kubernetes' backoffLimitPerIndex). `max_parallel` is Slurm's `%N`:
the leader's placement passes over an index while N of its sweep hold a slot.

Pure: parsing a spec, expanding it to indexes, counting slots and states.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Iterator

from pink.errors import BadRequest
from pink.tasks import ON_RUNNER, Params, Task, _words, check_env

SPEC_BYTES = 256 * 2**10  # bytes of a sweep's spec as JSON
MAX_SWEEP_BYTES = 64 * 2**20  # bytes of all a sweep's records together once expanded
DEFAULT_MAX_INDEXES = 500  # [limits] sweep_indexes when the config names none (live_tasks_per_user's default)
SPEC_HINT = ('send sweep as JSON: {"grid": {"LR": ["1e-3", "1e-4"]}} (every combination), or '
             '{"items": [{"env": {"LR": "1e-3"}}, {"cmd": "python train.py --lr 1e-4"}]}, '
             'optionally with "max_parallel": N')


@dataclass(frozen=True)
class Index:
    """What one index changes: env merged over the task's, and its command (None: the task's)."""

    env: dict[str, str]
    cmd: str | None = None


@dataclass(frozen=True)
class Spec:
    """A validated sweep: its indexes in order and the concurrency cap (None: no cap)."""

    indexes: tuple[Index, ...]
    max_parallel: int | None = None


def _bad(message: str) -> BadRequest:
    return BadRequest(f"bad sweep: {message}; {SPEC_HINT}", code="bad_sweep")


def _env(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _bad(f"{where} env must be an object of NAME: value")
    env = {}
    for key, item in value.items():
        if not key or "=" in key or not isinstance(item, (str, int, float)) or isinstance(item, bool):
            raise _bad(f"{where} env {key!r} must be a name without '=' and a string or number value")
        env[key] = str(item)
    try:
        check_env(env, f"{where} env")  # as Params.parse checks a task's env
    except BadRequest as exc:
        raise _bad(exc.message) from None
    return env


def _grid(grid: Any) -> Iterator[Index]:
    if not isinstance(grid, dict) or not grid:
        raise _bad("grid must be an object of NAME: [values]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _bad(f"grid {key!r} must be a non-empty list of values")
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield Index(env=_env(dict(zip(keys, values)), "grid"))


def _items(items: Any) -> Iterator[Index]:
    if not isinstance(items, list) or not items:
        raise _bad("items must be a non-empty list")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not set(item) <= {"env", "cmd"} or not item:
            raise _bad(f"item {i} must be an object with env and/or cmd")
        cmd = item.get("cmd")
        if cmd is not None and (not isinstance(cmd, str) or not cmd.strip()):
            raise _bad(f"item {i} cmd must be a non-empty string of shell words")
        yield Index(env=_env(item.get("env", {}), f"item {i}"), cmd=cmd)


def parse(raw: Any, max_indexes: int = DEFAULT_MAX_INDEXES) -> Spec | None:
    """The spec from its JSON (text or decoded); None when no sweep was asked for.

    Refuses (400 bad_sweep) a malformed spec, and one over `max_indexes`
    before expanding past it (a grid's size is the product of its lists)."""
    if raw is None or raw == "":
        return None
    size = len(raw.encode()) if isinstance(raw, str) else len(json.dumps(raw, default=str).encode())
    if size > SPEC_BYTES:
        raise BadRequest(f"bad sweep: its spec takes {size} bytes; at most {SPEC_BYTES}: split it into "
                         "several sweeps", code="bad_sweep")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise _bad("it is not JSON") from None
    if not isinstance(raw, dict) or len({"grid", "items"} & set(raw)) != 1 \
            or not set(raw) <= {"grid", "items", "max_parallel"}:
        raise _bad("it must be an object with exactly one of grid or items")
    cap = raw.get("max_parallel")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise _bad("max_parallel must be a whole number, 1 or more")
    if "grid" in raw and isinstance(raw["grid"], dict):
        size = 1
        for values in raw["grid"].values():
            size *= len(values) if isinstance(values, list) else 1
        _check_size(size, max_indexes)
    indexes = tuple(itertools.islice(_grid(raw["grid"]) if "grid" in raw else _items(raw["items"]),
                                     max_indexes + 1))
    _check_size(len(indexes), max_indexes)
    return Spec(indexes=indexes, max_parallel=min(cap, len(indexes)) if cap else None)


def _check_size(size: int, max_indexes: int) -> None:
    if max_indexes and size > max_indexes:
        raise BadRequest(f"bad sweep: {size} indexes; a sweep may have at most {max_indexes} "
                         f"([limits] sweep_indexes = {max_indexes}): split it into several sweeps",
                         code="bad_sweep")


def new_id() -> str:
    return "s" + secrets.token_hex(6)


def index_params(params: Params, index: Index, number: int) -> Params:
    """The task's parameters for one index: its env over the task's, its command
    if it has one, and the index in `PINK_SWEEP_INDEX` (as Slurm's SLURM_ARRAY_TASK_ID)."""
    env = {**params.env, **index.env, "PINK_SWEEP_INDEX": str(number)}
    cmd = _words(index.cmd, "sweep cmd") if index.cmd is not None else params.cmd
    name = f"{params.name}[{number}]" if params.name else ""
    return replace(params, env=env, cmd=cmd, name=name)


def tag(task: Task, sweep_id: str, number: int, spec: Spec) -> Task:
    """The record marked as index `number` of the sweep."""
    task.extra["sweep"] = {"id": sweep_id, "index": number, "size": len(spec.indexes),
                           "max_parallel": spec.max_parallel}
    return task


def of(task: Task) -> dict | None:
    """The task's sweep mark (`{id, index, size, max_parallel}`), or None."""
    mark = task.extra.get("sweep")
    return mark if isinstance(mark, dict) and isinstance(mark.get("id"), str) else None


def slots_held(tasks: list[Task]) -> Counter:
    """Per sweep id, its indexes holding a runner slot (placed through running)."""
    held = Counter()
    for task in tasks:
        if task.state in ON_RUNNER and (mark := of(task)):
            held[mark["id"]] += 1
    return held


def capped(task: Task, held: Counter) -> str | None:
    """Why `task` waits for its sweep's cap (None: it may be placed)."""
    mark = of(task)
    cap = mark.get("max_parallel") if mark else None
    if not cap or held[mark["id"]] < cap:
        return None
    return f"sweep limit: {held[mark['id']]} of {cap} running"


def counts(states: list[str]) -> dict[str, int]:
    """Indexes by state, in a stable order for tables."""
    return dict(sorted(Counter(states).items()))
