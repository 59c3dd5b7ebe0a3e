"""How much a task really used its GPUs: the record the runner reports and the archive keeps.

A task holds its GPUs whether it computes on them or not; a lab wants to
know which. The runner samples NVML for each running task's GPUs
(`gpu_runner.usage`) and reports a `GpuUsage` with the result; `Task.gpu_usage`
carries it into the archive and the API. A task whose GPUs could not be
measured (declared GPUs without NVML, a task without GPUs) has None, shown
as "not measured": zeros would read as "idle", which nobody measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

NOT_MEASURED = "not measured"  # what the CLI and the pages say for None


@dataclass(frozen=True)
class GpuUsage:
    """A task's GPU use over its run, from `samples` NVML readings of its GPUs.

    Percentages are NVML's utilization.gpu (the share of time a kernel ran);
    `mean_percent` averages every reading of every GPU, `peak_percent` is the
    highest one GPU reached, `peak_memory_bytes` the most memory one GPU of the
    task held, `idle_minutes` the time all its GPUs stayed under the runner's
    `idle_gpu_percent` together, `measured_seconds` the time from the first reading to the
    last: less than the run's when the runner restarted meanwhile (the count starts again).
    """

    mean_percent: float
    peak_percent: float
    peak_memory_bytes: int
    idle_minutes: float
    samples: int
    measured_seconds: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data) -> "GpuUsage | None":
        """The record from its JSON; None for none (or a shape this version cannot read)."""
        if not isinstance(data, dict) or not set(_TYPES) <= set(data):
            return None
        try:  # JSON from etcd or the archive: "1" or 1.0 where an int is due must not reach the sums
            return cls(**{name: kind(data[name]) for name, kind in _TYPES.items()})
        except (TypeError, ValueError, OverflowError):
            return None


_TYPES = {f.name: {"int": int, "float": float}[f.type] for f in fields(GpuUsage)}

