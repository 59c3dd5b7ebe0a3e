"""Every (state, event) pair of `pink.fate`: where it takes the task, with
which side effects, and the pairs it must refuse (pure logic, no services)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from pink import failures, fate
from pink.fate import Ending
from pink.tasks import FINAL, State, Params, new_record

Q, P, T, A, R, E = (State.QUEUED, State.PLACED, State.TRANSFERRED, State.ASSIGNED, State.RUNNING,
                    State.EXPORTED)
LIVE = (Q, P, T, A, R, E)
ON_RUNNER = (P, T, A, R)

SAMPLES = {
    fate.Placed: fate.Placed("run1", 5, ["g0"]),
    fate.Transferred: fate.Transferred("copied 10 bytes", lease=77, sent=10, seconds=0.5),
    fate.Started: fate.Started("run1", {"ssh": {}, "path": "/outbox/t.log"}),
    fate.Exited: fate.Exited(attempt=1, at=1000.0),
    fate.Reported: fate.Reported(Ending.EXITED, attempt=1, exit_code=0, export={"path": "/outbox/t.tar.zst"}),
    fate.RunnerLost: fate.RunnerLost("runner run1 lost"),
    fate.OperatorMove: fate.OperatorMove("run1"),
    fate.UploadLost: fate.UploadLost("upload lost with web1"),
    fate.JobFailed: fate.JobFailed("transfer"),
    fate.JobGaveUp: fate.JobGaveUp("transfer failed 8 times"),
    fate.Cancel: fate.Cancel(),
    fate.Fetched: fate.Fetched({"stored": True, "size": 3}),
    fate.ExportLost: fate.ExportLost("runner run1 no longer has the export"),
    fate.FinalizeGaveUp: fate.FinalizeGaveUp("finalize failed 8 times"),
}

# (event, state) -> the state it leads to; "removed": the record leaves etcd;
# "same": nothing to write. A pair absent here must be refused.
TABLE = {
    **{(fate.Placed, Q): "placed"},
    **{(fate.Transferred, s): "assigned" for s in (P, T)},
    **{(fate.Started, A): "running"},
    **{(fate.Exited, R): "running", (fate.Reported, R): "exported"},
    **{(fate.RunnerLost, s): "queued" for s in ON_RUNNER},
    **{(fate.OperatorMove, s): "queued" for s in (P, T, A)},
    **{(fate.UploadLost, s): "exported" for s in (Q, P)},
    **{(fate.JobFailed, s): s.value for s in LIVE},
    **{(fate.JobGaveUp, s): "exported" for s in (P, T)},
    **{(fate.Cancel, s): "exported" for s in (Q, P, T, A)},
    **{(fate.Cancel, R): "running", (fate.Cancel, E): "exported"},
    **{(fate.Cancel, s): "same" for s in FINAL},
    **{(fate.Fetched, E): "succeeded", (fate.ExportLost, E): "queued", (fate.FinalizeGaveUp, E): "failed"},
}
# (event, state) -> (release, free_gpus, unassign, writes the assignment); the rest have none
EFFECTS = {
    **{(fate.Transferred, s): (None, None, None, True) for s in (P, T)},
    (fate.Exited, R): (None, "run1", None, False),
    (fate.Reported, R): ("run1", None, "run1", False),
    **{(fate.RunnerLost, s): ("run1", None, "run1", False) for s in ON_RUNNER},
    **{(fate.OperatorMove, s): ("run1", None, "run1", False) for s in (P, T, A)},
    (fate.UploadLost, P): ("run1", None, "run1", False),  # a queued task holds nothing yet
    **{(fate.JobGaveUp, s): ("run1", None, "run1", False) for s in (P, T)},
    **{(fate.Cancel, s): ("run1", None, "run1", False) for s in (P, T, A)},
}


def task_in(state: State, **changes):
    task = new_record("abc123", "alice", Params(), {"sha256": "0" * 64, "size": 10}, "web1")
    on_node = {} if state == Q else {"node": "run1", "epoch": 5, "gpus": ["g0"]}
    result = {"result": "succeeded", "exit_code": 0} if state == E else {}
    return replace(task, state=state, **{**on_node, **result, **changes})


def test_every_event_has_a_sample_and_a_rule():
    assert set(SAMPLES) | {fate.Archived} == set(fate.EVENTS)


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("kind", list(SAMPLES), ids=lambda k: k.__name__)
def test_each_state_and_event(kind, state):
    task = task_in(state)
    before = copy.deepcopy(task)
    expected = TABLE.get((kind, state))
    if expected is None:
        with pytest.raises(fate.Refused):
            fate.decide(task, SAMPLES[kind])
        return
    decision = fate.decide(task, SAMPLES[kind])
    if expected == "same":
        assert decision.unchanged and decision.task is task
        return
    assert not decision.unchanged and decision.task.state.value == expected
    release, free_gpus, unassign, assigns = EFFECTS.get((kind, state), (None, None, None, False))
    assert (decision.release, decision.free_gpus, decision.unassign, decision.assign is not None) == \
        (release, free_gpus, unassign, assigns)
    assert decision.fence_node == (kind is fate.Transferred), "only an assignment is fenced on the runner's epoch"
    assert task == before, "decide must not change the record it was given"


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_archived_removes_the_attempt_it_names_and_refuses_another(state):
    task = task_in(state)
    assert fate.decide(task, fate.Archived(1, state)).task is None
    with pytest.raises(fate.Refused):
        fate.decide(task, fate.Archived(2, state))
    other = Q if state != Q else P
    with pytest.raises(fate.Refused):
        fate.decide(task, fate.Archived(1, other))


def test_a_final_record_is_never_written_back_by_a_runner_event():
    """The states a runner's events leave are live: final ones come from finalize alone."""
    for (kind, state), to in TABLE.items():
        if kind not in (fate.Fetched, fate.ExportLost, fate.FinalizeGaveUp, fate.Cancel):
            assert State(to) not in FINAL, (kind, state)


def test_the_transfer_records_both_steps_and_the_assignment_is_fenced_on_the_runner():
    decision = fate.decide(task_in(P), SAMPLES[fate.Transferred])
    assert [h[1] for h in decision.task.history[-2:]] == ["transferred", "assigned"]
    assert decision.task.timings["transfer_bytes"] == 10 and decision.task.timings["transfer_seconds"] == 0.5
    assert decision.assign == {"task": "abc123", "attempt": 1, "epoch": 5} and decision.assign_lease == 77
    assert decision.fence_node
    repaired = fate.decide(task_in(T), fate.Transferred("handed over by the leader", lease=77))
    assert [h[1] for h in repaired.task.history[-1:]] == ["assigned"] and "transfer_bytes" not in repaired.task.timings


@pytest.mark.parametrize("report,result,error,failure", [
    (fate.Reported(Ending.EXITED, attempt=1, exit_code=0), "succeeded", None, None),
    (fate.Reported(Ending.EXITED, attempt=1, exit_code=3), "failed", "container exited with code 3", "exit_code"),
    (fate.Reported(Ending.EXITED, attempt=1, exit_code=137, cause="oom_killed"), "failed",
     "container exited with code 137", "oom_killed"),
    (fate.Reported(Ending.TIMED_OUT, attempt=1, exit_code=137, error="timed out after 5s"), "timed_out",
     "timed out after 5s", "timed_out"),
    (fate.Reported(Ending.CANCELLED, attempt=1, exit_code=143, error="cancelled"), "cancelled", "cancelled", None),
    (fate.Reported(Ending.BROKEN, attempt=1, error="exec: \"train\": not found", cause="start_failed"), "failed",
     "exec: \"train\": not found", "start_failed"),
    (fate.Reported(Ending.EXITED, attempt=1, exit_code=0, export_error="disk full"), "succeeded", "disk full", None),
    (fate.Reported(Ending.EXITED, attempt=1, exit_code=2, export_error="disk full"), "failed",
     "container exited with code 2", "exit_code"),
    (fate.Reported(Ending.BROKEN, attempt=1, exit_code=0, error="over 100 GiB", export_error="over 100 GiB",
                   cause="output_too_big"), "failed", "over 100 GiB", "output_too_big"),
])
def test_the_runner_says_how_the_run_ended_and_fate_picks_the_result(report, result, error, failure):
    new = fate.decide(task_in(R), report).task
    assert (new.state, new.result, new.error, new.failure) == (State.EXPORTED, result, error, failure)


@pytest.mark.parametrize("cause", ["image_load", "runner_error", "disk_full", None])
def test_a_run_the_infrastructure_broke_is_tried_again_then_fails_with_its_cause(cause):
    broken = fate.Reported(Ending.BROKEN, attempt=1, error="docker load: no space left on device", cause=cause)
    again = fate.decide(task_in(R), broken, fate.Rules(max_attempts=3))
    assert (again.task.state, again.task.attempt, again.task.losses, again.task.failure) == (Q, 2, 1, None)
    assert (again.release, again.unassign) == ("run1", "run1")
    assert "no space left on device" in again.task.history[-1][2]
    last = fate.decide(task_in(R, losses=2), broken, fate.Rules(max_attempts=3)).task
    assert (last.state, last.result, last.failure) == (E, "failed", cause or "runner_error")
    assert "gave up after" in last.error


def test_a_cancelled_task_the_infrastructure_broke_ends_cancelled_not_again():
    broken = fate.Reported(Ending.BROKEN, attempt=1, error="runner error: boom", cause="runner_error")
    new = fate.decide(task_in(R, cancel_requested=True), broken).task
    assert (new.state, new.result, new.failure) == (E, "cancelled", None)


@pytest.mark.parametrize("state,event,failure", [
    (R, fate.RunnerLost("runner run1 lost"), "runner_lost"),
    (Q, fate.UploadLost("upload lost with web1"), "upload_lost"),
    (P, fate.JobGaveUp("transfer failed 8 times"), "transfer_failed"),
    (E, fate.FinalizeGaveUp("finalize failed 8 times"), "finalize_failed"),
    (E, fate.ExportLost("runner run1 no longer has the export"), "export_lost"),
    (E, fate.Fetched(None, refused="the export is 9 bytes, over the limit"), "output_too_big"),
])
def test_every_failure_names_its_cause_and_whose_it_was(state, event, failure):
    new = fate.decide(task_in(state, losses=9), event, fate.Rules(max_attempts=3)).task
    assert new.failure == failure
    assert failures.describe(new.failure)["class"] == failures.CAUSES[failure].blame.value


def test_each_cause_has_a_class_a_summary_and_advice():
    for code, cause in failures.CAUSES.items():
        shown = failures.describe(code)
        assert shown["class"] in ("task", "infrastructure") and shown["summary"] and shown["advice"].endswith(".")
    assert failures.retried("runner_lost") and not failures.retried("exit_code") and not failures.retried(None)
    assert failures.describe(None) is None
    assert failures.describe("from_a_newer_pink")["class"] == "unknown"


def test_a_requeue_clears_what_the_attempt_before_left():
    failed = task_in(E, result="failed", failure="exit_code", exit_code=1, error="container exited with code 1",
                     export={"path": "/outbox/t.tar.zst"}, export_error="disk full", logs_truncated=9)
    again = fate.requeue(failed, "again")
    assert (again.failure, again.result, again.export, again.export_error, again.logs_truncated) == \
        (None, None, None, None, 0)


def test_a_task_that_failed_by_itself_is_not_run_again_for_a_lost_export():
    failed = task_in(E, result="failed", failure="oom_killed", exit_code=137)
    new = fate.decide(failed, fate.ExportLost("runner run1 no longer has the export")).task
    assert (new.state, new.failure, new.exit_code, new.attempt) == (State.FAILED, "oom_killed", 137, 1)
    assert new.export_error == "runner run1 no longer has the export"


def test_the_last_attempt_the_infrastructure_broke_keeps_its_log_for_the_archive():
    broken = fate.Reported(Ending.BROKEN, attempt=1, error="runner error: boom", cause="runner_error",
                           export={"log": "/outbox/t.log"})
    last = fate.decide(task_in(R, losses=2), broken, fate.Rules(max_attempts=3)).task
    assert (last.failure, last.export) == ("runner_error", {"log": "/outbox/t.log"})


def test_an_image_the_runner_refuses_is_the_tasks_own_failure():
    refused = fate.Reported(Ending.BROKEN, attempt=1, error="image sha256:ab refused: diff_ids", cause="image_refused")
    new = fate.decide(task_in(R), refused).task
    assert (new.state, new.result, new.failure) == (E, "failed", "image_refused")


def test_report_timings_are_kept_and_a_cached_image_counts_zero():
    report = fate.Reported(Ending.EXITED, attempt=1, exit_code=0,
                           timings={"image_load_seconds": 0.0, "export_seconds": None, "exited": 5.0})
    timings = fate.decide(task_in(R), report).task.timings
    assert timings["image_load_seconds"] == 0.0 and timings["exited"] == 5.0 and "export_seconds" not in timings


def test_a_lost_runner_requeues_until_attempts_run_out_then_fails():
    lost = fate.RunnerLost("runner run1 lost")
    again = fate.decide(task_in(R), lost, fate.Rules(max_attempts=3)).task
    assert (again.state, again.attempt, again.losses, again.node, again.gpus) == (Q, 2, 1, None, [])
    last = fate.decide(task_in(R, losses=2), lost, fate.Rules(max_attempts=3)).task
    assert (last.state, last.result) == (E, "failed") and "gave up after" in last.error


def test_a_loss_that_does_not_count_never_fails_the_task():
    moved = fate.decide(task_in(A, losses=9), fate.RunnerLost("lost track", counts=False)).task
    assert (moved.state, moved.losses) == (Q, 9)
    off = fate.decide(task_in(P, losses=2), fate.OperatorMove("run1"), fate.Rules(max_attempts=3)).task
    assert (off.state, off.losses) == (Q, 2)


def test_a_cancelled_task_is_not_run_again_after_a_loss():
    ended = fate.decide(task_in(R, cancel_requested=True), fate.RunnerLost("runner lost")).task
    assert (ended.state, ended.result) == (E, "cancelled")
    upload = fate.decide(task_in(P, cancel_requested=True), fate.UploadLost("upload lost")).task
    assert upload.result == "cancelled"


def test_a_runner_that_lost_track_of_a_cancelled_task_ends_it_cancelled():
    """The runner's report lost the race with the cancel flag: running it again would undo the cancel."""
    ended = fate.decide(task_in(R, cancel_requested=True), fate.RunnerLost("lost track", counts=False)).task
    assert (ended.state, ended.result, ended.attempt) == (E, "cancelled", 1)


def test_an_operator_moves_only_the_tasks_on_its_node():
    with pytest.raises(fate.Refused):
        fate.decide(task_in(P), fate.OperatorMove("run2"))


def test_exited_is_refused_for_another_attempt():
    with pytest.raises(fate.Refused):
        fate.decide(task_in(R, attempt=2), fate.Exited(attempt=1, at=1.0))


def test_a_second_cancel_changes_nothing():
    running = fate.decide(task_in(R), fate.Cancel()).task
    assert running.cancel_requested
    assert fate.decide(running, fate.Cancel()).unchanged
    exported = fate.decide(task_in(E), fate.Cancel()).task
    assert exported.delete_requested and fate.decide(exported, fate.Cancel()).unchanged


@pytest.mark.parametrize("changes,event,state,detail", [
    ({"delete_requested": True}, fate.Fetched({"stored": True}), "succeeded", "deleted by its user"),
    ({}, fate.Fetched(None, refused="over the limit"), "failed", "over the limit"),
    ({"result": "timed_out"}, fate.ExportLost("gone"), "timed_out", "gone"),
    ({"result": "cancelled"}, fate.ExportLost("gone"), "cancelled", "gone"),
    ({"cancel_requested": True}, fate.ExportLost("gone"), "cancelled", "gone"),
    ({"losses": 2}, fate.ExportLost("gone"), "failed", "gone"),
])
def test_finalize_decisions(changes, event, state, detail):
    final = fate.decide(task_in(E, **changes), event, fate.Rules(max_attempts=3)).task
    assert final.state.value == state and detail in final.history[-1][2]
    if changes.get("delete_requested"):
        assert final.output is None


def test_a_fetched_export_is_kept_with_the_final_record():
    final = fate.decide(task_in(E, logs_truncated=0), fate.Fetched({"stored": True, "size": 3}, 12)).task
    assert final.output == {"stored": True, "size": 3} and final.logs_truncated == 12
    assert final.history[-1][2] == "exit code 0"


def test_job_failures_count_per_stage():
    once = fate.decide(task_in(P), fate.JobFailed("transfer")).task
    twice = fate.decide(once, fate.JobFailed("transfer")).task
    assert twice.job_failures == {"transfer": 2} and twice.state == P
