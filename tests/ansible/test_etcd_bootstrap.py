"""A change of the etcd member list restarts no running member, and a
restart never stops more than one member with data at a time.

How a member without data starts (ETCD_INITIAL_CLUSTER, its state and
token) is in /etc/default/etcd-bootstrap, or etcd-join for a member added
later, files only a member without data has; /etc/default/etcd, whose change
restarts the member, names no other member (roles/etcd/tasks/membership.yml).
These tests render the role's files with the real `ansible-playbook` for 3
and then 4 members, start real etcd 3.4 processes from what was rendered
(members on 127.0.0.1 to 127.0.0.4), and run the role's rolling restart
(tasks/restart.yml) against stand-ins for systemctl and etcdctl.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest
import yaml

from devcluster.ports import free_port
from devcluster.processes import wait_until
from tests.ansible.test_ansible import ANSIBLE, REPO, ansible_playbook

ROLE = ANSIBLE / "roles" / "etcd"
RESTART_HANDLER = "Restart etcd"
MODULES = ("ansible.builtin.template", "template", "ansible.builtin.copy", "copy")

# Renders templates of the role for every member, as the role would, on the
# control host only: the role's defaults come in at their own precedence
# (include_role), so the inventory's host variables beat them.
RENDER_PLAYBOOK = """\
- name: The etcd role's files, as each member would get them.
  hosts: etcd
  gather_facts: false
  tasks:
    - name: Load the role's defaults (its placement check).
      ansible.builtin.include_role:
        name: etcd
        tasks_from: placement.yml
        public: true
    - name: Render the files.
      ansible.builtin.template:
        src: "{{ item }}"
        dest: "{{ render_out }}/{{ inventory_hostname }}/{{ item | basename }}"
        mode: "0644"
      loop: "{{ render_templates }}"
      delegate_to: localhost
"""


def run_ansible(work: Path, inventory: str, playbook: str, extra: dict | None = None,
                path: str | None = None) -> subprocess.CompletedProcess:
    """ansible-playbook with the repository's group_vars and the role under
    test, on the control host; `path` replaces PATH (stand-in commands)."""
    binary = ansible_playbook()
    if not binary:
        pytest.skip("ansible-playbook is not installed (pip install '.[deploy]')")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "group_vars").exists():
        shutil.copytree(ANSIBLE / "group_vars", work / "group_vars")
    (work / "inventory.ini").write_text(inventory)
    (work / "play.yml").write_text(playbook)
    (work / "extra.json").write_text(json.dumps(extra or {}))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROLE.parent), "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_LOCALHOST_WARNING": "false"}
    if path:
        env["PATH"] = path
    return subprocess.run([binary, "-i", "inventory.ini", "-e", "@extra.json", "play.yml"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)


def inventory(members: dict[str, str], host_vars: dict[str, str] | None = None) -> str:
    """[etcd] with `members` (name: address, plus `host_vars`' line for it);
    the first is the web host, which holds root's certificate."""
    lines = [f"{name} ansible_host={address} {(host_vars or {}).get(name, '')}".rstrip()
             for name, address in members.items()]
    return "[etcd]\n" + "\n".join(lines) + f"\n\n[web]\n{next(iter(members))}\n"


def render(work: Path, members: dict[str, str], templates: list[Path], host_vars: dict[str, str] | None = None,
           **extra) -> dict[str, dict[str, str]]:
    """Each member's rendering of `templates`: {member: {file name: text}}."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    for member in members:
        (out / member).mkdir(parents=True)
    result = run_ansible(work, inventory(members, host_vars), RENDER_PLAYBOOK,
                         {"render_out": str(out), "render_templates": [str(t) for t in templates], **extra})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return {d.name: {f.name: f.read_text() for f in d.iterdir()} for d in out.iterdir()}


def role_tasks(tasks: list, whens: tuple = ()):
    """Every task of a task list, nested blocks opened, with the `when`
    conditions it runs under (its blocks' and its own)."""
    for task in tasks or []:
        conditions = task.get("when", [])
        here = whens + tuple(conditions if isinstance(conditions, list) else [conditions])
        if "block" in task:
            yield from role_tasks(task["block"], here)
        else:
            yield task, here


def tasks_that_restart(role: Path, start: str) -> list[dict]:
    """The role's tasks that notify the restart handler on a member that
    starts as `start` (membership.yml's etcd_start: data, new or join):
    conditions that mention nothing else known count as true, so a task
    is left out only when its conditions rule out that kind of member."""
    env = jinja2.Environment(undefined=jinja2.ChainableUndefined)

    def may_hold(condition) -> bool:
        try:
            return env.compile_expression(str(condition))(etcd_start=start) is not False
        except jinja2.TemplateError:  # Ansible's own filters and tests: it may
            return True

    found = []
    for path in sorted((role / "tasks").glob("*.yml")):
        for task, whens in role_tasks(yaml.safe_load(path.read_text())):
            notify = task.get("notify", [])
            if RESTART_HANDLER in (notify if isinstance(notify, list) else [notify]) and all(map(may_hold, whens)):
                found.append(task)
    return found


def restart_inputs(role: Path, start: str) -> tuple[list[Path], list[str]]:
    """What a member's restart depends on: the templates of the tasks that
    would restart it, and the sources of the files copied as they are (the
    certificates, from the control host: the same for any member list)."""
    templates, copied = [], []
    for task in tasks_that_restart(role, start):
        module = next(m for m in MODULES if m in task)
        args = task[module]
        if module.endswith("template"):
            templates.append(role / "templates" / args["src"])
        else:
            assert "src" in args and "content" not in args, f"a restart depends on inline content: {task['name']}"
            copied.append(args["src"])
    return templates, copied


PRODUCTION = {"web1": "10.0.0.11", "web2": "10.0.0.12", "db": "10.0.0.30"}


def test_a_new_member_list_changes_nothing_a_running_member_restarts_for(tmp_path):
    """From 3 members to 4: every file whose change restarts a member that
    has its data renders byte for byte the same on the 3 members, while the
    bootstrap settings a new cluster's member reads do name the fourth."""
    templates, copied = restart_inputs(ROLE, "data")
    assert templates, "nothing renders /etc/default/etcd for a running member"
    assert all("etcd_tls_src_dir" in src for src in copied), copied  # the certificates only
    bootstrap = ROLE / "templates" / "etcd.bootstrap.j2"
    files = [*templates, bootstrap] if bootstrap.exists() else templates
    three = render(tmp_path / "three", PRODUCTION, files)
    four = render(tmp_path / "four", {**PRODUCTION, "web3": "10.0.0.13"}, files)
    for member in PRODUCTION:
        for template in templates:
            assert three[member][template.name] == four[member][template.name], (
                f"{template.name} of {member} changes when a member is added, and its change "
                f"restarts every member at once:\n{three[member][template.name]}\n---\n"
                f"{four[member][template.name]}")
    # The member list is still rendered, where only a member without data reads it.
    assert "web3=https://10.0.0.13:2380" in four["web1"]["etcd.bootstrap.j2"]
    assert "web3" not in three["web1"]["etcd.bootstrap.j2"]
    assert bootstrap not in templates and bootstrap in restart_inputs(ROLE, "new")[0]
    assert ROLE / "templates" / "etcd.join.j2" in restart_inputs(ROLE, "join")[0]


# ---------------------------------------------------------------- real etcd

def free_peer_port(addresses: list[str]) -> int:
    """A port free on every one of `addresses` (the members share the peer port)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            for address in addresses:
                with socket.socket() as sock:
                    sock.bind((address, port))
            return port
        except OSError:
            continue
    raise AssertionError("no port free on every member address")


def environment(*texts: str) -> dict[str, str]:
    """What etcd.service reads from these files, in its order (a later
    file wins): /etc/default/etcd, then the drop-in's first-start files."""
    env = {}
    for text in texts:
        for line in text.splitlines():
            if line.startswith("ETCD_"):
                key, value = line.split("=", 1)
                env[key] = value.strip('"')
    return env


class Members:
    """etcd processes on 127.0.0.x, and etcdctl with the members' certificate."""

    def __init__(self, tmp: Path, pki: Path, clients: dict[str, int]):
        self.tmp, self.pki, self.clients, self.procs = tmp, pki, clients, {}

    def start(self, name: str, env: dict[str, str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(["etcd"], env={"PATH": os.environ["PATH"], **env},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        proc.wait(15)

    def ctl(self, *argv: str) -> subprocess.CompletedProcess:
        endpoints = ",".join(f"https://127.0.0.1:{self.clients[n]}" for n in self.procs)
        return subprocess.run(["etcdctl", f"--endpoints={endpoints}", f"--cacert={self.pki}/ca.pem",
                               f"--cert={self.pki}/member.pem", f"--key={self.pki}/member.key",
                               "--dial-timeout=2s", "--command-timeout=5s", *argv],
                              env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, text=True)

    def healthy(self, count: int) -> bool:
        listed = json.loads(self.ctl("member", "list", "-w", "json").stdout)["members"]
        health = self.ctl("endpoint", "health", "--cluster")
        return (len(listed) == count and all(m.get("name") for m in listed) and health.returncode == 0
                and (health.stdout + health.stderr).count(" is healthy") == count)  # 3.4: on stderr

    def wait_healthy(self, count: int, timeout: float = 60) -> None:
        if not wait_until(lambda: self.healthy(count), timeout, interval=0.5):
            logs = "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in self.tmp.glob("*.log"))
            raise AssertionError(f"no healthy cluster of {count}:\n{logs}")

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def test_the_rendered_bootstrap_forms_a_cluster_and_a_member_joins_it(tmp_path):
    """Real etcd from the rendered files: 3 members found a cluster from
    /etc/default/etcd plus etcd-bootstrap; a fourth, added with `member add`,
    joins from etcd-join; the running members' /etc/default/etcd renders the
    same for 4 members, and a member restarted from it alone (it has data,
    so the role leaves no first-start file on it) rejoins the cluster."""
    if not shutil.which("etcd") or not shutil.which("etcdctl"):
        pytest.skip("etcd is not installed (apt-get install etcd-server etcd-client)")
    names = ["m1", "m2", "m3", "m4"]
    addresses = {name: f"127.0.0.{i}" for i, name in enumerate(names, 1)}
    pki = tmp_path / "pki"
    subprocess.run([str(REPO / "ssl" / "make-certs.sh"), "--web-dir", str(tmp_path / "ssl"),
                    "--db-dir", str(tmp_path / "ssl_db"), "--etcd-dir", str(pki),
                    ",".join(f"IP:{a}" for a in addresses.values())], check=True, capture_output=True)
    peer = free_peer_port(list(addresses.values()))
    clients = {}
    while len(set(clients.values())) < len(names):
        clients = {name: free_port() for name in names}
    host_vars = {n: f"etcd_client_port={clients[n]} etcd_peer_port={peer} etcd_pki_dir={pki} "
                    f"etcd_data_dir={tmp_path / n}" for n in names}
    main, bootstrap, join = (ROLE / "templates" / f"etcd.{t}.j2" for t in ("default", "bootstrap", "join"))

    three = render(tmp_path / "work", {n: addresses[n] for n in names[:3]}, [main, bootstrap], host_vars)
    members = Members(tmp_path, pki, clients)
    try:
        for name in names[:3]:  # a new cluster: its members start together
            members.start(name, environment(three[name][main.name], three[name][bootstrap.name]))
        members.wait_healthy(3)

        # etcd takes a member add only once every member has been connected
        # for a while (its strict reconfiguration check): the role adds a
        # member to a cluster that has been running.
        add = ["member", "add", "m4", f"--peer-urls=https://{addresses['m4']}:{peer}"]
        assert wait_until(lambda: members.ctl(*add).returncode == 0, 30), members.ctl(*add).stderr
        listed = members.ctl("member", "list", "-w", "json")
        four = render(tmp_path / "work", addresses, [main, join], host_vars,
                      etcd_member_list={"stdout": listed.stdout})
        for name in names[:3]:
            assert three[name][main.name] == four[name][main.name], name
        members.start("m4", environment(four["m4"][main.name], four["m4"][join.name]))
        members.wait_healthy(4)

        members.stop("m1")  # a running member's restart reads /etc/default/etcd alone
        members.start("m1", environment(four["m1"][main.name]))
        members.wait_healthy(4)
    finally:
        members.close()


def test_a_member_without_data_and_first_start_settings_founds_nothing(tmp_path):
    """/etc/default/etcd alone, on an empty data directory (a member whose
    data was lost, its first-start file removed): etcd refuses to start
    instead of founding a one-member cluster of its own next to the real one."""
    if not shutil.which("etcd"):
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    pki = tmp_path / "pki"
    subprocess.run([str(REPO / "ssl" / "make-certs.sh"), "--web-dir", str(tmp_path / "ssl"),
                    "--db-dir", str(tmp_path / "ssl_db"), "--etcd-dir", str(pki)],
                   check=True, capture_output=True)
    host_vars = {"m1": f"etcd_client_port={free_port()} etcd_peer_port={free_port()} etcd_pki_dir={pki} "
                       f"etcd_data_dir={tmp_path / 'm1'}"}
    main = ROLE / "templates" / "etcd.default.j2"
    rendered = render(tmp_path / "work", {"m1": "127.0.0.1"}, [main], host_vars)
    proc = subprocess.Popen(["etcd"], env={"PATH": os.environ["PATH"], **environment(rendered["m1"][main.name])},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"etcd runs on an empty data directory from /etc/default/etcd alone:\n{log[-2000:]}")
    assert proc.returncode != 0 and "cannot fetch cluster info" in log, log[-2000:]
    assert not list((tmp_path / "m1").glob("member/wal/*.wal"))


# ---------------------------------------------------------------- rolling restart

# Stand-ins: etcdctl answers for members m1..m3, a member being restarted
# (a file `down-NAME`) as unhealthy; systemctl restarts the member whose
# etcd-restart.sh called it (its parent's arguments), logging when.
FAKE_ETCDCTL = """#!/bin/sh
state={state}
case "$*" in
*"member list"*)
    for m in m1 m2 m3; do echo "1$m, started, $m, https://127.0.0.1:1$m, $(cat $state/url-$m), false"; done ;;
*"endpoint health"*)
    rc=0
    for m in m1 m2 m3; do
        if [ -e $state/down-$m ]; then echo "$(cat $state/url-$m) is unhealthy: down" >&2; rc=1
        else echo "$(cat $state/url-$m) is healthy: successfully committed proposal: took = 1ms" >&2; fi
    done
    exit $rc ;;
*) echo "unexpected: $*" >&2; exit 2 ;;
esac
"""
FAKE_SYSTEMCTL = """#!/bin/sh
state={state}
[ "$*" = "restart etcd.service" ] || {{ echo "unexpected: $*" >&2; exit 2; }}
m=$(tr '\\0' '\\n' < /proc/$PPID/cmdline | grep -x 'm[0-9]')
touch $state/down-$m
echo "begin $m $(date +%s.%N)" >> $state/log
sleep 1
echo "end $m $(date +%s.%N)" >> $state/log
rm $state/down-$m
"""
RESTART_PLAYBOOK = """\
- name: The etcd role's restart of marked members.
  hosts: etcd
  gather_facts: false
  tasks:
    - name: Restart the marked members as the role does.
      ansible.builtin.include_role:
        name: etcd
        tasks_from: restart.yml
"""


def fake_commands(tmp_path: Path) -> tuple[Path, str]:
    state, bin_dir = tmp_path / "state", tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    for i, member in enumerate(("m1", "m2", "m3"), 1):
        (state / f"url-{member}").write_text(f"https://127.0.0.1:2{i}79")
    for name, text in (("etcdctl", FAKE_ETCDCTL), ("systemctl", FAKE_SYSTEMCTL)):
        (bin_dir / name).write_text(text.format(state=state))
        (bin_dir / name).chmod(0o755)
    return state, f"{bin_dir}:{os.environ['PATH']}"


def restart_turns(state: Path) -> list[tuple[str, float, float]]:
    """(member, began, ended) of each restart, from the stand-in's log."""
    log = (state / "log").read_text().split() if (state / "log").exists() else []
    events = [(log[i], log[i + 1], float(log[i + 2])) for i in range(0, len(log), 3)]
    begins = [(m, t) for kind, m, t in events if kind == "begin"]
    ends = dict((m, t) for kind, m, t in events if kind == "end")
    return [(m, t, ends[m]) for m, t in begins]


def test_members_with_data_restart_one_at_a_time(tmp_path):
    """Marked members that have data (a renewed member.pem reaches them
    all) restart in turn through the role's tasks: never two at once, an
    unmarked member not at all, and each mark is gone afterwards."""
    state, path = fake_commands(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    for member in ("m1", "m2", "m3"):
        if member != "m2":
            (marks / member).write_text("changed\n")
    host_vars = {m: f"ansible_connection=local ansible_python_interpreter={sys.executable} "
                    f"etcd_client_port=2{i}79 etcd_start=data etcd_restart_mark={marks / m} "
                    f"etcd_pki_dir={tmp_path / 'pki'} etcd_health_timeout=10"
                 for i, m in enumerate(("m1", "m2", "m3"), 1)}
    out = run_ansible(tmp_path / "work", inventory({m: "127.0.0.1" for m in host_vars}, host_vars),
                      RESTART_PLAYBOOK, path=path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    turns = restart_turns(state)
    assert [m for m, _, _ in turns] == ["m1", "m3"], turns
    (_, _, first_ended), (_, second_began, _) = turns
    assert second_began >= first_ended, f"two members were down at once: {turns}"
    assert not list(marks.iterdir())


def test_a_member_is_not_restarted_while_another_is_down(tmp_path):
    """etcd-restart.sh restarts nothing while another member is unhealthy:
    with a member of three down, a restart would cost the quorum."""
    state, path = fake_commands(tmp_path)
    (state / "down-m2").touch()
    started = time.monotonic()
    out = subprocess.run([str(ROLE / "files" / "etcd-restart.sh"), "m1", "https://127.0.0.1:2179",
                          "https://127.0.0.1:2179", str(tmp_path / "pki"), "2"],
                         env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "could cost the quorum" in out.stderr, out.stderr
    assert not restart_turns(state) and time.monotonic() - started >= 2
    (state / "down-m2").unlink()  # all healthy: m1 goes
    out = subprocess.run(out.args, env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [m for m, _, _ in restart_turns(state)] == ["m1"]
