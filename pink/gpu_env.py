"""The NVIDIA variables PINK owns in every task's environment, so that GPU
access cannot be widened by the image's ENV (NGC images set
NVIDIA_VISIBLE_DEVICES=all) nor by the user's `env` at submit.

Docker puts a container's environment above its image config's ENV, and the
nvidia-container-toolkit reads the result, so what `container_env` returns
wins. `pink.tasks.Params.parse` refuses user env naming a `NEUTRAL` variable;
`gpu_runner.gpus` sets `container_env` on every container. No Docker imports.
"""

from __future__ import annotations

from collections.abc import Mapping

# Set from the task's assignment. A user may pass them (`-e
# NVIDIA_VISIBLE_DEVICES=all` out of NGC habit): accepted, and PINK's value wins.
ASSIGNED = ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")
# What CUDA work needs; `all` would add graphics, video and display, which mount more of the host.
DRIVER_CAPABILITIES = "compute,utility"

# Variables that only ever widen access, each with the value the toolkit treats
# as unset. Empty for all of them, read from the toolkit's sources:
# - MIG_CONFIG/MIG_MONITOR_DEVICES: `all` hands the container the MIG config or
#   monitor control devices; any non-empty value (even `void`) makes the legacy
#   hook refuse an unprivileged container. Empty is the same as unset.
# - IMEX_CHANNELS: parsed like NVIDIA_VISIBLE_DEVICES; empty reads as `void`.
# - GDS, MOFED, NVSWITCH, GDRCOPY: feature gates that inject their host devices
#   (nvidia-fs, InfiniBand, NVSwitch, gdrdrv) only for the exact value `enabled`.
NEUTRAL = {
    "NVIDIA_MIG_CONFIG_DEVICES": "",
    "NVIDIA_MIG_MONITOR_DEVICES": "",
    "NVIDIA_IMEX_CHANNELS": "",
    "NVIDIA_GDS": "",
    "NVIDIA_MOFED": "",
    "NVIDIA_NVSWITCH": "",
    "NVIDIA_GDRCOPY": "",
}


def container_env(assigned: list[str]) -> dict[str, str]:
    """The variables a container given `assigned` (GPU UUIDs) must see.

    With no GPU, NVIDIA_VISIBLE_DEVICES is `void` (the toolkit behaves as
    runc: no device, no driver library) and CUDA_VISIBLE_DEVICES is empty (CUDA
    sees none). Otherwise both list the UUIDs: CUDA accepts `GPU-<uuid>` entries,
    so even a runtime that exposed more devices would not let CUDA use them.
    """
    ids = ",".join(assigned)
    return {"NVIDIA_VISIBLE_DEVICES": ids or "void", "CUDA_VISIBLE_DEVICES": ids,
            "NVIDIA_DRIVER_CAPABILITIES": DRIVER_CAPABILITIES, **NEUTRAL}


def widening(env: Mapping[str, str]) -> list[str]:
    """The names in a user's `env` that PINK refuses: they could only widen access."""
    return sorted(name for name in env if name in NEUTRAL)
