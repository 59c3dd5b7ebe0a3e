"""What each running task does with its GPUs: sampled, summed up, and an opt-in idle policy.

One sampler thread per runner reads every GPU once per `[runner]
gpu_sample_seconds` (one NVML call per GPU, whatever the number of tasks)
and feeds each running task's tracker the readings of its own GPUs. A
tracker keeps the running sums (`Accumulator`: mean and peak utilisation,
peak memory, idle minutes) and asks the `IdlePolicy` whether a task idle
for long should be warned or stopped; the task's execution polls it and
acts (a `[pink: ...]` line in the log, then a stop like a timeout's).

Readings come from a `ReadingSource`: NVML on a real GPU server, a recorded
file when `[runner] gpu_samples_file` is set (a test hook: declared GPUs
have no NVML), else none, and then nothing is measured: the task reports
no usage ("not measured"), never zeros. Accumulator and policy are pure,
so recorded readings test them without a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Protocol

from pink.config import RunnerConfig
from pink.errors import ConfigError
from pink.gpu_usage import GpuUsage

log = logging.getLogger("pink.runner")

GAP_PERIODS = 3  # a longer pause between two readings (a stalled sampler) counts this many periods at most


@dataclass(frozen=True)
class Reading:
    """One GPU at one moment: NVML's utilization.gpu (percent) and its memory used (bytes)."""

    percent: float
    memory_used: int


class ReadingSource(Protocol):
    def read(self) -> dict[str, Reading]:
        """Every GPU's reading now, by UUID; {} when none could be read."""


class NvmlSource:
    """The runner's real GPUs through NVML, initialised once for the runner's life (each
    read is then one utilisation and one memory call per GPU)."""

    def __init__(self):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handles = {}
        self._failing: set[str] = set()  # GPUs whose last read failed: said once, not every sample
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            self._handles[uuid.decode() if isinstance(uuid, bytes) else uuid] = handle

    def read(self) -> dict[str, Reading]:
        readings = {}
        for uuid, handle in self._handles.items():
            try:
                readings[uuid] = Reading(float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                                         int(self._nvml.nvmlDeviceGetMemoryInfo(handle).used))
            except Exception as exc:  # noqa: BLE001 - a GPU fallen off the bus: its tasks skip this sample
                if uuid not in self._failing:  # a lost GPU stays lost: one line, not one per sample
                    self._failing.add(uuid)
                    log.warning("NVML could not read GPU %s: %s; its tasks' usage skips it until it reads again",
                                uuid, exc)
            else:
                if uuid in self._failing:
                    self._failing.discard(uuid)
                    log.warning("NVML reads GPU %s again", uuid)
        return readings


class RecordedSource:
    """A test hook (`[runner] gpu_samples_file`): readings replayed from a file, one JSON
    object per line (`{"percent": 0, "memory_used": 0}`), the same for every GPU of
    `uuids`, a line per read; the last line repeats once the file is played."""

    def __init__(self, path: str, uuids: list[str]):
        try:
            with open(path, encoding="utf-8") as fh:
                self._lines = [Reading(float(d["percent"]), int(d["memory_used"]))
                               for d in map(json.loads, filter(str.strip, fh))]
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a config mistake: said as one, no traceback
            raise ConfigError(f"[runner] gpu_samples_file {path}: not readable as JSON lines of "
                              f'{{"percent": ..., "memory_used": ...}}: {exc!r}') from None
        self._uuids = list(uuids)
        self._next = 0

    def read(self) -> dict[str, Reading]:
        if not self._lines:
            return {}
        reading = self._lines[min(self._next, len(self._lines) - 1)]
        self._next += 1
        return {uuid: reading for uuid in self._uuids}


class Accumulator:
    """A task's readings summed up as they come: nothing but counters, whatever the run's length.

    Idle time is the time between two readings that both found every GPU of the
    task under `idle_percent`; `streak` is the idle time since the last reading
    that was not, which the idle policy watches.
    """

    def __init__(self, gpus: list[str], idle_percent: float, max_gap: float):
        self.gpus = list(gpus)
        self.idle_percent = idle_percent
        self.max_gap = max_gap
        self.samples = 0
        self._sum = 0.0
        self._readings = 0
        self._peak = 0.0
        self._peak_memory = 0
        self.idle_seconds = 0.0
        self.streak = 0.0
        self._last: tuple[float, bool] | None = None  # the previous sample's time and whether it was idle
        self._first: float | None = None  # the first sample's time: how long the record covers
        self._measured_before = 0.0  # seconds measured by the runner process before a restart

    def feed(self, at: float, readings: Mapping[str, Reading]) -> None:
        """One sample at `at` (seconds, monotonic): skipped unless every GPU of the task was read."""
        mine = [readings[uuid] for uuid in self.gpus if uuid in readings]
        if not mine or len(mine) < len(self.gpus):
            return
        self.samples += 1
        if self._first is None:
            self._first = at
        self._sum += sum(r.percent for r in mine)
        self._readings += len(mine)
        self._peak = max(self._peak, *(r.percent for r in mine))
        self._peak_memory = max(self._peak_memory, *(r.memory_used for r in mine))
        idle = all(r.percent < self.idle_percent for r in mine)
        if not idle:
            self.streak = 0.0
        elif self._last is not None and self._last[1]:
            gap = min(max(0.0, at - self._last[0]), self.max_gap)
            self.idle_seconds += gap
            self.streak += gap
        self._last = (at, idle)

    def usage(self) -> GpuUsage | None:
        """The summary; None when no sample was taken (nothing measured)."""
        if not self.samples:
            return None
        return GpuUsage(mean_percent=round(self._sum / self._readings, 1), peak_percent=round(self._peak, 1),
                        peak_memory_bytes=self._peak_memory, idle_minutes=round(self.idle_seconds / 60, 2),
                        samples=self.samples, measured_seconds=round(self._measured(), 1))

    def _measured(self) -> float:
        return self._measured_before + (self._last[0] - self._first if self._first is not None else 0.0)

    # The counters survive a runner restart that adopts the container through a small file
    # (`Tracker.save`); monotonic times do not cross processes, so the restarted count goes on
    # from the first reading after it, and the idle streak starts again (a fresh warning).
    _SAVED = ("samples", "_sum", "_readings", "_peak", "_peak_memory", "idle_seconds")

    def state(self) -> dict:
        return {**{name: getattr(self, name) for name in self._SAVED}, "measured_seconds": self._measured()}

    def restore(self, state: dict) -> None:
        for name in self._SAVED:
            setattr(self, name, type(getattr(self, name))(state[name]))
        self._measured_before = float(state["measured_seconds"])


class Action(str, Enum):
    WARN = "warn"  # say in the task's log that it will be stopped
    STOP = "stop"  # stop it as at a deadline, its output kept


@dataclass(frozen=True)
class IdlePolicy:
    """`[runner] idle_minutes` (0: off) and `idle_grace_minutes`, in seconds: a task whose
    GPUs all stay idle `idle_seconds` is warned, and stopped once idle a grace longer than
    when the warning reached its log. A written warning always comes first, so a task is
    never stopped without one in its log. (No defaults: `RunnerConfig` holds them.)"""

    idle_seconds: float
    grace_seconds: float
    idle_percent: float

    @classmethod
    def of(cls, runner: RunnerConfig) -> "IdlePolicy":
        return cls(runner.idle_minutes * 60, runner.idle_grace_minutes * 60, runner.idle_gpu_percent)

    def action(self, streak: float, warned_at: float | None) -> Action | None:
        """What an idle streak of `streak` seconds calls for; `warned_at`: the streak when the
        warning was written to the log (None: not yet), so a late warning still gets its grace."""
        if not self.idle_seconds or streak < self.idle_seconds:
            return None
        if warned_at is None:
            return Action.WARN
        return Action.STOP if streak >= max(self.idle_seconds, warned_at) + self.grace_seconds else None

    def warning(self) -> str:
        """The log line, on lines of its own: the task's own output may stop mid-line."""
        return (f"\n[pink: this task's GPUs have been under {self.idle_percent:g}% for "
                f"{self.idle_seconds / 60:g} minutes; it will be stopped, its output kept, if they stay "
                f"idle {self.grace_seconds / 60:g} minutes more]\n")

    def reason(self) -> str:
        return (f"stopped: its GPUs stayed under {self.idle_percent:g}% for "
                f"{(self.idle_seconds + self.grace_seconds) / 60:g} minutes")


class Tracker:
    """One running task's accumulator and its pending policy action; fed by the sampler
    thread, read by the task's execution.

    The warning is the execution's to write: `take()` hands it over, `delivered()` says it
    is in the log, and only then may a stop follow (the sampler may run ahead of a slow
    execution, which must never find a stop where a warning was due)."""

    def __init__(self, gpus: list[str], policy: IdlePolicy, max_gap: float, state_path: str | None = None):
        self._lock = threading.Lock()
        self._acc = Accumulator(gpus, policy.idle_percent, max_gap)
        self.state_path = state_path  # where the counters are kept for a restarted runner; None: nowhere
        self._policy = policy
        self._spell = 0  # counts idle spells, so a warning taken in one is not delivered into the next
        self._warning_out = False  # a warning of this spell is pending or being written
        self._taken_in: int | None = None  # the spell whose warning the execution took
        self._warned_at: float | None = None  # the streak when this spell's warning was written
        self._pending: Action | None = None

    def feed(self, at: float, readings: Mapping[str, Reading]) -> None:
        with self._lock:
            self._acc.feed(at, readings)
            if not self._acc.streak:  # used again: a later idle spell is warned anew
                if self._warning_out or self._warned_at is not None:
                    self._spell += 1
                self._warning_out, self._warned_at = False, None
                if self._pending is Action.WARN:
                    self._pending = None  # not idle any more: nothing to warn of
            action = self._policy.action(self._acc.streak, self._warned_at)
            if action is Action.WARN and not self._warning_out:
                self._pending, self._warning_out = action, True
            elif action is Action.STOP:
                self._pending = action

    def take(self) -> Action | None:
        """The action due, once (a stop stays due until the task ends)."""
        with self._lock:
            action = self._pending
            if action is Action.WARN:
                self._pending, self._taken_in = None, self._spell
            return action

    def delivered(self) -> None:
        """The warning taken is in the task's log: its grace starts now."""
        with self._lock:
            if self._taken_in == self._spell and self._warning_out:
                self._warned_at = self._acc.streak

    def usage(self) -> GpuUsage | None:
        with self._lock:
            return self._acc.usage()

    def save(self) -> None:
        """The counters into `state_path` (whole or not at all: a restart may come mid-write)."""
        if self.state_path is None:
            return
        with self._lock:
            state = self._acc.state()
        part = self.state_path + ".part"
        with open(part, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(part, self.state_path)

    def load(self) -> bool:
        """The counters a runner process before this one saved; False where there are none."""
        try:
            with open(self.state_path, encoding="utf-8") as fh:
                state = json.load(fh)
            with self._lock:
                self._acc.restore(state)
            return True
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:  # measured anew, not failed
            log.warning("GPU usage counters in %s unreadable (%s): counting from now", self.state_path, exc)
            return False

    def forget(self) -> None:
        if self.state_path is not None:
            for path in (self.state_path, self.state_path + ".part"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


class Sampler:
    """The runner's one sampling thread and its running tasks' trackers."""

    def __init__(self, source: ReadingSource | None, policy: IdlePolicy, period: float):
        self.source = source
        self.policy = policy
        self.period = period
        self._trackers: dict[str, Tracker] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, runner: RunnerConfig, gpu_mode: str, uuids: list[str], nvml=None) -> "Sampler":
        """NVML on real GPUs, the recorded file when the test hook is set, else nothing to sample
        (`nvml`: what opens NVML, `NvmlSource` unless a test gives a source of its own)."""
        source: ReadingSource | None = None
        if runner.gpu_samples_file:
            source = RecordedSource(runner.gpu_samples_file, uuids)
            # said loudly: a production runner with the test hook on would report made-up usage
            log.warning("GPU usage is replayed from %s ([runner] gpu_samples_file, a test hook), not measured",
                        runner.gpu_samples_file)
        elif gpu_mode == "nvml":
            try:
                source = (nvml or NvmlSource)()
            except Exception as exc:  # noqa: BLE001 - tasks still run, their usage not measured
                log.warning("NVML did not start for sampling (%s): GPU usage is not measured", exc)
        return cls(source, IdlePolicy.of(runner), runner.gpu_sample_seconds)

    @property
    def measures(self) -> bool:
        return self.source is not None

    def start(self, stop: threading.Event) -> None:
        if self.measures:
            threading.Thread(target=self._loop, args=(stop,), name="gpu-sampler", daemon=True).start()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.period):
            try:
                self.sample(time.monotonic())
            except Exception:  # noqa: BLE001 - the thread must outlive a bad reading
                log.exception("GPU sampling failed; trying again")

    def sample(self, at: float) -> None:
        """Read every GPU once (only while a task is watched) and feed each task its own."""
        with self._lock:
            trackers = list(self._trackers.values())
        if trackers:
            readings = self.source.read()
            for tracker in trackers:
                tracker.feed(at, readings)
                try:
                    tracker.save()
                except OSError as exc:  # a full outbox disk: the count goes on in memory
                    log.debug("could not save GPU usage counters to %s: %s", tracker.state_path, exc)

    def _read_for(self, tracker: Tracker) -> None:
        """One reading for one task at its start or end, so a run shorter than a period is
        measured too; a failed read leaves it to the sampler's."""
        try:
            tracker.feed(time.monotonic(), self.source.read())
        except Exception:  # noqa: BLE001 - never fails the task
            log.exception("GPU reading failed")

    def watch(self, task_id: str, gpus: list[str], state_path: str | None = None) -> Tracker | None:
        """Start tracking a task's GPUs; None when it has none or nothing is measured here.
        `state_path`: where its counters are kept, loaded back when a runner restart adopted it."""
        if not self.measures or not gpus:
            return None
        with self._lock:
            tracker = self._trackers.get(task_id)
            new = tracker is None
            if new:
                tracker = Tracker(gpus, self.policy, self.period * GAP_PERIODS, state_path)
                if state_path is not None and tracker.load():
                    log.info("task %s: GPU usage counted on from %s (adopted)", task_id, state_path)
                self._trackers[task_id] = tracker
        if new:
            self._read_for(tracker)
        return tracker

    def finish(self, task_id: str) -> GpuUsage | None:
        """Stop tracking the task; its usage, None if it was not measured."""
        with self._lock:
            tracker = self._trackers.pop(task_id, None)
        if tracker is None:
            return None
        self._read_for(tracker)
        tracker.forget()  # reported now: a later process must not count it again
        return tracker.usage()
