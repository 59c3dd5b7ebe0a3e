"""PINK's own processes in a local cluster: pink-web, workers, the leader, runners.

They run from the venv the cluster is started from (the entry points next to
sys.executable), each with its config file, so that `make demo` and the
tests run the code of the working tree as a deployment would run it.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from devcluster.pink_toml import PinkConfig
from devcluster.processes import ClusterError, log_tail
from pink.compat import tomllib


class PinkProcesses(PinkConfig):
    """Start PINK's entry points for a config, reusing one that runs already
    and answers, and failing loudly (with its log) on one that dies at once."""

    @staticmethod
    def executable(name: str) -> str:
        """An entry point of the running venv (next to sys.executable)."""
        path = Path(sys.executable).parent / name
        if not path.exists():
            raise ClusterError(f"{path} does not exist: is PINK installed in this "
                               "venv (pip install -e .)?")
        return str(path)

    def _pink_env(self, config: Path) -> dict:
        return {"PINK_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}

    def start_pink(self, name: str, program: str, config: Path | str | None = None,
                   args: tuple[str, ...] = (), settle: float = 1.0) -> subprocess.Popen:
        """Start a PINK entry point and make sure it survives its first second."""
        config = Path(config or self.config_path)
        proc = self.start_process(name, [self.executable(program), "--config", str(config), *args],
                                  env=self._pink_env(config))
        time.sleep(settle)
        if not self.alive(name):
            raise ClusterError(f"{name} exited at once; {self.log_path(name)}:\n"
                               f"{log_tail(self.log_path(name))}")
        return proc

    def web_health(self, config: Path | str | None = None) -> bool:
        """GET /api/v1/health over HTTPS, verified against the cluster's CA."""
        settings = tomllib.loads(Path(config or self.config_path).read_text())
        url = settings["web"]["url"].rstrip("/") + "/api/v1/health"
        ctx = ssl.create_default_context(cafile=str(self.ssl_dir / "ca.pem"))
        with urllib.request.urlopen(url, timeout=3, context=ctx) as resp:
            return resp.status == 200

    def start_web(self, config: Path | str | None = None, name: str = "web") -> subprocess.Popen:
        if self._reuse(name, lambda: self.web_health(config)):
            return self._popen.get(name)
        proc = self.start_pink(name, "pink-web", config, settle=0)
        self._wait_ready(name, lambda: self.web_health(config))
        return proc

    def start_worker(self, n: int = 1, config: Path | str | None = None,
                     name: str | None = None) -> subprocess.Popen:
        name = name or f"worker-{n}"
        if self._reuse(name, lambda: True):
            return self._popen.get(name)
        return self.start_pink(name, "pink-worker", config)

    def start_notify_worker(self, config: Path | str | None = None,
                            name: str = "notify-worker") -> subprocess.Popen:
        """A worker of notifications only (`pink-worker --queues notify`), as each web host runs."""
        if self._reuse(name, lambda: True):
            return self._popen.get(name)
        return self.start_pink(name, "pink-worker", config, ("--queues", "notify"))

    def start_leader(self, config: Path | str | None = None, name: str = "leader") -> subprocess.Popen:
        if self._reuse(name, lambda: True):
            return self._popen.get(name)
        return self.start_pink(name, "pink-leader", config)

    def start_runner(self, runner: str = "run1", config: Path | str | None = None,
                     name: str | None = None) -> subprocess.Popen:
        name = name or f"runner-{runner}"
        if self._reuse(name, lambda: True):
            return self._popen.get(name)
        return self.start_pink(name, "pink-runner", config, ("--name", runner))
