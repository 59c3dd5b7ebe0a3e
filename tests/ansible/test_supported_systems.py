"""Which systems a deploy accepts, and in which groups (docs/operations.md,
"Supported systems"): the common role's first task, run by the real
`ansible-playbook` against inventories of pretend hosts whose system facts
are given as inventory variables (no fact gathering, nothing connected to).
Debian 12 and Ubuntu 24.04 carry every group; Ubuntu 22.04 is refused in
[etcd] (etcd 3.3) and as a Redis host (Redis 6.0); other systems are refused.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ansible.test_ansible import ANSIBLE, REPO, ansible_playbook

SYSTEMS = {
    "debian12": ("Debian", "12.8", "12"),
    "debian11": ("Debian", "11.11", "11"),
    "jammy": ("Ubuntu", "22.04", "22"),
    "noble": ("Ubuntu", "24.04", "24"),
    "focal": ("Ubuntu", "20.04", "20"),
}


def host_line(name: str, system: str) -> str:
    distribution, version, major = SYSTEMS[system]
    return (f"{name} ansible_connection=local ansible_python_interpreter={sys.executable} "
            f"ansible_distribution={distribution} ansible_distribution_version={version} "
            f"ansible_distribution_major_version={major}")


def check(tmp_path: Path, hosts: dict[str, str], groups: dict[str, list[str]]) -> dict[str, str]:
    """Run the common role's first task on every host: {host: "ok" or its failure message}."""
    playbook = ansible_playbook()
    if not playbook:
        pytest.skip("ansible-playbook is not installed (pip install '.[deploy]')")
    first = yaml.safe_load((ANSIBLE / "roles/common/tasks/main.yml").read_text())[0]
    (tmp_path / "first.yml").write_text(yaml.safe_dump([first], sort_keys=False))
    (tmp_path / "play.yml").write_text(yaml.safe_dump([{
        "hosts": "all", "gather_facts": False,
        "vars_files": [str(ANSIBLE / "roles/common/defaults/main.yml"), str(ANSIBLE / "group_vars/all.yml")],
        "tasks": [{"ansible.builtin.include_tasks": str(tmp_path / "first.yml")}],
    }]))
    lines = [host_line(name, system) for name, system in hosts.items()]
    for group, members in groups.items():
        lines += [f"[{group}]", *members]
    (tmp_path / "inventory.ini").write_text("\n".join(lines) + "\n")
    out = subprocess.run([playbook, "-i", str(tmp_path / "inventory.ini"), str(tmp_path / "play.yml")],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1", "HOME": str(tmp_path)})
    found = {name: "ok" for name in hosts if re.search(rf"^ok: \[{name}\]", out.stdout, re.M)}
    for name, message in re.findall(r"^fatal: \[(\S+)\]: FAILED! => (.*)$", out.stdout, re.M):
        found[name] = " ".join(str(yaml.safe_load(message).get("msg")).split())
    assert set(found) == set(hosts), out.stdout + out.stderr
    return found


def test_ubuntu_2204_is_refused_as_etcd_member_and_redis_host_only(tmp_path):
    hosts = {"web-jammy": "jammy", "web-debian": "debian12", "run-jammy": "jammy", "run-noble": "noble",
             "etcd-jammy": "jammy", "etcd-noble": "noble", "db-jammy": "jammy", "router-jammy": "jammy"}
    found = check(tmp_path, hosts, {
        "web": ["web-jammy", "web-debian"],  # [redis] is empty: the first web host runs Redis
        "processing": ["run-jammy", "run-noble"],
        "etcd": ["web-debian", "etcd-jammy", "etcd-noble"],
        "db": ["db-jammy"], "router": ["router-jammy"],
    })
    refused = {name for name, result in found.items() if result != "ok"}
    assert refused == {"web-jammy", "etcd-jammy"}, found
    assert found["etcd-jammy"].startswith("etcd-jammy runs Ubuntu 22.04 and is in [etcd]: its etcd is 3.3")
    assert "make Debian 12 or Ubuntu 24.04 hosts the members" in found["etcd-jammy"]
    assert found["web-jammy"].startswith("web-jammy runs Ubuntu 22.04 and is in [redis]: its Redis is 6.0")
    assert "[redis]" not in found["etcd-jammy"] and "[etcd]" not in found["web-jammy"]


def test_with_a_redis_group_an_ubuntu_2204_web_host_is_accepted(tmp_path):
    hosts = {"web-jammy": "jammy", "redis-jammy": "jammy", "redis-noble": "noble", "redis-debian": "debian12"}
    found = check(tmp_path, hosts, {
        "web": ["web-jammy"], "redis": ["redis-jammy", "redis-noble", "redis-debian"],
        "etcd": ["redis-noble"], "processing": [], "db": ["redis-debian"],
    })
    assert found["web-jammy"] == found["redis-noble"] == found["redis-debian"] == "ok", found
    assert found["redis-jammy"].startswith("redis-jammy runs Ubuntu 22.04 and is in [redis]"), found


def test_other_systems_are_refused_naming_the_host_and_the_supported_ones(tmp_path):
    hosts = {"old-debian": "debian11", "old-ubuntu": "focal", "web": "debian12"}
    found = check(tmp_path, hosts, {"web": ["web"], "processing": ["old-debian", "old-ubuntu"]})
    assert found["web"] == "ok"
    assert found["old-debian"].startswith("old-debian runs Debian 11.11; PINK's roles deploy to "
                                          "Debian 12, Ubuntu 22.04, Ubuntu 24.04"), found
    assert found["old-ubuntu"].startswith("old-ubuntu runs Ubuntu 20.04;"), found
