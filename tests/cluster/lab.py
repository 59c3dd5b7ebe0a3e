"""The lab as the fault tests see it: its machines, PINK through the router,
a steady stream of tasks, and the counts each fault test prints and asserts.

A fault is injected the way a lab loses a machine: `docker kill`, a
`docker network disconnect`, or `systemctl stop` inside a machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import docker

from devcluster import lab as devlab
from pink_cli.client import Client
from pink.errors import PinkError
from pink.tasks import FINAL_NAMES
from tests import images

WORKLOAD_DOCKERFILE = ('CMD ["sh", "-c", "sleep ${SECONDS:-2}; echo done > /result.txt"]\n')
HEALTH_TIMEOUT = 180.0  # seconds for a (re)started lab to run tasks again
SUBMIT_RETRY = 2.0  # seconds between tries of a submission the cluster refused


def workload_archive(into: Path, extra_bytes: int = 0) -> str:
    """The stream's image; with `extra_bytes`, a layer of that much random
    data too (a big image whose copy takes a while)."""
    dockerfile, files = WORKLOAD_DOCKERFILE, {}
    if extra_bytes:
        files = {"blob": os.urandom(extra_bytes)}
        dockerfile = "COPY blob /blob\n" + dockerfile
    client = docker.from_env()
    try:
        tag = f"pink/test-lab{'-big' if extra_bytes else ''}:{time.time_ns()}"
        images.build_image(client, tag, dockerfile, files=files)
        return images.save_image(client, tag, into / f"workload-{extra_bytes}.tar")
    finally:
        client.close()


def make(*args: str, log: str | None = None) -> str:
    """`make ARGS` in the checkout against the lab's inventory, as an operator
    runs it; its output is kept in build/cluster/<log or make-TARGET>.log and
    returned. A failing make fails the test, naming that log."""
    path = devlab.LAB_DIR / f"{log or 'make-' + args[0]}.log"
    out = subprocess.run(["make", "-C", str(devlab.REPO), *args, f"INVENTORY={devlab.LAB_DIR / 'inventory.ini'}"],
                         capture_output=True, text=True, timeout=1800, env={**os.environ, "ANSIBLE_FORCE_COLOR": "0"})
    path.write_text(out.stdout + out.stderr)
    assert out.returncode == 0, f"make {' '.join(args)} failed; see {path}:\n{out.stdout[-3000:]}"
    return out.stdout


def docker_cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *argv], capture_output=True, text=True, timeout=300)
    if check and out.returncode:
        raise AssertionError(f"docker {' '.join(argv)}: {out.stdout}{out.stderr}")
    return out


@dataclass
class Lab:
    hosts: dict[str, dict]
    client: Client

    @classmethod
    def load(cls) -> "Lab":
        hosts_file = devlab.LAB_DIR / "hosts.json"
        assert hosts_file.exists(), f"{hosts_file} is missing: run `make cluster` first"
        token = devlab.load_state()["admin_token"]
        client = Client(devlab.ROUTER_URL, token, str(devlab.LAB_DIR / "ssl" / "ca.pem"))
        return cls(json.loads(hosts_file.read_text()), client)

    def container(self, name: str) -> str:
        return self.hosts[name]["container"]

    def sh(self, name: str, script: str, check: bool = True) -> str:
        """Run a shell script as root on a machine; its stdout."""
        return docker_cli("exec", self.container(name), "sh", "-c", script, check=check).stdout

    def kill(self, name: str) -> None:
        docker_cli("kill", self.container(name))

    def disconnect(self, name: str) -> None:
        docker_cli("network", "disconnect", devlab.NETWORK, self.container(name))

    def connect(self, name: str) -> None:
        docker_cli("network", "connect", "--ip", self.hosts[name]["ip"], "--alias", name,
                   devlab.NETWORK, self.container(name))

    def heal(self) -> None:
        """Start what was killed and reconnect what was cut off."""
        for name, h in self.hosts.items():
            state = docker_cli("inspect", "-f", "{{.State.Running}} {{json .NetworkSettings.Networks}}",
                               h["container"]).stdout
            if state.startswith("false"):
                docker_cli("start", h["container"])
            elif devlab.NETWORK not in state:
                self.connect(name)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> None:
        """Until the router answers and both runners are registered."""
        deadline = time.monotonic() + timeout
        last: Exception | str = "no answer yet"
        while time.monotonic() < deadline:
            try:
                nodes = {n["name"]: n for n in self.client.nodes()}
                if {"run1", "run2"} <= {k for k, n in nodes.items() if n.get("alive", True)}:
                    return
                last = f"nodes: {sorted(nodes)}"
            except PinkError as exc:
                last = exc
            time.sleep(2)
        raise AssertionError(f"the lab is not healthy after {timeout:.0f}s: {last}")

    def redis_cli(self, host: str, args: str) -> str:
        """redis-cli on a machine with the lab's Redis password (`-p 26379`: Sentinel)."""
        password = (devlab.LAB_DIR / "credentials" / "redis").read_text().strip()
        return self.sh(host, f"REDISCLI_AUTH={password} redis-cli {args}")

    def redis_master(self) -> str:
        """The master's address, as the sentinel on db sees it."""
        return self.redis_cli("db", "-p 26379 SENTINEL get-master-addr-by-name pink").split()[0]

    @property
    def etcd_members(self) -> list[str]:
        """The hosts that are etcd members (never a runner: docs/security.md)."""
        return [name for name, h in self.hosts.items() if "etcd" in h["groups"]]

    def etcdctl(self, host: str, args: str, identity: str = "/etc/pink/etcd/client",
                endpoints: str = "") -> str:
        """etcdctl on a machine as one of its etcd identities (a cert/key pair
        without the suffix), against every member unless `endpoints` says;
        stderr is kept, for refusals."""
        endpoints = endpoints or ",".join(f"https://{self.hosts[h]['ip']}:2379" for h in self.etcd_members)
        ca = "/etc/etcd/pki/ca.pem" if identity.startswith("/etc/etcd/") else "/etc/pink/etcd/ca.pem"
        return self.sh(host, f"ETCDCTL_API=3 etcdctl --endpoints={endpoints} --cacert={ca} "
                             f"--cert={identity}.pem --key={identity}.key {args} 2>&1", check=False)

    def copying(self, task_id: str) -> bool:
        """Is the task's image arriving at its runner (a blob's part file in its spool)?"""
        task = self.client.get(task_id)
        if not task.get("node") or task["state"] != "placed":
            return False
        parts = self.sh(task["node"], "ls /var/lib/pink/runner/chroot/spool/incoming/ 2>/dev/null || true")
        return any(name.endswith(".part") for name in parts.split())

    def etcd_get(self, key: str) -> str:
        """A key's value, read on web2 with the web side's etcd identity."""
        return self.etcdctl("web2", f"get --print-value-only {key}").strip()

    def leader(self) -> str:
        """The host of the elected queue leader."""
        return json.loads(self.etcd_get("/pink/leader") or "{}").get("holder", "").split("/")[0]

    def lead_from(self, host: str, tries: int = 4) -> bool:
        """Move the queue leader to `host`: restart the leader candidate that
        holds it elsewhere (another candidate wins; `host`'s, eventually)."""
        for _ in range(tries):
            holder = self.leader()
            if holder == host:
                return True
            if holder:
                self.sh(holder, "systemctl restart pink-leader")
            time.sleep(15)  # the old lease lapses, a candidate takes over
        return self.leader() == host

    def redis_master_on(self, host: str, tries: int = 4) -> bool:
        """Ask Sentinel to fail over until `host`'s Redis is the master."""
        for _ in range(tries):
            if self.redis_master() == self.hosts[host]["ip"]:
                return True
            self.redis_cli("db", "-p 26379 SENTINEL failover pink")
            time.sleep(10)
        return self.redis_master() == self.hosts[host]["ip"]

    def db(self, sql: str) -> list[list[str]]:
        """Rows of a query on the archive (as MariaDB's root, on the db machine)."""
        out = self.sh("db", f"mariadb --batch --skip-column-names pink -e {json.dumps(sql)}")
        return [line.split("\t") for line in out.splitlines()]


@dataclass
class Counts:
    submitted: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # reason: count
    lost: int = 0
    accepted_twice: int = 0
    archived: int = 0
    recovery_s: float | None = None

    def line(self, fault: str) -> str:
        failed = sum(self.failed.values())
        reasons = "; ".join(f"{n}x {r}" for r, n in self.failed.items()) or "-"
        recovery = f"{self.recovery_s:.1f}" if self.recovery_s is not None else "-"
        return (f"| {fault} | {self.submitted} | {self.succeeded} | {failed} ({reasons}) | {self.lost} | "
                f"{self.accepted_twice} | {self.archived} | {recovery} |")


def _epoch(iso: str) -> float:
    """Seconds since the epoch of a time as the API writes it (UTC, `Z`)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Stream:
    """About `total` tasks submitted through the router one every `interval`
    seconds, mixing 2 s and 20 s runs, with and without a GPU. A submission
    the cluster refuses (a fault in progress) is tried again: only accepted
    tasks count as submitted."""

    def __init__(self, lab: Lab, archive: str, total: int = 40, interval: float = 1.0):
        self.lab, self.archive, self.total, self.interval = lab, archive, total, interval
        self.ids: list[str] = []
        self.submitted_at: dict[str, float] = {}
        self.refusals: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)

    def start(self) -> "Stream":
        self._thread.start()
        return self

    @staticmethod
    def mix(i: int) -> tuple[int, int]:
        """The `i`th task's (run seconds, GPUs): every fourth runs 20 s, every other asks for a GPU."""
        return (20 if i % 4 == 0 else 2), (1 if i % 2 else 0)

    def in_flight(self, overhead: float = 0.5) -> float:
        """Tasks the stream keeps running at once, each taking its run plus
        `overhead` seconds of the pipeline around it (Little's law)."""
        busy = sum(self.mix(i)[0] + overhead for i in range(self.total))
        return busy / (self.total * self.interval)

    def _run(self) -> None:
        for i in range(self.total):
            seconds, gpus = self.mix(i)
            while True:
                try:
                    task = self.lab.client.submit(self.archive, name=f"stream-{i}",
                                                  env={"SECONDS": str(seconds)}, gpus=gpus)
                    break
                except PinkError as exc:
                    self.refusals[str(exc)[:120]] += 1
                    time.sleep(SUBMIT_RETRY)
            self.ids.append(task["id"])
            self.submitted_at[task["id"]] = time.monotonic()
            time.sleep(self.interval)

    def wait_submitted(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ids) < count:
            assert time.monotonic() < deadline, f"only {len(self.ids)} of {count} tasks submitted"
            time.sleep(0.5)

    def finish(self, fault_at: float, timeout: float = 900) -> Counts:
        """Wait for every task to end (a task not final by then is lost) and
        count; recovery: from the fault to the end, as its record says, of
        the first task submitted after it that succeeded. (Counted from when
        the polling saw it, the figure was when the last submission went in.)"""
        fault_wall = time.time() - (time.monotonic() - fault_at)  # the lab's hosts share this clock
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        final: dict[str, dict] = {}
        while time.monotonic() < deadline and len(final) < len(self.ids):
            for task_id in self.ids:
                if task_id in final:
                    continue
                try:
                    task = self.lab.client.get(task_id)
                except PinkError:
                    continue
                if task["state"] in FINAL_NAMES:
                    final[task_id] = task
            time.sleep(2)
        counts = Counts(submitted=len(self.ids), lost=len(self.ids) - len(final))
        failed: Counter[str] = Counter()
        for task in final.values():
            if task["state"] == "succeeded":
                counts.succeeded += 1
            else:
                failed[f"{task['state']}: {task.get('error') or ''}"[:100]] += 1
        counts.failed = dict(failed)
        after = [_epoch(final[t]["timings"]["succeeded"]) - fault_wall for t in final
                 if self.submitted_at[t] > fault_at and final[t]["state"] == "succeeded"]
        counts.recovery_s = min(after) if after else None
        counts.archived, counts.accepted_twice = self._archive_counts()
        return counts

    def _archive_counts(self, timeout: float = 120) -> tuple[int, int]:
        """(tasks of the stream in the archive, tasks whose result was accepted
        more than once: two `exported` events)."""
        ids = ", ".join(f"'{t}'" for t in self.ids)
        deadline = time.monotonic() + timeout
        while True:
            archived = int(self.lab.db(f"SELECT COUNT(*) FROM tasks WHERE id IN ({ids})")[0][0])
            if archived >= len(self.ids) or time.monotonic() > deadline:
                break
            time.sleep(2)
        twice = self.lab.db(f"SELECT task_id FROM task_events WHERE task_id IN ({ids}) "
                            "AND state = 'exported' GROUP BY task_id HAVING COUNT(*) > 1")
        return archived, len(twice)


def report(fault: str, counts: Counts) -> None:
    """Print the row for docs/faults.md and keep it in build/cluster/faults.md."""
    row = counts.line(fault)
    print("\n" + row)
    with open(devlab.LAB_DIR / "faults.md", "a") as fh:
        fh.write(row + "\n")


def assert_nothing_lost(counts: Counts, explained: tuple[str, ...] = ()) -> None:
    """No task lost or accepted twice, every task archived, and a task failed
    only for a reason the fault explains (`explained`: words of its error)."""
    assert counts.lost == 0, counts
    assert counts.accepted_twice == 0, counts
    assert counts.archived == counts.submitted, counts
    unexplained = [r for r in counts.failed if not any(words in r for words in explained)]
    assert not unexplained, counts.failed
