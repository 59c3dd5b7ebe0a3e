"""`python -m devcluster.local`: start, stop and inspect a one-machine PINK cluster.

The command line of devcluster/cluster.py, called by `make up`, `make demo`,
`make down`, `make status`, `make test`, `make bench` and `make cluster`
(the last three: `dockerd`, an engine no cluster owns); `up` and `demo` reuse
what a previous call started (base/cluster.json). It needs root: sshd's
chroot, dockerd and the transfer account's useradd.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from devcluster.cluster import DEMO_BASE, Cluster
from devcluster.demo import run_demo
from devcluster.dockerd import ensure_dockerd
from devcluster.processes import ClusterError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.local",
                                     description="Start or stop a one-machine PINK cluster.")
    parser.add_argument("command", choices=["up", "down", "status", "config", "dockerd", "demo"])
    parser.add_argument("--base", default=str(DEMO_BASE),
                        help="cluster directory (not under /tmp: sshd's chroot needs "
                             "root-owned path components)")
    parser.add_argument("--with-pink", action="store_true",
                        help="also start pink-web, a worker, the leader and a runner")
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except (ClusterError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_command(args) -> int:
    if os.geteuid() != 0:
        raise ClusterError("the local cluster needs root (sshd chroot, dockerd, useradd)")
    if args.command == "dockerd":
        started = ensure_dockerd()
        print("dockerd started" if started else "dockerd already answers", file=sys.stderr)
        return 0
    if args.command == "demo":
        run_demo(args.base)
        return 0
    cluster = Cluster(args.base)
    if args.command == "up":
        print(cluster.up(with_pink=args.with_pink))
    elif args.command == "down":
        cluster.down()
    elif args.command == "status":
        for name, pid, alive in cluster.status():
            print(f"{name:20} {pid:>8} {'running' if alive else 'dead'}")
    elif args.command == "config":
        print(cluster.config_path if cluster.config_path.exists() else cluster.write_config())
    return 0


if __name__ == "__main__":
    sys.exit(main())
