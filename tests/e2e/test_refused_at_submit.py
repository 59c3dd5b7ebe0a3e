"""Refused before it waits: an image no runner can run (another platform, a
CUDA newer than every driver) is refused at submit, through the whole
archive (the API) and the layer upload (the CLI), naming both sides. The
runner declares its GPUs' CUDA version here (`[runner] cuda`); on GPU servers
NVML reports it."""

from __future__ import annotations

import time

from tests import images
from tests.helpers import Api, make_user

CUDA_12_4 = 'ENV NVIDIA_REQUIRE_CUDA="cuda>=12.4"\nCMD ["true"]\n'


def _lab(pink_processes, pink_config, config_variant) -> Api:
    path = config_variant("cuda", runner={"gpus": ["GPU-p1", "GPU-p2"], "cuda": "12.2"})
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start(config_path=path)
    api = Api(pink_config, make_user(pink_config, "alice"))
    deadline = time.monotonic() + 60
    while not [n for n in api("GET", "/nodes").json()["nodes"] if n.get("platform") and n.get("cuda")]:
        assert time.monotonic() < deadline, "the runner never registered its platform and CUDA version"
        time.sleep(0.3)
    return api


def test_what_no_runner_can_run_is_refused_at_submit_naming_both_sides(pink_processes, pink_config, config_variant,
                                                                      docker_client, tmp_path):
    api = _lab(pink_processes, pink_config, config_variant)
    node = api("GET", "/nodes").json()["nodes"][0]
    assert (node["platform"], node["cuda"]) == ("linux/amd64", "12.2"), node
    listed = api.cli("nodes").stdout
    assert "PLATFORM" in listed and "linux/amd64" in listed and "12.2" in listed, listed

    cuda = images.build_archive(docker_client, "pink/test-cuda124:1", CUDA_12_4, tmp_path / "cuda.tar")
    r = api.submit(cuda, gpus=1)
    assert r.status_code == 400 and r.json()["error"] == "unsatisfiable", r.text
    assert "needs CUDA 12.4" in r.json()["message"] and "supports CUDA 12.2" in r.json()["message"], r.text
    proc = api.cli("submit", "--gpus", "1", str(cuda), check=False)  # the CLI's way: a layer upload
    assert proc.returncode != 0 and "needs CUDA 12.4" in proc.stderr, proc.stderr

    ran = api.wait(api.submit(cuda).json()["task"]["id"])  # without GPUs no driver checks it
    assert ran["state"] == "succeeded" and ran["image"]["cuda"] == "12.4", ran
    assert ran["image"]["platform"] == "linux/amd64"
    shown = api.cli("status", ran["id"]).stdout
    assert "platform:     linux/amd64" in shown and "needs CUDA:   12.4" in shown, shown

    arm = images.retarget_archive(images.save_image(docker_client, images.ensure_busybox_image(docker_client),
                                                    tmp_path / "busybox.tar"), tmp_path / "arm.tar", "arm64")
    r = api.submit(arm, cmd="true")
    assert r.status_code == 400 and "built for linux/arm64" in r.json()["message"], r.text
    assert "run linux/amd64" in r.json()["message"], r.text
    proc = api.cli("submit", "--cmd", "true", str(arm), check=False)
    assert proc.returncode != 0 and "built for linux/arm64" in proc.stderr, proc.stderr
    assert [t["id"] for t in api("GET", "/tasks").json()["tasks"]] == [ran["id"]]  # nothing refused was kept
