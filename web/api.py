"""The REST API under /api/v1: tasks, their logs and outputs, nodes, health.

A submit records the task in etcd and enqueues its transfer job on this
host's queue (the leader would do it too, a moment later). Reads come from
etcd for live tasks and from the MariaDB archive for tasks no longer there.
Another user's task answers 404, exactly like a task that does not exist.
"""

from __future__ import annotations

import os
import time

import requests
from flask import Blueprint, Response, jsonify, request, send_file, stream_with_context
from redis.exceptions import RedisError

from pink import archive, lifecycle, nodes, scheduler, sftp
from pink.errors import Conflict, Forbidden, NotFound, PinkError, TooManyRequests, Unavailable
from pink.store import Record
from pink.tasks import NOT_STARTED, State, Params, exported, is_final, new_id, new_record, public_view
from queue_workers.queues import enqueue
from web import uploads
from web.auth import can_see, require_admin, require_user
from web.resources import res

bp = Blueprint("api", __name__, url_prefix="/api/v1")

FOLLOW_POLL = 0.5  # seconds between reads of a followed log
WAIT_POLL = 0.05  # seconds between reads of a task someone long-polls
MAX_WAIT = 30.0  # seconds a long poll of a task may last


@bp.post("/tasks")
def submit():
    user = require_user()
    params = Params.parse(request.args)
    if params.priority > 0 and not user.admin:
        raise Forbidden("only admins may submit with a priority above 0", code="priority")
    config = res().config
    store = res().store
    _check_user_limits(user.name, request.content_length or 0)
    task_id = new_id()
    upload = uploads.receive(config.web.spool_dir, task_id, config.web.max_upload_bytes)
    record = new_record(task_id, user.name, params, upload.image(), config.host)
    try:
        _check_user_limits(user.name, upload.size)
        store.create(store.keys.task(task_id), record)
    except PinkError:
        os.remove(upload.path)
        raise
    try:
        enqueue(res().redis, record, "transfer")
    except RedisError:
        pass  # recorded in etcd: the leader enqueues it once Redis answers
    return jsonify(task=public_view(record)), 201


def _check_user_limits(user: str, size: int) -> None:
    """Refuse a submission over the user's queued-task or image-bytes limit."""
    limits = res().config.limits
    if not (limits.queued_per_user or limits.upload_bytes_per_user):
        return
    store = res().store
    live = [r.value for r in store.list(store.keys.tasks)
            if r.value["user"] == user and not is_final(r.value)]
    queued = sum(1 for t in live if t["state"] == State.QUEUED)
    if limits.queued_per_user and queued >= limits.queued_per_user:
        raise TooManyRequests(f"user limit: {queued} tasks queued (limit {limits.queued_per_user}); "
                              "wait for some to start")
    held = sum(t["image"]["size"] for t in live)
    if limits.upload_bytes_per_user and held + size > limits.upload_bytes_per_user:
        raise TooManyRequests(f"user limit: your live tasks hold {held} bytes of images and this one "
                              f"adds {size} (limit {limits.upload_bytes_per_user})")


def _with_positions(tasks: list[dict]) -> list[dict]:
    """Public views, with each waiting task's place in the queue."""
    store = res().store
    every, live, allocs = scheduler.snapshot(store)
    plan = scheduler.plan(res().config, every, live, allocs)
    views = []
    for task in tasks:
        view = public_view(task)
        if task["state"] == State.QUEUED:
            view["position"] = plan.position(task["id"])
            view["waiting"] = plan.waiting.get(task["id"], task.get("waiting"))
        views.append(view)
    return views


def _live(task_id: str) -> Record | None:
    return res().store.get(res().store.keys.task(task_id))


def _task(task_id: str) -> tuple[dict, Record | None]:
    """The caller's task (live record first, then the archive) or 404."""
    user = require_user()
    rec = _live(task_id)
    task = rec.value if rec else None
    if task is None:
        try:
            task = archive.get_record(res().db(), task_id)
        except Unavailable:
            task = None
    if task is None or not can_see(user, task):
        raise NotFound(f"no task {task_id}", code="unknown_task")
    return task, rec


@bp.get("/tasks")
def list_tasks():
    user = require_user()
    store = res().store
    tasks = [r.value for r in store.list(store.keys.tasks) if can_see(user, r.value)]
    tasks.sort(key=lambda t: t["created_at"], reverse=True)
    return jsonify(tasks=_with_positions(tasks))


@bp.get("/tasks/<task_id>")
def get_task(task_id: str):
    """The task; with `wait=SECONDS&seen=STATE:ATTEMPT`, once it differs from what the caller saw.

    The long poll lets `pink submit --wait` see each state change the moment
    it happens instead of up to a polling interval later.
    """
    task, _ = _task(task_id)
    seen = request.args.get("seen")
    wait = min(request.args.get("wait", 0, type=float), MAX_WAIT)
    deadline = time.monotonic() + wait
    while seen == f"{task['state']}:{task['attempt']}" and not is_final(task) and time.monotonic() < deadline:
        time.sleep(WAIT_POLL)
        rec = _live(task_id)
        if rec is None:
            break
        task = rec.value
    return jsonify(task=_with_positions([task])[0])


@bp.delete("/tasks/<task_id>")
def delete_task(task_id: str):
    task, rec = _task(task_id)
    if rec is None or is_final(task):
        return _delete_finished(task, rec)
    return jsonify(task=public_view(_cancel(rec))), 202


def _cancel(rec: Record) -> dict:
    """Ask for cancellation; a task that has not started ends at once."""
    store = res().store
    for _ in range(20):
        task = rec.value
        if State(task["state"]) in NOT_STARTED:
            new = exported(task, State.CANCELLED, "cancelled before it started",
                           error="cancelled before it started", cancel_requested=True)
            if lifecycle.move(store, rec, new, release=task["node"], unassign=task["node"]):
                return new
        elif task["state"] == State.RUNNING and not task["cancel_requested"]:
            new = {**task, "cancel_requested": True}
            if store.txn().expect(rec).put(rec.key, new).commit():
                return new
        else:
            return task
        rec = store.get(rec.key)
        if rec is None:
            raise NotFound(f"no task {task['id']}", code="unknown_task")
    raise Conflict("the task kept changing; try again")


def _delete_finished(task: dict, rec: Record | None):
    output = task.get("output") or {}
    if output.get("host") == res().config.host and output.get("path"):
        try:
            os.remove(output["path"])
        except FileNotFoundError:
            pass
    archive.mark_deleted(res().db(), task["id"])
    if rec is not None:
        res().store.txn().expect(rec).delete(rec.key).commit()
    return jsonify(deleted=task["id"])


@bp.get("/tasks/<task_id>/output")
def output(task_id: str):
    task, _ = _task(task_id)
    out = task.get("output") or {}
    if not out.get("stored"):
        raise Conflict(f"task {task_id} has no output yet (state {task['state']})", code="no_output")
    name = public_view(task)["output"]["filename"]
    if out["host"] == res().config.host:
        if not os.path.exists(out["path"]):
            raise NotFound(f"the output of task {task_id} is no longer stored", code="output_gone")
        return send_file(out["path"], mimetype="application/octet-stream", as_attachment=True,
                         download_name=name, conditional=True, etag=out.get("sha256"))
    return _from_peer(out["url"] + request.full_path)


def _from_peer(url: str) -> Response:
    """Stream an output another web node holds, passing Range through."""
    headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Range", "Cookie")}
    try:
        upstream = requests.get(url, headers=headers, stream=True, timeout=30,
                                verify=res().config.web.ca or True)
    except requests.RequestException as exc:
        raise Unavailable(f"the web node holding this output is unreachable: {exc}") from exc
    passed = {k: v for k, v in upstream.headers.items()
              if k in ("Content-Length", "Content-Range", "Content-Disposition", "Accept-Ranges",
                       "Content-Type", "ETag")}
    return Response(upstream.iter_content(1 << 20), status=upstream.status_code, headers=passed)


@bp.get("/tasks/<task_id>/logs")
def logs(task_id: str):
    task, _ = _task(task_id)
    follow = request.args.get("follow") in ("1", "true", "yes")
    if not follow:
        return Response(_logs_now(task), mimetype="text/plain")
    return Response(stream_with_context(_follow(task_id)), mimetype="text/plain")


def _archived_logs(task_id: str) -> bytes:
    try:
        return archive.get_logs(res().db(), task_id) or b""
    except Unavailable:
        return b""


def _logs_now(task: dict) -> bytes:
    if is_final(task):
        return _archived_logs(task["id"])
    logfile = task.get("logfile")
    if not logfile:
        return b""
    try:
        with sftp.session(res().config.ssh, logfile["ssh"]) as conn:
            return sftp.read_from(conn, logfile["path"], 0)
    except Unavailable:
        return b""


def _follow(task_id: str):
    """Yield the log as it grows until the task is final."""
    offset = 0
    conn = client = None
    try:
        while True:
            rec = _live(task_id)
            task = rec.value if rec else None
            if task is None or is_final(task):
                yield _archived_logs(task_id)[offset:]
                return
            logfile = task.get("logfile")
            if logfile and conn is None:
                try:
                    client = sftp.connect(res().config.ssh, logfile["ssh"])
                    conn = client.open_sftp()
                except Unavailable:
                    client = None
            if conn is not None:
                data = sftp.read_from(conn, logfile["path"], offset)
                if data:
                    offset += len(data)
                    yield data
                    continue
            time.sleep(FOLLOW_POLL)
    finally:
        if client is not None:
            client.close()


NODE_FIELDS = ("name", "state", "epoch", "gpus", "gpu_mode", "gpu_inventory", "max_containers", "tasks",
               "started_at")


def _node_public(node: dict) -> dict:
    return {**{k: node.get(k) for k in NODE_FIELDS}, "host": node["ssh_host"],
            "images": len(node.get("images", []))}


@bp.get("/nodes")
def list_nodes():
    require_user()
    return jsonify(nodes=[_node_public(n) for n in nodes.view(res().store)])


@bp.post("/nodes/<name>/<action>")
def control_node(name: str, action: str):
    """drain (no new tasks; `?now=1` also moves tasks waiting there), stop
    (running tasks are stopped and re-queued elsewhere), resume. Admins only."""
    user = require_admin()
    states = {"drain": nodes.DRAINING, "stop": nodes.STOPPED, "resume": nodes.READY}
    if action not in states:
        raise NotFound(f"no node action {action}: use drain, stop or resume")
    store = res().store
    live = {n["name"]: n for n in nodes.view(store)}
    if name not in live and store.get(store.keys.control(name)) is None:
        raise NotFound(f"no node {name}", code="unknown_node")
    now = request.args.get("now") in ("1", "true", "yes")
    moved = nodes.set_state(store, name, states[action], by=user.name, now=now)
    node = {n["name"]: n for n in nodes.view(store)}.get(name)
    return jsonify(node=_node_public(node) if node else {"name": name, "state": states[action]},
                   moved=moved)


@bp.get("/health")
def health():
    checks = {}
    for name, probe in (("etcd", lambda: res().store.ping()), ("redis", lambda: res().redis.ping()),
                        ("db", lambda: res().db().ping())):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - health reports every failure
            checks[name] = f"unavailable: {exc}"
    ok = all(v == "ok" for v in checks.values())
    return jsonify(status="ok" if ok else "degraded", host=res().config.host, **checks), (200 if ok else 503)
