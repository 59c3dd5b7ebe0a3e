"""The RQ jobs that move a task: transfer, run, finalize, and spool cleanup.

Each job is called with (task_id, attempt) and begins by reading the task and
checking that it is still in the state the job expects for that attempt; if
not, it returns without doing anything. That check plus a compare-and-swap
on the way out is what makes a job that runs twice harmless.
"""

from __future__ import annotations

import logging
import os
import time

from pink import archive, lifecycle, scheduler, sftp
from pink.errors import Unavailable
from pink.tasks import State, advance, is_final, output_filename, requeue, retries_left, spool_file
from queue_workers import context
from queue_workers.queues import enqueue

log = logging.getLogger("pink.jobs")


def _load(task_id: str, attempt: int, *states: State):
    """The task's record if it is at `attempt` and in one of `states`."""
    rec = context.store().get(context.store().keys.task(task_id))
    if rec is None or rec.value["attempt"] != attempt or rec.value["state"] not in states:
        return None
    return rec


def _node(name: str, epoch: int | None = None) -> dict | None:
    """The live node record (with its epoch); None if gone or another incarnation."""
    rec = context.store().get(context.store().keys.node(name))
    if rec is None or (epoch is not None and rec.create_revision != epoch):
        return None
    return {**rec.value, "epoch": rec.create_revision, "lease": rec.lease}




# -- transfer ----------------------------------------------------------------

def transfer(task_id: str, attempt: int) -> str:
    """Place the task on a runner and copy its image there (runs on the upload's host)."""
    rec = _load(task_id, attempt, State.QUEUED, State.PLACED)
    if rec and rec.value["state"] == State.QUEUED:
        rec = _place(rec)
    if rec is None or rec.value["state"] != State.PLACED:
        return "nothing to do"
    return _copy_image(rec)


def _place(rec):
    store = context.store()
    for _ in range(20):
        task = rec.value
        tasks, live, allocs = scheduler.snapshot(store)
        plan = scheduler.plan(context.config(), tasks, live, allocs)
        choice = plan.choices.get(task["id"])
        if choice is None:
            _set_waiting(rec, plan.waiting.get(task["id"], "waiting for its turn"))
            return None
        node = next(n for n in live if n["name"] == choice.node)
        new = advance(task, State.PLACED, f"placed on {choice.node}", node=choice.node,
                      epoch=node["epoch"], gpus=choice.gpus, waiting=None)
        reserve = lifecycle.Reserve(choice.node, {"gpus": choice.gpus, "attempt": task["attempt"]},
                                    allocs.get(choice.node))
        if lifecycle.move(store, rec, new, reserve=reserve,
                          fence=(store.keys.node(choice.node), node["epoch"])):
            return store.get(rec.key)
        rec = store.get(rec.key)
        if rec is None or rec.value["state"] != State.QUEUED:
            return None
    raise Unavailable(f"could not place task {rec.key}: runners kept changing")


def _set_waiting(rec, reason: str) -> None:
    if rec.value.get("waiting") != reason:
        context.store().txn().expect(rec).put(rec.key, {**rec.value, "waiting": reason}).commit()


def _copy_image(rec) -> str:
    store = context.store()
    task = rec.value
    node = _node(task["node"], task["epoch"])
    if node is None:
        return "runner gone; the leader will re-queue"
    sha = task["image"]["sha256"]
    started = time.time()
    sent = 0
    if sha not in node.get("images", []):
        remote = f"{node['ssh_spool']}/{sha}.tar"
        ssh = context.config().ssh
        with context.sftp().session(node) as conn:
            if sftp.remote_size(conn, remote) != task["image"]["size"]:
                local = spool_file(context.config().web.spool_dir, task["id"])  # we run on its web host
                sent = sftp.put_parallel(conn, ssh, node, local, remote)
    elapsed = time.time() - started
    detail = f"copied {sent} bytes in {elapsed:.2f}s" if sent else "runner already holds the image"
    new = advance(task, State.TRANSFERRED, detail)
    new["timings"].update(transfer_bytes=sent, transfer_seconds=round(elapsed, 3))
    if not lifecycle.move(store, rec, new):
        return "task moved during transfer"
    enqueue(context.redis(), new, "run")
    return detail


# -- run ---------------------------------------------------------------------

def run(task_id: str, attempt: int) -> str:
    """Hand the task to its runner: an assignment key bound to the runner's lease."""
    rec = _load(task_id, attempt, State.TRANSFERRED)
    if rec is None:
        return "nothing to do"
    task = rec.value
    node = _node(task["node"], task["epoch"])
    if node is None:
        return "runner gone; the leader will re-queue"
    store = context.store()
    new = advance(task, State.ASSIGNED, f"assigned to {task['node']} epoch {task['epoch']}")
    assignment = {"task": task_id, "attempt": attempt, "epoch": task["epoch"]}
    ok = lifecycle.move(store, rec, new, fence=(store.keys.node(task["node"]), task["epoch"]),
                        assign=assignment, assign_lease=node["lease"])
    return "assigned" if ok else "task moved first"


# -- finalize ----------------------------------------------------------------

def finalize(task_id: str, attempt: int) -> str:
    """Pull the export and log into the output store, archive, then end the task."""
    rec = _load(task_id, attempt, State.EXPORTED)
    if rec is None:
        return "nothing to do"
    task = rec.value
    config = context.config()
    try:
        output, logs = _fetch(task)
    except Unavailable:
        if task.get("node") and _node(task["node"], task["epoch"]) is None:
            return _output_lost(rec)
        raise
    new = advance(task, State(task["result"]), _final_detail(task), output=output)
    archive.write(config.db, new, logs)
    if not lifecycle.move(context.store(), rec, new):
        return _lost_the_race(rec, output, logs)
    _forget_on_runner(task)
    enqueue(context.redis(), new, "cleanup")
    return new["state"]


def _lost_the_race(rec, output: dict | None, logs: bytes) -> str:
    """Another finalize ended the task first: the archive must say what etcd says."""
    current = context.store().get(rec.key)
    if current is not None and is_final(current.value):
        archive.write(context.config().db, current.value, logs)
        theirs = (current.value.get("output") or {}).get("path")
        if output and output["path"] != theirs and os.path.exists(output["path"]):
            os.remove(output["path"])
    return "task moved first"


def _fetch(task: dict) -> tuple[dict | None, bytes]:
    """Copy the export (if any) and the log from the runner's outbox."""
    remote = task.get("export")
    if not remote:
        return None, (task.get("error") or "").encode()
    config = context.config()
    os.makedirs(config.web.output_dir, exist_ok=True)
    local = os.path.join(config.web.output_dir, output_filename(task))
    output = None
    with context.sftp().session(remote["ssh"]) as conn:
        if remote.get("path"):
            size, digest = sftp.get(conn, remote["path"], local)
            output = {"stored": True, "host": config.host, "url": config.web.url,
                      "path": local, "size": size, "sha256": digest}
        logs = sftp.read_from(conn, remote["log"], 0)
    return output, logs


def _final_detail(task: dict) -> str:
    if task.get("exit_code") is not None:
        return f"exit code {task['exit_code']}"
    return task.get("error") or task["result"]


def _output_lost(rec) -> str:
    """The runner died holding the export: try again, or end without output.

    A cancelled or timed-out task is not run again for its output: it ends as
    it was going to, without one. Others run again up to the retry limit.
    """
    task = rec.value
    if task["result"] in (State.CANCELLED, State.TIMED_OUT):
        new = advance(task, State(task["result"]), "its export was lost with its runner",
                      export_error="export lost with its runner")
        archive.write(context.config().db, new, b"")
        lifecycle.move(context.store(), rec, new)
        return new["state"]
    if retries_left(task, context.config().max_attempts):
        new = requeue(task, f"export lost with runner {task['node']}")
        if lifecycle.move(context.store(), rec, new):
            enqueue(context.redis(), new, "transfer")
        return "re-queued"
    new = advance(task, State.FAILED, "export lost with its runner", error="export lost with its runner")
    archive.write(context.config().db, new, b"")
    lifecycle.move(context.store(), rec, new)
    return "failed"


def _forget_on_runner(task: dict) -> None:
    remote = task.get("export")
    if not remote:
        return
    try:
        with context.sftp().session(remote["ssh"]) as conn:
            sftp.remove(conn, *[p for p in (remote.get("path"), remote.get("log")) if p])
    except Unavailable as exc:
        log.warning("could not clean runner outbox for %s: %s", task["id"], exc)


# -- cleanup -----------------------------------------------------------------

def cleanup(task_id: str, attempt: int) -> str:
    """Delete a finished task's upload from this host's spool."""
    rec = context.store().get(context.store().keys.task(task_id))
    if rec is not None and not is_final(rec.value):
        return "task still live"
    # From the id, not the record: the user may have deleted the record already.
    path = spool_file(context.config().web.spool_dir, task_id)
    if os.path.exists(path):
        os.remove(path)
        return "removed"
    return "nothing to remove"
