"""etcd's quorum lives only on hosts that run no users' code.

A member holds every key of the cluster and the peers' certificate, so a
container that escapes to root on a member owns etcd. The playbook puts the
members on web, db (and router) hosts, makes the processing hosts plain
clients with the runner's own certificate, and refuses an inventory that
makes a processing host a member. These tests run the real
`ansible-playbook` on the lab's own inventory (devcluster/lab.py) and on
inventories that break the rule; a `make cluster` lab is checked in
tests/cluster/test_lab_deploy.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from devcluster import lab
from tests.ansible.test_ansible import ANSIBLE, REPO, ansible_playbook

# Renders what the roles would write, on the control host only: the etcd
# role's placement check, each member's /etc/default/etcd and
# /etc/default/etcd-bootstrap (the initial member list, which a new
# cluster's members read), and each processing host's pink.toml. Nothing
# connects to the inventory's hosts.
RENDER_PLAYBOOK = """\
- name: The etcd members, as the etcd role sees them.
  hosts: etcd
  gather_facts: false
  tasks:
    - name: Check the members' placement as the role does.
      ansible.builtin.include_role:
        name: etcd
        tasks_from: placement.yml
        public: true
    - name: Render the member's etcd environment.
      ansible.builtin.copy:
        content: "{{{{ lookup('ansible.builtin.template', '{etcd_template}') }}}}"
        dest: "{out}/{{{{ inventory_hostname }}}}.etcd.env"
        mode: "0644"
      delegate_to: localhost
    - name: Render the member's bootstrap settings.
      ansible.builtin.copy:
        content: "{{{{ lookup('ansible.builtin.template', '{bootstrap_template}') }}}}"
        dest: "{out}/{{{{ inventory_hostname }}}}.etcd-bootstrap.env"
        mode: "0644"
      delegate_to: localhost
- name: The processing hosts' PINK config.
  hosts: processing
  gather_facts: false
  vars_files:
    - {common_defaults}
  tasks:
    - name: Render the host's pink.toml.
      ansible.builtin.copy:
        content: "{{{{ lookup('ansible.builtin.template', '{toml_template}') }}}}"
        dest: "{out}/{{{{ inventory_hostname }}}}.pink.toml"
        mode: "0644"
      delegate_to: localhost
"""


def run_playbook(tmp_path: Path, inventory: str, *argv: str, playbook: Path | None = None
                 ) -> subprocess.CompletedProcess:
    """ansible-playbook with the repository's roles and group_vars against
    `inventory`: the render playbook above unless another is given."""
    binary = ansible_playbook()
    if not binary:
        pytest.skip("ansible-playbook is not installed (pip install '.[deploy]')")
    work = tmp_path / "work"
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    if not work.exists():
        shutil.copytree(ANSIBLE / "group_vars", work / "group_vars")
    (work / "inventory.ini").write_text(inventory)
    (work / "render.yml").write_text(RENDER_PLAYBOOK.format(
        out=out, etcd_template=ANSIBLE / "roles" / "etcd" / "templates" / "etcd.default.j2",
        bootstrap_template=ANSIBLE / "roles" / "etcd" / "templates" / "etcd.bootstrap.j2",
        toml_template=ANSIBLE / "roles" / "common" / "templates" / "pink.toml.j2",
        common_defaults=ANSIBLE / "roles" / "common" / "defaults" / "main.yml"))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
           "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_LOCALHOST_WARNING": "false"}
    return subprocess.run([binary, "-i", str(work / "inventory.ini"), *argv,
                           str(playbook or work / "render.yml")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)


def etcd_env(path: Path) -> dict[str, str]:
    return dict(re.findall(r'(?m)^(ETCD_\w+)="(.*)"$', path.read_text()))


def test_the_labs_quorum_is_on_hosts_that_run_no_users_code(tmp_path):
    """A container escaping to root on a runner finds no etcd member: no
    processing host of the lab is in any member's initial cluster, the
    quorum has an odd number of members, and each runner's PINK config
    reaches etcd as a client of the members, never of itself."""
    out = run_playbook(tmp_path, lab.inventory_text())
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    runners = {h.name: h.ip for h in lab.HOSTS if h.processing}
    members = {h.name: h.ip for h in lab.HOSTS if "etcd" in h.groups}
    assert runners and len(members) in (3, 5)
    assert not set(runners) & set(members)
    rendered = {p.name.split(".")[0] for p in (tmp_path / "out").glob("*.etcd.env")}
    assert rendered == set(members), "an etcd environment was rendered for a non-member"
    for name in members:
        assert "ETCD_INITIAL_CLUSTER" not in etcd_env(tmp_path / "out" / f"{name}.etcd.env")
        env = etcd_env(tmp_path / "out" / f"{name}.etcd-bootstrap.env")
        cluster = dict(entry.split("=", 1) for entry in env["ETCD_INITIAL_CLUSTER"].split(","))
        assert set(cluster) == set(members), cluster
        for url in cluster.values():
            assert not any(f"//{ip}:" in url for ip in runners.values()), url
    for name, ip in runners.items():
        config = tomllib.loads((tmp_path / "out" / f"{name}.pink.toml").read_text())
        endpoints = config["etcd"]["endpoints"]
        assert sorted(endpoints) == sorted(f"{a}:2379" for a in members.values()), endpoints
        assert config["etcd"]["cert"] == "/etc/pink/etcd/client.pem"  # the runner's own identity


def test_site_yml_makes_processing_hosts_clients_only(tmp_path):
    """On the lab's inventory, site.yml runs the etcd role on the members
    alone, and on each runner the play that stops any etcd server and removes
    a member's data and certificates (what an older layout left there)."""
    out = run_playbook(tmp_path, lab.inventory_text(), "--list-hosts", "--list-tasks",
                       playbook=ANSIBLE / "site.yml")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    plays = {}
    for block in re.split(r"(?m)^  play #\d+ ", out.stdout)[1:]:
        name = re.match(r"\((.*?)\): (.*?)\tTAGS", block).group(2)
        hosts = re.search(r"(?m)^    pattern: .*\n    hosts \(\d+\):\n((?:      \S+\n)+)", block)
        plays[name] = (set(hosts.group(1).split()), block)
    etcd_plays = {name: hosts for name, (hosts, block) in plays.items() if "etcd : " in block}
    members = {h.name for h in lab.HOSTS if "etcd" in h.groups}
    runners = {h.name for h in lab.HOSTS if h.processing}
    assert list(etcd_plays.values()) == [members], etcd_plays
    clients = [hosts for name, (hosts, block) in plays.items()
               if "Ensure no etcd member's data or certificates are on this host." in block]
    assert clients == [runners], plays.keys()


@pytest.mark.parametrize("layout", ["old lab (etcd on all but the router)", "one runner as member"])
def test_a_processing_host_as_member_is_refused(tmp_path, layout):
    """An inventory that makes a host running users' containers an etcd member
    is refused before anything is configured, with a message that names the
    host and says where the members belong."""
    text = lab.inventory_text()
    extra = "run1\nrun2\n" if layout.startswith("old") else "run2\n"
    text = text.replace("[etcd]\n", "[etcd]\n" + extra)
    out = run_playbook(tmp_path, text)
    assert out.returncode != 0, out.stdout[-3000:]
    message = re.sub(r"\s+", " ", out.stdout + out.stderr)
    assert "in both [etcd] and [processing]" in message, message[-3000:]
    assert ("run1, run2 are" if extra == "run1\nrun2\n" else "run2 is") in message
    assert "leave processing hosts out of [etcd]" in message
    assert not list((tmp_path / "out").glob("*.etcd.env"))


def test_one_machine_may_carry_every_role_when_it_says_so(tmp_path):
    """The example inventory (one machine in every group) deploys: it opts in
    explicitly, which a lab of several machines never needs to."""
    text = (ANSIBLE / "inventory.example.ini").read_text()
    assert "etcd_members_may_run_tasks=true" in text
    out = run_playbook(tmp_path, text)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    refused = run_playbook(tmp_path, text.replace(" etcd_members_may_run_tasks=true", ""))
    assert refused.returncode != 0 and "pink1 is in both" in re.sub(r"\s+", " ", refused.stdout)


def test_docs_say_where_the_quorum_lives():
    """The operators' guide and the role's README state the placement rule."""
    for path in (REPO / "docs" / "deploy.md", ANSIBLE / "roles" / "etcd" / "README.md",
                 REPO / "docs" / "security.md"):
        text = path.read_text()
        assert "etcd_members_may_run_tasks" in text and "processing" in text, path
