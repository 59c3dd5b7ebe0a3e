"""The runner's GPUs: inventory, and how a container is given its reserved ones.

Three modes, reported in the node record: `nvml` (real NVIDIA GPUs found
through nvidia-ml-py: the container gets exactly its devices through a Docker
DeviceRequest), `declared` (UUIDs from the config, for hosts without GPUs and
for tests: only NVIDIA_VISIBLE_DEVICES is set), and `none`.
"""

from __future__ import annotations

import logging

from docker.types import DeviceRequest

log = logging.getLogger("pink.runner")


def nvml_inventory() -> list[dict]:
    """GPUs NVML reports, or [] without a driver or without nvidia-ml-py."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: a runner without GPUs is valid
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


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


class GPUs:
    def __init__(self, declared: list[str]):
        if declared:
            self.mode = "declared"
            self.inventory = [{"index": i, "uuid": u, "model": "declared", "memory": None}
                              for i, u in enumerate(declared)]
            log.info("using %d declared GPUs (no devices requested from Docker)", len(declared))
        else:
            self.inventory = nvml_inventory()
            self.mode = "nvml" if self.inventory else "none"
            log.info("GPU mode %s: %d GPUs", self.mode, len(self.inventory))

    @property
    def uuids(self) -> list[str]:
        return [g["uuid"] for g in self.inventory]

    def container_args(self, assigned: list[str], env: dict) -> dict:
        """Docker arguments for a container given `assigned`; sets env to match."""
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(assigned) if assigned else "void"
        if self.mode == "nvml" and assigned:
            return {"device_requests": [DeviceRequest(device_ids=assigned, capabilities=[["gpu"]])]}
        return {}
