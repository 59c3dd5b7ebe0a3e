"""Thirty tasks with mixed GPU counts over three runners with declared GPUs:
every task finishes, no GPU is ever held by two running containers at once,
and the work is spread over the runners."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict

import pytest

from tests import images
from tests.helpers import Api, files_in_output, make_user

RUNNERS = {"run1": 2, "run2": 2, "run3": 4}  # declared GPUs per runner
PROBE = ("sh -c 'mkdir /o; echo $NVIDIA_VISIBLE_DEVICES > /o/gpus; "
         "cut -d\" \" -f1 /proc/uptime > /o/start; sleep 1; cut -d\" \" -f1 /proc/uptime > /o/end'")


@pytest.fixture
def gpu_cluster(pink_processes, pink_config, cluster, config_variant):
    pink_processes.web()
    pink_processes.worker()
    pink_processes.leader()
    c = pink_config
    for name, count in RUNNERS.items():
        cluster.start_sshd(name)
        path = config_variant(name, runner_name=name,
                              runner={"gpus": [f"GPU-{name}-{i}" for i in range(count)], "max_containers": 4})
        pink_processes.runner(name, path)
    return Api(c, make_user(c, "alice"))


def test_no_gpu_is_ever_shared(gpu_cluster, docker_client, tmp_path):
    api = gpu_cluster
    archive = images.save_image(docker_client, images.ensure_busybox_image(docker_client), tmp_path / "bb.tar")
    ids = [api.submit(archive, cmd=PROBE, output="/o", gpus=1 + i % 2).json()["task"]["id"]
           for i in range(30)]
    held = defaultdict(list)  # gpu -> [(start, end, task)]
    runners = set()
    for task_id in ids:
        task = api.wait(task_id, timeout=300)
        assert task["state"] == "succeeded", json.dumps(task)
        files = files_in_output(api("GET", f"/tasks/{task_id}/output").content)
        seen = files["o/gpus"].decode().strip().split(",")
        assert sorted(seen) == sorted(task["gpus"]) and len(seen) == task["params"]["gpus"]
        assert all(g.startswith(f"GPU-{task['node']}-") for g in seen)
        start, end = float(files["o/start"]), float(files["o/end"])
        for gpu in seen:
            held[gpu].append((start, end, task_id))
        runners.add(task["node"])
    for gpu, spans in held.items():
        for (s1, e1, t1), (s2, e2, t2) in itertools.combinations(sorted(spans), 2):
            assert e1 <= s2, f"{gpu} held by {t1} ({s1}-{e1}) and {t2} ({s2}-{e2}) at once"
    assert runners == set(RUNNERS), f"tasks ran only on {runners}"


def test_gpu_is_free_while_the_previous_task_exports(pink_processes, pink_config, cluster, config_variant,
                                                      docker_client, tmp_path):
    """One GPU, two slots: the next GPU task starts while the first one's big
    output is still exporting (the exited container keeps its slot, not its GPU)."""
    pink_processes.web()
    pink_processes.worker()
    pink_processes.leader()
    cluster.start_sshd("solo")
    pink_processes.runner("solo", config_variant("solo", runner_name="solo",
                                                 runner={"gpus": ["GPU-solo-0"], "max_containers": 2}))
    api = Api(pink_config, make_user(pink_config, "alice"))
    archive = images.save_image(docker_client, images.ensure_busybox_image(docker_client), tmp_path / "bb.tar")
    big = api.submit(archive, gpus=1, output="/o",  # 192 MiB of random bytes: seconds of export
                     cmd="sh -c 'mkdir /o; head -c 201326592 /dev/urandom > /o/big'").json()["task"]["id"]
    small = api.submit(archive, gpus=1, cmd="true").json()["task"]["id"]
    first, second = api.wait(big, timeout=300), api.wait(small, timeout=300)
    assert first["state"] == second["state"] == "succeeded", json.dumps([first, second])
    t1, t2 = first["timings"], second["timings"]
    assert t1["running"] < t1["exited"] <= t2["placed"] < t2["running"] < t1["exported"], json.dumps([t1, t2])
    assert t2["running"] < t2["exited"] <= t2["exported"], t2
    assert second["gpus"] == first["gpus"] == ["GPU-solo-0"]
