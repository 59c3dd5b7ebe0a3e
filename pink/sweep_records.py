"""A sweep's indexes in etcd and the archive: creating them, reading one sweep, cancelling it.

Creation counts every index against the user's limits once, then writes
the indexes in transactions of `CHUNK` (etcd allows 128 operations in one)
and `CHUNK_BYTES`: a sweep of up to `CHUNK` small records is one transaction; a larger one is
written chunk after chunk, and if a later chunk cannot be written the
chunks already written are taken back (deleted while still queued, else
cancelled) before the error is answered, so no half sweep stays behind.

Reading a sweep costs its own keys: its live indexes through
`Keys.sweep` (an index family written with the records) and its past
through the archive's `by_sweep` index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from pink import archive, control, idempotency, sweeps
from pink.config import Config
from pink.errors import BadRequest, Conflict, NotFound
from pink.store import SMALL_PAGE, Store, encode
from pink.tasks import Params, State, Task, new_id

log = logging.getLogger("pink.sweeps")
CHUNK = 40  # indexes per transaction: 3 puts each, plus the gate and an idempotency key, under 128
CHUNK_BYTES = 1 << 20  # of records per transaction: etcd refuses a request over 1.5 MiB (--max-request-bytes)


def expand(template: Task, spec: sweeps.Spec, sweep_id: str, record_bytes: int = 0,
           max_bytes: int = sweeps.MAX_SWEEP_BYTES) -> list[Task]:
    """One record per index from the submit's record (same image, web node, notice).
    Refuses (400) an index whose parameters take over `record_bytes` (0: no limit)
    and a sweep whose records take over `max_bytes` together, as it expands."""
    records, total = [], 0
    for number, index in enumerate(spec.indexes):
        params: Params = sweeps.index_params(template.params, index, number)
        params.check_size(record_bytes)
        task_id = new_id()
        timings = dict(template.timings)
        if number and "upload_bytes" in timings:
            timings["upload_bytes"] = 0  # the image was received once, for index 0
        # FIFO within a priority follows the index (queue_key orders by creation time).
        record = replace(template, id=task_id, name=params.name or task_id, params=params,
                         created_at=template.created_at + number * 1e-6, extra=dict(template.extra), timings=timings,
                         history=[list(h) for h in template.history])
        records.append(sweeps.tag(record, sweep_id, number, spec))
        total += len(encode(record))
        if total > max_bytes:
            raise BadRequest(f"bad sweep: its {len(spec.indexes)} indexes take over {max_bytes} bytes of "
                             "records; make each index's env or cmd smaller, or split it into several sweeps",
                             code="bad_sweep")
    return records


def create(store: Store, config: Config, records: list[Task], claim: idempotency.Claim | None,
           chunk: int = CHUNK) -> tuple[str, bool]:
    """Record every index of a sweep within its user's limits: (index 0's id, True),
    or, for an Idempotency-Key already used, (the first task's id, False).

    Every chunk's transaction compares the user's gate: the first as counted,
    each later one as the previous chunk left it. A submit by the same user
    between two chunks (which counted without the rest of this sweep) fails
    the next chunk, and the sweep is taken back whole (409 busy): the limits
    hold across chunks. `chunk`: indexes per transaction (tests make it small)."""
    user = records[0].user
    for record in records:
        control.check_params(config, record.params)
    lease = 0
    try:
        for _ in range(control.CREATE_TRIES):
            if first := control.replay(store, user, claim):
                return first, False
            held = control._check_user_limits(store, config, user, records[0].image["size"], len(records))
            keyed = None
            if claim:
                lease = lease or store.grant(idempotency.TTL)
                keyed = (store.keys.idempotency(user, claim.digest), claim.entry(records[0].id), lease)
            chunks = _chunks(records, chunk)
            try:
                created = store.create_sweep_tasks(chunks[0], held.gate, None, keyed)
            except Exception:
                lease = 0  # etcd may have applied it: the key holds the lease, which expires by itself
                _take_back(store, chunks[0], keyed)
                raise
            if not created:
                continue  # another submit of this user counted with us: count again
            lease = 0
            _write_rest(store, chunks, records, keyed)
            return records[0].id, True
    finally:
        control._drop(store, lease)
    raise Conflict("your other submissions kept changing your task count; try again", code="busy")


def _chunks(records: list[Task], chunk: int = CHUNK) -> list[list[Task]]:
    """The records in transactions of at most `chunk` indexes and CHUNK_BYTES (one record at least)."""
    chunks, size = [[]], 0
    for record in records:
        length = len(encode(record))
        if chunks[-1] and (len(chunks[-1]) == chunk or size + length > CHUNK_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(record)
        size += length
    return chunks


def _write_rest(store: Store, chunks: list[list[Task]], records: list[Task], keyed) -> None:
    """Write the chunks after the first, each comparing the gate as the previous one
    left it; on any failure (an error, a gate changed meanwhile) take back them all."""
    try:
        for previous, chunk in zip(chunks, chunks[1:]):
            if not store.create_sweep_tasks(chunk, None, previous[-1].id):
                raise Conflict("another submit of yours was counted while this sweep was being written; "
                               "nothing of the sweep was kept: submit again", code="busy")
    except Exception:
        _take_back(store, records, keyed)
        raise


def _take_back(store: Store, records: list[Task], keyed) -> None:
    """Remove the indexes already written: deleted if still queued, else cancelled.
    The idempotency key goes first (a retry of the request then makes a new sweep,
    never answers this one), and only if it names this sweep."""
    if keyed:
        try:
            rec = store.get(keyed[0])
            if rec is not None and rec.value == keyed[1]:
                store.txn().expect(rec).delete(rec.key).commit()
        except Exception as exc:  # noqa: BLE001 - the indexes must still be taken back
            log.warning("could not delete the idempotency key of a failed sweep: %s", exc)
    for task in records:
        try:
            rec = store.get(store.keys.task(task.id))
            if rec is not None and not _delete_queued(store, rec):
                control.cancel(store, rec)
        except Exception as exc:  # noqa: BLE001 - take back the others
            log.warning("could not take back index %s of a failed sweep: %s", task.id, exc)


def _delete_queued(store: Store, rec) -> bool:
    """Delete a record nobody moved yet (still queued, as written) with its index entries."""
    task, keys = rec.value, store.keys
    if task.state != State.QUEUED:
        return False
    txn = store.txn().expect(rec).delete(rec.key).delete(keys.owner(task.user, task.id))
    return txn.delete(keys.sweep_member(sweeps.of(task)["id"], task.id)).commit()


@dataclass
class SweepView:
    """One sweep as its owner sees it: every index found, by index number."""

    id: str
    user: str
    tasks: list[Task]

    @property
    def size(self) -> int:
        marks = [sweeps.of(t) for t in self.tasks]
        return max([m.get("size") or 0 for m in marks] + [len(self.tasks)])

    @property
    def max_parallel(self) -> int | None:
        return sweeps.of(self.tasks[0]).get("max_parallel")


def read(store: Store, conn_factory, sweep_id: str) -> SweepView | None:
    """The sweep's indexes: live records through its etcd index, the rest from the
    archive (`conn_factory()` is called only when some index is not live). An
    index found in both (archived, its record not yet removed) is read from the archive."""
    members = store.list(store.keys.sweep(sweep_id), SMALL_PAGE)
    ids = [m.key.rsplit("/", 1)[1] for m in members]
    live = {r.value.id: r.value for r in store.get_many([store.keys.task(i) for i in ids])}
    size = max([(sweeps.of(t) or {}).get("size") or 0 for t in live.values()] + [0])
    past: dict[str, Task] = {}
    if not live or size > len(live) or any(t.state == State.EXPORTED for t in live.values()):
        past = {t.id: t for t in archive.by_sweep(conn_factory(), sweep_id)}
    tasks = {**live, **past}
    found = [t for t in tasks.values() if (sweeps.of(t) or {}).get("id") == sweep_id]
    if not found:
        return None
    found.sort(key=lambda t: sweeps.of(t)["index"])
    return SweepView(id=sweep_id, user=found[0].user, tasks=found)


def readable(store: Store, conn_factory, sweep_id: str, user) -> SweepView:
    """The sweep if `user` owns it (or is an admin); 404 otherwise, as for a task."""
    view = read(store, conn_factory, sweep_id)
    if view is None or not (user.admin or view.user == user.name):
        raise NotFound(f"no sweep {sweep_id}", code="unknown_sweep")
    return view


def cancel_all(store: Store, sweep_id: str) -> list[Task]:
    """Cancel every index not yet done running (an exported one keeps its output)."""
    cancelled = []
    members = store.list(store.keys.sweep(sweep_id), SMALL_PAGE)
    for rec in store.get_many([store.keys.task(m.key.rsplit("/", 1)[1]) for m in members]):
        if rec.value.state == State.EXPORTED or rec.value.cancel_requested:
            continue
        try:
            cancelled.append(control.cancel(store, rec))
        except (NotFound, Conflict):
            pass  # it finished meanwhile
    return cancelled
