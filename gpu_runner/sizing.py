"""How much of its host each task's container gets: `[runner]` max_containers,
memory, cpus and shm_size.

Each may be left at its auto value (the defaults), and the runner derives it
from the host it finds, so that one default fits a laptop and an 8-GPU server:

- `max_containers = 0`: one slot per GPU (found through NVML, or declared),
  NO_GPU_SLOTS on a host without GPUs. Placement counts a task of any size
  as one slot, so 8 one-GPU tasks fill an 8-GPU server.
- `memory = "auto"`: the host's memory less a reserve for the host itself
  (dockerd loading and exporting images, the runner, sshd, the page cache),
  shared evenly by the slots; fewer slots where each would get less than
  MIN_MEMORY.
- `cpus = 0`: the cores Docker may use, shared evenly by the slots (at least
  one core: a CPU limit is a ceiling, and a task on a small host may then
  use a whole core while its neighbours idle).
- `shm_size = "auto"`: half the container's memory limit, as a host's own
  /dev/shm is half its memory. Docker's 64 MiB is too small for PyTorch's
  DataLoader workers (they hand batches over through /dev/shm) and NCCL; a
  tmpfs's pages are charged to the container, so /dev/shm never lets a task
  use more memory than its limit.

An explicit value is used as given, as before auto values existed (the slots
are still fewer than max_containers where the host's memory cannot give each
container its `memory`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from docker.utils import parse_bytes

AUTO = "auto"
GiB = 2**30
MiB = 2**20
NO_GPU_SLOTS = 4  # slots of a host without GPUs (tasks without GPUs only)
MIN_RESERVE = 4 * GiB  # the host keeps at least this much of its memory ...
RESERVE_SHARE = 16  # ... or 1/16 of it, whichever is more (never over half)
MIN_MEMORY = GiB  # an auto memory limit is never below this: fewer slots instead


@dataclass(frozen=True)
class Sizing:
    slots: int  # containers at once (the node record's max_containers)
    memory: int | str  # each container's memory limit: bytes, or the configured size as given
    cpus: float  # each container's CPU limit, before Docker's cap (Execution._cpus)
    shm: int  # bytes of each container's /dev/shm


def reserve(ram: int) -> int:
    """The memory an auto `memory` leaves to the host."""
    return min(ram // 2, max(MIN_RESERVE, ram // RESERVE_SHARE))


def size(runner, gpus: int, ram: int, cores: float) -> Sizing:
    """The sizing `runner` (a RunnerConfig) gives on a host with `gpus` GPUs,
    `ram` bytes of memory and `cores` cores Docker may use."""
    wanted = runner.max_containers if runner.max_containers > 0 else (gpus or NO_GPU_SLOTS)
    if _auto(runner.memory):
        usable = ram - reserve(ram)
        slots = max(1, min(wanted, usable // MIN_MEMORY))
        memory = memory_bytes = usable // slots // MiB * MiB
    else:
        memory = runner.memory
        memory_bytes = parse_bytes(memory)
        slots = max(1, min(wanted, ram // memory_bytes))
    if runner.cpus > 0:
        cpus = float(runner.cpus)
    else:
        cpus = max(math.floor(cores * 100 / slots) / 100, min(1.0, float(cores)))
    shm = memory_bytes // 2 if _auto(runner.shm_size) else parse_bytes(runner.shm_size)
    return Sizing(slots=slots, memory=memory, cpus=cpus, shm=shm)


def host_memory() -> int:
    """This host's memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def usable_cores(agent) -> float:
    """The cores Docker takes limits up to (its daemon's, read at the runner's
    start), and where the daemon is this host's, those this process may use
    (a cpuset or `taskset` narrows both)."""
    cores = agent.docker_cpus
    url = agent.config.runner.docker_url
    if not url or url.startswith("unix://"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    return cores


def of(agent) -> Sizing:
    """The sizing of `agent`'s runner on this host."""
    return size(agent.config.runner, len(agent.gpus.uuids), host_memory(), usable_cores(agent))


def _auto(value) -> bool:
    return str(value).strip().lower() in (AUTO, "")
