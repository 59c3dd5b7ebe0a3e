"""A runner on its own "host" (a network namespace) is cut off mid-task.

The namespace reaches the machine over a veth on a bridge; it runs its own
sshd (the transfer account) and `pink-runner --name runp`, which talks to the
machine's Docker over its unix socket. A separate etcd listens on the bridge
address so that unplugging the veth cuts the runner off from etcd. The task
must be retried on the host's runner exactly once, and the partitioned
runner, once back, must neither touch the result (fencing) nor keep its old
epoch or its container.
"""

from __future__ import annotations

import socket
import time
import tomllib
from pathlib import Path

import pytest

from devcluster.netns import NetnsHost
from devcluster.pink_toml import dump_toml
from devcluster.ports import free_port
from devcluster.processes import wait_until
from pink import config as pink_config_module
from pink.store import Store
from tests import images
from tests.helpers import Api, archived, make_user

NETNS = "pinkt-runp"
BRIDGE = "brpinkt"
HOST_VETH = "vpinkt-runp"  # host end of the link, on the bridge; the namespace end is eth0
SUBNET = "10.77.9"  # /24 used by no other test
HOST_ADDR = f"{SUBNET}.1"  # the bridge: etcd listens here
NS_ADDR = f"{SUBNET}.2"  # the namespaced runner's host
NS_SSH_PORT = 2222
RUNNER = "runp"
HOST_RUNNER = "runh"  # the retry's runner, on the machine itself
TASK_SECONDS = 12  # long enough that attempt 1 is still running when the runner is cut off


LINK = NetnsHost(NETNS, HOST_VETH, HOST_ADDR, NS_ADDR, bridge=BRIDGE)
_in_ns = LINK.argv


def _answers(host: str, port: int, banner: bytes = b"") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            return not banner or sock.recv(64).startswith(banner)
    except OSError:
        return False


class NamespacedHost:
    """The namespace, its link, the bridge etcd, the runner's sshd and runner.

    Processes are started through the session's Cluster (own session, log in
    cluster.log_path(name)) under names prefixed with the test's tag.
    """

    def __init__(self, cluster, pink_config, tmp_path: Path):
        self.cluster = cluster
        self.tag = f"t{pink_config.namespace}-part"
        self.tmp = tmp_path
        self.prefix = pink_config.etcd.prefix
        self.base_config = tomllib.loads(Path(pink_config.path).read_text())
        self.etcd_port = free_port()
        self.procs: list[str] = []
        self.host_config: Path | None = None
        self.ns_config: Path | None = None

    def name(self, role: str) -> str:
        return f"{self.tag}-{role}"

    # -- network -----------------------------------------------------------

    def up(self) -> None:
        LINK.up()  # removes first what a killed earlier run may have left
        self._start_etcd()
        self._start_sshd()
        self._write_configs()

    def partition(self) -> None:
        LINK.partition()

    def heal(self) -> None:
        LINK.heal()

    def down(self) -> None:
        for name in reversed(self.procs):
            self.cluster.stop(name)
        LINK.down()

    # -- services ------------------------------------------------------------

    def _start(self, role: str, argv: list[str], env: dict | None = None) -> str:
        name = self.name(role)
        self.procs.append(name)
        self.cluster.start_process(name, argv, env=env)
        return name

    def _start_etcd(self) -> None:
        """An etcd of this test's own, on the bridge address as well as loopback:
        the session's etcd listens on loopback only, out of the namespace's reach."""
        peer = free_port()
        port = self.etcd_port
        name = self._start("etcd", [
            "etcd", "--name", "part", "--data-dir", str(self.tmp / "etcd"),
            "--listen-client-urls", f"http://{HOST_ADDR}:{port},http://127.0.0.1:{port}",
            "--advertise-client-urls", f"http://{HOST_ADDR}:{port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"part=http://127.0.0.1:{peer}",
        ])
        assert wait_until(lambda: _answers(HOST_ADDR, port) and _answers("127.0.0.1", port), 30), \
            self.cluster.log_path(name).read_text(errors="replace")[-3000:]

    def _start_sshd(self) -> None:
        """The cluster's chrooted SFTP-only account for `runp`, served in the namespace."""
        cluster = self.cluster
        cluster._ssh_keys(RUNNER)
        cluster._runner_layout(RUNNER)
        for path in (cluster.spool_dir(RUNNER), cluster.outbox_dir(RUNNER)):
            for child in path.iterdir():
                child.unlink()
        lines = []
        for line in cluster._sshd_config(RUNNER, NS_SSH_PORT).read_text().splitlines():
            key = line.split(" ", 1)[0]
            if key == "ListenAddress":
                line = f"ListenAddress {NS_ADDR}"
            elif key == "PidFile":
                line = f"PidFile {self.tmp / 'sshd-runp.pid'}"
            lines.append(line)
        config = self.tmp / "sshd_config"
        config.write_text("\n".join(lines) + "\n")
        name = self._start("sshd", _in_ns("/usr/sbin/sshd", "-D", "-e", "-f", str(config)))
        assert wait_until(lambda: _answers(NS_ADDR, NS_SSH_PORT, b"SSH-2.0-"), 15), \
            self.cluster.log_path(name).read_text(errors="replace")[-3000:]

    def _write_configs(self) -> None:
        """Host side (web, worker, leader, runh) and namespace side (runp) configs,
        both on the bridge etcd; the workers pin runp's host key at its address."""
        kind, blob = (self.cluster.runner_dir(RUNNER) / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known_hosts = self.tmp / "known_hosts"
        known_hosts.write_text(self.cluster.known_hosts.read_text()
                               + f"[{NS_ADDR}]:{NS_SSH_PORT} {kind} {blob}\n")
        host = {**self.base_config,
                "etcd": {**self.base_config["etcd"], "endpoints": [f"127.0.0.1:{self.etcd_port}"]},
                "ssh": {**self.base_config["ssh"], "known_hosts": str(known_hosts)}}
        ns = {**host,
              "etcd": {**host["etcd"], "endpoints": [f"{HOST_ADDR}:{self.etcd_port}"]},
              "runner": {**host["runner"], "name": RUNNER,
                         "spool_dir": str(self.cluster.spool_dir(RUNNER)),
                         "outbox_dir": str(self.cluster.outbox_dir(RUNNER)),
                         "ssh_host": NS_ADDR, "ssh_port": NS_SSH_PORT}}
        self.host_config = self.tmp / "pink-host.toml"
        self.ns_config = self.tmp / "pink-runp.toml"
        for path, data in ((self.host_config, host), (self.ns_config, ns)):
            path.write_text(dump_toml(data))
            path.chmod(0o600)

    def start_runner(self) -> str:
        exe = self.cluster.executable("pink-runner")
        return self._start("runner-runp", _in_ns(exe, "--config", str(self.ns_config), "--name", RUNNER),
                           env={"PINK_CONFIG": str(self.ns_config), "PYTHONUNBUFFERED": "1"})

    def alive(self, role: str) -> bool:
        return self.cluster.alive(self.name(role))

    def log(self, role: str) -> str:
        return self.cluster.log_path(self.name(role)).read_text(errors="replace")


@pytest.fixture
def ns_host(cluster, pink_config, tmp_path):
    host = NamespacedHost(cluster, pink_config, tmp_path)
    try:
        host.up()
        yield host
    finally:
        host.down()


@pytest.fixture(scope="module")
def partition_archive(docker_client, tmp_path_factory):
    return images.build_archive(
        docker_client, f"pink/test-partition:{TASK_SECONDS}",
        f'CMD ["sh", "-c", "echo start; sleep {TASK_SECONDS}; echo finished > /done.txt"]\n',
        tmp_path_factory.mktemp("partition") / "slow.tar")


def _wait_for(what: str, check, timeout: float, logs=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} (after {timeout:.0f}s)\n{logs()}"
        time.sleep(0.2)


def test_partitioned_runner_is_fenced_and_its_task_retried(ns_host, pink_processes, partition_archive,
                                                           docker_client):
    config = pink_config_module.load(ns_host.host_config)
    pink_processes.web(str(ns_host.host_config))
    pink_processes.worker(config_path=str(ns_host.host_config))
    pink_processes.leader(str(ns_host.host_config))
    api = Api(config, make_user(config, "alice"))
    store = Store.from_config(config)
    task_key = store.keys.task
    node_key = store.keys.node(RUNNER)

    def logs() -> str:
        out = [f"--- {role}\n" + ns_host.log(role)[-4000:] for role in ("runner-runp",)]
        out += [f"--- {name}\n" + pink_processes.log(name)[-3000:] for name in pink_processes.started]
        return "\n".join(out)

    def retried_on_host() -> dict | None:
        t = store.get(task_key(task_id)).value
        return t if (t.state, t.node, t.attempt) == ("running", HOST_RUNNER, 2) else None

    # Only the namespaced runner exists, so placement must choose it.
    ns_host.start_runner()
    first = _wait_for("runp never registered", lambda: store.get(node_key), 30, logs)
    task_id = api.submit(partition_archive).json()["task"]["id"]
    task = api.wait(task_id, states={"running"}, timeout=60)
    running_at = time.monotonic()
    assert (task["node"], task["attempt"]) == (RUNNER, 1)
    assert store.get(task_key(task_id)).value.epoch == first.create_revision

    pink_processes.runner(HOST_RUNNER, str(ns_host.host_config))  # where the retry must go
    _wait_for(f"{HOST_RUNNER} never registered", lambda: store.get(store.keys.node(HOST_RUNNER)), 30, logs)

    ns_host.partition()
    try:
        # runp's lease expires; the leader re-queues and placement picks runh.
        retried = _wait_for(f"the task was not retried on {HOST_RUNNER}", retried_on_host, 45, logs)
        assert store.get(node_key) is None
        # Cut off from etcd, runp must notice its lost lease and kill its container
        # without waiting for the link to come back.
        label = [f"pink.task={task_id}", f"pink.node={RUNNER}"]
        _wait_for("runp's container still runs while runp is cut off",
                  lambda: not docker_client.containers.list(filters={"label": label}), 20, logs)
        gone_after = time.monotonic() - running_at
    finally:
        ns_host.heal()

    task = api.wait(task_id, timeout=90)
    assert task["state"] == "succeeded", (task, logs())
    assert (task["attempt"], task["node"]) == (2, HOST_RUNNER)
    assert retried.epoch == store.get(store.keys.node(HOST_RUNNER)).create_revision
    history = archived(api.config, task_id)["history"]
    states = [state for _, state, _ in history]
    assert states.count("succeeded") == 1, history
    assert states.count("running") == 2, history

    # Back from the partition, runp registers again as a new incarnation.
    _wait_for("runp did not register again after the partition healed",
              lambda: store.get(node_key) or not ns_host.alive("runner-runp"), 30, logs)
    assert ns_host.alive("runner-runp"), f"runp exited instead of registering again\n{logs()}"
    again = store.get(node_key)
    assert again.create_revision != first.create_revision
    assert "lease lost" in ns_host.log("runner-runp")
    assert again.create_revision > retried.epoch

    # ...and the result of the retry stands: nothing of attempt 1 brings the task back.
    time.sleep(4)
    assert store.get(task_key(task_id)) is None
    after = archived(api.config, task_id)
    assert after["history"] == history
    assert (after["state"], after["node"], after["attempt"]) == ("succeeded", HOST_RUNNER, 2)
    assert docker_client.containers.list(all=True, filters={"label": f"pink.task={task_id}"}) == []
    # Gone before it could have finished by itself: it was killed.
    assert gone_after < TASK_SECONDS, f"runp's container ran for {gone_after:.1f}s"
