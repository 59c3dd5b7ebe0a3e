"""A second "host" on this machine: a network namespace joined to it by a
veth pair, so that traffic crosses a link that can be cut.

Used by the benchmark (SFTP over a link instead of loopback) and by the
partition test (a runner cut off mid-task). With `bridge`, the host end of
the link sits on a bridge carrying the host's address, so services can
listen on that address and unplugging the veth cuts the namespace off from
them; without one, the address is on the host end of the veth itself.
Everything `up()` makes, `down()` removes, including what a killed earlier
run left behind.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


@dataclass
class NetnsHost:
    name: str  # the namespace
    host_veth: str  # host end of the link; the namespace end is eth0
    host_addr: str  # the machine's address on the link (on the bridge, if any)
    ns_addr: str  # the namespace's address
    prefix: int = 24
    bridge: str | None = None

    @property
    def _forward_rule(self) -> list[str]:
        # dockerd's FORWARD policy is DROP: bridged traffic would vanish silently.
        return ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]

    def argv(self, *argv: str) -> list[str]:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def up(self) -> None:
        self.down()
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        if self.bridge:
            run("ip", "link", "add", self.bridge, "type", "bridge")
            run("ip", "addr", "add", f"{self.host_addr}/{self.prefix}", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
            run("ip", "link", "set", self.host_veth, "master", self.bridge, "up")
            run("iptables", "-I", *self._forward_rule)
        else:
            run("ip", "addr", "add", f"{self.host_addr}/{self.prefix}", "dev", self.host_veth)
            run("ip", "link", "set", self.host_veth, "up")
        run(*self.argv("ip", "addr", "add", f"{self.ns_addr}/{self.prefix}", "dev", "eth0"))
        run(*self.argv("ip", "link", "set", "eth0", "up"))
        run(*self.argv("ip", "link", "set", "lo", "up"))

    def partition(self) -> None:
        """Unplug the link: nothing passes either way until `heal()`."""
        run("ip", "link", "set", self.host_veth, "down")

    def heal(self) -> None:
        run("ip", "link", "set", self.host_veth, "up")

    def down(self) -> None:
        if self.bridge:
            while run("iptables", "-C", *self._forward_rule, check=False).returncode == 0:
                run("iptables", "-D", *self._forward_rule)
        run("ip", "link", "del", self.host_veth, check=False)  # removes its peer too
        if self.bridge:
            run("ip", "link", "del", self.bridge, check=False)
        run("ip", "netns", "del", self.name, check=False)
