"""What a user may do to tasks, whatever the door (web API, pages, CLI):
submit within limits, cancel, delete, list their history and see the queue.

The web layer parses requests and renders answers; the rules live here so
every door applies the same ones. A task lives in etcd until it is archived
(`pink.archive`); these functions take whichever record is current.
"""

from __future__ import annotations

import os
from dataclasses import replace

from pink import archive, lifecycle, nodes
from pink.config import Config
from pink.errors import BadRequest, Conflict, Forbidden, NotFound, TooManyRequests
from pink.store import Record, Store
from pink.tasks import NOT_STARTED, State, Task, exported


def visible_user(caller_name: str, admin: bool, wanted: str | None) -> str | None:
    """Whose tasks a caller may list or sum up: their own; admins anyone's
    (None: everyone's)."""
    if admin:
        return wanted
    if wanted not in (None, caller_name):
        raise Forbidden("only admins may see other users' tasks", code="forbidden")
    return caller_name


def history_page(store: Store, conn, query: archive.Query) -> tuple[list[Task], str | None]:
    """One page of tasks, newest first, and the cursor of the next (None at the end).

    Live tasks (etcd) and the archive (MariaDB) are ordered by (submitted,
    id) and filtered alike, so a page is one consistent slice whichever
    store each task is in; a task in both for a moment (archived, not yet
    removed from etcd) shows once, as etcd has it. The archive answers from
    an index; the live tasks are the queue, not the history.
    """
    live = [r.value for r in store.list(store.keys.tasks)]
    live_ids = {t.id for t in live}
    archived = [t for t in archive.page(conn, query) if t.id not in live_ids]
    matching = [t for t in live if query.matches(t)]
    ordered = sorted(matching + archived, key=lambda t: (t.created_at, t.id), reverse=True)
    page = ordered[:query.limit]
    more = len(ordered) > query.limit
    return page, archive.Cursor(page[-1].created_at, page[-1].id).encode() if more else None


def check_submit(store: Store, config: Config, user: str, gpus: int, size: int) -> None:
    """Refuse a submission no runner could ever take, or over the user's limits."""
    _check_satisfiable(store, gpus)
    _check_user_limits(store, config, user, size)


def _check_satisfiable(store: Store, gpus: int) -> None:
    """Like Slurm, refuse at once what no registered runner has room for.

    With no runner registered at all, the task is accepted and waits (a
    lab's runners may all be restarting).
    """
    largest = max((len(n.gpus) for n in nodes.view(store)), default=None)
    if largest is not None and gpus > largest:
        raise BadRequest(f"no runner has {gpus} GPUs; the largest has {largest}", code="unsatisfiable")


def _check_user_limits(store: Store, config: Config, user: str, size: int) -> None:
    """Refuse a submission over the user's queued-task or image-bytes limit.

    Reads live tasks only (etcd holds no history), so its cost follows the
    queue, not the archive.
    """
    limits = config.limits
    if not (limits.queued_per_user or limits.upload_bytes_per_user):
        return
    live = [r.value for r in store.list(store.keys.tasks) if r.value.user == user]
    queued = sum(1 for t in live if t.state == State.QUEUED)
    if limits.queued_per_user and queued >= limits.queued_per_user:
        raise TooManyRequests(f"user limit: {queued} tasks queued (limit {limits.queued_per_user}); "
                              "wait for some to start")
    held = sum(t.image["size"] for t in live)
    if limits.upload_bytes_per_user and held + size > limits.upload_bytes_per_user:
        raise TooManyRequests(f"user limit: your live tasks hold {held} bytes of images and this one "
                              f"adds {size} (limit {limits.upload_bytes_per_user})")


def cancel(store: Store, rec: Record) -> Task:
    """Ask a live task to end; returns its record after the request.

    A task that has not started ends at once; a running one is asked to stop
    (its runner does it); an `exported` task is already done running and is
    marked for deletion: its finalize archives it without fetching the output.
    """
    for _ in range(20):
        task = rec.value
        if task.state in NOT_STARTED:
            new = exported(task, State.CANCELLED, "cancelled before it started",
                           error="cancelled before it started", cancel_requested=True)
            if lifecycle.move(store, rec, new, release=task.node, unassign=task.node):
                return new
        elif task.state == State.RUNNING and not task.cancel_requested:
            new = replace(task, cancel_requested=True)
            if store.txn().expect(rec).put(rec.key, new).commit():
                return new
        elif task.state == State.EXPORTED and not task.delete_requested:
            new = replace(task, delete_requested=True)
            if store.txn().expect(rec).put(rec.key, new).commit():
                return new
        else:
            return task
        rec = store.get(rec.key)
        if rec is None:
            raise NotFound(f"task {task.id} has just finished; delete it again", code="finished")
    raise Conflict("the task kept changing; try again")


def delete_archived(conn, config: Config, task: Task) -> None:
    """Delete a finished task: its row is hidden, its logs and output go.

    The output file is removed here when this host holds it; otherwise the
    retention sweep on its host removes it (the row is marked expired).
    """
    output = task.output or {}
    path = output.get("path")
    if output.get("host") == config.host and path and inside(path, config.web.output_dir):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    archive.mark_deleted(conn, task.id)


def inside(path: str, directory: str) -> bool:
    """Is `path` in `directory`? A record must never make us delete elsewhere."""
    real, base = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, base]) == base


def queue_summary(store: Store) -> dict[str, tuple[int, str]]:
    """Each waiting task's (position, reason), as the leader last published them."""
    rec = store.get(store.keys.queue)
    if rec is None:
        return {}
    reasons = rec.value.get("reasons") or []
    return {task_id: (position, reasons[reason] if reason < len(reasons) else "")
            for task_id, (position, reason) in (rec.value.get("tasks") or {}).items()}
