"""GPU isolation the image cannot undo: an NGC-style image (NVIDIA_VISIBLE_DEVICES=all
and friends in its ENV), submitted with `-e NVIDIA_VISIBLE_DEVICES=all`, sees only
its assigned GPUs; user env that could only widen access is refused at submit."""

from __future__ import annotations

from pathlib import Path

import pytest
from werkzeug.datastructures import MultiDict

from pink.errors import BadRequest
from pink.gpu_env import ASSIGNED, DRIVER_CAPABILITIES, NEUTRAL
from pink.tasks import Params
from tests import images
from tests.helpers import Api, make_user

DECLARED = [f"GPU-iso-{i}" for i in range(4)]
WIDE_ENV = {"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
            "NVIDIA_DRIVER_CAPABILITIES": "all", "NVIDIA_MIG_CONFIG_DEVICES": "all",
            "NVIDIA_IMEX_CHANNELS": "all", "NVIDIA_GDS": "enabled"}
WIDE_IMAGE = "".join(f"ENV {k}={v}\n" for k, v in WIDE_ENV.items()) + 'CMD ["env"]\n'


@pytest.fixture
def gpu_api(pink_processes, pink_config, config_variant):
    """Web, worker, leader and a runner with four declared GPUs; an Api for alice."""
    path = config_variant("gpus", runner={"gpus": DECLARED})
    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start(config_path=path)
    return Api(pink_config, make_user(pink_config, "alice"))


def test_image_and_user_cannot_widen_the_assigned_gpus(gpu_api, docker_client, tmp_path):
    api = gpu_api
    archive = images.build_archive(docker_client, "pink/test-wide-gpus:1", WIDE_IMAGE, tmp_path / "wide.tar")
    assert set(docker_client.images.get("pink/test-wide-gpus:1").attrs["Config"]["Env"]) \
        >= {f"{k}={v}" for k, v in WIDE_ENV.items()}  # the premise: the image asks for everything
    r = api.submit(archive, gpus=2, env="NVIDIA_VISIBLE_DEVICES=all")
    assert r.status_code == 201, r.text
    task = api.wait(r.json()["task"]["id"])
    assert task["state"] == "succeeded", task
    assigned = task["gpus"]
    assert len(assigned) == 2 and set(assigned) <= set(DECLARED)
    lines = api("GET", f"/tasks/{task['id']}/logs").text.splitlines()
    seen = dict(line.split("=", 1) for line in lines if "=" in line)
    assert seen["NVIDIA_VISIBLE_DEVICES"] == seen["CUDA_VISIBLE_DEVICES"] == ",".join(assigned)
    assert seen["NVIDIA_DRIVER_CAPABILITIES"] == DRIVER_CAPABILITIES == "compute,utility"
    assert {name: seen[name] for name in NEUTRAL} == dict.fromkeys(NEUTRAL, "")


def test_widening_env_is_refused_and_nothing_is_created(web, writer_archive):
    api = Api(web, make_user(web, "alice"))
    r = api.submit(writer_archive, env=["A=1", "NVIDIA_MIG_CONFIG_DEVICES=all"])
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "bad_param" and "NVIDIA_MIG_CONFIG_DEVICES" in body["message"]
    assert api("GET", "/tasks").json()["tasks"] == []
    spool = Path(web.web.spool_dir)
    assert not spool.exists() or not any(spool.iterdir())  # refused before the upload was read


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_params_refuse_each_widening_variable(name):
    with pytest.raises(BadRequest) as err:
        Params.parse(MultiDict([("env", f"{name}=all")]))
    assert err.value.code == "bad_param" and name in err.value.message


def test_params_accept_the_overridden_variables():
    """Accepted as given: the runner overrides them (test above), so no submit breaks on NGC habits."""
    params = Params.parse(MultiDict([("env", f"{name}=all") for name in ASSIGNED]))
    assert params.env == dict.fromkeys(ASSIGNED, "all")
