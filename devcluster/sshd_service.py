"""The runners' image-transfer account: a chrooted, SFTP-only sshd per runner.

Workers hand images to a runner and fetch its outputs over SFTP as the
system account `pink-xfer`, confined to the runner's spool and outbox, with
host keys pinned in a known_hosts file: the same arrangement a deployment
makes, so that the transfer code is tested against a real, strict sshd.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from pathlib import Path

from devcluster.ports import PortBook
from devcluster.processes import ClusterError
from devcluster.state import ClusterState

XFER_USER = "pink-xfer"  # the runners' image-transfer account (SFTP only)


def ensure_xfer_user() -> None:
    """The system account runners receive images as (idempotent).

    Its password field is `*` (no password) rather than useradd's `!`, which
    sshd without PAM reads as a locked account and refuses even for keys.
    """
    try:
        pwd.getpwnam(XFER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--shell", "/usr/sbin/nologin",
                        "--home-dir", "/nonexistent", "--no-create-home", XFER_USER],
                       check=True)
    subprocess.run(["usermod", "-p", "*", XFER_USER], check=True)


def keygen(path: Path, comment: str) -> None:
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                        "-f", str(path)], check=True)


class TransferPaths(ClusterState):
    """Where the transfer account's files lie under base/: the workers' key
    and known_hosts (base/ssh/), and each runner's chroot with its spool and
    outbox. PINK's config and the tests read these as much as sshd does."""

    @property
    def ssh_dir(self) -> Path:
        return self.base / "ssh"

    @property
    def ssh_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    def runner_dir(self, runner: str = "run1") -> Path:
        return self.base / ("runner" if runner == "run1" else f"runner-{runner}")

    def chroot(self, runner: str = "run1") -> Path:
        return self.runner_dir(runner) / "chroot"

    def spool_dir(self, runner: str = "run1") -> Path:
        return self.chroot(runner) / "spool"

    def outbox_dir(self, runner: str = "run1") -> Path:
        return self.chroot(runner) / "outbox"


class SshdService(TransferPaths, PortBook):
    """Start a runner's sshd: its keys, its root-owned chroot (sshd refuses
    any other), its config, and the pinned host keys of all runners."""

    def ssh_port(self, runner: str = "run1") -> int:
        return self.state["ports"][f"sshd-{runner}"]

    def _sshd_answers(self, runner: str) -> bool:
        with socket.create_connection(("127.0.0.1", self.ssh_port(runner)), timeout=2) as sock:
            return sock.recv(64).startswith(b"SSH-2.0-")

    def start_sshd(self, runner: str = "run1") -> int:
        """An sshd whose only account is the chrooted, SFTP-only `pink-xfer`.

        Returns its port. The workers' key and the pinned host key are written
        to base/ssh/ (id_ed25519, known_hosts) for the PINK config.
        """
        name = f"sshd-{runner}"
        if self._reuse(name, lambda: self._sshd_answers(runner)):
            self._write_known_hosts()
            return self.ssh_port(runner)
        ensure_xfer_user()
        self._ssh_keys(runner)
        self._runner_layout(runner)
        port = self.port(name)
        config = self._sshd_config(runner, port)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        check = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)],
                               capture_output=True, text=True)
        if check.returncode:
            raise ClusterError(f"sshd rejects {config}: {check.stderr.strip()}")
        self.start_process(name, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)])
        self._wait_ready(name, lambda: self._sshd_answers(runner))
        self._write_known_hosts()
        return port

    def _ssh_keys(self, runner: str) -> None:
        self.ssh_dir.mkdir(mode=0o700, exist_ok=True)
        self.runner_dir(runner).mkdir(exist_ok=True)
        keygen(self.ssh_key, "pink-workers")
        keygen(self.runner_dir(runner) / "ssh_host_ed25519_key", f"pink-{runner}-host")

    def _runner_layout(self, runner: str) -> None:
        """Root-owned, non-writable path down to the chroot (sshd demands it);
        only the spool and outbox belong to the transfer account."""
        xfer = pwd.getpwnam(XFER_USER)
        for path in (self.runner_dir(runner), self.chroot(runner)):
            path.mkdir(exist_ok=True)
            os.chown(path, 0, 0)
            os.chmod(path, 0o755)
        for path in (self.spool_dir(runner), self.outbox_dir(runner)):
            path.mkdir(exist_ok=True)
            os.chown(path, xfer.pw_uid, xfer.pw_gid)
            os.chmod(path, 0o700)
        pubkey = self.ssh_key.with_suffix(".pub").read_text().strip()
        keys = self.runner_dir(runner) / "authorized_keys"
        keys.write_text(f"restrict {pubkey}\n")
        os.chmod(keys, 0o644)

    def _sshd_config(self, runner: str, port: int) -> Path:
        rdir = self.runner_dir(runner)
        config = rdir / "sshd_config"
        config.write_text(f"""\
# Written by devcluster.local: the image-transfer account of runner {runner}.
Port {port}
ListenAddress 127.0.0.1
HostKey {rdir / 'ssh_host_ed25519_key'}
PidFile {self.run_dir / f'sshd-{runner}.sshd.pid'}
AuthorizedKeysFile {rdir / 'authorized_keys'}
StrictModes yes
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers {XFER_USER}
AllowTcpForwarding no
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTunnel no
PermitTTY no
LogLevel VERBOSE
Subsystem sftp internal-sftp

Match User {XFER_USER}
    ChrootDirectory {self.chroot(runner)}
    ForceCommand internal-sftp
    AllowTcpForwarding no
    X11Forwarding no
""")
        return config

    def _write_known_hosts(self) -> None:
        """Pin every runner's host key; unknown hosts are refused by clients."""
        lines = []
        for key in sorted(self.state["ports"]):
            if key.startswith("sshd-"):
                runner = key.removeprefix("sshd-")
                hostkey = self.runner_dir(runner) / "ssh_host_ed25519_key.pub"
                if hostkey.exists():
                    kind, blob = hostkey.read_text().split()[:2]
                    lines.append(f"[127.0.0.1]:{self.state['ports'][key]} {kind} {blob}")
        self.known_hosts.write_text("\n".join(lines) + "\n")
        os.chmod(self.known_hosts, 0o644)
