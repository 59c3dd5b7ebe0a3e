"""A second "host" for the benchmark: a network namespace behind a veth link,
running an sshd that serves the cluster's runner transfer account (same
chroot, host key and authorized key) on the namespace's own address.

Used by bench/run.py so that SFTP and scp cross a real (virtual) link rather
than loopback. Everything made here is removed by `RunnerHost.down()`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from devcluster.netns import NetnsHost

NETNS = "pinkbench"  # the namespace's name
HOST_VETH = "veth-pinkb"  # host end of the link; the namespace end is eth0
HOST_ADDR = "10.78.0.1"
NS_ADDR = "10.78.0.11"
PREFIX = 24
SSH_PORT = 22


class RunnerHost:
    """The namespace, its veth pair and its sshd; `up()` then `down()`."""

    def __init__(self, cluster, runner: str = "run1"):
        self.cluster = cluster
        self.runner = runner
        self.config = cluster.base / "bench-sshd_config"
        self.known_hosts = cluster.base / "bench-known_hosts"
        self.log = cluster.log_path("bench-sshd")
        self.proc: subprocess.Popen | None = None
        self.netns = NetnsHost(NETNS, HOST_VETH, HOST_ADDR, NS_ADDR, PREFIX)

    @property
    def node(self) -> dict:
        """The runner as a transfer job sees it (pink.sftp's `node`)."""
        return {"name": f"{self.runner}-netns", "ssh_host": NS_ADDR, "ssh_port": SSH_PORT,
                "ssh_user": "pink-xfer", "ssh_spool": "/spool"}

    def up(self) -> None:
        self.down()  # a previous run that was killed may have left them
        self.netns.up()
        self._start_sshd()

    def _start_sshd(self) -> None:
        rdir = self.cluster.runner_dir(self.runner)
        text = (rdir / "sshd_config").read_text()  # the cluster's runner sshd, re-addressed
        lines = []
        for line in text.splitlines():
            key = line.split(" ", 1)[0]
            if key == "Port":
                line = f"Port {SSH_PORT}"
            elif key == "ListenAddress":
                line = f"ListenAddress {NS_ADDR}"
            elif key == "PidFile":
                line = f"PidFile {self.cluster.run_dir / 'bench-sshd.sshd.pid'}"
            elif key == "LogLevel":
                line = "LogLevel ERROR"
            lines.append(line)
        self.config.write_text("\n".join(lines) + "\n")
        kind, blob = (rdir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"{NS_ADDR} {kind} {blob}\n")
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.netns.argv("/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)),
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((NS_ADDR, SSH_PORT), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"sshd in namespace {NETNS} did not answer; see {self.log}")

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self.netns.down()
        for path in (self.config, self.known_hosts):
            Path(path).unlink(missing_ok=True)
