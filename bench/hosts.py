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

NETNS = "pinkbench"  # the namespace's name
HOST_VETH = "veth-pinkb"  # host end of the link; the namespace end is eth0
HOST_ADDR = "10.78.0.1"
NS_ADDR = "10.78.0.11"
PREFIX = 24
SSH_PORT = 22


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class RunnerHost:
    """The namespace, its veth pair and its sshd; `up()` then `down()`."""

    def __init__(self, cluster, runner: str = "run1"):
        self.cluster = cluster
        self.runner = runner
        self.config = cluster.base / "bench-sshd_config"
        self.known_hosts = cluster.base / "bench-known_hosts"
        self.log = cluster.log_path("bench-sshd")
        self.proc: subprocess.Popen | None = None

    @property
    def node(self) -> dict:
        """The runner as a transfer job sees it (pink.sftp's `node`)."""
        return {"name": f"{self.runner}-netns", "ssh_host": NS_ADDR, "ssh_port": SSH_PORT,
                "ssh_user": "pink-xfer", "ssh_spool": "/spool"}

    def up(self) -> None:
        self.down()  # a previous run that was killed may have left them
        _ip("netns", "add", NETNS)
        _ip("link", "add", HOST_VETH, "type", "veth", "peer", "name", "eth0", "netns", NETNS)
        _ip("addr", "add", f"{HOST_ADDR}/{PREFIX}", "dev", HOST_VETH)
        _ip("link", "set", HOST_VETH, "up")
        _ip("netns", "exec", NETNS, "ip", "addr", "add", f"{NS_ADDR}/{PREFIX}", "dev", "eth0")
        _ip("netns", "exec", NETNS, "ip", "link", "set", "eth0", "up")
        _ip("netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
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
                ["ip", "netns", "exec", NETNS, "/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
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
        _ip("link", "del", HOST_VETH, check=False)  # removes the peer too
        _ip("netns", "del", NETNS, check=False)
        for path in (self.config, self.known_hosts):
            Path(path).unlink(missing_ok=True)
