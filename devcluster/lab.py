"""The multi-host lab (`make cluster`): PINK's real topology on one machine.

Six Debian 12 machines as systemd containers on one Docker network with fixed
addresses (router, web1, web2, run1, run2, db; etcd's three members on web1,
web2 and db, the hosts that run no users' code: the runners are its clients),
deployed by the very roles and playbook a lab applies to its own machines
(`make deploy INVENTORY=build/cluster/inventory.ini`), twice: the second run
must change nothing. Then an admin user, the CLI's config pointing at the
router, and build/cluster/hosts.json for scripts and tests.

Everything it makes on the Docker engine is named `pinklab-*` and removed by
name (`down`); nothing is pruned, since other work shares the engine. A second
`up` reuses the image, network and containers that are there.

The image is built without a registry: mmdebstrap makes a Debian 12 root
filesystem with the packages the roles install already in it (the roles still
install them on real machines that lack them), and PINK's Python dependencies
wait in a venv and a wheelhouse, so a deploy needs no network.

tests/cluster/test_ubuntu.py adds GPU servers of Ubuntu 22.04 and 24.04 to
the lab (add_ubuntu_hosts, remove_ubuntu_hosts), made the same way from
Ubuntu's archive for their own Pythons; `down` removes them too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAB_DIR = REPO / "build" / "cluster"  # inventory, keys, certificates, hosts.json
CACHE_DIR = LAB_DIR / "cache"  # root filesystem and wheels: kept by `down`
DOCKER_DIRS = Path("/var/lib/pinklab")  # runners' /var/lib/docker (overlay2 needs a host dir)
PREFIX = "pinklab-"
NETWORK = PREFIX + "net"
SUBNET = "10.77.0.0/24"
ROUTER_URL = "https://10.77.0.10"
BOOT_TIMEOUT = 60.0
WHEELHOUSE = "/opt/pink-wheelhouse"  # in the image
CLI_CONFIG = Path(os.environ.get("PINK_CLI_CONFIG", "~/.config/pink/config.toml")).expanduser()

# What the roles install, baked in so that a deploy installs nothing; plus
# what Ansible itself needs on a target (python3-apt for the apt module).
PACKAGES = (
    "systemd systemd-sysv dbus openssh-server sudo python3 python3-apt python3-venv "
    "python3-packaging ca-certificates iproute2 iptables procps curl openssl "
    "etcd-server etcd-client redis-server redis-sentinel mariadb-server mariadb-client "
    "nginx docker.io"
).split()
# Redis's units ask for a private user namespace, which a container cannot
# make (status 217/USER): the lab's image turns that off for them.
# Services the packages enable on install: each role enables its own where it
# belongs, so a web node does not run MariaDB.
DISABLED_UNITS = ("docker.service docker.socket containerd.service etcd.service "
                  "redis-server.service redis-sentinel.service mariadb.service nginx.service")


def node_dockerfile(disabled_units: str, masked_too: tuple[str, ...] = (),
                    then: tuple[str, ...] = ()) -> str:
    """The Dockerfile of a lab machine's image, with `{base}` left to format.

    Debian's nodes and Ubuntu's GPU servers are made alike: PINK's venv from
    the wheelhouse, the services their packages enable turned off
    (`disabled_units`: the roles enable each where it belongs), the units a
    container cannot run masked (and `masked_too`), and host keys made at a
    machine's first boot rather than baked into the image, so that no two
    machines share them. `then`: further shell lines of the same RUN.
    One text for both keeps their images from drifting apart.
    """
    run = (
        "python3 -m venv /opt/pink",
        f" && /opt/pink/bin/pip install -q --no-index --find-links {WHEELHOUSE} pink",
        f" && systemctl disable {disabled_units}",
        " && systemctl mask getty@.service console-getty.service systemd-udevd.service",
        "      systemd-modules-load.service systemd-firstboot.service systemd-remount-fs.service",
        *(f"      {unit}" for unit in masked_too),
        " && rm -f /etc/ssh/ssh_host_*",
        " && printf '%s\\n' '[Unit]' 'Description=Host keys of this machine' 'Before=ssh.service'",
        "      'ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key' '[Service]' 'Type=oneshot'",
        "      'ExecStart=/usr/bin/ssh-keygen -A' '[Install]' 'WantedBy=multi-user.target'",
        "      > /etc/systemd/system/pinklab-hostkeys.service",
        " && systemctl enable pinklab-hostkeys.service ssh.service",
        *then,
    )
    return (f"FROM {{base}}\nCOPY wheels {WHEELHOUSE}\nRUN " + " \\\n".join(run)
            + '\nSTOPSIGNAL SIGRTMIN+3\nCMD ["/sbin/init"]\n')


NODE_DOCKERFILE = node_dockerfile(DISABLED_UNITS, then=(
    " && for unit in redis-server redis-sentinel; do",
    "      mkdir -p /etc/systemd/system/$unit.service.d",
    "      && printf '%s\\n' '[Service]' 'PrivateUsers=false' > /etc/systemd/system/$unit.service.d/lab.conf;",
    "    done",
))
TARGET_PYTHON = "3.11.2"  # Debian 12's
TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TARGET_EXTRA_WHEELS = ("async-timeout>=4.0.3",)  # redis's, on Python < 3.11.3
SYSTEMD_FLAGS = ("--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined",
                 "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
                 "--tmpfs", "/run", "--tmpfs", "/run/lock")
# A processing host runs its own Docker engine.
ENGINE_FLAGS = ("--cap-add", "NET_ADMIN", "--security-opt", "apparmor=unconfined")


class LabError(RuntimeError):
    """The lab could not be built, deployed or reached."""


@dataclass(frozen=True)
class LabHost:
    """One machine of the lab: its name (hostname and inventory name), its
    address on the lab network, and its inventory groups."""

    name: str
    ip: str
    groups: tuple[str, ...]
    engine: int = 0  # its Docker engine's address ranges (172.30.N.1/24); runN: N

    @property
    def container(self) -> str:
        return PREFIX + self.name

    @property
    def processing(self) -> bool:
        return "processing" in self.groups

    @property
    def docker_dir(self) -> Path:
        return DOCKER_DIRS / f"{self.name}-docker"

    @property
    def containerd_dir(self) -> Path:
        return DOCKER_DIRS / f"{self.name}-containerd"


# etcd's members are the three hosts that run no users' code: a member holds
# every key and the peers' certificate, which a container escaping to root on
# a runner must not find (docs/security.md). The router would make four, no
# more failures tolerated than three.
HOSTS = (
    LabHost("router", "10.77.0.10", ("router",)),
    LabHost("web1", "10.77.0.11", ("web", "etcd", "redis")),
    LabHost("web2", "10.77.0.12", ("web", "etcd", "redis")),
    LabHost("run1", "10.77.0.21", ("processing",)),
    LabHost("run2", "10.77.0.22", ("processing",)),
    LabHost("db", "10.77.0.30", ("db", "etcd", "redis")),
)
GROUPS = ("router", "web", "processing", "db", "etcd", "redis")
GPUS_PER_RUNNER = 2
# Containers each lab runner runs at once. The auto value gives one slot per
# GPU (2 here), but the fault matrix's stream keeps about 7 tasks in flight
# (a 20 s task every 4 s, 2 s tasks in between): with 4 slots in all, the
# queue grows whatever the fault, and a row's recovery measures the queue.
SLOTS_PER_RUNNER = 4


def every_host() -> tuple[LabHost, ...]:
    """The lab's machines and the Ubuntu GPU servers a test may add to them."""
    return (*HOSTS, *(u.host for u in UBUNTU))


def host(name: str) -> LabHost:
    for h in every_host():
        if h.name == name:
            return h
    raise LabError(f"no lab host {name!r}; hosts: {', '.join(h.name for h in every_host())}")


# ---------------------------------------------------------------- helpers

def run(*argv: str, **kw) -> subprocess.CompletedProcess:
    """Run a command, raising LabError with its output when it fails."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    out = subprocess.run(argv, **kw)
    if out.returncode:
        raise LabError(f"{' '.join(argv[:4])}... failed ({out.returncode}):\n"
                       f"{(out.stdout or '')[-3000:]}{(out.stderr or '')[-3000:]}")
    return out


def docker_exists(kind: str, name: str) -> bool:
    return subprocess.run(["docker", kind, "inspect", name], capture_output=True).returncode == 0


def say(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the image

def requirements() -> str:
    """PINK's install_requires: the image's venv depends on nothing else."""
    text = (REPO / "setup.cfg").read_text()
    return re.search(r"install_requires =\n((?:[ \t]+.*\n)+)", text).group(1)


def image_names() -> tuple[str, str]:
    """(base, node) image names, tagged by what goes into them: new packages
    make a new base; a new Dockerfile or new dependencies a new node image."""
    def digest(*parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]

    return (f"{PREFIX}base:{digest(*PACKAGES)}",
            f"{PREFIX}node:{digest(*PACKAGES, NODE_DOCKERFILE, requirements())}")


def host_apt_sources() -> list[str]:
    """The host's own apt sources (its mirror may be the only one reachable)."""
    found = [str(p) for p in [Path("/etc/apt/sources.list"),
                              *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
             if p.is_file() and p.suffix in (".list", ".sources") and p.stat().st_size]
    return found or ["http://deb.debian.org/debian"]


def collect_wheels(into: Path, python: str = TARGET_PYTHON,
                   extra: tuple[str, ...] = TARGET_EXTRA_WHEELS) -> None:
    """PINK's wheel and its dependencies' binary wheels for the image's Python
    (`python`: Debian 12's 3.11.2 by default, whatever this machine runs).
    pip evaluates markers with the running interpreter's full version, so the
    dependencies only older Pythons need are named explicitly (`extra`)."""
    say(f"collecting PINK's wheels for Python {python}")
    pip = [sys.executable, "-m", "pip"]
    run(*pip, "wheel", "-q", "--no-deps", "--wheel-dir", str(into), str(REPO), timeout=600)
    wheel = next(into.glob("pink-*.whl"))
    abi = "cp" + "".join(python.split(".")[:2])
    run(*pip, "download", "-q", "--dest", str(into), "--only-binary=:all:",
        "--python-version", python, "--implementation", "cp", "--abi", abi,
        *(f"--platform={p}" for p in TARGET_PLATFORMS), str(wheel), *extra,
        timeout=1200)


def build_image() -> str:
    base, node = image_names()
    if docker_exists("image", node):
        return node
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    if not docker_exists("image", base):
        rootfs = CACHE_DIR / f"rootfs-{base.split(':')[1]}.tar"
        if not rootfs.exists():
            if not shutil.which("mmdebstrap"):
                raise LabError("mmdebstrap is not installed (apt-get install mmdebstrap)")
            say(f"building the Debian 12 root filesystem ({len(PACKAGES)} packages, a few minutes)")
            partial = rootfs.with_name(rootfs.name + ".part")
            run("mmdebstrap", "--variant=minbase", "--format=tar", f"--include={','.join(PACKAGES)}",
                "--aptopt=Acquire::Check-Valid-Until \"false\"", "--skip=cleanup/apt/lists",
                "bookworm", str(partial), *host_apt_sources(), timeout=1800)
            partial.rename(rootfs)
        run("docker", "import", str(rootfs), base, timeout=600)
    context = CACHE_DIR / "image"
    shutil.rmtree(context, ignore_errors=True)
    (context / "wheels").mkdir(parents=True)
    collect_wheels(context / "wheels")
    (context / "Dockerfile").write_text(NODE_DOCKERFILE.format(base=base))
    say(f"building {node}")
    run("docker", "build", "-q", "-t", node, str(context), timeout=1200,
        env={**os.environ, "DOCKER_BUILDKIT": "0"})
    shutil.rmtree(context, ignore_errors=True)
    return node


# ---------------------------------------------------------------- Ubuntu GPU servers

@dataclass(frozen=True)
class Ubuntu:
    """An Ubuntu release whose GPU servers tests/cluster/test_ubuntu.py adds
    to the lab (as processing hosts only: docs/operations.md, "Supported
    systems"): its suite, its python3's version (the wheelhouse's tags), the
    wheels its markers need that pip, running on 3.11, would not pick, and
    the machine made of it."""

    version: str
    suite: str
    python: str
    extra_wheels: tuple[str, ...]
    host: LabHost


UBUNTU = (
    Ubuntu("22.04", "jammy", "3.10.12", ("async-timeout>=4.0.3", "tomli>=2.0"),
           LabHost("ubuntu2204", "10.77.0.41", ("processing",), engine=3)),
    Ubuntu("24.04", "noble", "3.12.3", (),
           LabHost("ubuntu2404", "10.77.0.42", ("processing",), engine=4)),
)
UBUNTU_MIRROR = "http://archive.ubuntu.com/ubuntu"
# The archive's keys, from Ubuntu's own package, pinned by its SHA-256
# (Debian 12 has no ubuntu-keyring package): its 2018 archive key is
# F6EC B376 2474 EDA9 D21B 7022 8719 20D1 991B C93C.
UBUNTU_KEYRING_DEB = ("pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb",
                      "36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8")
# What the common, docker and pink_runner roles install (a GPU server's
# roles), plus what Ansible needs (apt itself: Ubuntu's minbase lacks it);
# docker.io is in universe.
UBUNTU_PACKAGES = (
    "apt systemd systemd-sysv dbus openssh-server sudo python3 python3-apt python3-venv "
    "python3-packaging ca-certificates iproute2 iptables procps curl openssl docker.io"
).split()
UBUNTU_DISABLED_UNITS = "docker.service docker.socket containerd.service"
# As NODE_DOCKERFILE, for a GPU server: no Redis; resolved masked (the
# container's resolv.conf is Docker's).
UBUNTU_DOCKERFILE = node_dockerfile(UBUNTU_DISABLED_UNITS, masked_too=("systemd-resolved.service",))


def ubuntu_image_names(release: Ubuntu) -> tuple[str, str]:
    """(base, node) image names of a release, tagged by what goes into them."""
    def digest(*parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]

    base = digest(release.suite, *UBUNTU_PACKAGES)
    node = digest(base, release.python, *release.extra_wheels, UBUNTU_DOCKERFILE, requirements())
    return f"{PREFIX}ubuntu-base:{release.suite}-{base}", f"{PREFIX}ubuntu-node:{release.suite}-{node}"


def ubuntu_keyring() -> Path:
    """Ubuntu's archive keyring (for mmdebstrap), fetched once into the cache
    from the archive and checked against the pinned digest."""
    keyring = CACHE_DIR / "ubuntu-archive-keyring.gpg"
    if keyring.exists():
        return keyring
    path, sha256 = UBUNTU_KEYRING_DEB
    with urllib.request.urlopen(f"{UBUNTU_MIRROR}/{path}", timeout=60) as resp:
        deb = resp.read()
    if hashlib.sha256(deb).hexdigest() != sha256:
        raise LabError(f"{UBUNTU_MIRROR}/{path} is not the ubuntu-keyring package the lab pins")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "keyring.deb").write_bytes(deb)
        run("dpkg-deb", "-x", str(Path(tmp) / "keyring.deb"), str(Path(tmp) / "x"))
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "x/usr/share/keyrings/ubuntu-archive-keyring.gpg", keyring)
    return keyring


def ubuntu_rootfs(release: Ubuntu, tag: str) -> Path:
    """The release's root filesystem with UBUNTU_PACKAGES, cached like Debian's."""
    rootfs = CACHE_DIR / f"rootfs-ubuntu-{release.suite}-{tag}.tar"
    if rootfs.exists():
        return rootfs
    if not shutil.which("mmdebstrap"):
        raise LabError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    keyring = ubuntu_keyring()
    say(f"building the Ubuntu {release.version} root filesystem (a few minutes)")
    partial = rootfs.with_name(rootfs.name + ".part")
    sources = [f"deb {UBUNTU_MIRROR} {release.suite}{pocket} main universe"
               for pocket in ("", "-updates", "-security")]
    run("mmdebstrap", "--variant=minbase", "--format=tar", f"--include={','.join(UBUNTU_PACKAGES)}",
        f"--keyring={keyring}", "--skip=cleanup/apt/lists", release.suite, str(partial), *sources,
        timeout=1800)
    partial.rename(rootfs)
    return rootfs


def build_ubuntu_image(release: Ubuntu) -> str:
    """The image of the release's GPU servers: its root filesystem, and a venv
    with PINK from a wheelhouse for its Python, so a deploy fetches nothing."""
    base, node = ubuntu_image_names(release)
    if docker_exists("image", node):
        return node
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    if not docker_exists("image", base):
        run("docker", "import", str(ubuntu_rootfs(release, base.rsplit("-", 1)[1])), base, timeout=600)
    context = CACHE_DIR / f"image-{release.suite}"
    shutil.rmtree(context, ignore_errors=True)
    (context / "wheels").mkdir(parents=True)
    collect_wheels(context / "wheels", release.python, release.extra_wheels)
    (context / "Dockerfile").write_text(UBUNTU_DOCKERFILE.format(base=base))
    say(f"building {node}")
    # --network none: the build installs from the wheelhouse alone (and an
    # engine without a default bridge builds it too).
    run("docker", "build", "-q", "--network", "none", "-t", node, str(context), timeout=1200,
        env={**os.environ, "DOCKER_BUILDKIT": "0"})
    shutil.rmtree(context, ignore_errors=True)
    return node


# ---------------------------------------------------------------- network and machines

def ensure_network() -> None:
    if not docker_exists("network", NETWORK):
        run("docker", "network", "create", "--subnet", SUBNET, "--label", "pinklab=1", NETWORK)


def ensure_host(h: LabHost, image: str, extra: tuple[str, ...] = ()) -> None:
    """Start the machine unless it runs; a stopped one is started again.
    `extra`: more `docker run` flags."""
    state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}} {{.Config.Image}}", h.container],
                           capture_output=True, text=True)
    if state.returncode == 0:
        running, made_from = state.stdout.split()
        if made_from != image:
            say(f"{h.container} runs {made_from}, not {image}: kept (`make cluster-down` to rebuild)")
        if running != "true":
            run("docker", "start", h.container)
        return
    argv = ["docker", "run", "-d", "--name", h.container, "--hostname", h.name,
            "--network", NETWORK, "--ip", h.ip, "--network-alias", h.name,
            "--label", "pinklab=1", *SYSTEMD_FLAGS]
    if h.processing:
        h.docker_dir.mkdir(parents=True, exist_ok=True)
        argv += [*ENGINE_FLAGS, "-v", f"{h.docker_dir}:/var/lib/docker"]
    run(*argv, *extra, image, "/sbin/init")


def root_key() -> Path:
    """The control host's key for root on every lab machine (Ansible's login)."""
    key = LAB_DIR / "id_ed25519"
    if not key.exists():
        LAB_DIR.mkdir(parents=True, exist_ok=True)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pinklab-control", "-f", str(key))
    return key


def authorize(h: LabHost, key: Path) -> str:
    """Install the control key for root once systemd is up, and return the
    machine's own SSH host key (read over `docker exec`, never from the network)."""
    script = ("mkdir -p -m 700 /root/.ssh && cat > /root/.ssh/authorized_keys && "
              "systemctl is-active ssh >/dev/null && cat /etc/ssh/ssh_host_ed25519_key.pub")
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        out = subprocess.run(["docker", "exec", "-i", h.container, "sh", "-c", script],
                             input=key.with_suffix(".pub").read_text(), capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.startswith("ssh-ed25519 "):
            return " ".join(out.stdout.split()[:2])
        if time.monotonic() > deadline:
            raise LabError(f"{h.name} did not boot to a running sshd within {BOOT_TIMEOUT:.0f}s:\n"
                           f"{out.stdout}{out.stderr}")
        time.sleep(1)


def write_known_hosts(hostkeys: dict[str, str]) -> Path:
    path = LAB_DIR / "known_hosts"
    path.write_text("".join(f"{host(name).ip} {key}\n" for name, key in hostkeys.items()))
    return path


# ---------------------------------------------------------------- certificates and inventory

def make_certs() -> None:
    """The lab's own certificates (ssl/make-certs.sh, as `make certs`), naming
    every lab address so the router, web nodes and MariaDB verify."""
    sans = [f"IP:{h.ip}" for h in HOSTS] + [f"DNS:{h.name}" for h in HOSTS]
    run(str(REPO / "ssl" / "make-certs.sh"), "--web-dir", str(LAB_DIR / "ssl"),
        "--db-dir", str(LAB_DIR / "ssl_db"), *sans)


def host_vars(h: LabHost) -> str:
    """Inline inventory variables (INI host lines take Python literals)."""
    pairs = [f"ansible_host={h.ip}"]
    if h.processing:
        index = h.engine or int(h.name.removeprefix("run"))
        gpus = [f"GPU-lab-{h.name}-{i}" for i in range(GPUS_PER_RUNNER)]
        engine = {"bip": f"172.30.{index}.1/24",
                  "default-address-pools": [{"base": f"172.31.{index * 16}.0/20", "size": 24}]}
        pairs += [f"pink_runner_gpus='{json.dumps(gpus)}'",
                  f"docker_daemon_config='{json.dumps(engine)}'"]
    return " ".join(pairs)


def inventory_text(hosts: tuple[LabHost, ...] = HOSTS) -> str:
    """The lab's inventory.ini: its machines in their groups (tests render the
    playbook against exactly this); other `hosts`: a lab with machines added."""
    lines = [
        "# Written by `make cluster` (devcluster/lab.py): the lab's machines, deployed",
        "# by the same roles as a real lab (`make deploy INVENTORY=this file`).",
        "# The lab's settings are in group_vars/pinklab.yml beside this file.",
        "",
    ]
    for group in GROUPS:
        lines.append(f"[{group}]")
        lines += [f"{h.name} {host_vars(h)}" if group == h.groups[0] else h.name
                  for h in hosts if group in h.groups]
        lines.append("")
    lines += ["[pinklab:children]", *GROUPS, ""]
    return "\n".join(lines)


def write_inventory(known_hosts: Path, key: Path) -> Path:
    """inventory.ini, and group_vars/pinklab.yml beside it: Ansible reads an
    inventory's group_vars/<group> after the playbook's group_vars/all.yml,
    so the lab's own certificates and credentials win over the defaults
    (an INI file's [all:vars] would not)."""
    path = LAB_DIR / "inventory.ini"
    path.write_text(inventory_text())
    settings = {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes",
        "pink_credentials_dir": str(LAB_DIR / "credentials"),
        "pink_tls_dir": str(LAB_DIR / "ssl"),
        "pink_db_tls_dir": str(LAB_DIR / "ssl_db"),
        # The image holds PINK's dependencies: a deploy fetches nothing.
        "common_pip_extra_args": f"--no-index --find-links {WHEELHOUSE}",
        "common_runner_max_containers": SLOTS_PER_RUNNER,
    }
    (LAB_DIR / "group_vars").mkdir(exist_ok=True)
    (LAB_DIR / "group_vars" / "pinklab.yml").write_text(
        "# Written by `make cluster` (devcluster/lab.py).\n"
        + "".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    return path


def write_inventory_with(name: str, hosts: tuple[LabHost, ...]) -> Path:
    """A copy of the lab's inventory with `hosts` added, beside it (so that
    group_vars/pinklab.yml applies to them too): build/cluster/NAME."""
    path = LAB_DIR / name
    path.write_text(inventory_text((*HOSTS, *hosts)))
    return path


def write_hosts_json() -> Path:
    path = LAB_DIR / "hosts.json"
    path.write_text(json.dumps({h.name: {"ip": h.ip, "container": h.container,
                                         "groups": list(h.groups)} for h in HOSTS}, indent=2) + "\n")
    return path


# ---------------------------------------------------------------- deploying

RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def deploy(inventory: Path, run_number: int | str) -> dict[str, int]:
    """`make deploy` on the lab's inventory; returns changed tasks per host.

    The output goes to the terminal and to build/cluster/deploy-N.log.
    """
    log = LAB_DIR / f"deploy-{run_number}.log"
    say(f"deploy {run_number}: make deploy INVENTORY={inventory.relative_to(REPO)} (log {log})")
    with open(log, "w") as fh:
        proc = subprocess.Popen(["make", "-C", str(REPO), "deploy", f"INVENTORY={inventory}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            fh.write(line)
            if line.startswith(("PLAY ", "TASK ", "changed:", "fatal:", "failed:")) or RECAP.match(line):
                sys.stderr.write(line)
        proc.wait()
    text = log.read_text()
    recap = {m.group(1): (int(m.group(3)), int(m.group(4)) + int(m.group(5)))
             for m in RECAP.finditer(text)}
    if proc.returncode or not recap or any(bad for _, bad in recap.values()):
        raise LabError(f"deploy {run_number} failed; see {log}:\n{text[-4000:]}")
    return {name: changed for name, (changed, _) in recap.items()}


def changed_tasks(log: Path) -> list[str]:
    """The tasks a deploy log reports as changed (for a second run's error)."""
    found, task = [], ""
    for line in log.read_text().splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line
        elif line.startswith("changed:"):
            found.append(f"{task} {line}")
    return found


# ---------------------------------------------------------------- after the deploy

def load_state() -> dict:
    path = LAB_DIR / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(state: dict) -> None:
    path = LAB_DIR / "state.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps(state, indent=2) + "\n")


def pink_on(h: LabHost, *args: str) -> str:
    """Run the `pink` CLI on a lab machine with that machine's config."""
    return run("docker", "exec", h.container, "/opt/pink/bin/pink", *args,
               "--config", "/etc/pink/pink.toml").stdout


def ensure_admin() -> str:
    """The lab's admin user's API token (created once, kept in state.json, mode 0600)."""
    state = load_state()
    if "admin_token" not in state:
        web1 = host("web1")
        try:
            created = json.loads(pink_on(web1, "admin", "user", "create", "admin", "--admin", "--json"))
            say(f"admin user created: password {created['password']} (shown once)")
            state["admin_token"] = created["token"]
        except LabError as exc:
            if "already exists" not in str(exc):
                raise
            # state.json was lost, not the user: a new password, and a token made with it
            from pink_cli.client import Client

            password = json.loads(pink_on(web1, "admin", "user", "reset-password", "admin", "--json"))["password"]
            say(f"admin password reset: {password} (shown once)")
            state["admin_token"] = Client(ROUTER_URL, ca=str(LAB_DIR / "ssl" / "ca.pem")).login(
                "admin", password)["token"]
        save_state(state)
    return state["admin_token"]


def login(token: str) -> None:
    """Point the CLI of this machine (~/.config/pink/config.toml) at the router."""
    pink = Path(sys.executable).with_name("pink")
    run(str(pink), "login", "--url", ROUTER_URL, "--token", token,
        "--ca", str(LAB_DIR / "ssl" / "ca.pem"))


def add_ubuntu_hosts(releases: tuple[Ubuntu, ...] = UBUNTU) -> tuple[LabHost, ...]:
    """Start a GPU server of each Ubuntu release beside the lab's machines
    (tests/cluster/test_ubuntu.py): its image, its machine (Docker's and
    containerd's data on host directories: nested overlays fail), root's key,
    its host key pinned in build/cluster/known_hosts. Deploying it is the
    caller's: an inventory from write_inventory_with."""
    key = root_key()
    known = LAB_DIR / "known_hosts"
    for release in releases:
        image = build_ubuntu_image(release)
        h = release.host
        h.containerd_dir.mkdir(parents=True, exist_ok=True)
        ensure_host(h, image, ("-v", f"{h.containerd_dir}:/var/lib/containerd"))
        hostkey = authorize(h, key)
        kept = [line for line in known.read_text().splitlines() if not line.startswith(f"{h.ip} ")]
        known.write_text("".join(f"{line}\n" for line in [*kept, f"{h.ip} {hostkey}"]))
    return tuple(r.host for r in releases)


def remove_ubuntu_hosts() -> list[str]:
    """Remove the Ubuntu GPU servers add_ubuntu_hosts made (machines, their
    engines' data, their pinned host keys); returns the machines removed.
    What the lab's web nodes and etcd keep of them is the caller's: a deploy
    without them, `pink node forget`."""
    hosts = [u.host for u in UBUNTU]
    names = [h.container for h in hosts if docker_exists("container", h.container)]
    if names:
        run("docker", "rm", "-f", *names, timeout=300)
    for h in hosts:
        shutil.rmtree(h.docker_dir, ignore_errors=True)
        shutil.rmtree(h.containerd_dir, ignore_errors=True)
    known = LAB_DIR / "known_hosts"
    if known.exists():
        gone = tuple(f"{h.ip} " for h in hosts)
        known.write_text("".join(f"{line}\n" for line in known.read_text().splitlines()
                                 if not line.startswith(gone)))
    return names


# ---------------------------------------------------------------- commands

def up() -> None:
    """`make cluster`: build or reuse everything, deploy twice, log the CLI in."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (Docker, /var/lib/pinklab)")
    image = build_image()
    ensure_network()
    for h in HOSTS:
        ensure_host(h, image)
    key = root_key()
    known_hosts = write_known_hosts({h.name: authorize(h, key) for h in HOSTS})
    make_certs()
    inventory = write_inventory(known_hosts, key)
    write_hosts_json()
    deploy(inventory, 1)
    changed = deploy(inventory, 2)
    if any(changed.values()):
        raise LabError("the second deploy changed things (it must report changed=0): "
                       f"{changed}\n" + "\n".join(changed_tasks(LAB_DIR / "deploy-2.log")))
    login(ensure_admin())
    say(f"up: PINK answers at {ROUTER_URL} (CA {LAB_DIR / 'ssl' / 'ca.pem'}); "
        f"`pink` is logged in ({CLI_CONFIG}); hosts in {LAB_DIR / 'hosts.json'}; "
        "remove with `make cluster-down`")


def down() -> None:
    """`make cluster-down`: remove by name the machines, network, runners'
    engines and files `up` made (images: remove_images); build/cluster/cache
    stays, so the next image takes a minute instead of three. Ubuntu GPU
    servers a test left behind go too."""
    ubuntu = remove_ubuntu_hosts()
    names = [h.container for h in HOSTS if docker_exists("container", h.container)]
    if names:
        run("docker", "rm", "-f", *names, timeout=300)
    names += ubuntu
    if docker_exists("network", NETWORK):
        run("docker", "network", "rm", NETWORK)
    for h in HOSTS:
        if h.processing:
            shutil.rmtree(h.docker_dir, ignore_errors=True)
    if DOCKER_DIRS.exists() and not any(DOCKER_DIRS.iterdir()):
        DOCKER_DIRS.rmdir()
    if CLI_CONFIG.exists() and ROUTER_URL in CLI_CONFIG.read_text():
        CLI_CONFIG.unlink()
    if LAB_DIR.exists():
        for entry in LAB_DIR.iterdir():
            if entry != CACHE_DIR:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    say(f"down: removed {len(names)} machines and {NETWORK}")


def remove_images() -> None:
    """Every pinklab-node and pinklab-base image (Ubuntu's too), whichever build made it."""
    listed = run("docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}",
                 *(f"--filter=reference={PREFIX}{kind}" for kind in
                   ("node", "base", "ubuntu-node", "ubuntu-base"))).stdout
    names = listed.split()
    if names:
        run("docker", "image", "rm", *names)


def status() -> dict[str, str]:
    """Each machine's state as Docker sees it ("absent" when not made)."""
    found = {}
    for h in HOSTS:
        out = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}}", h.container],
                             capture_output=True, text=True)
        found[h.name] = out.stdout.strip() if out.returncode == 0 else "absent"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.lab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build, start and deploy the lab (make cluster)")
    down_cmd = sub.add_parser("down", help="remove the lab (make cluster-down)")
    down_cmd.add_argument("--keep-image", action="store_true",
                          help="keep the machines' image for the next `up`")
    sub.add_parser("status", help="each machine's state")
    sub.add_parser("image", help="build the machines' image only")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            down()
            if not args.keep_image:
                remove_images()
        elif args.command == "image":
            print(build_image())
        else:
            for name, state in status().items():
                print(f"{name:8} {host(name).ip:12} {state}")
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
