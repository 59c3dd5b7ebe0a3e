"""`lifecycle.apply`, the one writer of task records, against a real etcd:
a decision and its side effects commit together or not at all."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pink import fate, lifecycle
from pink.store import Store
from pink.tasks import Params, State, new_id, new_record


@pytest.fixture
def store(pink_config):
    s = Store.from_config(pink_config)
    yield s
    s.close()


def seed(store: Store, state: State, **changes):
    """A task in `state` on run1 (epoch: run1's node key), holding a
    reservation and an assignment; returns (its record, run1's fence)."""
    assert store.txn().put(store.keys.node("run1"), {"name": "run1"}).commit()
    epoch = store.get(store.keys.node("run1")).create_revision
    task = new_record(new_id(), "alice", Params(gpus=1), {"sha256": "0" * 64, "size": 10}, "web1")
    assert store.create_task(task, None)
    rec = store.get(store.keys.task(task.id))
    placed = replace(task, state=state, node="run1", epoch=epoch, gpus=["g0"], **changes)
    assert store.txn().expect(rec).put(rec.key, placed) \
        .put(store.keys.alloc("run1"), {task.id: {"gpus": ["g0"], "attempt": 1}}) \
        .put(store.keys.assignment("run1", task.id), {"task": task.id}).commit()
    return store.get(rec.key), (store.keys.node("run1"), epoch)


def test_a_report_moves_the_task_and_frees_its_reservation_and_assignment_at_once(store):
    rec, fence = seed(store, State.RUNNING)
    new = lifecycle.apply(store, rec, fate.Reported(fate.Ending.EXITED, attempt=1, exit_code=0), fence=fence)
    assert new.state == State.EXPORTED and new.result == "succeeded"
    assert store.get(rec.key).value.state == State.EXPORTED
    assert store.get(store.keys.alloc("run1")) is None
    assert store.get(store.keys.assignment("run1", rec.value.id)) is None


def test_an_exit_frees_the_gpus_and_keeps_the_slot(store):
    rec, fence = seed(store, State.RUNNING)
    assert lifecycle.apply(store, rec, fate.Exited(1, 123.0), fence=fence)
    assert store.get(store.keys.alloc("run1")).value[rec.value.id]["gpus"] == []
    assert store.get(rec.key).value.timings["exited"] == 123.0


def test_a_stale_view_writes_nothing(store):
    rec, fence = seed(store, State.RUNNING)
    assert lifecycle.apply(store, rec, fate.Cancel())  # someone else moved it first
    assert lifecycle.apply(store, rec, fate.RunnerLost("runner run1 lost"), fence=fence) is None
    current = store.get(rec.key).value
    assert current.state == State.RUNNING and current.cancel_requested
    assert store.get(store.keys.alloc("run1")) is not None


def test_a_report_is_kept_when_a_cancel_request_landed_meanwhile(store):
    """The run ended before the cancel reached it: its result stands, not a requeue or a loss."""
    rec, fence = seed(store, State.RUNNING)
    assert lifecycle.apply(store, rec, fate.Cancel())  # rec is now stale
    new = lifecycle.apply(store, rec, fate.Reported(fate.Ending.EXITED, attempt=1, exit_code=0), fence=fence)
    assert (new.state, new.result, new.cancel_requested) == (State.EXPORTED, "succeeded", True)
    assert store.get(store.keys.alloc("run1")) is None


def test_a_report_of_another_attempt_is_refused(store):
    rec, fence = seed(store, State.RUNNING, attempt=2)
    with pytest.raises(fate.Refused):
        lifecycle.apply(store, rec, fate.Reported(fate.Ending.EXITED, attempt=1, exit_code=0), fence=fence)


def test_an_event_that_follows_the_record_is_decided_again_on_the_record_as_it_is(store):
    rec, _ = seed(store, State.RUNNING)
    assert lifecycle.apply(store, rec, fate.JobFailed("transfer"))  # rec is now stale
    new = lifecycle.apply(store, rec, fate.Cancel())
    assert new.cancel_requested and new.job_failures == {"transfer": 1}


def test_a_lost_fence_writes_nothing(store):
    rec, fence = seed(store, State.RUNNING)
    stale = (fence[0], fence[1] - 1)
    assert lifecycle.apply(store, rec, fate.Reported(fate.Ending.EXITED, attempt=1, exit_code=0), fence=stale) is None
    assert store.get(rec.key).value.state == State.RUNNING


def test_the_runner_fence_guards_an_assignment(store):
    rec, _ = seed(store, State.PLACED)
    store.delete(store.keys.node("run1"))  # the runner's incarnation ended
    assert lifecycle.apply(store, rec, fate.Transferred("copied", lease=0)) is None
    assert store.get(rec.key).value.state == State.PLACED


def test_archived_removes_the_record_and_its_owner_entry_and_returns_what_it_removed(store):
    rec, _ = seed(store, State.EXPORTED, result="succeeded")
    assert lifecycle.apply(store, rec, fate.Cancel()).delete_requested  # a delete request lands meanwhile
    gone = lifecycle.apply(store, rec, fate.Archived(1, State.EXPORTED))
    assert gone.delete_requested, "the request that landed while finalize archived is not lost"
    assert store.get(rec.key) is None and store.get(store.keys.owner("alice", rec.value.id)) is None
    assert lifecycle.apply(store, rec, fate.Archived(1, State.EXPORTED)).id == rec.value.id  # already gone


def test_a_final_record_never_goes_back_to_etcd(store):
    rec, _ = seed(store, State.EXPORTED, result="succeeded")
    with pytest.raises(fate.Refused):
        lifecycle.apply(store, rec, fate.Fetched(None))
    assert store.get(rec.key).value.state == State.EXPORTED


def test_an_event_that_does_not_fit_the_state_is_refused(store):
    rec, _ = seed(store, State.QUEUED)
    with pytest.raises(fate.Refused):
        lifecycle.apply(store, rec, fate.Started("run1", {}))


def test_a_cancel_of_a_task_that_left_etcd_meanwhile_says_so(store):
    rec, _ = seed(store, State.RUNNING)
    assert lifecycle.apply(store, rec, fate.JobFailed("transfer"))  # rec is now stale
    store.delete(rec.key)
    assert lifecycle.apply(store, rec, fate.Cancel()) is None


def test_an_exit_is_decided_again_after_a_cancel_request_landed(store):
    rec, fence = seed(store, State.RUNNING)
    assert lifecycle.apply(store, rec, fate.Cancel())  # rec is now stale
    assert lifecycle.apply(store, rec, fate.Exited(1, 9.0), fence=fence).cancel_requested
    assert store.get(store.keys.alloc("run1")).value[rec.value.id]["gpus"] == []
