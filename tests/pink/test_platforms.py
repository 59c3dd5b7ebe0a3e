"""`pink.platforms`: what an image config asks of a runner, and when no
reporting runner can give it (pure logic, no services)."""

from __future__ import annotations

import pytest

from pink import platforms
from pink.platforms import Needs

# The env of an official nvidia/cuda:12.4 image: CUDA 12.4, or a datacenter
# driver branch its forward compatibility covers.
CUDA_12_4 = "NVIDIA_REQUIRE_CUDA=cuda>=12.4 brand=tesla,driver>=470,driver<471 brand=tesla,driver>=535,driver<536"


def config(arch="amd64", os_name="linux", env=None) -> dict:
    return {"architecture": arch, "os": os_name, "config": {"Env": env or []}}


def runner(cuda="12.2", driver="535.104.05", gpus=2, platform="linux/amd64") -> dict:
    return {"platform": platform, "gpus": [f"g{i}" for i in range(gpus)], "cuda": cuda, "driver": driver}


@pytest.mark.parametrize("env,shown", [
    ([CUDA_12_4], "12.4"),
    (["CUDA_VERSION=11.8.0"], "11.8"),
    (["CUDA_VERSION=11.8.0", "NVIDIA_REQUIRE_CUDA=cuda>=12.1"], "12.1"),  # the toolkit's check wins
    (["NVIDIA_REQUIRE_CUDA=cuda>=12.4", "NVIDIA_DISABLE_REQUIRE=1"], None),
    (["PATH=/bin", "CUDA_VERSION=", "NVIDIA_REQUIRE_CUDA=brand=tesla"], None),
    ([], None),
])
def test_an_image_states_its_cuda_need_the_way_the_nvidia_toolkit_reads_it(env, shown):
    needs = platforms.of_config(config(env=env))
    assert (needs.platform, needs.cuda_shown) == ("linux/amd64", shown)


@pytest.mark.parametrize("hostile", [
    {}, {"architecture": 5}, {"config": "x"}, {"config": {"Env": "A=1"}},
    {"os": "linux", "architecture": "", "config": {"Env": [7, None, "=x"]}},
    {"os": "linux", "architecture": "a" * 10**6},  # would be copied into the task record
    config(env=["NVIDIA_REQUIRE_CUDA=cuda>=" + "1" * 5000 + ".1"]),  # int() of 5000 digits raises
    config(env=["CUDA_VERSION=" + "9" * 5000]),
    config(env=["CUDA_VERSION=\u0661\u0662.\u0663"]),  # Arabic-Indic digits are no version
])
def test_a_config_that_says_nothing_usable_needs_nothing(hostile):
    needs = platforms.of_config(hostile)
    assert needs.cuda_shown is None and needs.to_json()["cuda"] is None
    assert needs.platform in (None, "linux/amd64")


def test_docker_names_its_machine_as_uname_does_and_images_as_go_does():
    assert platforms.platform_of("linux", "x86_64") == "linux/amd64"
    assert platforms.platform_of("linux", "aarch64") == "linux/arm64"
    assert platforms.platform_of("linux", "riscv64") == "linux/riscv64"
    assert platforms.platform_of(None, "x86_64") is None


def test_an_image_for_another_platform_is_refused_naming_both():
    why = platforms.refusal(Needs("linux/arm64"), 0, [runner(), runner()])
    assert "built for linux/arm64" in why and "run linux/amd64" in why and "--platform linux/amd64" in why
    assert platforms.refusal(Needs("linux/amd64"), 0, [runner()]) is None
    assert platforms.refusal(Needs("linux/arm64"), 0, [runner(), runner(platform="linux/arm64")]) is None
    assert platforms.refusal(Needs("linux/arm64"), 0, [runner(), runner(platform=None)]) is None  # an older one


def test_a_cuda_newer_than_every_driver_is_refused_naming_both_versions():
    needs = platforms.of_config(config(env=["NVIDIA_REQUIRE_CUDA=cuda>=12.4"]))
    why = platforms.refusal(needs, 1, [runner(), runner(cuda="11.8", driver="520.61.05")])
    assert "needs CUDA 12.4" in why and "is 535.104.05, which supports CUDA 12.2" in why
    assert platforms.refusal(needs, 1, [runner(cuda="12.4")]) is None
    assert platforms.refusal(needs, 1, [runner(), runner(cuda="12.6")]) is None


def test_a_datacenter_driver_its_forward_compatibility_covers_runs_the_image():
    needs = platforms.of_config(config(env=[CUDA_12_4]))
    assert platforms.runs_on(needs, runner(cuda="12.2", driver="535.104.05")) is True  # driver>=535,<536
    assert platforms.runs_on(needs, runner(cuda="12.2", driver="530.30.02")) is False
    assert "needs CUDA 12.4" in platforms.refusal(needs, 1, [runner(cuda="12.1", driver="530.30.02")])


def test_the_cuda_need_counts_only_with_gpus_and_only_where_the_gpus_are():
    needs = platforms.of_config(config(env=["NVIDIA_REQUIRE_CUDA=cuda>=12.4"]))
    assert platforms.refusal(needs, 0, [runner()]) is None  # no GPUs: no driver check
    assert platforms.refusal(needs, 4, [runner(), runner(gpus=8, cuda="12.6")]) is None
    assert "supports CUDA 12.2" in platforms.refusal(needs, 2, [runner(), runner(gpus=1, cuda="12.6")])


def test_what_no_runner_reported_is_never_held_against_an_image():
    needs = platforms.of_config(config(arch="arm64", env=["NVIDIA_REQUIRE_CUDA=cuda>=13.0"]))
    assert platforms.refusal(needs, 1, []) is None  # no runner yet: it waits
    assert platforms.refusal(needs, 0, [{"gpus": []}]) is None  # an older runner says no platform
    amd = platforms.of_config(config(env=["NVIDIA_REQUIRE_CUDA=cuda>=13.0"]))
    unknown = {"platform": "linux/amd64", "gpus": ["g0"]}  # declared GPUs without a CUDA version
    assert platforms.refusal(amd, 1, [runner(), unknown]) is None
