"""Session fixtures: one real local cluster (etcd, Redis, MariaDB, sshd) per run.

`cluster` starts the services once, through devcluster.local, under
/var/lib/pink-test/<random> (not /tmp: sshd's chroot needs root-owned parents).
`pink_config` gives every test its own namespace in them (etcd prefix, Redis
database, MariaDB schema, spool dirs) and a config file; `pink_processes`
starts PINK's own processes for that config and stops them after the test.
At the end the Docker images the tests built (tests/images.py) are removed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
import warnings
from pathlib import Path

import pytest
import redis

from devcluster.cluster import TEST_BASE, Cluster
from devcluster.dockerd import remove_task_containers
from devcluster.ports import free_port
from pink import config as pink_config_module
from tests import images

# tests/cluster runs against the multi-host lab, which `make test-cluster`
# builds first (`make cluster`) and marks with PINK_LAB=1.
collect_ignore = [] if os.environ.get("PINK_LAB") == "1" else ["cluster"]
REDIS_DBS = 127  # databases 1..127 of the cluster's Redis (started with 128)
_namespaces = itertools.count(1)


def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit("PINK's tests need root: they start dockerd, sshd with a chroot, "
                    "MariaDB and a system user. Run them as root (or `sudo make test`).",
                    returncode=2)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session", autouse=True)
def built_images():
    """Removes, once every test is done, the images tests/images.py made and
    the tags runners put on them; images Docker held before stay.

    Autouse and session-scoped, so it is set up first and torn down last:
    after the cluster's runners, which tag images they load, have stopped.
    """
    yield images
    if images.built():
        import docker

        client = docker.from_env()
        try:
            _, kept = images.remove_built(client)
        finally:
            client.close()
        if kept:  # shown in pytest's warnings summary
            warnings.warn(f"{len(kept)} image(s) the tests built stay in Docker (a container uses "
                          f"them, or a tag held before): {', '.join(i[7:19] for i in kept)}")

@pytest.fixture(scope="session")
def cluster():
    """The session's services, started once on free ports; removed at the end."""
    TEST_BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(TEST_BASE, 0o755)
    base = TEST_BASE / uuid.uuid4().hex[:10]
    cl = Cluster(base, ssl_dir=base / "ssl", ssl_db_dir=base / "ssl_db")
    try:
        cl.ensure_dockerd()
        cl.make_certs()
        cl.start_etcd()
        cl.start_redis()
        cl.start_mariadb()
        cl.start_sshd("run1")
        yield cl
    finally:
        cl.down()
        shutil.rmtree(base, ignore_errors=True)


def _empty_dir(path: Path) -> None:
    """Remove what a previous test left, keeping the dir (and its owner/mode)."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


@pytest.fixture
def pink_config(cluster, tmp_path):
    """A `pink.config.Config` for this test alone, loaded from `config.path`.

    Its etcd prefix, Redis database and MariaDB schema are fresh and removed
    afterwards; the web spool/output dirs are new and the runner's spool and
    outbox are emptied. TTLs are short so fault tests finish quickly.
    """
    n = next(_namespaces)
    prefix = f"/pink-test/{n}"
    db_number = 1 + (n - 1) % REDIS_DBS
    database = f"pink_t{n}"
    rds = redis.Redis.from_url(cluster.redis_url(db_number))
    if rds.dbsize():
        raise RuntimeError(f"Redis database {db_number} holds data: refusing to use it")
    cluster.create_database(database)
    for path in (cluster.spool_dir("run1"), cluster.outbox_dir("run1"), cluster.runner_dir("run1") / "blobs"):
        if path.exists():
            _empty_dir(path)
    web = tmp_path / "web"
    path = cluster.write_config(
        path=tmp_path / "pink.toml", host="web1", runner_name="run1", web_port=free_port(),
        redis_url=cluster.redis_url(db_number),
        node_ttl=3, leader_ttl=3, reconcile_interval=0.5,
        etcd={"prefix": prefix},
        db={"database": database},
        web={"spool_dir": str(web / "spool"), "output_dir": str(web / "outputs")},
    )
    config = pink_config_module.load(path)
    config.namespace = n  # lets pink_processes name its processes after the test
    try:
        yield config
    finally:
        rds.flushdb()
        rds.close()
        cluster.drop_database(database)
        cluster.etcd_delete_prefix(prefix + "/")


@pytest.fixture
def config_variant(cluster, pink_config, tmp_path):
    """`variant(name, **overrides)`: another config file in this test's namespace
    (same etcd prefix, Redis database, schema, web port and dirs, short TTLs),
    with `overrides` (top-level settings or section dicts) applied. Returns its path."""

    def variant(name: str, runner_name: str = "run1", **overrides) -> str:
        c = pink_config
        settings = {"web_port": int(c.web.url.rsplit(":", 1)[1]), "redis_url": c.redis_url,
                    "node_ttl": 3, "leader_ttl": 3, "reconcile_interval": 0.5,
                    "etcd": {"prefix": c.etcd.prefix}, "db": {"database": c.db.database},
                    "web": {"spool_dir": c.web.spool_dir, "output_dir": c.web.output_dir}}
        for key, value in overrides.items():
            settings[key] = {**settings[key], **value} if isinstance(value, dict) and key in settings \
                else value
        return str(cluster.write_config(path=tmp_path / f"{name}.toml", runner_name=runner_name,
                                        **settings))

    return variant


@pytest.fixture(scope="session")
def docker_client(cluster):
    import docker

    client = docker.from_env()
    yield client
    client.close()


class PinkProcesses:
    """PINK's processes for one test's config, named `t<n>-<role>` in the
    cluster's process table so that tests never touch each other's."""

    def __init__(self, cluster: Cluster, config):
        self.cluster = cluster
        self.config = config
        self.tag = f"t{config.namespace}"
        self.started: list[str] = []

    def _name(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        self.started.append(name)
        return name

    def web(self, config_path: str | None = None, role: str = "web") -> str:
        name = self._name(role)
        self.cluster.start_web(config_path or self.config.path, name=name)
        return name

    def worker(self, n: int = 1, config_path: str | None = None) -> str:
        name = self._name(f"worker-{n}")
        self.cluster.start_worker(n, config_path or self.config.path, name=name)
        return name

    def notify_worker(self, config_path: str | None = None) -> str:
        """A worker of the `pink-notify` queue alone (the pipeline's workers never serve it)."""
        name = self._name("notify-worker")
        self.cluster.start_notify_worker(config_path or self.config.path, name=name)
        return name

    def leader(self, config_path: str | None = None, role: str = "leader") -> str:
        name = self._name(role)
        self.cluster.start_leader(config_path or self.config.path, name=name)
        return name

    def runner(self, runner: str = "run1", config_path: str | None = None) -> str:
        name = self._name(f"runner-{runner}")
        self.cluster.start_runner(runner, config_path or self.config.path, name=name)
        return name

    def alive(self, name: str) -> bool:
        return self.cluster.alive(name)

    def stop(self, name: str) -> None:
        self.cluster.stop(name)

    def kill(self, name: str) -> None:
        self.cluster.kill(name)

    def log(self, name: str) -> str:
        return self.cluster.log_path(name).read_text(errors="replace")

    def stop_all(self) -> None:
        for name in reversed(self.started):
            self.cluster.stop(name)


@pytest.fixture
def pink_processes(cluster, pink_config):
    procs = PinkProcesses(cluster, pink_config)
    yield procs
    procs.stop_all()
    remove_task_containers(pink_config.etcd.prefix)


@pytest.fixture
def web(pink_processes, pink_config):
    """pink-web alone for this test's config (nothing picks tasks up)."""
    pink_processes.web()
    return pink_config


@pytest.fixture
def api(pink_processes, pink_config):
    """A running one-machine PINK (web, worker, leader, runner) and user alice on it."""
    from tests.helpers import Api, make_user

    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader, pink_processes.runner):
        start()
    return Api(pink_config, make_user(pink_config, "alice"))


@pytest.fixture(scope="session")
def writer_archive(docker_client, tmp_path_factory):
    """An image whose task writes /result.txt ("hello from pink") and says done."""
    return images.build_archive(docker_client, "pink/test-writer:1", images.WRITER,
                                tmp_path_factory.mktemp("writer") / "writer.tar")


@pytest.fixture(scope="session")
def slow_archive(docker_client, tmp_path_factory):
    """An image whose task takes a few seconds, saying when it starts and ends."""
    return images.build_archive(docker_client, "pink/test-slow:1",
                                'CMD ["sh", "-c", "echo start; sleep 4; echo finished > /done.txt"]\n',
                                tmp_path_factory.mktemp("slow") / "slow.tar")


@pytest.fixture
def control_plane(pink_processes, pink_config):
    """pink-web (which announces web1), a worker and the leader, no runner;
    an Api for user alice."""
    from tests.helpers import Api, make_user

    for start in (pink_processes.web, pink_processes.worker, pink_processes.leader):
        start()
    return Api(pink_config, make_user(pink_config, "alice"))
