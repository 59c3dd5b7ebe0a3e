"""The runner's GPUs: inventory, and how a container is given its reserved ones.

Three modes, reported in the node record: `nvml` (real NVIDIA GPUs found
through nvidia-ml-py: the container gets exactly its devices through a Docker
DeviceRequest), `declared` (UUIDs from the config, for hosts without GPUs and
for tests: only the environment says which), and `none`. Every container, with
GPUs or not, gets `pink.gpu_env.container_env` over the image's and the user's
NVIDIA variables: with nvidia as Docker's default runtime, an image's
NVIDIA_VISIBLE_DEVICES=all would otherwise expose every GPU of the host.
"""

from __future__ import annotations

import logging

from docker.types import DeviceRequest

from pink import gpu_env, platforms

log = logging.getLogger("pink.runner")


def nvml_inventory() -> list[dict]:
    """GPUs NVML reports, or [] without a driver or without nvidia-ml-py."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver: a runner without GPUs is valid
        log.warning("NVML did not start (%s): this runner offers no GPUs; if the host has some, "
                    "check the NVIDIA driver (`nvidia-smi`)", exc)
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            found.append({"index": index, "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                          "model": _text(pynvml.nvmlDeviceGetName(handle)),
                          "memory": pynvml.nvmlDeviceGetMemoryInfo(handle).total})
        return found
    finally:
        pynvml.nvmlShutdown()


def nvml_readings() -> dict[str, dict]:
    """Each GPU's utilisation (0..1) and memory used and total (bytes), by UUID; {} without NVML.

    Published in the node record every STATS_INTERVAL for the nodes page and
    /metrics (see pink.metrics for why through etcd).
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver or no library: nothing to read
        return {}
    try:
        readings = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            readings[_text(pynvml.nvmlDeviceGetUUID(handle))] = {
                "utilization": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100,
                "memory_used": memory.used, "memory_total": memory.total}
        return readings
    except Exception as exc:  # noqa: BLE001 - a GPU fallen off the bus must not stop the runner
        log.warning("NVML readings failed: %s", exc)
        return {}
    finally:
        pynvml.nvmlShutdown()


def nvml_driver() -> dict:
    """The driver's version and the newest CUDA it supports; {} without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver or no library: nothing to report
        return {}
    try:
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # 12040 for 12.4
        return {"driver": _text(pynvml.nvmlSystemGetDriverVersion()), "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}"}
    except Exception as exc:  # noqa: BLE001 - an old driver without the call: nothing said, nothing refused
        log.warning("NVML did not report the driver's CUDA version: %s", exc)
        return {}
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


class GPUs:
    def __init__(self, declared: list[str], declared_cuda: str = ""):
        cuda = platforms.numbers(str(declared_cuda))  # a TOML number (12.2) is taken as written too
        self.driver = {"cuda": ".".join(map(str, cuda))} if declared and cuda else {}
        if declared:
            self.mode = "declared"
            self.inventory = [{"index": i, "uuid": u, "model": "declared", "memory": None}
                              for i, u in enumerate(declared)]
            log.info("using %d declared GPUs (no devices requested from Docker)", len(declared))
        else:
            self.inventory = nvml_inventory()
            self.mode = "nvml" if self.inventory else "none"
            self.driver = nvml_driver() if self.inventory else {}
            log.info("GPU mode %s: %d GPUs", self.mode, len(self.inventory))

    def readings(self) -> dict[str, dict]:
        """Live readings of real GPUs (`nvml` mode); declared GPUs have none."""
        return nvml_readings() if self.mode == "nvml" else {}

    @property
    def uuids(self) -> list[str]:
        return [g["uuid"] for g in self.inventory]

    def container_args(self, assigned: list[str], env: dict[str, str]) -> dict:
        """Docker arguments for a container given `assigned`; overrides the
        NVIDIA variables in `env` (the user's) to match, over any the image sets."""
        env.update(gpu_env.container_env(assigned))
        if self.mode == "nvml" and assigned:
            return {"device_requests": [DeviceRequest(device_ids=assigned, capabilities=[["gpu"]])]}
        return {}
