"""The task state machine and parameter parsing (pure logic, no services)."""

from __future__ import annotations

import pytest
from werkzeug.datastructures import MultiDict

from pink.errors import BadRequest, Conflict
from pink.tasks import FINAL, State, Params, TRANSITIONS, Task, advance, job_id, new_record, public_view


def record(**params):
    return new_record("abc123", "alice", Params(**params), {"sha256": "0" * 64, "size": 10,
                                                           "image_id": "sha256:" + "1" * 64,
                                                           "repo_tags": [], "layout": "docker"},
                      "web1")


def test_final_states_have_no_way_out():
    assert all(state not in TRANSITIONS for state in FINAL)


def test_a_task_cannot_skip_states():
    with pytest.raises(Conflict):
        advance(record(), State.RUNNING)
    with pytest.raises(Conflict):
        advance(record(), State.SUCCEEDED)


def test_advance_records_history_and_timing_without_touching_the_original():
    task = record()
    placed = advance(task, State.PLACED, "placed on run1", node="run1")
    assert task.state == "queued" and task.node is None
    assert placed.state == "placed" and placed.node == "run1"
    assert placed.history[-1][1:] == ["placed", "placed on run1"]
    assert "placed" in placed.timings and "placed" not in task.timings


def test_job_ids_are_deterministic_and_valid_for_rq():
    from rq.job import validate_job_id

    assert job_id("abc", "transfer", 2) == job_id("abc", "transfer", 2)
    validate_job_id(job_id("abc123", "finalize", 3))


def test_params_from_a_query_string():
    p = Params.parse(MultiDict([("cmd", "sh -c 'echo hi'"), ("env", "A=1"), ("env", "B=x=y"),
                                ("gpus", "2"), ("timeout", "60"), ("output", "/out")]))
    assert p.cmd == ["sh", "-c", "echo hi"] and p.env == {"A": "1", "B": "x=y"}
    assert (p.gpus, p.timeout, p.output, p.compression) == (2, 60, "/out", "zstd")


@pytest.mark.parametrize("args, words", [
    ({"gpus": "-1"}, "gpus"), ({"timeout": "soon"}, "timeout"), ({"env": "NOVALUE"}, "KEY=VALUE"),
    ({"cmd": "sh -c 'unterminated"}, "cmd"), ({"output": "rel"}, "absolute"),
    ({"compression": "lz4"}, "compression"),
])
def test_bad_params_say_what_is_wrong(args, words):
    with pytest.raises(BadRequest) as err:
        Params.parse(MultiDict(args))
    assert words in err.value.message


def test_public_view_hides_host_paths():
    view = public_view(record())
    assert "spool_path" not in view and "web_host" not in view
    assert view["created_at"].endswith("Z")


def test_a_record_keeps_what_this_version_does_not_know():
    """A newer PINK may add keys: an older one moving the task must not drop them."""
    data = {**record(gpus=2).to_json(), "future_field": {"x": 1}}
    data["params"]["future_param"] = True
    task = Task.from_json(data)
    assert task.params.gpus == 2 and task.state == State.QUEUED
    moved = advance(task, State.PLACED, node="run1")
    assert moved.to_json()["future_field"] == {"x": 1} and moved.to_json()["node"] == "run1"
    assert moved.to_json()["params"]["future_param"] is True and moved.to_json()["params"]["gpus"] == 2
    assert Task.from_json(moved.to_json()) == moved


@pytest.mark.parametrize("change", [{"params": None}, {"image": {"size": 1}}, {"history": None},
                                    {"state": "sleeping"}, {"id": None, "user": None, "created_at": None}])
def test_a_record_that_is_not_a_task_is_refused(change):
    data = {**record().to_json(), **change}
    if change.get("id", "") is None:
        del data["id"]
    with pytest.raises((ValueError, TypeError)):
        Task.from_json(data)
