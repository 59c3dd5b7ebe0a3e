"""A task's GPU usage as a record: reported by the runner, kept through etcd and the archive,
shown by the API and the CLI, "not measured" (null) where nothing was measured; the idle
policy's stop is the task's own failure (`gpu_idle`), not retried."""

from __future__ import annotations

import json
from dataclasses import replace

from pink import failures, fate
from pink.fate import Ending
from pink.gpu_usage import GpuUsage
from pink.tasks import Params, State, Task, new_record, public_view
from pink_cli import output

USAGE = GpuUsage(mean_percent=41.5, peak_percent=99.0, peak_memory_bytes=3 * 2**30, idle_minutes=12.5, samples=720,
                 measured_seconds=3600.0)


def running() -> Task:
    task = new_record("abc123", "alice", Params(gpus=1), {"sha256": "0" * 64, "size": 10}, "web1")
    return replace(task, state=State.RUNNING, node="run1", epoch=5, gpus=["g0"])


def test_the_report_carries_the_usage_into_the_record_and_its_json():
    new = fate.decide(running(), fate.Reported(Ending.EXITED, attempt=1, exit_code=0, gpu_usage=USAGE)).task
    assert new.gpu_usage == USAGE
    again = Task.from_json(json.loads(json.dumps(new.to_json())))  # as etcd and the archive keep it
    assert again.gpu_usage == USAGE and again == new
    assert public_view(new)["gpu_usage"] == {"mean_percent": 41.5, "peak_percent": 99.0,
                                             "peak_memory_bytes": 3 * 2**30, "idle_minutes": 12.5, "samples": 720,
                                             "measured_seconds": 3600.0}


def test_not_measured_is_null_never_zeros():
    new = fate.decide(running(), fate.Reported(Ending.EXITED, attempt=1, exit_code=0)).task
    assert new.gpu_usage is None and new.to_json()["gpu_usage"] is None
    assert public_view(new)["gpu_usage"] is None
    assert Task.from_json({**new.to_json(), "gpu_usage": {"mean_percent": 1}}).gpu_usage is None  # unreadable


def test_the_record_from_json_has_its_types_whatever_the_json_said():
    data = {**USAGE.to_json(), "samples": "720", "peak_memory_bytes": 3.0 * 2**30, "mean_percent": 41.5}
    again = GpuUsage.from_json(data)
    assert again == USAGE and type(again.samples) is int and type(again.peak_memory_bytes) is int
    assert GpuUsage.from_json({**data, "samples": "many"}) is None and GpuUsage.from_json(None) is None


def test_a_record_from_before_gpu_usage_reads_as_not_measured():
    data = running().to_json()
    del data["gpu_usage"]
    assert Task.from_json(data).gpu_usage is None


def test_a_requeued_task_forgets_the_attempt_befores_usage():
    measured = replace(running(), gpu_usage=USAGE)
    assert fate.requeue(measured, "again").gpu_usage is None


def test_an_idle_stop_is_the_tasks_own_failure_not_retried():
    stopped = fate.Reported(Ending.BROKEN, attempt=1, exit_code=137, cause="gpu_idle", gpu_usage=USAGE,
                            error="stopped: its GPUs stayed under 5% for 40 minutes",
                            export={"path": "/outbox/abc123-1.tar.zst"})
    decision = fate.decide(running(), stopped, fate.Rules(max_attempts=3))
    new = decision.task
    assert (new.state, new.result, new.failure, new.attempt) == (State.EXPORTED, "failed", "gpu_idle", 1)
    assert new.export == {"path": "/outbox/abc123-1.tar.zst"} and new.gpu_usage == USAGE  # output kept
    assert not failures.retried("gpu_idle")
    shown = failures.describe("gpu_idle")
    assert shown["class"] == "task" and "--gpus 0" in shown["advice"]


def test_pink_status_says_the_usage_or_not_measured():
    base = {"id": "abc123", "state": "succeeded", "params": {}, "image": {}}
    assert output.gpu_usage_line({**base, "gpu_usage": None}) == "not measured"
    assert output.gpu_usage_line({**base, "state": "running", "gpu_usage": None}) is None  # not reported yet
    line = output.gpu_usage_line({**base, "gpu_usage": USAGE.to_json()})
    assert line == "mean 41.5%, peak 99%, peak memory 3.0 GiB, idle 12.5 min (720 samples over 60.0 min)"
    assert "gpu usage:    not measured" in output.task_details({**base, "gpu_usage": None})


def test_pink_usage_shows_gpu_hours_used_and_idle_or_not_measured():
    row = {"user": "alice", "tasks": 2, "succeeded": 2, "failed": 0, "timed_out": 0, "cancelled": 0,
           "gpu_hours": 2.0, "wall_hours": 2.0, "measured_tasks": 1, "gpu_hours_used": 0.5, "gpu_hours_idle": 0.25,
           "gpu_hours_measured": 1.5}
    text = output.usage_table([row, {**row, "user": "bob", "measured_tasks": 0, "gpu_hours_used": None,
                                     "gpu_hours_idle": None, "gpu_hours_measured": None}])
    header, alice, bob = text.splitlines()
    assert "GPU-HOURS USED" in header and "GPU-HOURS IDLE" in header
    assert "0.50 of 1.50 measured GPU-h" in alice and "0.25 of 1.50 measured GPU-h" in alice
    assert bob.count("not measured") == 2


def test_an_attempt_that_ends_the_task_through_after_loss_keeps_its_usage():
    """A retried cause (the runner's error) on the last attempt, or on a cancelled task, ends the
    task in `after_loss`: the attempt's usage is kept there as a plain report keeps it."""
    broken = fate.Reported(Ending.BROKEN, attempt=1, cause="runner_error", error="docker broke", gpu_usage=USAGE)
    last = fate.decide(replace(running(), losses=2), broken, fate.Rules(max_attempts=3)).task
    assert (last.state, last.result, last.gpu_usage) == (State.EXPORTED, "failed", USAGE)
    cancelled = fate.decide(replace(running(), cancel_requested=True), broken, fate.Rules(max_attempts=3)).task
    assert (cancelled.result, cancelled.gpu_usage) == ("cancelled", USAGE)
    again = fate.decide(running(), broken, fate.Rules(max_attempts=3)).task
    assert (again.state, again.gpu_usage) == (State.QUEUED, None)  # another attempt measures anew
