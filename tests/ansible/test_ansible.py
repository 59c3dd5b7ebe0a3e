"""The Ansible deployment in ansible/: syntax, house style, no default secrets.

Static checks run everywhere (no Ansible needed); the syntax check needs
`ansible-playbook` in this venv or on PATH (`pip install '.[deploy]'`). An
opt-in converge (PINK_ANSIBLE_CONVERGE=1) applies the `common` and
`pink_runner` roles twice to a Debian systemd container and requires the
second run to change nothing, then logs in to the SFTP account it made.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import docker
import jinja2
import pytest

from pink import config as pink_config
from tests import images

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
ROLES = sorted(p for p in (ANSIBLE / "roles").iterdir() if p.is_dir())
EXPECTED_ROLES = {"common", "etcd", "mariadb", "redis", "pink_web", "pink_workers",
                  "pink_runner", "docker", "nginx", "backup"}
TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):", re.M)
SECRET_KEY = re.compile(r"(password|passwd|secret|requirepass|(?<!cluster_)token)", re.I)
# Values that are not secrets: empty, or "no password" markers of useradd.
NOT_A_SECRET = {"", '""', "''", "*", '"*"', "'*'", "!", '"!"', "'!'"}


def ansible_playbook() -> str | None:
    here = Path(sys.executable).parent / "ansible-playbook"
    return str(here) if here.exists() else shutil.which("ansible-playbook")


def yaml_files() -> list[Path]:
    return sorted(p for p in ANSIBLE.rglob("*") if p.suffix in (".yml", ".yaml")
                  and "credentials" not in p.parts and "build" not in p.parts)


def task_chunks(path: Path) -> list[tuple[str, str]]:
    """A task file cut at each `- name:` (nested block tasks included), with
    the indentation of the task's own keys."""
    parts = re.split(r"(?m)^( *)- name:", path.read_text())
    return [(parts[i] + "  ", parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def test_roles_are_all_there():
    assert {role.name for role in ROLES} == EXPECTED_ROLES
    for name in ("site.yml", "inventory.example.ini", "group_vars/all.yml"):
        assert (ANSIBLE / name).is_file(), name


def test_syntax_check():
    playbook = ansible_playbook()
    if not playbook:
        pytest.skip("ansible-playbook is not installed (pip install '.[deploy]')")
    for book in ("site.yml", "etcd-remove.yml", "backup.yml", "restore.yml"):
        out = subprocess.run([playbook, "--syntax-check", "-i", "ansible/inventory.example.ini",
                              f"ansible/{book}", "-e", "member=pink1"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_layout_and_prefixed_defaults(role):
    for name in ("defaults/main.yml", "tasks/main.yml", "README.md"):
        assert (role / name).is_file(), f"{role.name} lacks {name}"
    keys = TOP_KEY.findall((role / "defaults" / "main.yml").read_text())
    assert keys, f"{role.name}: defaults/main.yml defines nothing"
    unprefixed = [k for k in keys if not k.startswith(role.name + "_")]
    assert not unprefixed, f"{role.name}: defaults not prefixed with {role.name}_: {unprefixed}"
    readme = (role / "README.md").read_text()
    undocumented = [k for k in keys if k not in readme
                    and not any(k.startswith(p.strip("`_ ")) for p in
                                re.findall(r"`([a-z_]+)_`", readme))]
    assert not undocumented, f"{role.name}: README.md does not mention {undocumented}"


def test_shell_and_command_tasks_declare_their_changes():
    offenders = []
    for path in yaml_files():
        if "tasks" not in path.parts and "handlers" not in path.parts:
            continue
        for indent, chunk in task_chunks(path):
            if re.search(rf"(?m)^{indent}(ansible\.builtin\.)?(shell|command|raw|script):", chunk):
                if not re.search(rf"(?m)^{indent}(changed_when|  creates|  removes):", chunk):
                    offenders.append(f"{path.relative_to(ANSIBLE)}: {chunk.splitlines()[0].strip()}")
    assert not offenders, "shell/command tasks without changed_when/creates:\n" + "\n".join(offenders)


def test_task_names_are_present():
    for path in yaml_files():
        if "tasks" in path.parts:
            text = path.read_text()
            unnamed = re.findall(r"(?m)^- (?!name:)\S+:", text)
            assert not unnamed, f"{path}: unnamed tasks {unnamed}"


def test_no_default_passwords():
    """Secret-looking settings hold templates (generated or vaulted), never literals."""
    offenders = []
    for path in sorted(ANSIBLE.rglob("*")):
        if not path.is_file() or "credentials" in path.parts or "build" in path.parts:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            m = re.match(r"^\s*-?\s*([\w.-]+)\s*[:=]\s*(.*?)\s*$", line)  # YAML, INI, TOML
            if not m:
                m = re.match(r"^\s*(requirepass|masterauth)\s+(.*?)\s*$", line)  # redis.conf
            if not m or not SECRET_KEY.search(m.group(1)):
                continue
            value = m.group(2)
            if value in NOT_A_SECRET or "{{" in value or value.endswith((">-", "|")):
                continue
            offenders.append(f"{path.relative_to(ANSIBLE)}:{number}: {line.strip()}")
    assert not offenders, "literal secrets:\n" + "\n".join(offenders)
    group_vars = (ANSIBLE / "group_vars" / "all.yml").read_text()
    for name in ("pink_db_password", "pink_redis_password", "pink_secret_key"):
        line = re.search(rf"(?m)^{name}:.*$", group_vars).group(0)
        assert "lookup('ansible.builtin.password'" in line, line


def test_units_run_pink_with_the_config_file():
    units = {p.name: p.read_text() for p in ANSIBLE.rglob("*.service.j2")
             if "backup" not in p.parts}  # the backup role's oneshot units run as root
    assert set(units) == {"pink-web.service.j2", "pink-worker@.service.j2", "pink-notify@.service.j2",
                          "pink-leader.service.j2", "pink-runner.service.j2"}
    assert "--queues notify" in units["pink-notify@.service.j2"]
    for name, text in units.items():
        unit = name.split(".")[0].rstrip("@")
        program = "pink-worker" if unit == "pink-notify" else unit  # its notify-only instances
        assert re.search(rf"ExecStart={{{{ pink_venv }}}}/bin/{program} --config "
                         r"{{ pink_config_file }}", text), name
        assert "Restart=always" in text and "NoNewPrivileges=yes" in text, name
        assert ("User=root" if program == "pink-runner" else "User={{ pink_user }}") in text


def test_router_streams_uploads():
    text = (ANSIBLE / "roles" / "nginx" / "templates" / "pink.conf.j2").read_text()
    for directive in ("proxy_request_buffering off;", "client_max_body_size {{ nginx_max_body_size }};",
                      "proxy_buffering off;", "proxy_ssl_verify on;"):
        assert directive in text


def test_sftp_account_is_chrooted_sftp_only():
    text = (ANSIBLE / "roles" / "pink_runner" / "templates" / "pink-xfer.conf.j2").read_text()
    for directive in ("Match User {{ pink_xfer_user }}", "ChrootDirectory {{ pink_xfer_chroot }}",
                      "ForceCommand internal-sftp", "PasswordAuthentication no",
                      "AllowTcpForwarding no", "PermitTTY no"):
        assert directive in text


def render_pink_toml(**overrides) -> dict:
    """Render common's pink.toml template as Ansible would, with stand-in vars."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    env.filters.update(to_json=json.dumps, bool=lambda v: str(v).lower() in ("1", "true", "yes", "on"),
                       extract=lambda name, found, attr: found[name][attr])
    variables = {
        "ansible_managed": "test", "inventory_hostname": "web1", "pink_address": "10.0.0.11",
        "pink_config_file": "/etc/pink/pink.toml", "pink_redis_url": "redis://:x@10.0.0.11:6379/0",
        "pink_etcd_endpoints": ["10.0.0.11:2379", "10.0.0.12:2379"], "pink_etcd_prefix": "/pink",
        "pink_db_host": "db1", "hostvars": {"db1": {"pink_address": "10.0.0.20"}},
        "pink_db_port": 3306, "pink_db_user": "pink", "pink_db_password": "p" * 32,
        "pink_db_name": "pink", "pink_etc_dir": "/etc/pink", "pink_data_dir": "/var/lib/pink",
        "pink_secret_key": "s" * 48, "pink_https_port": 8443, "pink_tls_install_dir": "/etc/pink/tls",
        "pink_ssh_dir": "/var/lib/pink/ssh", "pink_xfer_chroot": "/var/lib/pink/runner/chroot",
        "pink_xfer_port": 22, "pink_xfer_user": "pink-xfer",
        "groups": {"web": ["web1"], "processing": ["web1"]},  # one host in both roles, as the example
        "common_web_max_upload_bytes": 68719476736,  # group_vars' pink_max_upload_bytes
        "common_web_blob_budget_bytes": 214748364800,  # group_vars' pink_web_blob_budget_bytes
        "pink_redis_sentinels": [], "pink_redis_master": "pink", "common_etcd_user": "pink-web",
    }
    defaults = (ANSIBLE / "roles" / "common" / "defaults" / "main.yml").read_text()
    for key, value in re.findall(r"(?m)^(common_\w+):\s*(.+)$", defaults):
        if "{{" not in value and not value.startswith("["):
            try:
                variables[key] = json.loads(value)
            except ValueError:
                variables[key] = value
    variables["common_pink_host"] = "web1"
    variables["common_runner_gpus"] = []
    variables.update(overrides)
    template = env.from_string(
        (ANSIBLE / "roles" / "common" / "templates" / "pink.toml.j2").read_text())
    return tomllib.loads(template.render(**variables))


def test_pink_toml_template_covers_every_setting():
    data = render_pink_toml()
    config = pink_config.from_mapping(data)  # refuses unknown settings
    assert config.db.host == "10.0.0.20" and config.runner.gpus == []
    example = tomllib.loads((REPO / "docs" / "pink.example.toml").read_text())
    for key, value in example.items():
        if isinstance(value, dict):
            missing = set(value) - set(data.get(key, {}))
            assert not missing, f"[{key}] lacks {missing}"
        else:
            assert key in data, key
    routed = render_pink_toml(groups={"web": ["web1"], "processing": ["web1"], "router": ["router"]},
                              hostvars={"db1": {"pink_address": "10.0.0.20"},
                                        "router": {"pink_address": "10.0.0.10"}})
    assert routed["web"]["trusted_proxies"] == ["10.0.0.10"]  # the client's address for login throttling
    assert render_pink_toml(common_runner_gpus="nvml")["runner"]["gpus"] == []
    assert render_pink_toml(common_runner_gpus=["GPU-1"])["runner"]["gpus"] == ["GPU-1"]


def test_a_processing_host_gets_no_secret_it_does_not_need():
    """Runners run untrusted containers as root: their config names etcd and
    the runner, and holds no database password, Flask secret, Redis password
    or SSH key; a web-only host gets no [runner]."""
    groups = {"web": ["web1"], "processing": ["run1"]}
    runner = render_pink_toml(inventory_hostname="run1", common_pink_host="run1", groups=groups,
                              common_etcd_user="pink-runner")
    assert set(runner) == {"host", "node_ttl", "leader_ttl", "reconcile_interval", "max_attempts",
                           "etcd", "runner", "limits"}  # limits: the runner caps exports
    assert "p" * 32 not in json.dumps(runner) and "s" * 48 not in json.dumps(runner)
    config = pink_config.from_mapping(runner)
    assert config.runner.name == "run1" and config.etcd.endpoints and not config.db.password
    web = render_pink_toml(groups=groups)
    assert {"db", "web", "ssh", "redis_url"} <= set(web) and "runner" not in web
    assert web["db"]["password"] == "p" * 32


def render_etcd_default(bootstrap: bool = False, **overrides) -> dict[str, str]:
    """The etcd role's /etc/default/etcd rendered as Ansible would (stand-in
    inventory, the role's own defaults), as the environment etcd.service reads;
    with `bootstrap`, as at a new cluster's first start, when the drop-in
    adds /etc/default/etcd-bootstrap (the member list) after it."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["unique"] = lambda values: list(dict.fromkeys(values))
    role = ANSIBLE / "roles" / "etcd"
    variables = {"ansible_managed": "test", "inventory_hostname": "etcd1"}
    for key, value in re.findall(r"(?m)^(etcd_\w+):\s*(.+)$", (role / "defaults" / "main.yml").read_text()):
        if "{{" not in value:
            variables[key] = value.strip().strip('"')
    variables.update(etcd_name="etcd1", etcd_address="10.0.0.31", etcd_client_port=2379,
                     etcd_peer_port=2380, etcd_members=["etcd1"],
                     hostvars={"etcd1": {"pink_address": "10.0.0.31"}})
    variables.update(overrides)
    files = ["etcd.default.j2", "etcd.bootstrap.j2"] if bootstrap else ["etcd.default.j2"]
    text = "".join(env.from_string((role / "templates" / name).read_text()).render(**variables) for name in files)
    return dict(re.findall(r'(?m)^(ETCD_\w+)="(.*)"$', text))  # a later file's setting wins


def go_seconds(duration: str) -> float:
    """Seconds in a Go duration such as `5m`, `1h30m` or `5m0s`."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_etcd_compacts_its_history():
    """Without compaction etcd keeps every revision until its quota is full."""
    env = render_etcd_default()
    assert env["ETCD_AUTO_COMPACTION_MODE"] == "periodic"
    assert 60 <= go_seconds(env["ETCD_AUTO_COMPACTION_RETENTION"]) <= 3600
    assert "ETCD_QUOTA_BACKEND_BYTES" not in env  # etcd's default (2 GiB) stays


def test_etcd_starts_with_the_rendered_environment(tmp_path):
    """etcd itself, given exactly what etcd.service would read at a new
    cluster's first start (/etc/default/etcd, then etcd-bootstrap), accepts
    the settings (TLS, compaction); the role's auth script then turns
    authentication on, after which PINK's store reaches its prefix only with
    its client certificate, and nothing else gets in."""
    if not shutil.which("etcd"):
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    from devcluster.ports import free_port
    from devcluster.processes import wait_until
    from pink.errors import PinkError
    from pink.store import Store

    pki = tmp_path / "pki"
    subprocess.run([str(REPO / "ssl" / "make-certs.sh"), "--web-dir", str(tmp_path / "ssl"),
                    "--db-dir", str(tmp_path / "ssl_db"), "--etcd-dir", str(pki)],
                   check=True, capture_output=True)
    client, peer = free_port(), free_port()
    env = render_etcd_default(bootstrap=True, etcd_address="127.0.0.1", etcd_client_port=client,
                              etcd_peer_port=peer, etcd_data_dir=str(tmp_path / "data"), etcd_pki_dir=str(pki),
                              hostvars={"etcd1": {"pink_address": "127.0.0.1"}})
    log = tmp_path / "etcd.log"
    with open(log, "wb") as fh:  # zap: etcd 3.4 logs its whole configuration as JSON at start
        proc = subprocess.Popen(["etcd"], env={"PATH": os.environ["PATH"], **env, "ETCD_LOGGER": "zap"},
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_until(lambda: '"auto-compaction-retention"' in log.read_text(), 30), log.read_text()
        text = log.read_text()
        assert '"auto-compaction-mode":"periodic"' in text, text
        retention = re.search(r'"auto-compaction-retention":"([^"]+)"', text).group(1)
        assert go_seconds(retention) == go_seconds(env["ETCD_AUTO_COMPACTION_RETENTION"])
        assert proc.poll() is None, text

        script = ANSIBLE / "roles" / "etcd" / "files" / "etcd-auth.sh"
        runner_prefixes = ",".join([f"readwrite:/pink/{p}/" for p in ("tasks", "nodes", "alloc", "assign")]
                                   + ["read:/pink/control/"])
        argv = [str(script), f"https://127.0.0.1:{client}", str(pki / "ca.pem"), str(pki), "member",
                "pink-web=readwrite:/pink/", f"pink-runner={runner_prefixes}"]
        assert wait_until(lambda: subprocess.run(argv, capture_output=True).returncode == 0, 30)
        again = subprocess.run(argv, capture_output=True, text=True, check=True)
        assert again.stdout == "", "the auth script changed things on its second run"

        def store(user: str | None, prefix: str = "/pink") -> Store:
            files = {"cert": str(pki / f"{user}.pem"), "key": str(pki / f"{user}.key")} if user else {}
            return Store([f"127.0.0.1:{client}"], prefix, timeout=3, ca=str(pki / "ca.pem"), **files)

        web, runner = store("pink-web"), store("pink-runner")
        assert web.create(web.keys.node("probe"), {"by": "web"})
        assert runner.get(runner.keys.node("probe")).value == {"by": "web"}
        for intruder in (store("member"), store(None), store("pink-web", prefix="/other")):
            with pytest.raises(PinkError):
                intruder.get(intruder.keys.node("probe"))
        with pytest.raises(PinkError):  # a runner may not say where web nodes are
            runner.create(runner.keys.web("web9"), {"url": "https://192.0.2.1"})
        assert web.create(web.keys.control("probe"), {"state": "draining"})
        assert runner.get(runner.keys.control("probe")).value == {"state": "draining"}
        with pytest.raises(PinkError):  # nor give itself orders
            runner.delete(runner.keys.control("probe"))
        assert web.create(web.keys.web("web9"), {"url": "https://10.0.0.9"})
        with pytest.raises(PinkError, match="ca"):
            Store([f"127.0.0.1:{client}"], "/pink", cert=str(pki / "pink-web.pem"),
                  key=str(pki / "pink-web.key"))
    finally:
        proc.terminate()
        proc.wait(15)


# ---------------------------------------------------------------- converge (opt-in)

CONVERGE_IMAGE = "pink/ansible-target:bookworm"
ROOTFS = Path(os.environ.get("PINK_ANSIBLE_ROOTFS", "/var/tmp/pink-ansible/rootfs.tar"))
ROOTFS_PACKAGES = ("systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,"
                   "openssh-server,ca-certificates,iproute2,sudo")
CONVERGE_PLAYBOOK = """\
- name: Every PINK host.
  hosts: all
  become: true
  roles: [common]
- name: The processing hosts (no docker role, no nested Docker here).
  hosts: processing
  become: true
  roles: [pink_runner]
"""


def sh(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


@pytest.fixture
def systemd_container(tmp_path):
    """A Debian 12 container booted with systemd, reachable over SSH as root."""
    if not shutil.which("docker"):
        pytest.skip("docker is not installed")
    if subprocess.run(["docker", "image", "inspect", CONVERGE_IMAGE],
                      capture_output=True).returncode:
        if not ROOTFS.exists():
            if not shutil.which("mmdebstrap"):
                pytest.skip("mmdebstrap is not installed (apt-get install mmdebstrap)")
            ROOTFS.parent.mkdir(parents=True, exist_ok=True)
            sh("mmdebstrap", "--variant=minbase", f"--include={ROOTFS_PACKAGES}",
               "bookworm", str(ROOTFS), timeout=900)
        client = docker.from_env()
        with images.tracked(client, CONVERGE_IMAGE):  # removed at the session's end
            sh("docker", "import", "--change", 'CMD ["/sbin/init"]', str(ROOTFS), CONVERGE_IMAGE)
        client.close()
    name = f"pink-ansible-{secrets.token_hex(4)}"
    sh("docker", "run", "-d", "--name", name, "--hostname", "pink1",
       "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined", "--cgroupns=host",
       "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run", "--tmpfs", "/run/lock",
       CONVERGE_IMAGE, "/sbin/init")
    try:
        key = tmp_path / "root_key"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        setup = ("mkdir -p -m 700 /root/.ssh && cat > /root/.ssh/authorized_keys && "
                 "(test -f /etc/ssh/ssh_host_ed25519_key || ssh-keygen -A) && "
                 "systemctl enable --now ssh >/dev/null 2>&1; systemctl is-active ssh")
        deadline = time.monotonic() + 60
        while True:  # systemd needs a moment before systemctl answers
            out = subprocess.run(["docker", "exec", "-i", name, "sh", "-c", setup],
                                 input=key.with_suffix(".pub").read_text(),
                                 capture_output=True, text=True)
            if out.stdout.strip() == "active" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out.stdout.strip() == "active", out.stdout + out.stderr
        address = sh("docker", "inspect", "-f",
                     "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name).stdout.strip()
        hostkey = sh("docker", "exec", name, "cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout
        # This machine's network may re-sign TLS with a local CA (pip's cert
        # setting): give the container the same bundle for pip.
        sh("docker", "cp", os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"),
           f"{name}:/etc/pink-test-ca.crt")
        # mmdebstrap leaves no package lists behind, unlike an installed host.
        sh("docker", "exec", name, "apt-get", "update", "-q", timeout=300)
        known = tmp_path / "known_hosts"
        known.write_text(f"{address} {' '.join(hostkey.split()[:2])}\n")  # pinned, not accepted
        yield {"name": name, "address": address, "key": key, "known_hosts": known,
               "hostkey": hostkey}
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@pytest.mark.skipif(os.environ.get("PINK_ANSIBLE_CONVERGE") != "1",
                    reason="converging a systemd container takes minutes: set PINK_ANSIBLE_CONVERGE=1")
@pytest.mark.timeout(1800)
def test_converge_common_and_runner_is_idempotent(systemd_container, tmp_path):
    playbook = ansible_playbook()
    if not playbook:
        pytest.skip("ansible-playbook is not installed (pip install '.[deploy]')")
    target = systemd_container
    work = tmp_path / "converge"
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
    # A frozen copy of the checkout: others may edit the tree between the runs.
    source = work / "src"
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
               cwd=REPO).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, source / rel)
    sh("git", "init", "-q", str(source))
    sh("git", "-C", str(source), "add", "-A")
    extra = {"pink_source_dir": str(source), "pink_tls_dir": str(work / "ssl"),
             "pink_db_tls_dir": str(work / "ssl_db"), "pink_runner_gpus": [],
             "common_pip_extra_args": "--cert /etc/pink-test-ca.crt"}
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
           "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_PIPELINING": "true"}
    argv = [playbook, "-i", str(work / "inventory.ini"), str(work / "converge.yml"),
            "-e", json.dumps(extra)]
    recaps = []
    for run in (1, 2):
        out = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1500)
        (tmp_path / f"run{run}.log").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, f"run {run} failed:\n{out.stdout[-8000:]}\n{out.stderr[-3000:]}"
        recaps.append(re.search(r"pink1\s+:\s+(.*)", out.stdout).group(1))
    assert re.search(r"\bchanged=0\b", recaps[1]), f"second run changed things: {recaps[1]}\n" + \
        "\n".join(line for line in out.stdout.splitlines() if line.startswith("changed:"))
    assert re.search(r"\bfailed=0\b", recaps[1])

    name = target["name"]
    effective = sh("docker", "exec", name, "sshd", "-T", "-C",
                   "user=pink-xfer,host=web1,addr=10.0.0.11").stdout
    assert "chrootdirectory /var/lib/pink/runner/chroot" in effective
    assert "forcecommand internal-sftp" in effective
    assert "chrootdirectory none" in sh("docker", "exec", name, "sshd", "-T", "-C",
                                        "user=root,host=web1,addr=10.0.0.11").stdout
    toml = sh("docker", "exec", name, "cat", "/etc/pink/pink.toml").stdout
    parsed = pink_config.from_mapping(tomllib.loads(toml))
    assert parsed.runner.ssh_host == target["address"] and len(parsed.db.password) == 32

    # The workers' generated key logs in to SFTP in the chroot, against the pinned host key.
    import paramiko

    client = paramiko.SSHClient()
    client.get_host_keys().add(target["address"], "ssh-ed25519",
                               paramiko.Ed25519Key(data=__import__("base64").b64decode(
                                   target["hostkey"].split()[1])))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(target["address"], username="pink-xfer", allow_agent=False,
                   look_for_keys=False, timeout=20,
                   key_filename=str(work / "credentials" / "pink_workers_id_ed25519"))
    try:
        with client.open_sftp() as sftp:
            assert sorted(sftp.listdir("/")) == ["outbox", "spool"]
            with sftp.open("/spool/probe", "w") as fh:
                fh.write(b"ok")
        _, stdout, _ = client.exec_command("id")
        assert b"uid=" not in stdout.read()  # ForceCommand: no shell
    finally:
        client.close()
