"""Ubuntu GPU servers join the lab, run tasks and leave (docs/operations.md,
"Supported systems"): one Ubuntu 22.04 and one Ubuntu 24.04 machine
(devcluster/lab.py builds them with mmdebstrap from archive.ubuntu.com) are
added to [processing] of a copy of the lab's inventory and the whole
site.yml deploys it, so that the web hosts pin their SSH host keys; each runs
a task while the other runners are drained; then they stop, are forgotten
(`pink node forget`) and removed, and the lab's own inventory is deployed
again: the lab is as it was. Before that, an Ubuntu 22.04 host in [etcd] and
[redis] is refused by the first task of the deploy, naming it.

The lab must be up (`make cluster`); run with
`PINK_LAB=1 .venv/bin/python -m pytest tests/cluster/test_ubuntu.py`.
The first run builds the two Ubuntu images (a few minutes each, cached in
build/cluster/cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devcluster import lab as devlab
from pink.errors import PinkError
from pink.tasks import FINAL_NAMES
from tests.cluster.lab import docker_cli
from tests.helpers import files_in_output

pytestmark = pytest.mark.timeout(3600)

RELEASES = {u.host.name: u for u in devlab.UBUNTU}  # ubuntu2204, ubuntu2404
PYTHONS = {"ubuntu2204": "3.10", "ubuntu2404": "3.12"}
TASK_TIMEOUT = 300.0  # seconds for a task on a new runner (its image is copied there first)
GONE_TIMEOUT = 120.0  # seconds for a stopped runner to leave the node list and be forgotten


def sh(name: str, script: str) -> str:
    """A shell script as root on a lab machine (the added ones too); its stdout."""
    return docker_cli("exec", devlab.host(name).container, "sh", "-c", script).stdout


def make_deploy(inventory: Path, log_name: str, *ansible_args: str) -> subprocess.CompletedProcess:
    """`make deploy` with this inventory; its output in build/cluster/LOG_NAME."""
    out = subprocess.run(["make", "-C", str(devlab.REPO), "deploy", f"INVENTORY={inventory}",
                          f"ANSIBLE_ARGS={' '.join(ansible_args)}"],
                         capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "ANSIBLE_FORCE_COLOR": "0"})
    (devlab.LAB_DIR / log_name).write_text(out.stdout + out.stderr)
    return out


def pink_cli(*args: str) -> subprocess.CompletedProcess:
    """The `pink` CLI as `make cluster` left it logged in (as test_lab_deploy)."""
    pink = str(Path(sys.executable).parent / "pink")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINK_")}
    return subprocess.run([pink, *args], capture_output=True, text=True, timeout=300, env=env)


def node_names(lab) -> set[str]:
    return {n["name"] for n in lab.client.nodes()}


def pinned_runner_addresses(web: str) -> set[str]:
    """The addresses whose host keys a web host's workers pin."""
    lines = sh(web, "cat /var/lib/pink/ssh/known_hosts").splitlines()
    return {line.split()[0] for line in lines if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def ubuntu(lab):
    """The two Ubuntu machines, booted and reachable by Ansible (not deployed).
    Whatever a test left undone, they are gone afterwards and the lab's own
    inventory deployed again."""
    state = {"added": devlab.add_ubuntu_hosts(), "deployed": False}
    yield state
    if any(devlab.docker_exists("container", h.container) for h in state["added"]) or state["deployed"]:
        for name in RELEASES:
            subprocess.run(["docker", "exec", devlab.host(name).container, "systemctl", "stop", "pink-runner"],
                           capture_output=True, timeout=120)
        devlab.remove_ubuntu_hosts()
        if state["deployed"]:
            devlab.deploy(devlab.LAB_DIR / "inventory.ini", "ubuntu-cleanup")
        deadline = time.monotonic() + GONE_TIMEOUT
        for name in RELEASES:
            while pink_cli("node", "forget", name).returncode and time.monotonic() < deadline:
                time.sleep(5)
        for name in ("run1", "run2"):
            lab.client.node_action(name, "resume")


def test_an_ubuntu_2204_etcd_member_or_redis_host_is_refused_naming_it(ubuntu):
    jammy = RELEASES["ubuntu2204"].host
    misplaced = devlab.LabHost(jammy.name, jammy.ip, ("processing", "etcd", "redis"), engine=jammy.engine)
    inventory = devlab.write_inventory_with("inventory-ubuntu-refused.ini", (misplaced,))
    out = make_deploy(inventory, "deploy-ubuntu-refused.log", "--limit", jammy.name)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode != 0, text[-3000:]
    assert "ubuntu2204 runs Ubuntu 22.04 and is in [etcd]: its etcd is 3.3" in text, text[-3000:]
    assert "[redis]: its Redis is 6.0" in text, text[-3000:]
    assert "failed=1" in text and "changed=0" in text, text[-3000:]  # refused before anything changed


def test_ubuntu_gpu_servers_are_deployed_and_each_runs_a_task(lab, ubuntu, archive, tmp_path):
    inventory = devlab.write_inventory_with("inventory-ubuntu.ini", ubuntu["added"])
    ubuntu["deployed"] = True
    devlab.deploy(inventory, "ubuntu-add")
    for name, release in RELEASES.items():
        assert f'VERSION_ID="{release.version}"' in sh(name, "cat /etc/os-release")
        python = sh(name, "/opt/pink/bin/python -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
        assert python.strip() == PYTHONS[name]
        assert sh(name, "systemctl is-active pink-runner ssh docker").split() == ["active"] * 3
        # Docker 29 would keep images in containerd's store (roles/docker, docker_daemon_classic_store_*)
        assert sh(name, "docker info --format '{{.Driver}}'").strip() == "overlay2"
    for web in ("web1", "web2"):
        pinned = pinned_runner_addresses(web)
        assert {h.ip for h in ubuntu["added"]} <= pinned, (web, pinned)
    deadline = time.monotonic() + 120
    while not set(RELEASES) <= node_names(lab):
        assert time.monotonic() < deadline, f"the Ubuntu runners never registered: {node_names(lab)}"
        time.sleep(2)

    for name in RELEASES:
        others = sorted(node_names(lab) - {name})
        try:
            for other in others:
                lab.client.node_action(other, "drain")
            task = lab.client.submit(archive, name=f"ubuntu-{name}", env={"SECONDS": "1"}, gpus=1)
            final = wait_final(lab, task["id"])
        finally:
            for other in others:
                lab.client.node_action(other, "resume")
        assert final["state"] == "succeeded", final
        assert final["node"] == name, final
        assert final["gpus"] and all(g.startswith(f"GPU-lab-{name}-") for g in final["gpus"]), final
        output = lab.client.download(task["id"], tmp_path / f"{name}.tar.zst")
        assert files_in_output(output.read_bytes()).get("result.txt") == b"done\n"


def test_the_lab_is_as_it_was_once_they_leave(lab, ubuntu, archive):
    for name in RELEASES:
        assert pink_cli("node", "drain", name).returncode == 0
        sh(name, "systemctl stop pink-runner")
    deadline = time.monotonic() + GONE_TIMEOUT
    forgotten = {}
    while len(forgotten) < len(RELEASES):
        for name in set(RELEASES) - set(forgotten):
            out = pink_cli("node", "forget", name)
            if out.returncode == 0:
                forgotten[name] = out.stderr.strip()
        assert time.monotonic() < deadline, f"not forgotten: {set(RELEASES) - set(forgotten)}"
        time.sleep(2)
    assert not set(RELEASES) & node_names(lab)
    removed = devlab.remove_ubuntu_hosts()
    assert sorted(removed) == sorted(h.container for h in ubuntu["added"])
    devlab.deploy(devlab.LAB_DIR / "inventory.ini", "ubuntu-removed")
    ubuntu["deployed"] = False
    for web in ("web1", "web2"):
        assert pinned_runner_addresses(web) == {devlab.host("run1").ip, devlab.host("run2").ip}
    assert node_names(lab) == {"run1", "run2"}
    assert all(n["state"] == "ready" for n in lab.client.nodes()), lab.client.nodes()
    lab.wait_healthy()
    task = lab.client.submit(archive, name="ubuntu-after", env={"SECONDS": "1"})
    assert wait_final(lab, task["id"])["state"] == "succeeded"


def wait_final(lab, task_id: str, timeout: float = TASK_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            task = lab.client.get(task_id)
        except PinkError:
            task = {"state": "unknown"}
        if task["state"] in FINAL_NAMES:
            return task
        assert time.monotonic() < deadline, f"task {task_id} is still {task['state']} after {timeout:.0f}s"
        time.sleep(2)
