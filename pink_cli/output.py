"""How the CLI shows things: task and node tables, task details, progress.

Pure functions from the API's JSON to text, so tests check them without a
server; the commands in `pink_cli.commands` write their result to stdout
(data) and everything else to stderr. Progress bars go to stderr only.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone

import click

from pink.compat import fromisoformat
from pink.gpu_usage import NOT_MEASURED
from pink.tasks import FINAL_NAMES
from pink.units import limit_value, size

PROGRESS_EVERY = 0.1  # seconds between two redraws of a progress bar


def to_json(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = fromisoformat(text)  # 3.11's reading on 3.10 too
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def age(text: str | None, now: datetime | None = None) -> str:
    """`2024-05-01T10:00:00Z` -> `3m`: the one unit a person needs at a glance."""
    t = parse_time(text)
    if t is None:
        return "-"
    seconds = max(0, int(((now or datetime.now(timezone.utc)) - t).total_seconds()))
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds // span}{unit}"
    return f"{seconds}s"


def _cell(value) -> str:
    return "-" if value is None or value == "" else str(value)


def table(headers: list[str], rows: list[list]) -> str:
    """Left-aligned columns two spaces apart, like `docker ps`."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = [headers] + cells
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines)


def tasks_table(tasks: list[dict], now: datetime | None = None) -> str:
    rows = [[t.get("id"), t.get("name"), t.get("state"), t.get("node"), t.get("attempt"),
             age(t.get("created_at"), now), t.get("exit_code")] for t in tasks]
    return table(["ID", "NAME", "STATE", "NODE", "ATTEMPT", "AGE", "EXIT"], rows)


def usage_table(rows: list[dict]) -> str:
    body = [[r["user"], r["tasks"], r["succeeded"], r["failed"], r["timed_out"], r["cancelled"],
             f"{r['gpu_hours']:.2f}", _measured(r.get("gpu_hours_used"), r.get("gpu_hours_measured")),
             _measured(r.get("gpu_hours_idle"), r.get("gpu_hours_measured")), f"{r['wall_hours']:.2f}"] for r in rows]
    return table(["USER", "TASKS", "SUCCEEDED", "FAILED", "TIMED OUT", "CANCELLED", "GPU-HOURS",
                  "GPU-HOURS USED", "GPU-HOURS IDLE", "WALL-HOURS"], body)


def _measured(hours: float | None, of: float | None) -> str:
    """GPU-hours from measured tasks only, out of those tasks' GPU-hours (`of`: unmeasured
    tasks' hours are in neither used nor idle); a user with none has `not measured`, never 0."""
    if hours is None:
        return NOT_MEASURED
    return f"{hours:.2f}" if of is None else f"{hours:.2f} of {of:.2f} measured GPU-h"


def limits_table(limits: dict[str, dict]) -> str:
    """`GET /usage`'s limits: each one, the user's use, and what it caps."""
    rows = [[name, limit_value(name, entry.get("limit"), "no limit"), limit_value(name, entry.get("used")),
             entry.get("caps")] for name, entry in limits.items()]
    return table(["LIMIT", "VALUE", "USED", "WHAT IT CAPS"], rows)


def nodes_table(nodes: list[dict]) -> str:
    rows = [[n.get("name"), n.get("host"), n.get("state"), len(n.get("gpus") or []),
             len(n.get("tasks") or []), n.get("platform"), n.get("cuda"), n.get("epoch")] for n in nodes]
    return table(["NAME", "HOST", "STATE", "GPUS", "TASKS", "PLATFORM", "CUDA", "EPOCH"], rows)


def tokens_table(tokens: list[dict], now: datetime | None = None) -> str:
    rows = [[t.get("id"), t.get("name"), t.get("scope"), age(t.get("created_at"), now),
             age(t.get("last_used_at"), now) if t.get("last_used_at") else "never",
             (t.get("expires_at") or "never")[:10]] for t in tokens]
    return table(["ID", "NAME", "SCOPE", "CREATED", "LAST USED", "EXPIRES"], rows)


def users_table(users: list[dict], now: datetime | None = None) -> str:
    rows = [[u.get("name"), "yes" if u.get("admin") else "", "disabled" if u.get("disabled") else "active",
             age(u.get("created_at"), now),
             age(u.get("last_used_at"), now) if u.get("last_used_at") else "never"] for u in users]
    return table(["NAME", "ADMIN", "STATE", "CREATED", "LAST USED"], rows)


def _words(value) -> str:
    if isinstance(value, list):
        return " ".join(value)
    return _cell(value)


def task_details(task: dict) -> str:
    """One task as `key: value` lines: what `pink status ID` prints."""
    params = task.get("params") or {}
    image = task.get("image") or {}
    output = task.get("output")
    lines = [
        ("id", task.get("id")), ("name", task.get("name")), ("user", task.get("user")),
        ("state", task.get("state")), ("attempt", task.get("attempt")), ("node", task.get("node")),
        ("queue position", task.get("position")), ("waiting for", task.get("waiting")),
        ("exit code", task.get("exit_code")), ("error", task.get("error")),
        ("failure", failure_line(task.get("failure"))),
        ("what to do", (task.get("failure") or {}).get("advice")),
        ("created", task.get("created_at")), ("updated", task.get("updated_at")),
        ("image", ", ".join(image.get("repo_tags") or []) or image.get("image_id")),
        ("image size", size(image.get("size"))), ("image sha256", image.get("sha256")),
        ("platform", image.get("platform")), ("needs CUDA", image.get("cuda")),
        ("cmd", _words(params.get("cmd"))), ("entrypoint", _words(params.get("entrypoint"))),
        ("env", " ".join(f"{k}={v}" for k, v in sorted((params.get("env") or {}).items()))),
        ("gpus", params.get("gpus")), ("timeout", f"{params['timeout']}s" if params.get("timeout") else None),
        ("output path", params.get("output")), ("compression", params.get("compression")),
        ("output", f"{output.get('filename')} ({size(output.get('size'))})" if output else None),
        ("expires", task.get("expires_at") if not task.get("expired_at") else None),
        ("expired", task.get("expired_at")),
        ("log", f"truncated: the first {task['logs_truncated']} bytes were dropped"
         if task.get("logs_truncated") else None),
        ("gpu usage", gpu_usage_line(task)),
    ]
    text = "\n".join(f"{k + ':':14}{_cell(v)}" for k, v in lines)
    timings = task.get("timings") or {}
    if timings:
        text += "\ntimings:\n" + "\n".join(f"  {k + ':':14}{_cell(v)}" for k, v in timings.items())
    return text


def gpu_usage_line(task: dict) -> str | None:
    """What the run did with its GPUs, once the runner reported it (exported or final):
    `not measured` where nothing was (no NVML, no GPUs), never zeros."""
    usage = task.get("gpu_usage")
    if usage is None:
        return NOT_MEASURED if task.get("state") in FINAL_NAMES | {"exported"} else None
    return (f"mean {usage['mean_percent']:g}%, peak {usage['peak_percent']:g}%, peak memory "
            f"{size(usage['peak_memory_bytes'])}, idle {usage['idle_minutes']:g} min ({usage['samples']} samples "
            f"over {usage.get('measured_seconds', 0) / 60:.1f} min)")  # less than the run: a runner restart


def failure_line(failure: dict | None) -> str | None:
    """Whose failure it was and what happened: `task: it ran past its time limit`."""
    if not failure:
        return None
    return f"{failure.get('class')}: {failure.get('summary')}"


def state_line(task: dict) -> str:
    """A state change while waiting: `task 3f2a… running on gpu1 (attempt 2)`."""
    text = f"task {task.get('id')}: {task.get('state')}"
    if task.get("node"):
        text += f" on {task['node']}"
    if (task.get("attempt") or 1) > 1:
        text += f" (attempt {task['attempt']})"
    if task.get("state") in ("failed", "timed_out", "succeeded") and task.get("exit_code") is not None:
        text += f", exit code {task['exit_code']}"
    if task.get("error"):
        text += f": {task['error']}"
    elif task.get("state") == "queued" and task.get("waiting"):
        text += f" (#{task.get('position')}: {task['waiting']})"
    return text


class ProgressBar:
    """A click progress bar on stderr behind the client's `progress(done, total)`
    callback; the bar is created at the first call, when the total is known."""

    def __init__(self, label: str, enabled: bool = True):
        self.label = label
        self.enabled = enabled
        self._bar = None
        self._shown = 0
        self._last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = click.progressbar(length=total or 0, label=self.label, file=sys.stderr,
                                          show_eta=True, show_percent=bool(total))
            self._bar.__enter__()
        now = time.monotonic()
        if done == total or now - self._last >= PROGRESS_EVERY:
            self._bar.update(done - self._shown)
            self._shown, self._last = done, now

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
