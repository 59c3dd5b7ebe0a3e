"""What a user may do to tasks, whatever the door (web API, pages, CLI):
submit within limits, cancel, delete, list their history and see the queue.

The web layer parses requests and renders answers; the rules live here so
every door applies the same ones. A task lives in etcd until it is archived
(`pink.archive`); these functions take whichever record is current.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from pink import archive, fate, idempotency, journal, lifecycle, nodes, platforms
from pink.config import Config
from pink.errors import BadRequest, Conflict, Forbidden, NotFound, TooManyRequests, Unavailable
from pink.store import SMALL_PAGE, Record, Store
from pink.tasks import State, Task, holds_gpus

CREATE_TRIES = 20  # creations by one user at once that a submit outlasts before it answers 409
MAX_EVICTIONS = 100  # idempotency keys one creation deletes (a transaction holds at most 128 operations)


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
    an index; a user's live tasks come from their own index (`_live_of`).
    """
    live = _live_of(store, query.user)
    live_ids = {t.id for t in live}
    archived = [t for t in archive.page(conn, query) if t.id not in live_ids]
    matching = [t for t in live if query.matches(t)]
    ordered = sorted(matching + archived, key=lambda t: (t.created_at, t.id), reverse=True)
    page = ordered[:query.limit]
    more = len(ordered) > query.limit
    return page, archive.Cursor(page[-1].created_at, page[-1].id).encode() if more else None


def _live_of(store: Store, user: str | None) -> list[Task]:
    """The live tasks a page of `user`'s may show: their own, through their index
    (a read per task of theirs, none of anyone else's, however long the queue);
    for an admin's listing of every user (`user` None), the whole queue. Tasks
    recorded before the index existed have no entry: they drain as they end."""
    if user is None:
        return [r.value for r in store.list(store.keys.tasks)]
    return _tasks_of(store, Holdings(None, store.list(store.keys.owned(user), SMALL_PAGE)))


def check_submit(store: Store, config: Config, user: str, gpus: int, size: int) -> None:
    """Refuse a submission no runner could ever take, or over the user's limits,
    before its upload is read (`create` checks the limits again, atomically)."""
    check_satisfiable(store, gpus)
    _check_user_limits(store, config, user, size)


def check_satisfiable(store: Store, gpus: int, needs: platforms.Needs = platforms.Needs()) -> None:
    """Like Slurm, refuse at once what no registered runner has room for, or
    can run at all (another platform, too old a CUDA driver: `pink.platforms`).

    With no runner registered at all, the task is accepted and waits (a
    lab's runners may all be restarting).
    """
    runners = nodes.view(store)
    if why := platforms.refusal(needs, gpus, [n.record for n in runners]):
        raise BadRequest(why, code="unsatisfiable")
    largest = max((len(n.gpus) for n in runners if platforms.same_platform(needs, n.record)), default=None)
    if largest is not None and gpus > largest:
        raise BadRequest(f"no runner has {gpus} GPUs; the largest has {largest}", code="unsatisfiable")


@dataclass
class Holdings:
    """A user's live tasks as their index (`Keys.owner`) lists them, and their
    gate as read before it (None: absent)."""

    gate: Record | None
    entries: list[Record]

    @property
    def live(self) -> int:
        return len(self.entries)

    @property
    def image_bytes(self) -> int:
        return sum(int(e.value.get("size") or 0) for e in self.entries)

    def task_ids(self) -> list[str]:
        return [e.key.rsplit("/", 1)[1] for e in self.entries]


def holdings(store: Store, user: str) -> Holdings:
    """The user's index: a range over their own prefix, never over everyone's tasks.

    The gate is read first: a creation after that read rewrites it, so a
    count that missed the creation fails its transaction instead of passing.
    Records written before the index existed have no entry and are not
    counted: they are the tasks live at the upgrade, and they drain as they end.
    """
    gate = store.get(store.keys.gate(user))
    return Holdings(gate, store.list(store.keys.owned(user), SMALL_PAGE))


def _without_stale(store: Store, held: Holdings) -> Holdings:
    """The holdings without index entries whose task record is gone, which are
    deleted: an older process (a leader not yet upgraded) retires a record
    without its entry. Read only at the limit, so it costs a user's own
    records, and only when they would be refused."""
    present = {r.key for r in store.get_many([store.keys.task(i) for i in held.task_ids()])}
    stale = [e for e, i in zip(held.entries, held.task_ids()) if store.keys.task(i) not in present]
    for entry in stale:
        store.txn().expect(entry).delete(entry.key).commit()
    return replace(held, entries=[e for e in held.entries if e not in stale]) if stale else held


def _tasks_of(store: Store, held: Holdings) -> list[Task]:
    """The user's live records: one read per task of theirs, none of anyone else's."""
    return [r.value for r in store.get_many([store.keys.task(i) for i in held.task_ids()])]


def _check_user_limits(store: Store, config: Config, user: str, size: int, count: int = 1) -> Holdings:
    """Refuse `count` new tasks (a sweep's indexes; their image counts once) over
    the user's live-task, queued-task or image-bytes limit; the holdings
    counted, for the creation's compare.

    Costs what the user's own tasks cost: their index (and, with
    queued_per_user set, their records), never the other users' tasks.
    """
    limits = config.limits
    held = holdings(store, user)
    if limits.live_tasks_per_user and held.live + count > limits.live_tasks_per_user:
        held = _without_stale(store, held)
    if limits.live_tasks_per_user and held.live + count > limits.live_tasks_per_user:
        adding = f" and this submit adds {count}" if count > 1 else ""
        raise TooManyRequests(f"user limit: {held.live} live tasks{adding} (live_tasks_per_user = "
                              f"{limits.live_tasks_per_user}); wait for some to finish or cancel some")
    if limits.queued_per_user:
        queued = sum(1 for t in _tasks_of(store, held) if t.state == State.QUEUED)
        if queued + count > limits.queued_per_user:
            raise TooManyRequests(f"user limit: {queued} tasks queued (limit {limits.queued_per_user}: "
                                  f"queued_per_user = {limits.queued_per_user}); wait for some to start")
    if limits.upload_bytes_per_user and held.image_bytes + size > limits.upload_bytes_per_user:
        raise TooManyRequests(f"user limit: your live tasks hold {held.image_bytes} bytes of images and this "
                              f"one adds {size} (limit {limits.upload_bytes_per_user}: upload_bytes_per_user "
                              f"= {limits.upload_bytes_per_user}); wait for some to finish")
    return held


def check_params(config: Config, params) -> None:
    """Refuse parameters over `record_bytes` before an upload is read."""
    params.check_size(config.limits.record_bytes)


def create(store: Store, config: Config, record: Task, claim: idempotency.Claim | None) -> tuple[str, bool]:
    """Record a new task within its user's limits: (its id, True); or, for an
    Idempotency-Key the user already sent, (the first task's id, False).

    The record, its index entry, the user's gate and the key are written in
    one transaction that compares the gate as counted and the key's absence:
    two submits by one user at once cannot both pass the last free place, and
    two with one key make one task (the loser answers the winner's task).

    What one user can hold in etcd is bounded: live_tasks_per_user x (the
    record's parameters, record_bytes, plus its image metadata, at most 16
    tags of 256 characters twice (8 KiB) and 128 layers' digests and sizes
    (~20 KiB), plus ~4 KiB of state and history): 500 x ~96 KiB = ~47 MiB with
    the shipped defaults, and as many idempotency keys of ~200 bytes (0.1
    MiB). That is 2.3% of etcd's default 2 GiB quota (about 43 users each at
    every cap at once; gunicorn's 4 KiB request line keeps query parameters
    to ~4 KiB today, ~18 MiB a user): a lab with more users should raise
    etcd's --quota-backend-bytes (8 GiB is etcd's suggested maximum).
    """
    check_params(config, record.params)
    lease = 0
    try:
        for _ in range(CREATE_TRIES):
            first = replay(store, record.user, claim)
            if first:
                return first, False
            held = _check_user_limits(store, config, record.user, record.image["size"])
            keyed = None
            if claim:
                lease = lease or store.grant(idempotency.TTL)
                keyed = (store.keys.idempotency(record.user, claim.digest), claim.entry(record.id), lease)
            evicted = _evicted(store, config, record.user, claim)
            try:
                created = store.create_task(record, held.gate, keyed, evicted)
            except Exception:
                lease = 0  # etcd may have applied it: the key may hold the lease, which expires by itself
                raise
            if created:
                lease = 0  # the key holds it now
                return record.id, True
    finally:
        _drop(store, lease)
    raise Conflict("your other submissions kept changing your task count; try again", code="busy")


def replay(store: Store, user: str, claim: idempotency.Claim | None) -> str | None:
    """The task a request with this key already made (None: none, or no key); 422 if
    the key was used for other parameters."""
    if claim is None:
        return None
    rec = store.get(store.keys.idempotency(user, claim.digest))
    return None if rec is None else idempotency.first_task(claim, rec.value)


def _evicted(store: Store, config: Config, user: str, claim: idempotency.Claim | None) -> list[str]:
    """The user's oldest idempotency keys past live_tasks_per_user, to delete with
    this creation: keys stay bounded like records, and a submit is never refused
    for them (only a key older than as many newer keyed submits is forgotten)."""
    bound = config.limits.live_tasks_per_user
    if claim is None or not bound:
        return []
    keys = store.list(store.keys.idempotencies(user), SMALL_PAGE)
    excess = min(max(len(keys) + 1 - bound, 0), MAX_EVICTIONS)
    return [r.key for r in sorted(keys, key=lambda r: r.create_revision)[:excess]]


def _drop(store: Store, lease: int) -> None:
    """Revoke a lease no key took (it would expire in a day anyway)."""
    if lease:
        try:
            store.revoke(lease)
        except Unavailable:
            pass


def limits_of(store: Store, config: Config, user: str) -> dict:
    """Each per-user limit with its value and the user's current use where
    that is cheap (None where it is not, or is counted elsewhere).

    Reads the user's index; their records only when a limit that needs the
    states (queued_per_user, gpus_per_user) is set.
    """
    limits, retention = config.limits, config.retention
    held = holdings(store, user)
    tasks = _tasks_of(store, held) if limits.queued_per_user or limits.gpus_per_user else None
    used = {
        "live_tasks_per_user": held.live,
        "upload_bytes_per_user": held.image_bytes,
        "queued_per_user": None if tasks is None else sum(1 for t in tasks if t.state == State.QUEUED),
        "gpus_per_user": None if tasks is None else sum(len(t.gpus) for t in tasks if holds_gpus(t)),
    }
    values = {name: getattr(limits, name) for name in (
        "live_tasks_per_user", "queued_per_user", "upload_bytes_per_user", "upload_sessions_per_user",
        "output_bytes_per_task", "log_streams_per_user", "log_streams_per_node", "gpus_per_user",
        "record_bytes")}
    values["max_output_bytes_per_user"] = retention.max_output_bytes_per_user
    values["max_log_bytes"] = retention.max_log_bytes
    return {name: {"limit": value, "used": used.get(name)} for name, value in values.items()}


def cancel(store: Store, rec: Record) -> Task:
    """Ask a live task to end; returns its record after the request.

    A task that has not started ends at once; a running one is asked to stop
    (its runner does it); an `exported` task is already done running and is
    marked for deletion: its finalize archives it without fetching the output
    (`fate.Cancel`).
    """
    task = lifecycle.apply(store, rec, fate.Cancel())
    if task is None:
        raise NotFound(f"task {rec.value.id} has just finished; delete it again", code="finished")
    return task


def delete_archived(conn, config: Config, task: Task) -> None:
    """Delete a finished task: its row is hidden, its logs and output go.

    The output file is removed here when this host holds it; otherwise the
    retention sweep on its host removes it (the row is marked expired).
    """
    output = task.output or {}
    path = output.get("path")
    if output.get("host") == config.host and path and inside(path, config.web.output_dir):
        Path(path).unlink(missing_ok=True)
    archive.mark_deleted(conn, task.id)
    journal.add_deletion(config.web.output_dir, task)


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
