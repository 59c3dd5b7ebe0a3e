"""A dockerd of one test's own, to restart under a running task.

The shared engine serves every other test and helper, so it is never
restarted; this one has its own data root, exec root (its containerd lives
there), pid file and socket under a fresh /tmp/pdr-* directory (short: unix
socket paths are limited to 108 bytes), no bridge, no iptables, and
live-restore on as in deployments. It runs in a network namespace of its
own (`unshare --net`): a dockerd started with `--bridge=none` deletes the
host's docker0, and with it the shared engine's default network. `close` removes its containers, stops it,
ends any process still naming its directory (a shim, its containerd),
unmounts what it mounted there and removes the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import docker

from tests import images

START_TIMEOUT = 60.0  # seconds dockerd may take to answer
STOP_TIMEOUT = 30.0  # seconds between SIGTERM and SIGKILL
BUSYBOX_TAG = "pink/busybox:private"


class PrivateDockerd:
    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="pdr-", dir="/tmp"))
        self.socket = self.base / "d.sock"
        self.url = f"unix://{self.socket}"
        # its own (empty) settings, not the shared engine's /etc/docker/daemon.json
        (self.base / "daemon.json").write_text(json.dumps({}))
        self.proc: subprocess.Popen | None = None
        # made once dockerd first answers: the client asks the version at its creation
        self.client: docker.DockerClient | None = None
        self.image = ""  # set by the owner once imported (import_busybox)

    def start(self) -> None:
        args = ["unshare", "--net", "--", "dockerd", "--config-file", str(self.base / "daemon.json"),
                "--data-root", str(self.base / "data"), "--exec-root", str(self.base / "exec"),
                "--pidfile", str(self.base / "dockerd.pid"), "-H", self.url,
                "--bridge=none", "--iptables=false", "--ip-masq=false", "--live-restore"]
        with open(self.base / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private dockerd did not start; {self.base}/dockerd.log:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, as `systemctl restart docker` sends: with live-restore the containers run on."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, down: float = 0.0) -> None:
        """Stop, stay down `down` seconds, start again."""
        self.stop()
        time.sleep(down)
        self.start()

    def answers(self) -> bool:
        try:
            if self.client is None:
                self.client = docker.DockerClient(base_url=self.url, timeout=60)
            return self.client.ping()
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False

    def log_tail(self, lines: int = 30) -> str:
        text = (self.base / "dockerd.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def import_busybox(self) -> str:
        """The busybox rootfs (tests/images.py) as BUSYBOX_TAG in this engine.
        Not through images.ensure_busybox_image: that records the image for
        removal from the shared engine at the session's end."""
        with tempfile.TemporaryDirectory(prefix="pink-rootfs-") as tmp:
            rootfs = images.busybox_rootfs(os.path.join(tmp, "rootfs"))
            archive = os.path.join(tmp, "rootfs.tar")
            with tarfile.open(archive, "w") as tar:
                tar.add(rootfs, arcname=".")
            repository, _, tag = BUSYBOX_TAG.rpartition(":")
            self.client.api.import_image_from_file(archive, repository=repository, tag=tag,
                                                   changes=['CMD ["sh"]', "ENV PATH=/bin"])
        return BUSYBOX_TAG

    def close(self) -> None:
        """Remove what this engine made, stop it and remove its directory."""
        try:
            if self.proc is not None and self.answers():
                for container in self.client.containers.list(all=True):
                    container.remove(force=True, v=True)
        finally:
            if self.client is not None:
                self.client.close()
            self.stop()
            self._end_processes()
            self._unmount()
            shutil.rmtree(self.base, ignore_errors=True)

    def _end_processes(self) -> None:
        """Kill, by pid, processes whose command line names our directory
        (a shim or containerd a failed test left): no other process does."""
        marker = str(self.base).encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _unmount(self) -> None:
        """dockerd leaves its data root bind-mounted on itself (and, after a
        failure, overlays and namespaces under it): deepest first."""
        prefix = str(self.base) + "/"
        with open("/proc/self/mounts") as fh:
            points = [line.split()[1] for line in fh if line.split()[1].startswith(prefix)]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
