"""Each container's share of its host (issue 19): the auto rules that size a
runner from the GPUs, memory and cores it finds, explicit values kept as
given, /dev/shm reaching a real container, and the Ansible template writing
every setting a lab tunes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpu_runner import sizing
from gpu_runner.agent import Agent
from gpu_runner.execution import Execution
from gpu_runner.gpus import GPUs
from pink import config as pink_config
from pink.config import RunnerConfig
from pink.tasks import Params, new_record
from tests import images
from tests.ansible.test_ansible import render_pink_toml

GiB = 2**30
MiB = 2**20


# ---------------------------------------------------------------- the rules

def test_auto_fills_an_8_gpu_server_with_a_fair_share_each():
    """DGX A100: 8 GPUs, 2 TiB, 256 threads -> 8 slots of 240 GiB and 32 CPUs."""
    s = sizing.size(RunnerConfig(), gpus=8, ram=2048 * GiB, cores=256)
    assert s.slots == 8
    assert sizing.reserve(2048 * GiB) == 128 * GiB  # RAM/16 on a big host
    assert s.memory == (2048 - 128) * GiB // 8 == 240 * GiB
    assert s.cpus == 32.0
    assert s.shm == 120 * GiB  # half the memory limit
    assert s.slots * s.memory + sizing.reserve(2048 * GiB) <= 2048 * GiB  # the host keeps its reserve


def test_auto_on_a_workstation_and_a_host_without_gpus():
    a6000 = sizing.size(RunnerConfig(), gpus=4, ram=256 * GiB, cores=64)
    assert (a6000.slots, a6000.memory, a6000.cpus) == (4, 60 * GiB, 16.0)  # reserve 16 GiB
    laptop = sizing.size(RunnerConfig(), gpus=0, ram=16 * GiB, cores=8)
    assert (laptop.slots, laptop.memory, laptop.cpus) == (4, 3 * GiB, 2.0)  # 4 slots, as before auto
    assert sizing.reserve(16 * GiB) == 4 * GiB  # at least 4 GiB


def test_auto_cpus_are_at_least_one_core_and_odd_splits_round_down():
    assert sizing.size(RunnerConfig(), gpus=0, ram=16 * GiB, cores=2).cpus == 1.0  # not 0.5
    assert sizing.size(RunnerConfig(), gpus=3, ram=64 * GiB, cores=10).cpus == 3.33
    assert sizing.size(RunnerConfig(), gpus=0, ram=16 * GiB, cores=1).cpus == 1.0


def test_auto_memory_gives_fewer_slots_rather_than_tiny_limits():
    small = sizing.size(RunnerConfig(), gpus=8, ram=6 * GiB, cores=8)
    assert sizing.reserve(6 * GiB) == 3 * GiB  # never over half the RAM
    assert small.slots == 3 and small.memory == GiB
    tiny = sizing.size(RunnerConfig(), gpus=0, ram=GiB, cores=1)
    assert tiny.slots == 1 and 0 < tiny.memory <= GiB // 2


def test_explicit_values_are_kept_as_given():
    r = RunnerConfig(max_containers=4, memory="4g", cpus=2.0, shm_size="256m")
    s = sizing.size(r, gpus=8, ram=2048 * GiB, cores=256)
    assert (s.slots, s.memory, s.cpus, s.shm) == (4, "4g", 2.0, 256 * MiB)
    # as before auto values: fewer slots where memory cannot give each its limit
    assert sizing.size(r, gpus=8, ram=10 * GiB, cores=256).slots == 2
    assert sizing.size(RunnerConfig(max_containers=0, memory="1g"), gpus=0, ram=2 * GiB, cores=4).slots == 2
    # one explicit, the others auto
    mixed = sizing.size(RunnerConfig(max_containers=16), gpus=8, ram=2048 * GiB, cores=256)
    assert (mixed.slots, mixed.memory, mixed.cpus) == (16, 120 * GiB, 16.0)
    assert sizing.size(RunnerConfig(memory="64g"), gpus=8, ram=2048 * GiB, cores=256).shm == 32 * GiB


def test_runner_config_defaults_are_auto():
    r = RunnerConfig()
    assert (r.max_containers, r.memory, r.cpus, r.shm_size) == (0, "auto", 0.0, "auto")
    loaded = pink_config.from_mapping({"runner": {"shm_size": "16g", "memory": "auto", "cpus": 0}})
    assert loaded.runner.shm_size == "16g"


def _agent(runner: RunnerConfig, gpus: list[str], docker_client=None, cores: int = 256):
    """What Agent._slots and Execution._container_args read of the agent."""
    return SimpleNamespace(config=SimpleNamespace(runner=runner), gpus=GPUs(gpus), docker=docker_client,
                           docker_cpus=cores, cpu_cap=None, epoch=7, store=None, lease=None,
                           labels=lambda: {"pink.cluster": "/pink-sizing-test", "pink.node": runner.name})


def test_the_agent_advertises_one_slot_per_gpu(monkeypatch):
    monkeypatch.setattr(sizing, "host_memory", lambda: 2048 * GiB)
    declared = [f"GPU-{i}" for i in range(8)]
    assert Agent._slots(_agent(RunnerConfig(), declared)) == 8  # the node record's max_containers
    assert Agent._slots(_agent(RunnerConfig(), [])) == sizing.NO_GPU_SLOTS
    assert Agent._slots(_agent(RunnerConfig(max_containers=3, memory="4g"), declared)) == 3


# ---------------------------------------------------------------- a real container

def _task(image_id: str):
    return new_record("sizing0001", "alice", Params(cmd=["sh", "-c", "df -k /dev/shm"]),
                      {"image_id": image_id, "sha256": "0" * 64}, "web1")


@pytest.mark.parametrize("shm_size, expected", [("auto", None), ("256m", 256 * MiB)])
def test_shm_size_reaches_the_container(docker_client, shm_size, expected):
    """Created the way the runner creates a task's container: Docker's HostConfig
    carries the size, and the container's /dev/shm is that big."""
    image = images.ensure_busybox_image(docker_client)
    runner = RunnerConfig(name="sizing", shm_size=shm_size)
    agent = _agent(runner, [], docker_client, cores=docker_client.info()["NCPU"])
    execution = Execution(agent, "sizing0001", 1)
    args = execution._container_args(_task(docker_client.images.get(image).id))
    share = sizing.of(agent)
    expected = expected or share.memory // 2
    assert args["shm_size"] == expected
    args["name"] = f"pink-sizing-{shm_size}"
    container = docker_client.containers.create(**args)
    try:
        container.reload()
        host = container.attrs["HostConfig"]
        assert host["ShmSize"] == expected
        assert host["Memory"] == share.memory  # auto: bytes
        assert host["NanoCpus"] == int(min(share.cpus, sizing.usable_cores(agent)) * 1e9)
        container.start()
        assert container.wait(timeout=60)["StatusCode"] == 0
        line = container.logs().decode().splitlines()[-1].split()
        assert int(line[1]) * 1024 == expected  # df -k: the tmpfs's size
    finally:
        container.remove(force=True, v=True)


def test_explicit_limits_go_to_docker_as_given():
    runner = RunnerConfig(name="sizing", memory="512m", cpus=1.0, shm_size="auto")
    agent = _agent(runner, [], cores=1)
    args = Execution(agent, "sizing0001", 1)._container_args(_task("busybox"))
    assert (args["mem_limit"], args["nano_cpus"], args["shm_size"]) == ("512m", 10**9, 256 * MiB)


# ---------------------------------------------------------------- Ansible

def test_the_template_writes_every_runner_setting_a_lab_tunes():
    runner = render_pink_toml()["runner"]
    assert {k: runner[k] for k in ("max_containers", "memory", "cpus", "shm_size")} == \
        {"max_containers": 0, "memory": "auto", "cpus": 0.0, "shm_size": "auto"}
    assert runner["image_cache_bytes"] == 200 * GiB  # not "keep every image for ever"
    assert runner["blob_budget_bytes"] == 200 * GiB
    assert (runner["max_run_seconds"], runner["container_disk"]) == (7 * 24 * 3600, "")
    assert (runner["max_spool_images"], runner["spool_grace"]) == (8, 600.0)
    tuned = render_pink_toml(common_runner_max_containers=4, common_runner_memory="48g",
                             common_runner_cpus=12, common_runner_shm_size="16g",
                             common_runner_max_run_seconds=86400, common_runner_container_disk="100g",
                             common_runner_image_cache_bytes=GiB, common_runner_blob_budget_bytes=2 * GiB,
                             common_runner_max_spool_images=2, common_runner_spool_grace=60)
    r = pink_config.from_mapping(tuned).runner
    assert (r.max_containers, r.memory, r.cpus, r.shm_size) == (4, "48g", 12.0, "16g")
    assert (r.max_run_seconds, r.container_disk, r.image_cache_bytes, r.blob_budget_bytes) == \
        (86400, "100g", GiB, 2 * GiB)
    assert (r.max_spool_images, r.spool_grace) == (2, 60.0)
    s = sizing.size(r, gpus=4, ram=256 * GiB, cores=64)
    assert (s.slots, s.memory, s.cpus, s.shm) == (4, "48g", 12.0, 16 * GiB)


def test_the_shipped_template_fills_an_8_gpu_server():
    r = pink_config.from_mapping(render_pink_toml()).runner
    s = sizing.size(r, gpus=8, ram=1024 * GiB, cores=128)
    assert s.slots == 8 and s.memory == (1024 - 64) * GiB // 8 and s.cpus == 16.0
