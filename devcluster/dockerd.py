"""The Docker engine that runners start task containers on.

A cluster needs an engine but rarely owns one: `python -m devcluster.local
dockerd` (and `make cluster`) start one that no cluster owns and nothing
stops, logging to /var/log/pink-dockerd.log; a cluster starts its own only
when none answers, and then stops it with the rest. Engine checks talk to its
socket directly, so that nothing here needs the Docker SDK except removing a
cluster's task containers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from devcluster.processes import START_TIMEOUT, ClusterError, ProcessTable, log_tail, wait_until

DOCKERD_LOG = Path("/var/log/pink-dockerd.log")  # a dockerd no cluster owns


def remove_task_containers(prefix: str) -> None:
    """Remove the task containers of the PINK cluster whose etcd prefix is
    `prefix`: a runner that stops leaves them running for its next process."""
    import docker

    try:
        client = docker.from_env()
    except docker.errors.DockerException:
        return  # no engine (it was never started): no containers either
    try:
        for container in client.containers.list(all=True, filters={"label": f"pink.cluster={prefix}"}):
            container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass  # removed meanwhile
    finally:
        client.close()


def docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return host.removeprefix("unix://") if host.startswith("unix://") else ""


def docker_answers() -> bool:
    """Ping the engine's API on its unix socket (what `docker info` needs)."""
    path = docker_socket()
    if not path:  # a tcp:// DOCKER_HOST: let the client decide
        return subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b"OK" in sock.recv(4096)
    except OSError:
        return False


def ensure_dockerd(log: Path = DOCKERD_LOG, timeout: float = START_TIMEOUT) -> subprocess.Popen | None:
    """Start dockerd unless an engine answers; returns the process we started.

    A dockerd we find running belongs to someone else and is never stopped.
    """
    if docker_answers():
        return None
    if not shutil.which("dockerd"):
        raise ClusterError("dockerd is not installed (apt-get install docker.io)")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(["dockerd"], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    if not wait_until(lambda: proc.poll() is None and docker_answers(), timeout):
        raise ClusterError(f"dockerd did not answer within {timeout:.0f}s; "
                           f"{log}:\n{log_tail(log)}")
    return proc


class DockerdService(ProcessTable):
    """A cluster's own dockerd, started only when no engine answers: one we
    find belongs to someone else, while one we start is ours to stop."""

    def ensure_dockerd(self) -> None:
        """Make sure a Docker engine answers; one we start is ours to stop."""
        if self._reuse("dockerd", docker_answers) or docker_answers():
            return
        self.start_process("dockerd", ["dockerd"])
        self._wait_ready("dockerd", docker_answers)
