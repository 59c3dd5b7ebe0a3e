"""The RQ jobs that move a task, transfer and finalize (`pink.pipeline.STAGES`), and the sweep.

Each job is called with (task_id, attempt) and begins by reading the task and
checking that it is still in the state the job expects for that attempt; if
not, it returns without doing anything. That check plus a compare-and-swap
on the way out is what makes a job that runs twice harmless.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pink import (archive, blob_store, control, fate, journal, lifecycle, metrics, outputs, pipeline, recipes, sftp,
                  upload_sessions, wire)
from pink.errors import NotFound, Unavailable
from pink.notifications import Notice
from pink.nodes import NodeView
from pink.tasks import State, Task
from queue_workers import context, notify
from queue_workers.queues import enqueue_next

log = logging.getLogger("pink.jobs")


def _load(task_id: str, attempt: int, stage: str):
    """The task's record if it is at `attempt` and in the state `stage` works from."""
    rec = context.store().get(context.store().keys.task(task_id))
    if rec is None or rec.value.attempt != attempt or rec.value.state != pipeline.STAGES[stage].state:
        return None
    return rec


def _node(name: str, epoch: int | None = None) -> NodeView | None:
    """The live runner; None if gone or another incarnation than `epoch`."""
    rec = context.store().get(context.store().keys.node(name))
    if rec is None or (epoch is not None and rec.create_revision != epoch):
        return None
    return NodeView.of(rec)




# -- transfer ----------------------------------------------------------------

def transfer(task_id: str, attempt: int) -> str:
    """Copy a placed task's image to its runner (runs on the upload's host),
    then assign the task to the runner.

    The leader placed the task (and reserved its GPUs); this job copies
    what the runner lacks and hands the task over.
    """
    rec = _load(task_id, attempt, "transfer")
    if rec is None:
        return "nothing to do"
    return _copy_image(rec)


def _copy_image(rec) -> str:
    store = context.store()
    task = rec.value
    node = _node(task.node, task.epoch)
    if node is None:
        return "runner gone; the leader will re-queue"
    sha = task.image["sha256"]
    started = time.time()
    sent = 0
    if sha not in node.images:
        recipe = recipes.Recipe.from_dict(task.image["recipe"]) if "recipe" in task.image else None
        if recipe is None or _damaged(recipe):
            why = (f"the image's layers are missing or damaged on web node {context.config().host}, "
                   "where it was uploaded: submit it again")
            if new := lifecycle.apply(store, rec, fate.UploadLost(why)):
                enqueue_next(context.redis(), new)
            return why
        with context.sftp().session(node.record) as conn:
            sent = _send_blobs(conn, node, recipe)
    elapsed = time.time() - started
    if sent:
        metrics.count(context.redis(), "transfer_bytes", "to_runner", sent)
        metrics.count(context.redis(), "transfer_seconds", "to_runner", elapsed)
    detail = f"copied {sent} bytes in {elapsed:.2f}s" if sent else "runner already holds the image"
    # Transferred and assigned in one transaction: a warm task's transfer job
    # is its only job before the runner.
    if not lifecycle.apply(store, rec, fate.Transferred(detail, node.lease, sent, elapsed)):
        return "task or runner moved during transfer"
    return f"{detail}; assigned"


def _damaged(recipe: recipes.Recipe) -> bool:
    """Is a blob of `recipe` missing from this host's store, or of the wrong size?"""
    store = context.blobs()
    try:
        return any(store.size(d) != recipe.sizes[d] for d in recipe.blobs)
    except NotFound:
        return True


def _send_blobs(conn, node: NodeView, recipe: recipes.Recipe) -> int:
    """Send the blobs the runner lacks (neither held nor already in its incoming
    directory, see gpu_runner.images.RunnerBlobs); returns the bytes sent."""
    store, ssh = context.blobs(), context.config().ssh
    spool = node.record["ssh_spool"]
    incoming, held = f"{spool}/{wire.SPOOL_INCOMING}", f"{spool}/{wire.SPOOL_HELD}"
    sent = 0
    for digest in recipe.blobs:
        store.touch(digest)
        if sftp.remote_size(conn, f"{held}/{digest}") is not None or \
                sftp.remote_size(conn, f"{incoming}/{digest}") == recipe.sizes[digest] or \
                sftp.remote_size(conn, f"{incoming}/{digest}{wire.SUFFIX}") is not None:
            continue
        sent += wire.send(conn, ssh, node.record, store.path(digest), f"{incoming}/{digest}", context.link_rates())
    return sent


# -- finalize ----------------------------------------------------------------

class ExportLost(Exception):
    """The runner no longer has the export (or is gone for good)."""


FINALIZE_TRIED = "pink:finalize-tried:"  # Redis: a finalize job ran for this task and attempt (a day)
LAST_RESORT_LOG = 64 * 2**10  # bytes of log kept when a finalize gives up on archiving the task whole


def finalize(task_id: str, attempt: int) -> str:
    """Pull the export and log into the output store, archive, then leave etcd.

    The archive row is written once per task (keyed by id, holding this
    attempt); the etcd record goes only after it commits. A finalize that
    crashes in between is run again by the leader and finds the row: it
    removes the record without archiving twice. Runs, retries and failures
    are counted for /metrics.

    A try that fails for a reason retrying cannot change (anything but
    Unavailable: a database or runner away for a while) is tried again up to
    max_job_failures times; then the task is archived failed with that
    reason, its log cut to its last LAST_RESORT_LOG bytes and no output,
    instead of waiting in `exported` for ever.
    """
    redis = context.redis()
    try:
        first = redis.set(f"{FINALIZE_TRIED}{task_id}:{attempt}", 1, nx=True, ex=86400)
    except Exception:  # noqa: BLE001 - counting must not stop a finalize
        first = True
    metrics.count(redis, "finalize", "run" if first else "retry")
    try:
        return _finalize(task_id, attempt)
    except Exception as exc:
        metrics.count(redis, "finalize", "failed")
        if isinstance(exc, Unavailable) or not _last_try(task_id, attempt):
            raise
        log.warning("task %s: finalize gives up: %s", task_id, exc)
        return _finalize(task_id, attempt, gave_up=f"{type(exc).__name__}: {exc}")


def _last_try(task_id: str, attempt: int) -> bool:
    """Has this finalize failed max_job_failures - 1 times already?"""
    rec = _load(task_id, attempt, "finalize")
    return rec is not None and \
        rec.value.job_failures.get("finalize", 0) + 1 >= context.config().max_job_failures


def _notify_archived(conn, config, task: Task) -> None:
    """Enqueue the final notification of the archived record (read only when the
    live record's `notify` asks); its job id makes this a no-op when it was enqueued."""
    if Notice.of(task) is None:
        return
    archived = archive.get_record(conn, task.id)
    if archived is not None and archived.final:
        notify.enqueue(context.redis(), config, archived, archived.state.value)  # never raises


def _finalize(task_id: str, attempt: int, gave_up: str | None = None) -> str:
    rec = _load(task_id, attempt, "finalize")
    if rec is None:
        return "nothing to do"
    task = rec.value
    config = context.config()
    with archive.connection(config.db) as conn:
        archived = archive.archived_attempt(conn, task_id)
        if archived is None:
            try:
                final, logs = _given_up(task, gave_up) if gave_up else _final(task)
            except ExportLost as exc:
                final, logs = _after_lost_export(conn, rec, str(exc))
                if final is None:
                    return "re-queued"
            expires_at = _expiry(config)
            journal.add(config.web.output_dir, final, logs, expires_at, task.delete_requested)
            archive.archive_task(conn, final, logs, expires_at=expires_at,
                                 deleted=task.delete_requested)
            metrics.count(context.redis(), "finished", final.state.value)
            metrics.observe_start(context.redis(), final)
            notify.enqueue(context.redis(), config, final, final.state.value)  # never raises
        elif archived != attempt:
            log.warning("task %s: attempt %d is archived, not %d; keeping the archived one",
                        task_id, archived, attempt)
        else:  # a finalize that died after its commit: its notification may not be enqueued yet
            _notify_archived(conn, config, task)
        gone = lifecycle.apply(context.store(), rec, fate.Archived(task.attempt, State.EXPORTED))
        if gone is None:
            return "task moved first"
        if gone.delete_requested:  # asked for while we archived
            archive.mark_deleted(conn, task_id)
            journal.add_deletion(config.web.output_dir, gone)
    _forget_on_runner(task)
    return task.result


def _expiry(config) -> float | None:
    days = config.retention.output_days
    return time.time() + days * 86400 if days else None


@dataclass(frozen=True)
class Fetched:
    """What finalize took from the runner's outbox."""

    output: dict | None  # where the export is stored; None without one
    logs: bytes  # the end of the log
    dropped: int  # bytes of log before `logs`, left out
    refused: str | None = None  # why the export can never be stored: the task fails


def _final(task: Task) -> tuple[Task, bytes]:
    """The final record and its (bounded) log, with the export in the output store."""
    if task.delete_requested:
        return fate.decide(task, fate.Fetched(None)).task, b""
    got = _fetch(task)
    final = fate.decide(task, fate.Fetched(got.output, got.dropped, got.refused)).task
    return final, _with_notice(got.logs, got.dropped)


def _given_up(task: Task, error: str) -> tuple[Task, bytes]:
    """The last-resort record of a task whose finalize kept failing: failed,
    without an output, with the end of its log if the runner still serves it."""
    why = f"finalize failed {context.config().max_job_failures} times; last: {error[:500]}"
    logs, dropped = b"", 0
    remote = task.export or {}
    if remote.get("log") and remote.get("ssh"):
        try:
            with context.sftp().session(remote["ssh"]) as conn:
                logs, dropped = sftp.read_tail(conn, remote["log"], LAST_RESORT_LOG)
        except (FileNotFoundError, Unavailable) as exc:
            log.warning("task %s: its log is lost with the finalize: %s", task.id, exc)
    return fate.decide(task, fate.FinalizeGaveUp(why, dropped)).task, _with_notice(logs, dropped)


def _with_notice(logs: bytes, dropped: int) -> bytes:
    """The archived log: its kept end, after a line saying what was left out."""
    if not dropped:
        return logs
    return f"[pink: the log was {dropped + len(logs)} bytes; only its last {len(logs)} are kept]\n".encode() + logs


def _fetch(task: Task) -> Fetched:
    """Copy the end of the log and the export (if any) from the runner's outbox.

    An export already fetched by an earlier try of this finalize is used
    again, not copied again. One that can never be stored is refused (the
    log is kept); one that finds no room now fails this try only.
    """
    remote = task.export
    if not remote:
        return Fetched(None, (task.error or "").encode(), 0)
    config = context.config()
    try:
        with context.sftp().session(remote["ssh"]) as conn:
            logs, dropped = sftp.read_tail(conn, remote["log"], config.retention.max_log_bytes)
            try:
                output = _fetch_output(conn, task) if remote.get("path") else None
            except outputs.Refused as exc:
                return Fetched(None, logs, dropped, refused=exc.message)
    except FileNotFoundError as exc:
        raise ExportLost(f"runner {task.node} no longer has the export ({exc.filename or exc})") from None
    except Unavailable:
        if _runner_gone_for_good(task):
            raise ExportLost(f"runner {task.node} is gone with the export") from None
        raise
    return Fetched(output, logs, dropped)


def _fetch_output(conn, task: Task) -> dict:
    """The export in this node's output store, and a copy on another web node
    (see pink.outputs) before the task may be final."""
    config = context.config()
    remote = task.export
    os.makedirs(config.web.output_dir, exist_ok=True)
    local = outputs.local_path(config.web.output_dir, task)
    if os.path.exists(local) and os.path.getsize(local) == remote.get("size"):
        os.utime(local)  # fresh again: the sweep leaves young files alone
        size, digest = os.path.getsize(local), outputs.sha256_of(local)
    else:
        _check_room(conn, task)
        started = time.time()
        size, digest = outputs.fetch(conn, remote["path"], local, config.limits.output_bytes_per_task)
        metrics.count(context.redis(), "transfer_bytes", "from_runner", size)
        metrics.count(context.redis(), "transfer_seconds", "from_runner", time.time() - started)
    peer = outputs.replicate(config, context.store(), local, size, digest)
    return {"stored": True, "host": config.host, "url": config.web.url, "path": local,
            "size": size, "sha256": digest, "copies": [config.host] + ([peer] if peer else [])}


def _check_room(conn, task: Task) -> None:
    """Check the export's room by the larger of the size the runner claimed
    and the file's (see outputs.room_for)."""
    config = context.config()
    size = max(task.export.get("size") or 0, conn.stat(task.export["path"]).st_size or 0)
    outputs.room_for(config.web.output_dir, size, config.limits.output_bytes_per_task, config.host)


def _runner_gone_for_good(task: Task) -> bool:
    """The runner holding the export has no record at all (not merely a new
    epoch: a restarted runner still has its outbox), and finalize has failed
    often enough that it is not a blip."""
    if _node(task.node) is not None:
        return False
    failures = task.job_failures.get("finalize", 0)
    return failures + 1 >= context.config().max_job_failures


def _after_lost_export(conn, rec, why: str) -> tuple[Task | None, bytes]:
    """The export is gone: the final record to archive, or None once re-queued
    (`fate.ExportLost`). Not re-queued if another finalize of this attempt
    archived it meanwhile (it took the export, which is why this one found none).
    """
    task = rec.value
    event = fate.ExportLost(why)
    final = fate.decide(task, event, _rules()).task
    if final.final:
        return final, b""
    if archive.archived_attempt(conn, task.id) is not None:
        raise Unavailable(f"task {task.id} was archived by another finalize meanwhile")
    lifecycle.apply(context.store(), rec, event, _rules())  # the leader places it again
    return None, b""


def _rules() -> fate.Rules:
    return fate.Rules.of(context.config())


def _forget_on_runner(task: Task) -> None:
    remote = task.export
    if not remote:
        return
    try:
        with context.sftp().session(remote["ssh"]) as conn:
            sftp.remove(conn, *[p for p in (remote.get("path"), remote.get("log")) if p])
    except Unavailable as exc:
        log.warning("could not clean runner outbox for %s: %s", task.id, exc)


# -- sweep -------------------------------------------------------------------

def sweep() -> str:
    """Delete this host's expired outputs and the files no task needs, and
    copy the outputs this host holds alone to another web node once one is up.

    Enqueued by the leader every SWEEP_INTERVAL on each web host's transfer
    queue (outputs and uploads live on their web host). Besides outputs the
    archive marked expired, it removes files nothing references once they
    are older than SWEEP_GRACE (one that young may still be being written):
    outputs without a row (once past the journal's days: a restore may
    bring the row back), uploads without a live task, and `.part` files of
    uploads and downloads that were cut off. Against an archive with no
    rows at all (a database lost, or reinstalled before its restore) it
    removes no output: every one would look orphaned.
    """
    config = context.config()
    old = time.time() - blob_store.SWEEP_GRACE
    store = context.store()
    with archive.connection(config.db) as conn:
        expired = archive.expired_files(conn, config.host)
        for task_id, path in expired:
            if control.inside(path, config.web.output_dir):
                Path(path).unlink(missing_ok=True)
            archive.forget_file(conn, task_id)
        orphans = [] if archive.is_empty(conn) else [
            p for p in _files_before(config.web.output_dir, old) if not _output_needed(conn, store, p)]
        copied = outputs.add_missing_copies(config, store, conn, context.redis())
    for path in _files_before(config.web.spool_dir, old):
        name = os.path.basename(path)
        if name.endswith(".part") or store.get(store.keys.task(name.split(".")[0])) is None:
            orphans.append(path)
    for path in orphans:
        Path(path).unlink(missing_ok=True)
    blob_root = config.web.blob_root
    upload_sessions.expire(blob_root)
    keep = _blobs_in_use(store) | upload_sessions.in_use(blob_root)
    collected = context.blobs().collect(keep, grace=blob_store.SWEEP_GRACE)
    journal_days = journal.prune(config.web.output_dir)
    return (f"{len(expired)} expired outputs and {len(orphans)} orphaned files removed, "
            f"{copied} second copies made, {len(collected)} image blobs collected, "
            f"{journal_days} journal days dropped")


def _blobs_in_use(store) -> set[str]:
    """Every blob a live task's image needs: its transfer may still read them.
    (Reads every live task: etcd holds the live queue, not the history.)"""
    return {blob for rec in store.list(store.keys.tasks) for blob in recipes.image_blobs(rec.value.image)}


def _output_needed(conn, store, path: str) -> bool:
    """Does a live task (its finalize may be writing or archiving it) or an
    unexpired archive row own this file in the output store?

    Output files are named `<task>-<attempt>...`: one etcd read and one
    primary-key lookup per old file, whatever the history holds.
    """
    task_id = os.path.basename(path).split("-", 1)[0]
    if store.get(store.keys.task(task_id)) is not None:
        return True
    stored = archive.stored_output(conn, task_id)  # the name is the same in every store holding a copy
    if stored is not None:
        return os.path.basename(stored) == os.path.basename(path)
    return _awaits_restore(conn, path, task_id)


def _awaits_restore(conn, path: str, task_id: str) -> bool:
    """Could a restore still need this row-less output? A database restored
    from a dump older than the task's finalize lacks its row until `pink-backup
    recover` brings it back from the journal of the web node that finalized
    it, which may be another node than this copy's: an output is kept while
    it is younger than the journal's days (a real orphan, from a finalize cut
    short, waits that long too)."""
    try:
        young = os.stat(path).st_mtime > time.time() - journal.KEEP_DAYS * 86400
    except FileNotFoundError:
        return True  # gone already: nothing to remove
    return young and not archive.has_row(conn, task_id)


def _files_before(directory: str, cutoff: float) -> list[str]:
    """Plain files in `directory` last changed before `cutoff`."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return [e.path for e in entries
            if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < cutoff]
