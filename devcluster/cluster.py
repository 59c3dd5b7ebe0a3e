"""A one-machine PINK cluster: infrastructure services and PINK's processes.

`Cluster(base)` starts etcd, Redis, MariaDB (TLS only), a chrooted SFTP-only
sshd per runner, and pink-web/worker/leader/runner, each in its own session,
with pid files in base/run/, logs in base/log/ and its choices (ports,
passwords, paths) in base/cluster.json, so a second `up` reuses what runs.
Used by `python -m devcluster.local`, tests/conftest.py and bench/. Imports
no Flask, RQ or Docker: a cluster can be started before anything else is
importable.

Each concern is a class of its own module (state, processes, ports, certs,
dockerd, etcd_service, redis_service, mariadb_service, sshd_service,
pink_toml, pink_processes); `Cluster` only puts them together and says
in what order a whole cluster starts.
"""

from __future__ import annotations

from pathlib import Path

from devcluster.dockerd import DockerdService, remove_task_containers
from devcluster.pink_processes import PinkProcesses
from devcluster.pink_toml import PREFIX

DEMO_BASE = Path("/var/lib/pink-demo")  # `make demo`'s cluster
TEST_BASE = Path("/var/lib/pink-test")  # tests' clusters, one random subdir each


class Cluster(PinkProcesses, DockerdService):
    """One machine's PINK cluster rooted at `base` (which must not be in /tmp:
    sshd's ChrootDirectory needs root-owned, non-writable path components)."""

    def __init__(self, base: Path | str, ssl_dir: Path | str | None = None,
                 ssl_db_dir: Path | str | None = None):
        super().__init__(base)
        self._choose_cert_dirs(ssl_dir, ssl_db_dir)
        self._save()

    def down(self) -> None:
        """Stop everything this cluster started, newest first, nothing else."""
        for name in reversed(self.names()):
            self.stop(name)
        remove_task_containers(PREFIX)

    def up(self, with_pink: bool = False, runners: tuple[str, ...] = ("run1",)) -> Path:
        """Start (or reuse) every service; returns the PINK config path."""
        self.ensure_dockerd()
        self.make_certs()
        self.start_etcd()
        self.start_redis()
        self.start_mariadb()
        for runner in runners:
            self.start_sshd(runner)
        config = self.write_config(runner_name=runners[0])
        if with_pink:
            self.start_web()
            self.start_worker(1)
            self.start_notify_worker()
            self.start_leader()
            for runner in runners:
                cfg = config if runner == runners[0] else self.write_config(
                    runner_name=runner, path=self.base / f"pink-{runner}.toml")
                self.start_runner(runner, cfg)
        return config

    def status(self) -> list[tuple[str, int, bool]]:
        return [(name, self.pid(name), self.alive(name)) for name in self.names()]
