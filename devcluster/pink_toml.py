"""The PINK config file (pink.toml) of a local cluster.

Every PINK process of the cluster, and every test, reads the same kind of
file a deployment has (docs/pink.example.toml), pointing at the cluster's
services; tests write one per test with their own namespace (etcd prefix,
Redis database, schema). Written by a small TOML writer of its own, since
Python reads TOML but cannot write it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from devcluster.etcd_service import EtcdService
from devcluster.mariadb_service import MariaDBService
from devcluster.processes import ClusterError
from devcluster.redis_service import RedisService
from devcluster.sshd_service import XFER_USER, SshdService

WEB_PORT = 8443  # the demo's pages, at an address people bookmark (another if taken)
PREFIX = "/pink"  # the demo's etcd prefix, and its containers' `pink.cluster` label


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(data: dict) -> str:
    """Top-level scalars, then one [section] per nested dict (all PINK needs)."""
    out = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, section in data.items():
        if isinstance(section, dict):
            out += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in section.items()]
    return "\n".join(out) + "\n"


def merge(base: dict, overrides: dict) -> dict:
    """`overrides` wins; a dict value is merged into the section of that name."""
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key].update(value)
        else:
            result[key] = value
    return result


class PinkConfig(EtcdService, RedisService, MariaDBService, SshdService):
    """Write the config that points PINK at this cluster's services, which
    must run already: their ports and passwords go into it."""

    @property
    def config_path(self) -> Path:
        return self.base / "pink.toml"

    def write_config(self, host: str = "web1", runner_name: str = "run1",
                     path: Path | str | None = None, web_port: int | None = None,
                     **overrides) -> Path:
        """Write a PINK config for this cluster (docs/pink.example.toml format).

        `overrides` are top-level settings (node_ttl=3) or whole sections as
        dicts, merged into the generated ones (etcd={"prefix": "/t1"}).
        The runner's sshd must have been started.
        """
        missing = {"etcd", "redis", "mariadb", f"sshd-{runner_name}"} - set(self.state["ports"])
        if missing or "db_password" not in self.state:
            raise ClusterError(f"start the cluster first (`up`): no {', '.join(sorted(missing))}")
        path = Path(path) if path else self.config_path
        port = web_port or self.port("web", prefer=WEB_PORT)
        web = self.base / "web"
        data = {
            "host": host,
            "redis_url": self.redis_url(),
            "node_ttl": 10, "leader_ttl": 10, "reconcile_interval": 2.0, "max_attempts": 3,
            "etcd": {"endpoints": [self.etcd_endpoint], "prefix": PREFIX},
            "db": {"host": "127.0.0.1", "port": self.db_port, "user": "pink",
                   "password": self.state["db_password"], "database": "pink",
                   "ca": str(self.db_ca)},
            "web": {"spool_dir": str(web / "spool"), "output_dir": str(web / "outputs"),
                    "secret_key": self.secret("secret_key"),
                    "url": f"https://127.0.0.1:{port}",
                    "certfile": str(self.ssl_dir / "web.pem"),
                    "keyfile": str(self.ssl_dir / "web.key"),
                    "ca": str(self.ssl_dir / "ca.pem"),
                    "bind": f"127.0.0.1:{port}", "workers": 2},
            "ssh": {"key": str(self.ssh_key), "known_hosts": str(self.known_hosts)},
            "runner": {"name": runner_name,
                       "spool_dir": str(self.spool_dir(runner_name)),
                       "outbox_dir": str(self.outbox_dir(runner_name)),
                       "ssh_host": "127.0.0.1", "ssh_port": self.ssh_port(runner_name),
                       "ssh_user": XFER_USER, "ssh_spool": "/spool", "ssh_outbox": "/outbox",
                       "gpus": []},
        }
        data = merge(data, overrides)
        for key in ("spool_dir", "output_dir"):
            Path(data["web"][key]).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("# Written by devcluster.local for the cluster in "
                     f"{self.base}\n" + dump_toml(data))
        return path
