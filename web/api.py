"""The REST API under /api/v1: tasks, their logs and outputs, nodes, health.

A submit records the task in etcd; the leader, watching, places it and
enqueues its transfer on this host's queue. Reads come from
etcd for live tasks and from the MariaDB archive for tasks no longer there.
Another user's task answers 404, exactly like a task that does not exist.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from datetime import timezone

from flask import Blueprint, Response, jsonify, request, send_file, stream_with_context

from pink import archive, control, idempotency, nodes, outputs, platforms, recipes, sftp
from pink.compat import fromisoformat
from pink.errors import BadRequest, Conflict, Forbidden, Gone, NotFound, TooManyRequests, Unavailable
from pink.notifications import Notice
from pink.request_input import flag, number
from pink.store import Record
from pink.tasks import Params, State, Task, iso, new_id, new_record, public_view
from pink.version import version
from web import log_streams, notification_settings, uploads
from web import sweeps as sweep_api
from web.peers import PEER_HOP, output_from  # PEER_HOP: api.PEER_HOP, as before
from web.auth import can_see, require_admin, require_user
from web.resources import res

VERSION = version()  # at import: the code this process runs, whatever a deploy installs since

bp = Blueprint("api", __name__, url_prefix="/api/v1")

LOG_ATTEMPT_HEADER = "X-Pink-Log-Attempt"  # a followed log's response: the attempt it starts in
WAIT_POLL = 0.05  # seconds between reads of a task someone long-polls
MAX_WAIT = 30.0  # seconds a long poll of a task may last


@bp.post("/tasks")
def submit():
    """A task from a whole archive in the body. With an Idempotency-Key already
    used, the first task is answered before the body is read (the archive is not
    part of the key's fingerprint: only the parameters are)."""
    user = require_user()
    params = Params.parse(request.args)
    _check_priority(user, params)
    config = res().config
    store = res().store
    notify = notification_settings.Requested.of(request.args)  # a bad notify is refused before the upload
    claim = idempotency.claim(request.headers.get(idempotency.HEADER), "submit", params=asdict(params),
                              **notify.fingerprint(), **sweep_api.fingerprint())
    if first := control.replay(store, user.name, claim):
        return first_task(first)
    control.check_params(config, params)
    sweep_api.requested()  # a bad sweep is refused before the archive is read
    control.check_submit(store, config, user.name, params.gpus, request.content_length or 0)
    task_id = new_id()
    upload = uploads.receive(config.web.spool_dir, res().blobs, task_id, config.web.max_upload_bytes)
    return create_task(user, task_id, params, upload.image(), upload.received, claim, notify)


def _check_priority(user, params: Params) -> None:
    if params.priority > 0 and not user.admin:
        raise Forbidden("only admins may submit with a priority above 0", code="priority")


def create_task(user, task_id: str, params: Params, image: dict, received: int,
                claim: idempotency.Claim | None = None,
                notify: notification_settings.Requested | None = None, kept_notice: Notice | None = None):
    """Record a new task whose image's blobs are in this node's store; answers 201,
    or 200 with the first task when `claim`'s key already made one. `notify`: the
    request's notification parameters (read from it when not given); `kept_notice`:
    a rerun's original notice."""
    _check_priority(user, params)
    config, store = res().config, res().store
    needs = _needs(image)
    image = {**image, **needs.to_json()}
    record = new_record(task_id, user.name, params, image, config.host)
    record.timings["upload_bytes"] = received
    notify = notify or notification_settings.Requested.of(request.args)
    if notice := notification_settings.notice_for(user, notify, kept_notice):
        record.extra["notify"] = notice
    control.check_satisfiable(store, params.gpus, needs)
    if (spec := sweep_api.requested()) is not None:  # N tasks of one upload (web.sweeps)
        return sweep_api.submit(record, spec, claim)
    made, created = control.create(store, config, record, claim)  # the user's limits, atomically
    if not created:
        return first_task(made)
    return jsonify(task=public_view(record)), 201


def _needs(image: dict) -> platforms.Needs:
    """What the image's config (in this node's blob store) asks of a runner."""
    recipe = image.get("recipe") or {}
    try:
        with open(res().blobs.path(recipe.get("config") or ""), "rb") as fh:
            config = json.loads(fh.read(recipes.MAX_CONFIG_BYTES))
    except (OSError, ValueError, RecursionError):
        return platforms.Needs()  # an image without a readable config states no needs
    return platforms.of_config(config) if isinstance(config, dict) else platforms.Needs()


def first_task(task_id: str):
    """The answer to a retried request: the task its Idempotency-Key made, as it is now."""
    task, _ = _task(task_id)
    return jsonify(task=public_view(task)), 200


@bp.post("/tasks/<task_id>/rerun")
def rerun(task_id: str):
    """A new task with the image of `task_id`, while this web node still keeps its
    layers; with the query's parameters (those of POST /tasks) or, given none, the task's."""
    user = require_user()
    task, _ = _task(task_id)
    own = [k for k in request.args if k not in notification_settings.PARAMETERS]
    params = Params.parse(request.args) if own else task.params  # notify parameters alone keep the task's
    notify = notification_settings.Requested.of(request.args)
    claim = idempotency.claim(request.headers.get(idempotency.HEADER), "rerun", task=task_id,
                              params=asdict(params), **notify.fingerprint())
    if first := control.replay(res().store, user.name, claim):
        return first_task(first)
    recipe = task.image.get("recipe")
    if not recipe or res().blobs.missing(recipes.Recipe.from_dict(recipe).blobs):
        raise Gone(f"the image of task {task_id} is no longer kept on web node {res().config.host}: "
                   "submit its archive again", code="image_gone")
    return create_task(user, new_id(), params, dict(task.image), 0, claim, notify, Notice.of(task))


def _views(tasks: list[Task]) -> list[dict]:
    """Public views, with each waiting task's place in the queue (as the leader published it)."""
    queue = control.queue_summary(res().store) if any(t.state == State.QUEUED for t in tasks) else {}
    views = []
    for task in tasks:
        view = public_view(task)
        if task.state == State.QUEUED:
            position, reason = queue.get(task.id, (None, None))
            view["position"] = position
            view["waiting"] = reason or task.waiting
        views.append(view)
    return views


def _live(task_id: str) -> Record | None:
    return res().store.get(res().store.keys.task(task_id))


def _archived(task_id: str) -> Task | None:
    return archive.get_record(res().db(), task_id)


def _task(task_id: str) -> tuple[Task, Record | None]:
    """The caller's task (live record first, then the archive) or 404."""
    user = require_user()
    rec = _live(task_id)
    task = rec.value if rec else _archived(task_id)
    if task is None or not can_see(user, task):
        raise NotFound(f"no task {task_id}", code="unknown_task")
    return task, rec


def _query(user) -> archive.Query:
    """The history filter a GET /tasks asks for; only admins see other users."""
    args = request.args
    who = control.visible_user(user.name, user.admin, args.get("user") or None)
    state = args.get("state") or None
    if state is not None and state not in {s.value for s in State}:
        raise BadRequest(f"state must be one of {', '.join(s.value for s in State)}", code="bad_param")
    limit = number(args, "limit", int, archive.DEFAULT_PAGE, low=1, high=archive.MAX_PAGE)
    cursor = archive.Cursor.decode(args["cursor"]) if args.get("cursor") else None
    return archive.Query(user=who, state=state, name=args.get("name") or None,
                         since=_time(args, "since"), until=_time(args, "until"), limit=limit, cursor=cursor)


def _time(args, name: str) -> float | None:
    """A time as Unix seconds or ISO 8601 (`2026-11-01`, `2026-11-01T12:00:00Z`)."""
    text = args.get(name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
        raise BadRequest(f"{name} must be a finite time, got {text!r}", code="bad_param")
    try:
        moment = fromisoformat(text)  # 3.11's reading on 3.10 too
    except ValueError:
        raise BadRequest(f"{name} must be a date (2026-11-01), an ISO 8601 time or Unix seconds, "
                         f"got {text!r}", code="bad_param") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


@bp.get("/tasks")
def list_tasks():
    """One page of the caller's tasks, newest first: live ones from etcd, the past from MariaDB."""
    query = _query(require_user())
    page, cursor = control.history_page(res().store, res().db(), query)
    return jsonify(tasks=_views(page), next=cursor)


@bp.get("/usage")
def usage():
    """Per user, from the archive: task counts, GPU-hours and wall-hours. Admins see everyone.

    `limits`: every per-user limit with the user's current use and what it
    caps (`web.limits`), for the caller, or for the user an admin names."""
    from web import limits  # here: this function's one import, beside others' edits of the module's

    user = require_user()
    who = control.visible_user(user.name, user.admin, request.args.get("user") or None)
    since, until = _time(request.args, "since"), _time(request.args, "until")
    rows = archive.usage(res().db(), since, until, who)
    return jsonify(usage=rows, since=since, until=until, limits=limits.of(who or user.name))


@bp.get("/tasks/<task_id>")
def get_task(task_id: str):
    """The task; with `wait=SECONDS&seen=STATE:ATTEMPT`, once it differs from what the caller saw.

    The long poll lets `pink submit --wait` see each state change the moment
    it happens instead of up to a polling interval later. A task that leaves
    etcd while polled has been archived: the answer is its archived record.
    A long poll costs what a followed log does (etcd reads while it waits;
    a greenlet, not a thread), so it takes the same slots (`log_streams_per_user`, `log_streams_per_node`); with none free it
    answers at once, and the client asks again after its own pause.
    """
    task, _ = _task(task_id)
    seen = request.args.get("seen")
    wait = number(request.args, "wait", float, 0, low=0, cap=MAX_WAIT)
    slots = _poll_slots() if wait > 0 and seen else None
    deadline = time.monotonic() + (wait if slots else 0)
    client = log_streams.Client(request.environ, lambda: res().stopping) if slots else None
    try:
        while seen == f"{task.state.value}:{task.attempt}" and not task.final and time.monotonic() < deadline:
            if not client.wait(WAIT_POLL):
                break  # the client left: its slot is free at once
            rec = _live(task_id)
            task = rec.value if rec else (_archived(task_id) or task)
    finally:
        if slots:
            slots.release()
    return jsonify(task={**_views([task])[0], "notifications": notification_settings.of_task(task)})


def _poll_slots() -> log_streams.Slots | None:
    """A long poll's slots, or None when the caller's or the node's are all held."""
    try:
        return log_streams.acquire(res().config, require_user().name)
    except TooManyRequests:
        return None


@bp.delete("/tasks/<task_id>")
def delete_task(task_id: str):
    """Cancel a live task (202), or delete a finished one with its output and logs (200)."""
    task, rec = _task(task_id)
    if rec is None:
        control.delete_archived(res().db(), res().config, task)
        return jsonify(deleted=task.id)
    return jsonify(task=public_view(control.cancel(res().store, rec))), 202


def _gone_if_expired(task: Task, what: str) -> None:
    if task.expired_at:
        raise Gone(f"the {what} of task {task.id} expired on {iso(task.expired_at)} "
                   "(outputs and logs are kept for a limited time)", code="expired")


@bp.get("/tasks/<task_id>/output")
def output(task_id: str):
    task, _ = _task(task_id)
    _gone_if_expired(task, "output")
    out = task.output or {}
    if not out.get("stored"):
        raise Conflict(f"task {task_id} has no output yet (state {task.state.value})", code="no_output")
    name = public_view(task)["output"]["filename"]
    config = res().config
    holders = outputs.holders(out)
    if config.host in holders:
        path = outputs.local_path(config.web.output_dir, task)
        if os.path.exists(path):
            return send_file(path, mimetype="application/octet-stream", as_attachment=True,
                             download_name=name, conditional=True, etag=out.get("sha256"))
        holders.remove(config.host)
    if not holders or request.headers.get(PEER_HOP):  # a peer's request: this node's copy or nothing
        raise NotFound(f"the output of task {task_id} is no longer stored", code="output_gone")
    return _from_peers(holders)


def _from_peers(hosts: list[str]) -> Response:
    """Stream an output from the first live web node holding a copy, passing
    Range through (web.peers.output_from)."""
    problems: list[str] = []
    headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Range", "Cookie")}
    upstream = output_from(hosts, request.full_path, headers, problems)
    if upstream is None:
        raise Unavailable(f"no web node holding this output answers ({'; '.join(problems)}); "
                          "try again once one is back")
    passed = {k: v for k, v in upstream.headers.items()
              if k in ("Content-Length", "Content-Range", "Content-Disposition", "Accept-Ranges",
                       "Content-Type", "ETag")}
    response = Response(upstream.iter_content(1 << 20), status=upstream.status_code, headers=passed)
    response.call_on_close(upstream.close)
    return response


@bp.get("/tasks/<task_id>/logs")
def logs(task_id: str):
    """The log so far; with `follow=1`, the log as it grows (web.log_streams).

    A follow ends when the task is final, or after `log_follow_seconds`, or
    when its client leaves. It starts `offset` bytes into attempt `attempt`'s
    log (default: the current attempt, from its start), which is how a client
    resumes a follow that ended while the task was live; the response's
    `X-Pink-Log-Attempt` names that attempt.
    """
    task, _ = _task(task_id)
    _gone_if_expired(task, "log")
    follow = flag(request.args, "follow", False)
    if not follow:
        return Response(stream_with_context(_logs_now(task)), mimetype="text/plain")
    start = _follow_start(task)
    slots = log_streams.acquire(res().config, require_user().name)
    try:
        body = _follow(task_id, start, log_streams.Client(request.environ, lambda: res().stopping))
        response = Response(stream_with_context(body), mimetype="text/plain",
                            headers={LOG_ATTEMPT_HEADER: str(start.attempt)})
    except BaseException:
        slots.release()
        raise
    response.call_on_close(slots.release)  # runs however the stream ends, the client's leaving included
    return response


@dataclass(frozen=True)
class _LogPlace:
    """A place in a task's logs: `offset` bytes into attempt `attempt`'s log."""

    attempt: int
    offset: int


def _follow_start(task: Task) -> _LogPlace:
    return _LogPlace(number(request.args, "attempt", int, task.attempt, low=1),
                     number(request.args, "offset", int, 0, low=0))


def _archived_logs(task_id: str) -> bytes:
    try:
        return archive.get_logs(res().db(), task_id) or b""
    except Unavailable:
        return b""


def _logs_now(task: Task):
    """The log so far, streamed from the runner in chunks (or the archived one)."""
    if task.final:
        yield _archived_logs(task.id)
        return
    logfile = task.logfile
    if not logfile:
        return
    try:
        with sftp.session(res().config.ssh, logfile["ssh"]) as conn:
            yield from sftp.stream_from(conn, logfile["path"])
    except Unavailable:
        return


def _follow(task_id: str, start: _LogPlace, client: log_streams.Client):
    """Yield the log from `start` as it grows until the task is final, the
    follow's time is up or its client left; a new attempt's log follows the
    old one's after a line saying so (from its beginning)."""
    yield b""  # sends the headers: the client knows its follow is on even while the task is silent
    lasts = res().config.limits.log_follow_seconds
    deadline = time.monotonic() + lasts if lasts else math.inf
    attempt, offset = start.attempt, start.offset
    conn = ssh = following = None  # the SFTP session, its SSH client, the logfile they read
    try:
        while time.monotonic() < deadline:
            rec = _live(task_id)
            task = rec.value if rec else None
            if task is None or task.final:
                yield from _final_log(task_id, attempt, offset)
                return
            if task.attempt != attempt and task.logfile:  # the next attempt has started somewhere
                yield _next_attempt(task)
                attempt, offset = task.attempt, 0
            if task.logfile != following:
                if ssh is not None:
                    ssh.close()
                conn = ssh = None
                following = task.logfile
            if following and conn is None:
                try:
                    ssh = sftp.connect(res().config.ssh, following["ssh"])
                    conn = sftp.open_sftp(ssh)
                except Unavailable:
                    ssh = None
            if conn is not None:
                data = sftp.read_from(conn, following["path"], offset)
                if data:
                    offset += len(data)
                    yield data
                    continue
            if not client.wait(log_streams.POLL):
                return
    finally:
        if ssh is not None:
            ssh.close()


def _next_attempt(task: Task) -> bytes:
    """The line between two attempts' logs (the page and the CLI look for it)."""
    return f"\n[pink: attempt {task.attempt} started on {task.node}]\n".encode()


def _final_log(task_id: str, attempt: int, offset: int):
    """The archived log past `offset`, or all of it after a line if it is another attempt's."""
    try:
        task = _archived(task_id)
    except Unavailable:  # the archive is down: what it answers (nothing) is all there is
        task = None
    if task is not None and task.attempt != attempt:
        yield _next_attempt(task)
        offset = 0
    yield _archived_logs(task_id)[offset:]


NODE_FIELDS = ("name", "state", "epoch", "gpus", "max_containers", "tasks")


def _node_public(node: nodes.NodeView) -> dict:
    registered = {k: node.record.get(k) for k in ("gpu_mode", "gpu_inventory", "gpu_stats", "started_at",
                                                  "spool_free", "spool_images", "platform", "driver", "cuda")}
    return {**{k: getattr(node, k) for k in NODE_FIELDS}, **registered, "host": node.record["ssh_host"],
            "images": len(node.images)}


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
    live = {n.name: n for n in nodes.view(store)}
    if name not in live and store.get(store.keys.control(name)) is None:
        raise NotFound(f"no node {name}", code="unknown_node")
    now = flag(request.args, "now", False)
    moved = nodes.set_state(store, name, states[action], by=user.name, now=now)
    node = {n.name: n for n in nodes.view(store)}.get(name)
    return jsonify(node=_node_public(node) if node else {"name": name, "state": states[action]},
                   moved=moved)


@bp.delete("/nodes/<name>")
def forget_node(name: str):
    """Forget a runner that is gone for good (`nodes.forget`). Admins only."""
    require_admin()
    return jsonify(forgotten=nodes.forget(res().store, name))


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
    # The version (git's): a rolling upgrade shows which web nodes run the new code.
    return jsonify(status="ok" if ok else "degraded", host=res().config.host, version=VERSION,
                   **checks), (200 if ok else 503)
