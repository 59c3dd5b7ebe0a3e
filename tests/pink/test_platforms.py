"""`pink.platforms`: what an image config asks of a runner, and when no
reporting runner can give it (pure logic, no services)."""

from __future__ import annotations

import pytest

from pink import platforms
from pink.platforms import Needs


def config(arch="amd64", os_name="linux", env=None) -> dict:
    return {"architecture": arch, "os": os_name, "config": {"Env": env or []}}


@pytest.mark.parametrize("env,cuda", [
    (["NVIDIA_REQUIRE_CUDA=cuda>=12.4 brand=tesla,driver>=470,driver<471"], (12, 4)),
    (["CUDA_VERSION=11.8.0"], (11, 8)),
    (["CUDA_VERSION=11.8.0", "NVIDIA_REQUIRE_CUDA=cuda>=12.1"], (12, 1)),  # the toolkit's check wins
    (["NVIDIA_REQUIRE_CUDA=cuda>=12.4", "NVIDIA_DISABLE_REQUIRE=1"], None),
    (["PATH=/bin", "CUDA_VERSION=", "NVIDIA_REQUIRE_CUDA=brand=tesla"], None),
    ([], None),
])
def test_an_image_states_its_cuda_need_the_way_the_nvidia_toolkit_reads_it(env, cuda):
    assert platforms.of_config(config(env=env)) == Needs("linux/amd64", cuda)


@pytest.mark.parametrize("hostile", [{}, {"architecture": 5}, {"config": "x"}, {"config": {"Env": "A=1"}},
                                     {"os": "linux", "architecture": "", "config": {"Env": [7, None, "=x"]}}])
def test_a_config_that_says_nothing_usable_needs_nothing(hostile):
    assert platforms.of_config(hostile) == Needs()


def test_docker_names_its_machine_as_uname_does_and_images_as_go_does():
    assert platforms.platform_of("linux", "x86_64") == "linux/amd64"
    assert platforms.platform_of("linux", "aarch64") == "linux/arm64"
    assert platforms.platform_of("linux", "riscv64") == "linux/riscv64"


AMD = {"platform": "linux/amd64", "gpus": ["g0", "g1"], "cuda": "12.2", "driver": "535.104.05"}


def test_an_image_for_another_platform_is_refused_naming_both():
    why = platforms.refusal(Needs("linux/arm64"), 0, [AMD, {**AMD, "platform": "linux/amd64"}])
    assert "built for linux/arm64" in why and "run linux/amd64" in why and "--platform linux/amd64" in why
    assert platforms.refusal(Needs("linux/amd64"), 0, [AMD]) is None
    assert platforms.refusal(Needs("linux/arm64"), 0, [AMD, {**AMD, "platform": "linux/arm64"}]) is None


def test_a_cuda_newer_than_every_driver_is_refused_naming_both_versions():
    why = platforms.refusal(Needs("linux/amd64", (12, 4)), 1, [AMD, {**AMD, "cuda": "11.8", "driver": "520"}])
    assert "needs CUDA 12.4" in why and "is 535.104.05, which supports CUDA 12.2" in why
    assert platforms.refusal(Needs("linux/amd64", (12, 2)), 1, [AMD]) is None
    assert platforms.refusal(Needs("linux/amd64", (12, 4)), 1, [AMD, {**AMD, "cuda": "12.6"}]) is None


def test_the_cuda_need_counts_only_with_gpus_and_only_where_the_gpus_are():
    assert platforms.refusal(Needs(None, (13, 0)), 0, [AMD]) is None  # no GPUs: no driver check
    big = {**AMD, "gpus": ["g"] * 8, "cuda": "12.6"}
    assert platforms.refusal(Needs(None, (12, 4)), 4, [AMD, big]) is None
    assert "supports CUDA 12.2" in platforms.refusal(Needs(None, (12, 4)), 2, [AMD, {**big, "gpus": ["g"]}])


def test_what_no_runner_reported_is_never_held_against_an_image():
    assert platforms.refusal(Needs("linux/arm64", (13, 0)), 1, []) is None  # no runner yet: it waits
    assert platforms.refusal(Needs("linux/arm64"), 0, [{"gpus": []}]) is None  # an older runner
    unknown = {"platform": "linux/amd64", "gpus": ["g0"]}  # declared GPUs without a CUDA version
    assert platforms.refusal(Needs("linux/amd64", (13, 0)), 1, [AMD, unknown]) is None
