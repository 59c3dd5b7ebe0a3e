"""GPU inventory modes, without services: declared GPUs only set the environment,
which overrides the NVIDIA variables the user (or the image) set."""

from __future__ import annotations

from gpu_runner.gpus import GPUs, nvml_inventory
from pink.gpu_env import NEUTRAL


def test_declared_gpus_set_only_the_environment():
    gpus = GPUs(["GPU-a", "GPU-b"])
    assert gpus.mode == "declared" and gpus.uuids == ["GPU-a", "GPU-b"]
    env = {"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VISIBLE_DEVICES": "0,1", "MINE": "kept"}
    assert gpus.container_args(["GPU-b"], env) == {}  # no device requested from Docker
    assert env == {"NVIDIA_VISIBLE_DEVICES": "GPU-b", "CUDA_VISIBLE_DEVICES": "GPU-b",
                   "NVIDIA_DRIVER_CAPABILITIES": "compute,utility", "MINE": "kept", **NEUTRAL}


def test_no_gpus_means_no_devices_visible():
    gpus = GPUs([])
    env = {}
    gpus.container_args([], env)
    assert (env["NVIDIA_VISIBLE_DEVICES"], env["CUDA_VISIBLE_DEVICES"]) == ("void", "")
    if not nvml_inventory():  # no NVIDIA driver on this machine
        assert gpus.mode == "none" and gpus.uuids == []


def test_real_gpus_are_requested_by_uuid():
    gpus = GPUs([])
    gpus.mode, gpus.inventory = "nvml", [{"index": 0, "uuid": "GPU-x", "model": "m", "memory": 1}]
    env = {}
    args = gpus.container_args(["GPU-x"], env)
    request = args["device_requests"][0]
    assert request["DeviceIDs"] == ["GPU-x"] and request["Capabilities"] == [["gpu"]]
    assert env["NVIDIA_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"] == "GPU-x"
