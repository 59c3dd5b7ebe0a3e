"""What a local cluster remembers between commands: base/cluster.json.

A cluster is started by one command (`up`, a test session) and stopped by
another (`down`), possibly after a reboot: everything they must agree on,
its ports, passwords, certificate directories and processes, is kept in one
file under the cluster's base directory rather than in any process's memory.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path


class ClusterState:
    """The cluster's directory (base/, base/run/, base/log/) and its
    cluster.json, loaded on creation and saved after every change, so that a
    second `up` reuses what runs and `down` finds what to stop. The other
    parts of a cluster (devcluster/cluster.py) keep their choices here."""

    def __init__(self, base: Path | str):
        self.base = Path(base).absolute()
        self.run_dir = self.base / "run"
        self.log_dir = self.base / "log"
        self.state_file = self.base / "cluster.json"
        for path in (self.base, self.run_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.state = self._load_state()
        self.state.setdefault("ports", {})
        self.state.setdefault("procs", {})
        # The processes this object started itself, which it can wait for
        # (devcluster/processes.py); those of an earlier command have a pid only.
        self._popen: dict[str, subprocess.Popen] = {}

    def _load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}

    def _save(self) -> None:
        """Atomically, and private: the file holds the database passwords."""
        tmp = self.state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.state, fh, indent=2, sort_keys=True)
        os.replace(tmp, self.state_file)

    def secret(self, key: str) -> str:
        """A random secret generated once and kept in cluster.json."""
        if key not in self.state:
            self.state[key] = secrets.token_urlsafe(24)
            self._save()
        return self.state[key]
