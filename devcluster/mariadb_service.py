"""The cluster's MariaDB: PINK's accounts, tasks and audit trail.

It accepts TCP clients only over TLS, as a deployed one does, so that PINK's
database code is tested the way it runs; root works over the unix socket,
which tests use to make and drop a schema per test.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pymysql

from devcluster.certs import Certificates
from devcluster.ports import PortBook, tcp_answers
from devcluster.processes import ClusterError


class MariaDBService(PortBook, Certificates):
    """Start the cluster's MariaDB with random passwords for root and `pink`
    (no default secrets, even here), and make or drop one test's schema."""

    @property
    def db_socket(self) -> Path:
        return self.run_dir / "mariadb.sock"

    @property
    def db_port(self) -> int:
        return self.state["ports"]["mariadb"]

    @property
    def db_ca(self) -> Path:
        return self.ssl_db_dir / "ca.pem"

    def root_db(self, database: str | None = None) -> pymysql.connections.Connection:
        """A root connection over the unix socket (tests create schemas with it)."""
        return pymysql.connect(unix_socket=str(self.db_socket), user="root",
                               password=self.state.get("db_root_password", ""),
                               database=database, autocommit=True, connect_timeout=5)

    def _db_answers(self) -> bool:
        self.root_db().close()
        return True

    def start_mariadb(self) -> str:
        """MariaDB that accepts TCP clients only over TLS; returns pink's password.

        Creates database `pink` and user `pink` (REQUIRE SSL) with a random
        password, and gives root a random password too: no default secrets.
        """
        if not self._reuse("mariadb", self._db_answers):
            self._start_mariadbd()
        self._setup_db_users()
        return self.state["db_password"]

    def _start_mariadbd(self) -> None:
        data = self.base / "mariadb"
        if not (data / "mysql").is_dir():
            data.mkdir(exist_ok=True)
            out = subprocess.run(
                ["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={data}",
                 "--auth-root-authentication-method=normal"],
                capture_output=True, text=True)
            if out.returncode:
                raise ClusterError(f"mariadb-install-db failed:\n{out.stdout}\n{out.stderr}")
        for name in ("ca.pem", "server.pem", "server.key"):
            if not (self.ssl_db_dir / name).exists():
                raise ClusterError(f"{self.ssl_db_dir / name} is missing: run `make certs`")
        port = self.port("mariadb")
        self.start_process("mariadb", [
            "mariadbd", "--no-defaults", "--user=root", f"--datadir={data}",
            f"--socket={self.db_socket}", f"--port={port}", "--bind-address=127.0.0.1",
            f"--pid-file={self.run_dir / 'mariadbd.pid'}", "--skip-name-resolve",
            f"--ssl-ca={self.db_ca}", f"--ssl-cert={self.ssl_db_dir / 'server.pem'}",
            f"--ssl-key={self.ssl_db_dir / 'server.key'}", "--require-secure-transport=ON",
            "--innodb-buffer-pool-size=64M", "--max-connections=500",
        ])
        self._wait_ready("mariadb", lambda: self._db_answers() and tcp_answers(port))

    def _setup_db_users(self) -> None:
        """Idempotent: safe on every `up`, and repairs a half-done first run."""
        if "db_root_password" not in self.state:
            root_pw = secrets.token_urlsafe(24)
            with self.root_db() as conn, conn.cursor() as cur:
                cur.execute("ALTER USER 'root'@'localhost' IDENTIFIED BY %s", (root_pw,))
                cur.execute("SELECT user, host FROM mysql.user "
                            "WHERE user = '' OR (user = 'root' AND host <> 'localhost')")
                for user, host in cur.fetchall():  # no anonymous or remote root
                    cur.execute("DROP USER %s@%s", (user, host))
                cur.execute("DELETE FROM mysql.proxies_priv WHERE Host <> 'localhost'")
                cur.execute("FLUSH PRIVILEGES")
            self.state["db_root_password"] = root_pw
            self._save()
        password = self.secret("db_password")
        with self.root_db() as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS pink")
            for host in ("127.0.0.1", "localhost"):
                cur.execute("CREATE USER IF NOT EXISTS 'pink'@%s IDENTIFIED BY %s REQUIRE SSL",
                            (host, password))
                cur.execute("ALTER USER 'pink'@%s IDENTIFIED BY %s REQUIRE SSL", (host, password))
                cur.execute("GRANT ALL PRIVILEGES ON pink.* TO 'pink'@%s", (host,))

    def create_database(self, name: str) -> None:
        """A schema for one test, owned by the pink user."""
        with self.root_db() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
            for host in ("127.0.0.1", "localhost"):
                cur.execute(f"GRANT ALL PRIVILEGES ON `{name}`.* TO 'pink'@%s", (host,))

    def drop_database(self, name: str) -> None:
        with self.root_db() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
