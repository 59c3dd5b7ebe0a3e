"""A GPU server's roles on Ubuntu 22.04 and 24.04, without the lab (opt-in:
PINK_ANSIBLE_CONVERGE=1, as tests/ansible/test_ansible.py's Debian converge).

`common`, the etcd role's `absent.yml`, `docker` and `pink_runner` are
applied twice to one systemd container of each release (the lab's Ubuntu
images, devcluster/lab.py, each with its own nested Docker engine), on a
Docker network of the test's own: the second run must change nothing.
Then each runs PINK in its own Python, Docker keeps the classic image store
(Ubuntu's docker.io is Docker 29: roles/docker), and the workers' key logs
in to the chrooted SFTP account against the pinned host key (Ubuntu 24.04's
sshd is socket-activated). No etcd runs here: the runner is up, waiting for
one. tests/cluster/test_ubuntu.py runs tasks on such servers in the lab.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from devcluster import lab
from tests.ansible.test_ansible import ANSIBLE, REPO, ansible_playbook, sh

PLAYBOOK = """\
- name: Every PINK host.
  hosts: all
  become: true
  roles: [common]
- name: No etcd member's files on a GPU server.
  hosts: processing
  become: true
  tasks:
    - name: Ensure no etcd member is here.
      ansible.builtin.include_role: {name: etcd, tasks_from: absent.yml}
- name: The GPU servers.
  hosts: processing
  become: true
  roles: [docker, pink_runner]
"""
PYTHONS = {"22.04": "Python 3.10", "24.04": "Python 3.12"}

pytestmark = [
    pytest.mark.skipif(os.environ.get("PINK_ANSIBLE_CONVERGE") != "1",
                       reason="converging systemd containers takes minutes: set PINK_ANSIBLE_CONVERGE=1"),
    pytest.mark.timeout(2400),
]


def boot(name: str, image: str, network: str, data: Path, key: Path) -> dict:
    """A systemd container with its own Docker engine; root's key installed.
    Its address and its SSH host key (read over `docker exec`)."""
    for kind in ("docker", "containerd"):
        (data / kind).mkdir(parents=True)
    sh("docker", "run", "-d", "--name", name, "--hostname", name, "--network", network,
       *lab.SYSTEMD_FLAGS, *lab.ENGINE_FLAGS, "-v", f"{data / 'docker'}:/var/lib/docker",
       "-v", f"{data / 'containerd'}:/var/lib/containerd", image, "/sbin/init")
    script = ("mkdir -p -m 700 /root/.ssh && cat > /root/.ssh/authorized_keys && "
              "systemctl is-active ssh >/dev/null && cat /etc/ssh/ssh_host_ed25519_key.pub")
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(["docker", "exec", "-i", name, "sh", "-c", script],
                             input=key.with_suffix(".pub").read_text(), capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.startswith("ssh-ed25519 "):
            break
        assert time.monotonic() < deadline, f"{name} did not boot: {out.stdout}{out.stderr}"
        time.sleep(1)
    address = sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                 name).stdout.strip()
    return {"container": name, "address": address, "hostkey": " ".join(out.stdout.split()[:2])}


@pytest.fixture
def ubuntu_hosts(tmp_path):
    """One booted machine per Ubuntu release, {release: machine}; removed after."""
    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is not installed (apt-get install mmdebstrap)")
    nonce = secrets.token_hex(3)
    network, data = f"pinklab-ubuntu-converge-{nonce}", lab.DOCKER_DIRS / f"ubuntu-converge-{nonce}"
    key = tmp_path / "root_key"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    sh("docker", "network", "create", "--label", "pinklab=1", network)
    names = []
    try:
        machines = {}
        for release in lab.UBUNTU:
            names.append(f"pinklab-ubuntu-converge-{release.suite}-{nonce}")
            machines[release.version] = boot(names[-1], lab.build_ubuntu_image(release), network,
                                             data / release.suite, key)
        yield {"machines": machines, "key": key}
    finally:
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True, timeout=300)
        subprocess.run(["docker", "network", "rm", network], capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def inventory(ubuntu: dict) -> str:
    """The machines in [processing] (declared GPUs, each engine its own ranges,
    as the lab's runners); a web host that is never contacted."""
    lines = ["[processing]"]
    for index, (version, m) in enumerate(ubuntu["machines"].items(), start=3):
        gpus = json.dumps([f"GPU-converge-{index}-0"])
        engine = json.dumps({"bip": f"172.30.{index}.1/24",
                             "default-address-pools": [{"base": f"172.31.{index * 16}.0/20", "size": 24}]})
        lines.append(f"ubuntu{version.replace('.', '')} ansible_host={m['address']} "
                     f"pink_runner_gpus='{gpus}' docker_daemon_config='{engine}'")
    lines += ["[web]", "web1 ansible_host=192.0.2.11", "[etcd]", "web1", "[db]", "web1", "[router]", "web1"]
    return "\n".join(lines) + "\n"


def frozen_checkout(into: Path) -> Path:
    """A copy of the checkout with its own git (others may edit the tree between the runs)."""
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, into / rel)
    sh("git", "init", "-q", str(into))
    sh("git", "-C", str(into), "add", "-A")
    return into


def test_a_gpu_servers_roles_converge_on_ubuntu_and_serve_sftp(ubuntu_hosts, tmp_path):
    playbook = ansible_playbook()
    if not playbook:
        pytest.skip("ansible-playbook is not installed (pip install '.[deploy]')")
    work = tmp_path / "converge"
    work.mkdir()
    shutil.copytree(ANSIBLE / "group_vars", work / "group_vars")
    (work / "converge.yml").write_text(PLAYBOOK)
    (work / "inventory.ini").write_text(inventory(ubuntu_hosts))
    machines = ubuntu_hosts["machines"]
    known = work / "known_hosts"
    known.write_text("".join(f"{m['address']} {m['hostkey']}\n" for m in machines.values()))
    sh(str(REPO / "ssl" / "make-certs.sh"), "--web-dir", str(work / "ssl"), "--db-dir", str(work / "ssl_db"))
    extra = {"pink_source_dir": str(frozen_checkout(work / "src")), "pink_tls_dir": str(work / "ssl"),
             "pink_db_tls_dir": str(work / "ssl_db"), "ansible_user": "root",
             "ansible_ssh_private_key_file": str(ubuntu_hosts["key"]),
             "ansible_ssh_common_args": f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes",
             # The images hold PINK's dependencies for their Pythons (as the lab's).
             "common_pip_extra_args": f"--no-index --find-links {lab.WHEELHOUSE}"}
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
           "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    argv = [playbook, "-i", str(work / "inventory.ini"), "--limit", "processing",
            str(work / "converge.yml"), "-e", json.dumps(extra)]
    for run in (1, 2):
        out = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        (tmp_path / f"run{run}.log").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, f"run {run} failed:\n{out.stdout[-8000:]}\n{out.stderr[-3000:]}"
    recaps = re.findall(r"^(ubuntu\d+)\s+:\s+(.*)$", out.stdout, re.M)
    assert len(recaps) == 2 and all(re.search(r"\bchanged=0\b", r) for _, r in recaps), \
        f"the second run changed things: {recaps}\n" + "\n".join(
            line for line in out.stdout.splitlines() if line.startswith("changed:"))

    for version, m in machines.items():
        def run_there(script: str) -> str:
            return sh("docker", "exec", m["container"], "sh", "-c", script).stdout.strip()

        assert f'VERSION_ID="{version}"' in run_there("cat /etc/os-release")
        assert run_there("/opt/pink/bin/python --version").startswith(PYTHONS[version])
        assert run_there("docker info --format '{{.Driver}}'") == "overlay2"
        assert run_there("systemctl is-active pink-runner ssh docker").split() == ["active"] * 3
        client = paramiko.SSHClient()
        client.get_host_keys().add(m["address"], "ssh-ed25519",
                                   paramiko.Ed25519Key(data=base64.b64decode(m["hostkey"].split()[1])))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(m["address"], username="pink-xfer", allow_agent=False, look_for_keys=False,
                       timeout=20, key_filename=str(work / "credentials" / "pink_workers_id_ed25519"))
        try:
            with client.open_sftp() as sftp:
                assert sorted(sftp.listdir("/")) == ["outbox", "spool"], version
        finally:
            client.close()
