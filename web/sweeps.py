"""The sweep API: submitting one (a hook of every task creation), one view of it,
cancelling it, and a download of all its outputs as one tar stream.

A sweep is asked for with `sweep` (JSON, `pink.sweeps.parse`) in the query
of `POST /api/v1/tasks` or in the JSON body of a layer upload's commit.
Another user's sweep answers 404, like a task that does not exist.
"""

from __future__ import annotations

import json
import os
import tarfile

import requests
from flask import Blueprint, Response, jsonify, request, stream_with_context

from pink import control, idempotency, outputs, sweep_metrics, sweep_records, sweeps
from pink.request_input import number
from pink.tasks import FINAL_NAMES, State, Task, public_view
from web.auth import require_user
from web.peers import output_from
from web.resources import res

bp = Blueprint("sweeps", __name__, url_prefix="/api/v1/sweeps")

DEFAULT_PAGE = 100  # indexes a sweep's view lists unless asked for more
MAX_PAGE = 1000
BLOCK = tarfile.BLOCKSIZE


def _raw():
    """The request's sweep as sent: query text or the JSON body's value (None: none)."""
    raw = request.args.get("sweep")
    if raw is None and request.is_json:
        body = request.get_json(silent=True)
        raw = body.get("sweep") if isinstance(body, dict) else None
    return raw


def requested() -> sweeps.Spec | None:
    """The sweep this request asks for (None: a single task); 400 for a bad one."""
    return sweeps.parse(_raw(), res().config.limits.sweep_indexes)


def fingerprint() -> dict:
    """The sweep's part of an Idempotency-Key's fingerprint: its spec as canonical
    JSON (a key reused for another sweep, or for no sweep, answers 422)."""
    raw = _raw()
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {"sweep": raw}  # parse refuses it anyway
    return {"sweep": json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)}


def submit(template: Task, spec: sweeps.Spec, claim: idempotency.Claim | None):
    """Create every index from the submit's record; 201 with the sweep and index 0
    (`task`, so a client that knows only tasks still reads an answer)."""
    store, config = res().store, res().config
    records = sweep_records.expand(template, spec, sweeps.new_id(), config.limits.record_bytes)
    first, created = sweep_records.create(store, config, records, claim)
    if not created:
        from web.api import first_task  # web.api calls this module: imported when used

        return first_task(first)
    sweep_metrics.submitted(res().redis, len(records))
    mark = sweeps.of(records[0])
    return jsonify(task=public_view(records[0]), sweep={**mark, "tasks": [r.id for r in records]}), 201


def _summary(view: sweep_records.SweepView, offset: int, limit: int) -> dict:
    states = [done_state(t) for t in view.tasks]
    shown = view.tasks[offset:offset + limit]
    # why each waits, as the leader last published it (one read), as GET /tasks shows it
    queue = control.queue_summary(res().store) if any(t.state == State.QUEUED for t in shown) else {}
    return {"id": view.id, "user": view.user, "size": view.size, "max_parallel": view.max_parallel,
            "counts": sweeps.counts(states), "offset": offset, "limit": limit,
            "indexes": [_index(t, queue.get(t.id, (None, None))[1]) for t in shown]}


def done_state(task: Task) -> str:
    """The state a sweep counts: an exported index (the runner is done, its archiving
    pending) as the final state it will take, so a sweep is done while archiving lags."""
    if task.state == State.EXPORTED and task.result in FINAL_NAMES:
        return task.result
    return task.state.value


def _index(task: Task, waiting: str | None) -> dict:
    view = public_view(task)
    return {"index": sweeps.of(task)["index"], "task": task.id, "state": view["state"],
            "attempt": task.attempt, "env": task.params.env, "cmd": task.params.cmd,
            "exit_code": task.exit_code, "error": task.error, "failure": view["failure"],
            "waiting": (waiting or task.waiting) if task.state == State.QUEUED else None,
            "output": view["output"]}


def _view(sweep_id: str) -> sweep_records.SweepView:
    return sweep_records.readable(res().store, res().db, sweep_id, require_user())


@bp.get("/<sweep_id>")
def get_sweep(sweep_id: str):
    """Counts by state and a page of indexes (`offset`, `limit`) with env, state and result."""
    view = _view(sweep_id)
    offset = number(request.args, "offset", int, 0, low=0)
    limit = number(request.args, "limit", int, DEFAULT_PAGE, low=1, high=MAX_PAGE)
    return jsonify(sweep=_summary(view, offset, limit))


@bp.post("/<sweep_id>/cancel")
def cancel_sweep(sweep_id: str):
    """Cancel every index not done running; one index is cancelled as any task."""
    _view(sweep_id)
    cancelled = sweep_records.cancel_all(res().store, sweep_id)
    if cancelled:
        sweep_metrics.cancelled(res().redis)
    return jsonify(cancelled=[t.id for t in cancelled]), 202


@bp.get("/<sweep_id>/outputs")
def sweep_outputs(sweep_id: str):
    """Every stored output of the sweep as one tar stream, a member per index
    (`<index>-<task><ext>`), each from this node's store or from a web node holding it.

    A member is never made up silently: an output no node serves is left out,
    one whose copy broke off mid-stream is padded to its size (a tar states the
    size first), and a last member `ERRORS.txt` names them and why."""
    view = _view(sweep_id)
    stored = [t for t in view.tasks if (t.output or {}).get("stored") and not t.expired_at]
    config = res().config
    auth = {k: v for k, v in request.headers.items() if k in ("Authorization", "Cookie")}

    def stream():
        errors = []
        for task in stored:
            yield from _member(config, auth, task, errors)
        if errors:
            text = "".join(f"{line}\n" for line in errors).encode()
            info = tarfile.TarInfo("ERRORS.txt")
            info.size, info.mode = len(text), 0o644
            yield info.tobuf(format=tarfile.PAX_FORMAT) + text + b"\0" * (-len(text) % BLOCK)
        yield b"\0" * (2 * BLOCK)

    return Response(stream_with_context(stream()), mimetype="application/x-tar",
                    headers={"Content-Disposition": f'attachment; filename="sweep-{sweep_id}.tar"'})


def _member(config, auth: dict, task: Task, errors: list[str]):
    """One output as a tar member: header, bytes, padding (a tar needs the size first:
    the record's). The source is opened before the header: one no node serves is
    left out and named in `errors`; the upstream is closed however the stream ends
    (a client that goes away closes this generator)."""
    index = sweeps.of(task)["index"]
    problems: list[str] = []
    source = _open_output(config, auth, task, problems)
    if source is None:
        errors.append(f"index {index} (task {task.id}): output left out: no web node serves it "
                      f"({'; '.join(problems) or 'no copy'})")
        return
    size = task.output["size"]
    info = tarfile.TarInfo(f"{index:04d}-{public_view(task)['output']['filename']}")
    info.size, info.mtime, info.mode = size, int(task.updated_at), 0o644
    sent = 0
    with source:
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        try:
            for chunk in _chunks_of(source):
                chunk = chunk[:size - sent]
                sent += len(chunk)
                yield chunk
                if sent >= size:
                    break
        except (OSError, requests.RequestException) as exc:
            problems.append(f"{type(exc).__name__}")
    if sent < size:  # the copy went away mid-stream: padded so the next members stay readable
        errors.append(f"index {index} (task {task.id}): output incomplete: {sent} of {size} bytes, "
                      f"the rest zero-filled ({'; '.join(problems) or 'the copy ended early'}); "
                      f"download it alone: GET /api/v1/tasks/{task.id}/output")
        yield b"\0" * (size - sent)
    yield b"\0" * (-size % BLOCK)


def _open_output(config, auth: dict, task: Task, problems: list[str]):
    """This node's copy (an open file) or a peer's answer (a streamed response); None if none."""
    holders = outputs.holders(task.output)
    path = outputs.local_path(config.web.output_dir, task)
    if config.host in holders and os.path.exists(path):
        try:
            return open(path, "rb")
        except OSError as exc:
            problems.append(f"this node's copy: {type(exc).__name__}")
    upstream = output_from([h for h in holders if h != config.host], f"/api/v1/tasks/{task.id}/output",
                           auth, problems)
    if upstream is not None and upstream.status_code != 200:
        problems.append(f"a node answered {upstream.status_code}")
        upstream.close()
        return None
    return upstream


def _chunks_of(source):
    if isinstance(source, requests.Response):
        yield from source.iter_content(1 << 20)
    else:
        while chunk := source.read(1 << 20):
            yield chunk
