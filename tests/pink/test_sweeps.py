"""Sweeps: parsing a spec, each index's parameters, and the placement cap. Pure, no services."""

from __future__ import annotations

import json
from collections import Counter

import click
import pytest

from pink import sweeps
from pink.errors import BadRequest
from pink.nodes import NodeView
from pink.placement import plan
from pink.tasks import Params, State, Task, new_record
from pink_cli.sweeps import read_file, spec_from_options


def test_a_grid_is_every_combination_in_order():
    spec = sweeps.parse('{"grid": {"LR": ["1e-3", "1e-4"], "BS": [32, 64]}, "max_parallel": 2}')
    assert [i.env for i in spec.indexes] == [{"LR": "1e-3", "BS": "32"}, {"LR": "1e-3", "BS": "64"},
                                             {"LR": "1e-4", "BS": "32"}, {"LR": "1e-4", "BS": "64"}]
    assert spec.max_parallel == 2


def test_items_carry_env_or_a_command():
    spec = sweeps.parse({"items": [{"env": {"A": "1"}}, {"cmd": "python train.py --lr 3"}]})
    assert spec.indexes == (sweeps.Index(env={"A": "1"}), sweeps.Index(env={}, cmd="python train.py --lr 3"))
    assert spec.max_parallel is None
    assert sweeps.parse(None) is None and sweeps.parse("") is None


@pytest.mark.parametrize("raw, says", [
    ("{not json", "not JSON"),
    ({"grid": {"A": [1]}, "items": [{"env": {}}]}, "exactly one of grid or items"),
    ({"grid": {}}, "grid must be an object"),
    ({"grid": {"A": []}}, "non-empty list"),
    ({"items": []}, "items must be a non-empty list"),
    ({"items": [{"env": {"A": [1]}}]}, "string or number"),
    ({"items": [{"env": {"A=B": "1"}}]}, "without '='"),
    ({"items": [{"other": 1}]}, "env and/or cmd"),
    ({"items": [{"cmd": "  "}]}, "non-empty string"),
    ({"grid": {"A": [1]}, "max_parallel": 0}, "max_parallel"),
    ({"grid": {"A": [1]}, "max_parallel": True}, "max_parallel"),
    ({"grid": {"A": [1]}, "extra": 1}, "exactly one of grid or items"),
])
def test_a_bad_spec_says_what_is_wrong_and_what_to_send(raw, says):
    with pytest.raises(BadRequest) as err:
        sweeps.parse(raw)
    assert says in err.value.message and '"grid"' in err.value.message
    assert err.value.code == "bad_sweep" and err.value.status == 400


def test_a_sweep_over_the_limit_is_refused_before_it_is_expanded():
    with pytest.raises(BadRequest, match=r"1000000 indexes; a sweep may have at most 1000"):
        sweeps.parse({"grid": {k: list(range(10)) for k in "ABCDEF"}}, 1000)
    with pytest.raises(BadRequest, match="at most 2"):
        sweeps.parse({"items": [{"env": {}}] * 3}, 2)
    assert len(sweeps.parse({"items": [{"env": {}}] * 2}, 2).indexes) == 2


def test_an_index_merges_its_env_over_the_tasks_and_may_replace_the_command():
    params = Params(name="train", env={"LR": "1", "KEEP": "yes"}, cmd=["python", "a.py"])
    one = sweeps.index_params(params, sweeps.Index(env={"LR": "2"}), 3)
    assert one.env == {"LR": "2", "KEEP": "yes", "PINK_SWEEP_INDEX": "3"}
    assert one.cmd == ["python", "a.py"] and one.name == "train[3]"
    other = sweeps.index_params(params, sweeps.Index(env={}, cmd="sh -c 'echo hi'"), 0)
    assert other.cmd == ["sh", "-c", "echo hi"]
    assert params.env == {"LR": "1", "KEEP": "yes"}  # the template is left as it was


def _node(slots: int = 8) -> NodeView:
    return NodeView(name="a", epoch=1, gpus=[], images=[], max_containers=slots, state="ready")


def _index(number: int, sweep_id: str = "s1", cap: int | None = 2, state: State = State.QUEUED) -> Task:
    task = new_record(f"t{sweep_id}{number}", "alice", Params(), {"sha256": "a" * 64, "size": 100}, "web1")
    task.created_at += number  # FIFO by index
    task.state = state
    return sweeps.tag(task, sweep_id, number, sweeps.Spec(indexes=(sweeps.Index(env={}),) * 4, max_parallel=cap))


def test_placement_places_at_most_the_cap_and_says_why_the_rest_wait():
    queued = [_index(i) for i in range(4)]
    result = plan(queued, [_node()], {}, {}, sweep_slots=sweeps.slots_held(queued))
    assert sorted(result.choices) == ["ts10", "ts11"]
    assert result.waiting == {"ts12": "sweep limit: 2 of 2 running", "ts13": "sweep limit: 2 of 2 running"}


def test_indexes_holding_a_slot_count_and_other_sweeps_are_not_held_back():
    running = [_index(0, state=State.RUNNING), _index(1, state=State.PLACED)]
    assert sweeps.slots_held(running + [_index(2)]) == Counter({"s1": 2})
    queued = [_index(2), _index(3), _index(0, "s2", cap=None), _index(1, "s2", cap=None)]
    result = plan(queued, [_node()], {}, {}, sweep_slots=sweeps.slots_held(running))
    assert sorted(result.choices) == ["ts20", "ts21"]
    assert set(result.waiting) == {"ts12", "ts13"}
    one_free = plan(queued[:2], [_node()], {}, {}, sweep_slots=Counter({"s1": 1}))
    assert list(one_free.choices) == ["ts12"]


def test_a_task_outside_any_sweep_is_never_capped():
    task = new_record("plain", "alice", Params(), {"sha256": "a" * 64, "size": 100}, "web1")
    assert sweeps.capped(task, Counter()) is None and sweeps.of(task) is None


def test_the_cli_builds_a_grid_or_items_from_a_file(tmp_path):
    assert spec_from_options(("LR=1e-3,1e-4", "BS=32,64"), None, 2) == {
        "grid": {"LR": ["1e-3", "1e-4"], "BS": ["32", "64"]}, "max_parallel": 2}
    assert spec_from_options((), None, None) is None
    lines = tmp_path / "envs.jsonl"
    lines.write_text('{"A": "1"}\n\n{"A": 2}\n')
    listed = tmp_path / "envs.json"
    listed.write_text(json.dumps([{"A": "1"}, {"A": 2}]))
    assert read_file(str(lines)) == read_file(str(listed)) == [{"env": {"A": "1"}}, {"env": {"A": 2}}]
    with pytest.raises(click.UsageError):
        spec_from_options((), None, 3)
    with pytest.raises(click.BadParameter):
        spec_from_options(("LR",), None, None)


def test_indexes_are_written_in_transactions_etcd_accepts():
    from pink import sweep_records

    template = new_record("t", "alice", Params(name="n"), {"sha256": "a" * 64, "size": 100}, "web1")
    spec = sweeps.Spec(indexes=tuple(sweeps.Index(env={"I": str(i)}) for i in range(100)))
    records = sweep_records.expand(template, spec, "s1")
    assert [len(c) for c in sweep_records._chunks(records)] == [40, 40, 20]
    assert [r.params.env["I"] for r in records] == [str(i) for i in range(100)]
    assert [r.created_at for r in records] == sorted(r.created_at for r in records)  # FIFO by index
    assert len({r.id for r in records}) == 100 and records[7].name == "n[7]"
    big = sweeps.Spec(indexes=tuple(sweeps.Index(env={"X": "x" * 60_000}) for _ in range(40)))
    sizes = [len(c) for c in sweep_records._chunks(sweep_records.expand(template, big, "s2"))]
    assert sum(sizes) == 40 and max(sizes) <= 17  # ~60 KB each: 1 MiB a transaction


def test_sweep_indexes_below_one_is_a_config_error_and_the_default_fits_the_live_limit():
    from pink.config import LimitsConfig
    from pink.errors import ConfigError

    for bad in (0, -1, True, "5"):
        with pytest.raises(ConfigError, match="sweep_indexes"):
            LimitsConfig(sweep_indexes=bad)
    assert LimitsConfig().sweep_indexes <= LimitsConfig().live_tasks_per_user


def test_each_index_env_is_checked_as_a_task_env_and_the_spec_is_bounded():
    from pink import sweep_records

    with pytest.raises(BadRequest, match="item 0 env NVIDIA_GDS not allowed"):
        sweeps.parse({"items": [{"env": {"NVIDIA_GDS": "enabled"}}]})
    with pytest.raises(BadRequest, match="at most 262144"):
        sweeps.parse({"items": [{"env": {"A": "x" * 300_000}}]})
    assert sweeps.parse({"grid": {"A": [1, 2]}, "max_parallel": 50}).max_parallel == 2  # clamped to the size
    template = new_record("t", "alice", Params(), {"sha256": "a" * 64, "size": 100}, "web1")
    spec = sweeps.parse({"grid": {"A": ["x" * 1000], "B": list(range(20))}})
    with pytest.raises(BadRequest, match="params_too_large|take .* bytes") as err:
        sweep_records.expand(template, spec, "s1", record_bytes=500)
    assert err.value.code == "params_too_large"
    with pytest.raises(BadRequest) as err:
        sweep_records.expand(template, spec, "s1", max_bytes=10_000)
    assert err.value.code == "bad_sweep"
    assert len(sweep_records.expand(template, spec, "s1", record_bytes=64 * 2**10)) == 20


def test_an_exported_index_counts_as_the_final_state_it_will_take():
    from web.sweeps import done_state

    task = new_record("t", "alice", Params(), {"sha256": "a" * 64, "size": 100}, "web1")
    task.state, task.result = State.EXPORTED, "succeeded"
    assert done_state(task) == "succeeded"  # a stalled archiver never holds `pink submit --wait`
    task.result = None
    assert done_state(task) == "exported"
    task.state = State.RUNNING
    assert done_state(task) == "running"
