"""The cluster's TLS certificates: one CA for the web pages, one for MariaDB.

PINK talks TLS everywhere a network is crossed, so even a one-machine
cluster has certificates, made by the same ssl/make-certs.sh an operator
uses. The demo keeps them in the repository's ssl/ and ssl_db/; a test
session or a benchmark gives its cluster private directories instead.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from devcluster.state import ClusterState

REPO = Path(__file__).resolve().parent.parent
MAKE_CERTS = REPO / "ssl" / "make-certs.sh"


class Certificates(ClusterState):
    """Where the cluster's certificates are (recorded in cluster.json, so a
    later `down` or `config` uses the same ones) and making them."""

    def _choose_cert_dirs(self, ssl_dir: Path | str | None, ssl_db_dir: Path | str | None) -> None:
        """Record the directories given, else keep those recorded, else the repository's."""
        if ssl_dir:
            self.state["ssl_dir"] = str(Path(ssl_dir).absolute())
        if ssl_db_dir:
            self.state["ssl_db_dir"] = str(Path(ssl_db_dir).absolute())
        self.state.setdefault("ssl_dir", str(REPO / "ssl"))
        self.state.setdefault("ssl_db_dir", str(REPO / "ssl_db"))

    @property
    def ssl_dir(self) -> Path:
        return Path(self.state["ssl_dir"])

    @property
    def ssl_db_dir(self) -> Path:
        return Path(self.state["ssl_db_dir"])

    def make_certs(self, *sans: str) -> None:
        """Run ssl/make-certs.sh into this cluster's cert dirs (idempotent)."""
        subprocess.run([str(MAKE_CERTS), "--web-dir", str(self.ssl_dir),
                        "--db-dir", str(self.ssl_db_dir), *sans],
                       check=True, stdout=subprocess.DEVNULL)
