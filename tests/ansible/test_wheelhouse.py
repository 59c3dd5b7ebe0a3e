"""Offline installs: `make wheelhouse` (ansible/roles/common/files/wheelhouse.py)
and the common role's `common_wheelhouse`.

The wheelhouse built for Debian 12's Python installs PINK into a fresh venv
with pip's --no-index and no other source: it is complete. Its closure is
decided by each target's own markers, not by the Python that builds it. An
opt-in converge (PINK_ANSIBLE_CONVERGE=1, as in test_ansible.py) deploys
`common` from the wheelhouse to a Debian 12 container twice, the second run
changing nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.ansible.test_ansible import (ANSIBLE, CONVERGE_PLAYBOOK, REPO, ansible_playbook, sh,
                                        systemd_container)

FILES = ANSIBLE / "roles" / "common" / "files"
DEBIAN_12 = "3.11"

_spec = importlib.util.spec_from_file_location("wheelhouse", FILES / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(_spec)
sys.modules["wheelhouse"] = wheelhouse  # dataclasses look their module up
_spec.loader.exec_module(wheelhouse)

__all__ = ["systemd_container"]  # the converge's fixture, from test_ansible.py


def build_pink(into: Path) -> Path:
    out = subprocess.run(["bash", str(FILES / "build-wheel.sh"), str(REPO), str(into), sys.executable],
                         check=True, capture_output=True, text=True, timeout=600)
    return Path(out.stdout.strip())


def offline_env() -> dict[str, str]:
    """pip with no configured index or find-links: only what the command names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


def a_python(minor: str) -> str | None:
    """An interpreter of that Python: Debian's own first (3.11.2 on Debian 12)."""
    for candidate in ("/usr/bin/python3", sys.executable, shutil.which(f"python{minor}")):
        if candidate and subprocess.run([candidate, "-c", f"import sys; assert sys.version.startswith('{minor}.')"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def debian_wheelhouse(tmp_path_factory) -> Path:
    """`make wheelhouse` for Debian 12's Python alone."""
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run([sys.executable, str(FILES / "wheelhouse.py"), str(out), "--python", DEBIAN_12],
                   check=True, capture_output=True, text=True, timeout=1200)
    return out


def dist(name: str, version: str, *requires: str) -> wheelhouse.Dist:
    return wheelhouse.Dist(name=name, version=Version(version), requires=tuple(map(Requirement, requires)),
                           requires_python=SpecifierSet())


def test_the_targets_markers_decide_what_the_closure_needs():
    """redis wants async-timeout before Python 3.11.3 (Debian 12 has 3.11.2),
    an extra's dependencies count only when the extra is asked for, and a
    dependency whose version does not fit is missing too."""
    wheels = {d.name: d for d in (
        dist("pink", "1.0", "redis[hiredis]>=5", "click>=8.1"),
        dist("redis", "5.2.1", 'async-timeout>=4.0.3; python_full_version < "3.11.3"',
             'hiredis>=3; extra == "hiredis"', 'cryptography>=36; extra == "ocsp"'),
        dist("click", "8.0.0"))}
    debian, ubuntu_24 = (next(t for t in wheelhouse.TARGETS if t.tag == tag) for tag in ("cp311", "cp312"))
    roots = [Requirement("pink==1.0")]
    assert wheelhouse.missing_requirements(debian, wheels, roots) == [
        "async-timeout>=4.0.3", "click>=8.1", "hiredis>=3"]
    assert wheelhouse.missing_requirements(ubuntu_24, wheels, roots) == ["click>=8.1", "hiredis>=3"]


def test_targets_follow_pinks_requires_python():
    everything = wheelhouse.choose_targets([], SpecifierSet(">=3.10"))
    assert [t.tag for t in everything] == ["cp310", "cp311", "cp312"]
    assert [t.tag for t in wheelhouse.choose_targets([], SpecifierSet(">=3.11"))] == ["cp311", "cp312"]
    assert [t.tag for t in wheelhouse.choose_targets(["3.12", "cp311"], SpecifierSet(">=3.10"))] == \
        ["cp312", "cp311"]
    with pytest.raises(SystemExit, match="no wheelhouse for cp310"):
        wheelhouse.choose_targets(["3.10"], SpecifierSet(">=3.11"))
    with pytest.raises(SystemExit, match="unknown target Python 3.9"):
        wheelhouse.choose_targets(["3.9"], SpecifierSet(">=3.10"))


def test_the_wheelhouse_installs_pink_without_an_index(debian_wheelhouse, tmp_path):
    python = a_python(DEBIAN_12)
    if not python:
        pytest.skip(f"no Python {DEBIAN_12} here to install into")
    part = debian_wheelhouse / "cp311"
    wheels = sorted(p.name for p in part.glob("*.whl"))
    assert wheels and not any(w.startswith("pink-") for w in wheels)  # each deploy brings its own
    assert any(w.startswith("async_timeout-") for w in wheels)  # Debian 12's 3.11.2 needs it
    with tarfile.open(debian_wheelhouse / "cp311.tar") as tar:
        assert sorted(tar.getnames()) == wheels
    # The archive is the same bytes for the same wheels: a rebuilt, unchanged
    # wheelhouse copies nothing on the next deploy.
    again = tmp_path / "again.tar"
    wheelhouse.write_tar(sorted(part.glob("*.whl")), again)
    assert again.read_bytes() == (debian_wheelhouse / "cp311.tar").read_bytes()

    pink = build_pink(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    install = subprocess.run([*pip, "install", "-q", "--no-index", "--find-links", str(part), str(pink)],
                             capture_output=True, text=True, env=offline_env(), timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    subprocess.run([*pip, "check"], check=True, env=offline_env(), timeout=120)
    version = subprocess.run([str(venv / "bin" / "pink"), "--version"], check=True, capture_output=True,
                             text=True, timeout=60).stdout.strip()
    assert version == f"pink {pink.name.split('-')[1]}"  # git's, through the wheel's name
    subprocess.run([str(venv / "bin" / "python"), "-c",
                    "import web.app, web.serve, queue_workers.worker, queue_workers.leader, "
                    "gpu_runner.agent, pink.backup"], check=True, timeout=120)


@pytest.mark.skipif(os.environ.get("PINK_ANSIBLE_CONVERGE") != "1",
                    reason="converging a systemd container takes minutes: set PINK_ANSIBLE_CONVERGE=1")
@pytest.mark.timeout(1800)
def test_converge_from_the_wheelhouse_is_idempotent(systemd_container, debian_wheelhouse, tmp_path):
    """`common` (and `pink_runner`) deployed with common_wheelhouse: pip gets
    --no-index, so every dependency comes from the shipped archive; the
    second run copies, unpacks, installs and restarts nothing."""
    playbook = ansible_playbook()
    if not playbook:
        pytest.skip("ansible-playbook is not installed (pip install '.[deploy]')")
    target, work = systemd_container, tmp_path / "converge"
    work.mkdir()
    shutil.copytree(ANSIBLE / "group_vars", work / "group_vars")
    (work / "converge.yml").write_text(CONVERGE_PLAYBOOK)
    ssh_args = f"-o UserKnownHostsFile={target['known_hosts']} -o StrictHostKeyChecking=yes"
    (work / "inventory.ini").write_text(
        f"pink1 ansible_host={target['address']} ansible_user=root "
        f"ansible_ssh_private_key_file={target['key']} ansible_ssh_common_args='{ssh_args}'\n"
        + "".join(f"[{group}]\npink1\n" for group in ("web", "processing", "db", "etcd", "router")))
    subprocess.run([str(REPO / "ssl" / "make-certs.sh"), "--web-dir", str(work / "ssl"),
                    "--db-dir", str(work / "ssl_db")], check=True, capture_output=True)
    # A frozen, committed copy of the checkout: others may edit the tree between the runs.
    source = work / "src"
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, source / rel)
    sh("git", "init", "-q", str(source))
    sh("git", "-C", str(source), "add", "-A")
    sh("git", "-C", str(source), "-c", "user.name=PINK tests", "-c", "user.email=tests@pink.invalid",
       "commit", "-q", "-m", "converge")
    extra = {"pink_source_dir": str(source), "pink_tls_dir": str(work / "ssl"),
             "pink_db_tls_dir": str(work / "ssl_db"), "pink_runner_gpus": [],
             "common_wheelhouse": str(debian_wheelhouse)}
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
           "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    argv = [playbook, "-i", str(work / "inventory.ini"), str(work / "converge.yml"), "-e", json.dumps(extra)]
    recaps = []
    for run in (1, 2):
        out = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1500)
        (tmp_path / f"run{run}.log").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, f"run {run} failed:\n{out.stdout[-8000:]}\n{out.stderr[-3000:]}"
        recaps.append(re.search(r"pink1\s+:\s+(.*)", out.stdout).group(1))
    assert re.search(r"\bchanged=0\b", recaps[1]), f"second run changed things: {recaps[1]}\n" + \
        "\n".join(line for line in out.stdout.splitlines() if line.startswith("changed:"))
    name = target["name"]
    listed = sh("docker", "exec", name, "ls", "/opt/pink/wheelhouse").stdout.split()
    assert sorted(listed) == sorted(p.name for p in (debian_wheelhouse / "cp311").glob("*.whl"))
    installed = sh("docker", "exec", name, "/opt/pink/bin/pink", "--version").stdout.strip()
    built = next((work / "build").glob("pink-*.whl")).name.split("-")[1]
    assert installed == f"pink {built}"
