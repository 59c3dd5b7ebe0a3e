"""GPU usage on the runner from recorded readings: the sums a task reports, the idle
policy's warning and stop, and "not measured" where nothing reads the GPUs (no NVML)."""

from __future__ import annotations

import json
import logging

import pytest

from gpu_runner.usage import Accumulator, Action, IdlePolicy, NvmlSource, Reading, RecordedSource, Sampler, Tracker
from pink.config import RunnerConfig
from pink.errors import ConfigError
from pink.gpu_usage import GpuUsage

GiB = 2**30
A, B = "GPU-a", "GPU-b"


def readings(*per_gpu: tuple[float, int], uuids=(A, B)) -> dict[str, Reading]:
    return {uuid: Reading(percent, memory) for uuid, (percent, memory) in zip(uuids, per_gpu)}


def test_mean_peak_memory_and_idle_minutes_of_two_gpus():
    acc = Accumulator([A, B], idle_percent=5, max_gap=15)
    recorded = [  # (seconds, (GPU a), (GPU b)), one reading every 5 s
        (0, (90, 10 * GiB), (70, 8 * GiB)),
        (5, (100, 12 * GiB), (80, 9 * GiB)),
        (10, (2, 12 * GiB), (0, 9 * GiB)),  # both idle from here...
        (15, (1, 12 * GiB), (3, 9 * GiB)),
        (20, (0, 12 * GiB), (4, 9 * GiB)),  # ...10 s idle in all
        (25, (0, 12 * GiB), (50, 9 * GiB)),  # one GPU busy: not idle
    ]
    for at, a, b in recorded:
        acc.feed(at, readings(a, b))
    usage = acc.usage()
    assert usage == GpuUsage(mean_percent=round((90 + 70 + 100 + 80 + 2 + 0 + 1 + 3 + 0 + 4 + 0 + 50) / 12, 1),
                             peak_percent=100, peak_memory_bytes=12 * GiB, idle_minutes=round(10 / 60, 2), samples=6,
                             measured_seconds=25)
    assert acc.streak == 0


def test_a_sample_missing_one_of_the_tasks_gpus_is_skipped_and_a_stall_counts_little():
    acc = Accumulator([A, B], idle_percent=5, max_gap=15)
    acc.feed(0, readings((0, 1)))  # GPU b unread (NVML failed for it)
    assert acc.usage() is None  # nothing measured: None, not zeros
    acc.feed(10, readings((0, 1), (0, 1)))
    acc.feed(300, readings((0, 1), (0, 1)))  # the sampler stalled: at most max_gap counted
    assert (acc.samples, acc.idle_seconds) == (2, 15)


def test_other_gpus_readings_do_not_count():
    acc = Accumulator([A], idle_percent=5, max_gap=15)
    acc.feed(0, {A: Reading(40, GiB), "GPU-other": Reading(100, 70 * GiB)})
    assert acc.usage() == GpuUsage(40, 40, GiB, 0, 1, 0)


@pytest.mark.parametrize("streak,warned_at,action", [
    (0, None, None), (59, None, None), (60, None, Action.WARN), (60, 60, None),
    (89, 60, None), (90, 60, Action.STOP), (500, None, Action.WARN),  # warned before it is ever stopped
    (120, 100, None), (130, 100, Action.STOP),  # a late warning still gets its whole grace
])
def test_the_idle_policy_warns_then_stops_after_the_grace(streak, warned_at, action):
    assert IdlePolicy(idle_seconds=60, grace_seconds=30, idle_percent=5).action(streak, warned_at) is action


def test_the_idle_policy_is_off_by_default():
    policy = IdlePolicy.of(RunnerConfig())
    assert policy.idle_seconds == 0 and policy.action(10**6, 0) is None
    assert RunnerConfig().idle_gpu_percent == 5.0 and RunnerConfig().idle_grace_minutes == 10.0


def policy(idle, grace) -> IdlePolicy:
    return IdlePolicy(idle_seconds=idle, grace_seconds=grace, idle_percent=5)


def _run(tracker, sample, at):
    """The execution's part: take the action due and, for a warning, write it (delivered)."""
    tracker.feed(at, sample)
    action = tracker.take()
    if action is Action.WARN:
        tracker.delivered()
    return action


def test_a_tracker_warns_once_then_stops_an_idle_task():
    tracker = Tracker([A], policy(10, 10), max_gap=15)
    taken = [_run(tracker, {A: Reading(0, GiB)}, at) for at in range(0, 30, 5)]
    assert taken == [None, None, Action.WARN, None, Action.STOP, Action.STOP]


def test_a_lagging_execution_is_never_stopped_before_its_warning_is_written():
    """The sampler runs on while the execution has not taken the warning: what it then takes is
    the warning, not a stop, and the stop waits for the grace after it was written."""
    tracker = Tracker([A], policy(10, 10), max_gap=15)
    for at in range(0, 60, 5):  # 55 s idle, far past warning and grace, nothing taken
        tracker.feed(at, {A: Reading(0, GiB)})
    assert tracker.take() is Action.WARN
    tracker.feed(60, {A: Reading(0, GiB)})
    assert tracker.take() is None  # taken, not yet written: no second warning, no stop
    tracker.delivered()  # written at a 60 s streak
    tracker.feed(65, {A: Reading(0, GiB)})
    assert tracker.take() is None  # the grace runs from the warning
    tracker.feed(70, {A: Reading(0, GiB)})
    assert tracker.take() is Action.STOP


def test_a_warning_not_taken_is_dropped_when_the_gpus_work_again():
    tracker = Tracker([A], policy(10, 10), max_gap=15)
    for at in (0, 5, 10):
        tracker.feed(at, {A: Reading(0, GiB)})
    tracker.feed(15, {A: Reading(90, GiB)})
    assert tracker.take() is None  # busy again before it was taken: nothing to warn of
    for at in (20, 25, 30, 35, 40):  # a new spell, warned but the warning never written...
        tracker.feed(at, {A: Reading(0, GiB)})
    assert tracker.take() is Action.WARN
    tracker.feed(45, {A: Reading(80, GiB)})
    tracker.delivered()  # ...written only after the GPU worked again: it counts for nothing
    for at in (50, 55, 60, 65, 70):
        tracker.feed(at, {A: Reading(0, GiB)})
    assert tracker.take() is Action.WARN  # this spell is warned before any stop


def test_a_task_that_uses_its_gpus_again_is_warned_anew_later():
    tracker = Tracker([A], policy(10, 100), max_gap=15)
    busy, idle = {A: Reading(90, GiB)}, {A: Reading(0, GiB)}
    taken = [_run(tracker, sample, at * 5) for at, sample in enumerate([idle, idle, idle, busy, idle, idle, idle])]
    assert taken == [None, None, Action.WARN, None, None, None, Action.WARN]  # the second idle spell too
    assert tracker.usage().idle_minutes == round(20 / 60, 2)


def test_the_messages_say_the_limits():
    policy = IdlePolicy(idle_seconds=30 * 60, grace_seconds=10 * 60, idle_percent=5)
    assert policy.warning().startswith("\n[pink: ") and policy.warning().endswith("]\n")  # lines of its own
    assert "under 5% for 30 minutes" in policy.warning()
    assert "10 minutes more" in policy.warning()
    assert policy.reason() == "stopped: its GPUs stayed under 5% for 40 minutes"


def test_without_nvml_nothing_is_measured():
    """Declared GPUs (the dev cluster) or no GPUs: the sampler has no source, tasks report None."""
    sampler = Sampler.of(RunnerConfig(gpus=["GPU-declared-0"]), "declared", ["GPU-declared-0"])
    assert not sampler.measures
    assert sampler.watch("t1", ["GPU-declared-0"]) is None and sampler.finish("t1") is None


class Counted:
    """A reading source that counts its reads (always 80%, 1 GiB), or raises on `fail`."""

    def __init__(self, fail: Exception | None = None):
        if fail is not None:
            raise fail
        self.reads = 0

    def read(self):
        self.reads += 1
        return {A: Reading(80, GiB), B: Reading(80, GiB)}


def test_one_sampler_reads_once_for_every_task_and_a_task_without_gpus_is_not_measured():
    sampler = Sampler(Counted(), IdlePolicy.of(RunnerConfig()), 5)
    assert sampler.measures
    one, two = sampler.watch("t1", [A]), sampler.watch("t2", [A, B])  # one reading each as it starts
    assert sampler.watch("t3", []) is None and sampler.source.reads == 2
    for at in (10**6, 10**6 + 5, 10**6 + 10):
        sampler.sample(at)
    assert sampler.source.reads == 5  # one read per sample, whatever the number of tasks
    assert sampler.finish("t1").samples == 5  # its start, three samples, its end
    assert two.usage().samples == 4 and one is not two
    assert sampler.finish("t1") is None  # finished once


def test_a_task_shorter_than_a_period_is_measured_by_its_start_and_end_readings():
    sampler = Sampler(Counted(), IdlePolicy.of(RunnerConfig()), 3600)
    sampler.watch("quick", [A])
    usage = sampler.finish("quick")
    assert (usage.samples, usage.mean_percent, usage.peak_memory_bytes) == (2, 80, GiB)


def test_nvml_that_does_not_start_leaves_usage_not_measured_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pink.runner"):
        sampler = Sampler.of(RunnerConfig(), "nvml", [A], nvml=lambda: Counted(fail=OSError("NVML_ERROR_LIB")))
    assert not sampler.measures and sampler.watch("t1", [A]) is None and sampler.finish("t1") is None
    assert "NVML did not start for sampling (NVML_ERROR_LIB): GPU usage is not measured" in caplog.text


def test_a_lost_gpu_is_logged_when_it_fails_and_when_it_returns_not_every_sample(caplog):
    """NvmlSource over a stand-in for pynvml's calls: GPU b fails three reads, then reads again."""
    class Nvml:
        failing = 3

        def nvmlDeviceGetUtilizationRates(self, handle):
            if handle == "b" and Nvml.failing:
                Nvml.failing -= 1
                raise RuntimeError("GPU is lost")
            return type("U", (), {"gpu": 50})

        def nvmlDeviceGetMemoryInfo(self, handle):
            return type("M", (), {"used": GiB})

    source = NvmlSource.__new__(NvmlSource)  # its handles set here: no NVML on the test machine
    source._nvml, source._handles, source._failing = Nvml(), {A: "a", B: "b"}, set()
    with caplog.at_level(logging.WARNING, logger="pink.runner"):
        got = [sorted(source.read()) for _ in range(5)]
    assert got == [[A]] * 3 + [[A, B]] * 2
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"NVML could not read GPU {B}",
                                                                      f"NVML reads GPU {B} again"]


@pytest.mark.parametrize("settings,says", [
    ({"gpu_sample_seconds": 0}, "gpu_sample_seconds must be above 0"),
    ({"idle_gpu_percent": 0}, "idle_gpu_percent must be above 0 and at most 100"),
    ({"idle_gpu_percent": 101}, "idle_gpu_percent must be above 0 and at most 100"),
    ({"idle_minutes": 0.1, "gpu_sample_seconds": 5}, "idle_minutes must be 0 (off) or at least two"),
    ({"idle_minutes": -1}, "idle_minutes must be a number"),
    ({"idle_minutes": 30, "idle_grace_minutes": 0}, "idle_grace_minutes must be at least one"),
    ({"gpu_samples_file": "/s.jsonl"}, "gpu_samples_file is a test hook for declared GPUs"),
])
def test_bad_runner_gpu_usage_settings_are_refused(settings, says):
    with pytest.raises(ConfigError, match="\\[runner\\]") as refused:
        RunnerConfig(**settings)
    assert says in str(refused.value)


def test_good_runner_gpu_usage_settings_pass():
    RunnerConfig(idle_minutes=0, idle_grace_minutes=0)  # off: the grace does not matter
    RunnerConfig(idle_minutes=10 / 60, gpu_sample_seconds=5, idle_grace_minutes=5 / 60, idle_gpu_percent=100)
    RunnerConfig(gpus=[A], gpu_samples_file="/s.jsonl")


def test_a_bad_samples_file_is_a_config_error_and_an_active_one_a_warning(tmp_path, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"percent": 1}\n')
    with pytest.raises(ConfigError, match="gpu_samples_file"):
        Sampler.of(RunnerConfig(gpus=[A], gpu_samples_file=str(bad)), "declared", [A])
    with pytest.raises(ConfigError, match="gpu_samples_file"):
        Sampler.of(RunnerConfig(gpus=[A], gpu_samples_file=str(tmp_path / "none")), "declared", [A])
    good = tmp_path / "good.jsonl"
    good.write_text('{"percent": 1, "memory_used": 2}\n')
    with caplog.at_level(logging.WARNING, logger="pink.runner"):
        assert Sampler.of(RunnerConfig(gpus=[A], gpu_samples_file=str(good)), "declared", [A]).measures
    assert "a test hook" in caplog.text


def test_a_recorded_source_replays_its_lines_for_every_gpu(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"percent": 3, "memory_used": 7}\n\n{"percent": 9, "memory_used": 8}\n')
    source = RecordedSource(str(path), [A, B])
    assert source.read() == {A: Reading(3, 7), B: Reading(3, 7)}
    assert source.read() == source.read() == {A: Reading(9, 8), B: Reading(9, 8)}


def test_a_restarted_runner_adopting_a_task_counts_on_from_the_saved_counters(tmp_path):
    """The counters are saved beside the attempt's outbox files at each sample; the next runner
    process, adopting the container, loads them: one record for the whole run."""
    kept = tmp_path / "abc-1.gpu-usage.json"
    before = Sampler(Counted(), IdlePolicy.of(RunnerConfig()), 5)
    before.watch("abc", [A], str(kept))  # a reading at the start
    for at in (10**6, 10**6 + 5, 10**6 + 10):
        before.sample(at)
    assert json.loads(kept.read_text())["samples"] == 4  # the process dies here: no finish
    after = Sampler(Counted(), IdlePolicy.of(RunnerConfig()), 5)
    after.watch("abc", [A], str(kept))  # adopted: counts on, plus its own first reading
    after.sample(2 * 10**6)
    usage = after.finish("abc")
    assert (usage.samples, usage.mean_percent) == (7, 80)
    assert usage.measured_seconds >= 10  # the time measured before the restart is kept
    assert not kept.exists()  # reported: nobody counts it again


def test_unreadable_saved_counters_count_from_now(tmp_path, caplog):
    kept = tmp_path / "abc-1.gpu-usage.json"
    kept.write_text("{not json")
    sampler = Sampler(Counted(), IdlePolicy.of(RunnerConfig()), 5)
    with caplog.at_level(logging.WARNING, logger="pink.runner"):
        sampler.watch("abc", [A], str(kept))
    assert sampler.finish("abc").samples == 2 and "counting from now" in caplog.text
