"""A one-machine PINK cluster: infrastructure services and PINK's processes.

`Cluster(base)` starts etcd, Redis, MariaDB (TLS only), a chrooted SFTP-only
sshd per runner, and pink-web/worker/leader/runner, each in its own session,
with pid files in base/run/, logs in base/log/ and its choices (ports,
passwords, paths) in base/cluster.json, so a second `up` reuses what runs.
Called by `make demo`/`make test` (`python -m devcluster.local`) and by
tests/conftest.py. Imports no Flask, RQ or Docker: a cluster can be started
before anything else is importable.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pymysql

from pink.compat import tomllib

REPO = Path(__file__).resolve().parent.parent
MAKE_CERTS = REPO / "ssl" / "make-certs.sh"
DEMO_BASE = Path("/var/lib/pink-demo")  # `make demo`'s cluster
WEB_PORT = 8443  # the demo's pages, at an address people bookmark (another if taken)
PREFIX = "/pink"  # the demo's etcd prefix, and its containers' `pink.cluster` label
TEST_BASE = Path("/var/lib/pink-test")  # tests' clusters, one random subdir each
XFER_USER = "pink-xfer"  # the runners' image-transfer account (SFTP only)
DOCKERD_LOG = Path("/var/log/pink-dockerd.log")  # a dockerd no cluster owns
START_TIMEOUT = 60.0  # seconds a service may take to answer after its start
STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL when stopping
LOG_TAIL = 40  # lines of a service's log quoted when it fails to start
# etcd keeps every revision until compacted: without compaction each state
# change of every task stays in its database for good. Periodic mode drops
# history older than this (a Go duration); PINK's watches are hints that are
# followed by a fresh read, so it never needs old revisions. Shorter than the
# Ansible role's 5m so that a demo, a test session or `make bench` sees it work.
ETCD_COMPACTION_RETENTION = "1m"


class ClusterError(RuntimeError):
    """A service of the local cluster did not start or answer."""


# ---------------------------------------------------------------- helpers

def free_port() -> int:
    """A port the kernel considers free now (bind to port 0 on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def tcp_answers(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def wait_until(check, timeout: float, interval: float = 0.2) -> bool:
    """Poll `check()` until it is true or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except Exception:  # a service that is still starting may raise anything
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pid_alive(pid: int, exe: str | None = None) -> bool:
    """True when `pid` runs (not a zombie) and, if given, runs `exe`.

    Comparing the program guards against a recycled pid after a reboot or a
    long pause between `up` and `status`.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    if exe:
        # Entry points run as `python /venv/bin/pink-web`: look in the whole cmdline.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        return Path(exe).name in cmdline
    return True


def b64(text: str) -> str:
    """etcd's JSON gateway carries keys and values in base64."""
    return base64.b64encode(text.encode()).decode()


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


# ---------------------------------------------------------------- dockerd

def remove_task_containers(prefix: str) -> None:
    """Remove the task containers of the PINK cluster whose etcd prefix is
    `prefix`: a runner that stops leaves them running for its next process."""
    import docker

    try:
        client = docker.from_env()
    except docker.errors.DockerException:
        return  # no engine (it was never started): no containers either
    try:
        for container in client.containers.list(all=True, filters={"label": f"pink.cluster={prefix}"}):
            container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass  # removed meanwhile
    finally:
        client.close()


def docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return host.removeprefix("unix://") if host.startswith("unix://") else ""


def docker_answers() -> bool:
    """Ping the engine's API on its unix socket (what `docker info` needs)."""
    path = docker_socket()
    if not path:  # a tcp:// DOCKER_HOST: let the client decide
        return subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b"OK" in sock.recv(4096)
    except OSError:
        return False


def ensure_dockerd(log: Path = DOCKERD_LOG, timeout: float = START_TIMEOUT) -> subprocess.Popen | None:
    """Start dockerd unless an engine answers; returns the process we started.

    A dockerd we find running belongs to someone else and is never stopped.
    """
    if docker_answers():
        return None
    if not shutil.which("dockerd"):
        raise ClusterError("dockerd is not installed (apt-get install docker.io)")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(["dockerd"], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    if not wait_until(lambda: proc.poll() is None and docker_answers(), timeout):
        raise ClusterError(f"dockerd did not answer within {timeout:.0f}s; "
                           f"{log}:\n{log_tail(log)}")
    return proc


# ---------------------------------------------------------------- the cluster

class Cluster:
    """One machine's PINK cluster rooted at `base` (which must not be in /tmp:
    sshd's ChrootDirectory needs root-owned, non-writable path components)."""

    def __init__(self, base: Path | str, ssl_dir: Path | str | None = None,
                 ssl_db_dir: Path | str | None = None):
        self.base = Path(base).absolute()
        self.run_dir = self.base / "run"
        self.log_dir = self.base / "log"
        self.state_file = self.base / "cluster.json"
        for path in (self.base, self.run_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.state = self._load_state()
        if ssl_dir:
            self.state["ssl_dir"] = str(Path(ssl_dir).absolute())
        if ssl_db_dir:
            self.state["ssl_db_dir"] = str(Path(ssl_db_dir).absolute())
        self.state.setdefault("ssl_dir", str(REPO / "ssl"))
        self.state.setdefault("ssl_db_dir", str(REPO / "ssl_db"))
        self.state.setdefault("ports", {})
        self.state.setdefault("procs", {})
        self._popen: dict[str, subprocess.Popen] = {}
        self._save()

    # -------------------------------------------------------- state

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

    def port(self, key: str, prefer: int | None = None) -> int:
        """The port recorded for `key`, or `prefer` when free, or a newly chosen free one.

        A recorded port that something else took meanwhile is replaced, so a
        restart after a reboot does not fail on a stranger's listener; one
        recorded while `prefer` was taken moves back to `prefer` once it is free.
        """
        port = self.state["ports"].get(key)
        idle = port is not None and not self._owner_alive(key)
        if port is None or (idle and not port_is_free(port)) or (
                idle and prefer and port != prefer and port_is_free(prefer)):
            port = prefer if prefer and port_is_free(prefer) else free_port()
            self.state["ports"][key] = port
            self._save()
        return port

    def _owner_alive(self, key: str) -> bool:
        """Whether the process that uses port `key` (same name, minus a
        `-peer` suffix) is one of ours and alive."""
        return self.alive(key.removesuffix("-peer"))

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

    # -------------------------------------------------------- processes

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        record = self.state["procs"].get(name)
        return record["pid"] if record else None

    def start_process(self, name: str, argv: list[str], env: dict | None = None,
                      cwd: Path | str | None = None) -> subprocess.Popen:
        """Start `argv` in its own session, logging to base/log/<name>.log.

        Its own session makes it a process group we can signal as a whole
        (gunicorn's workers, dockerd's containerd) without touching ours.
        """
        if self.alive(name):
            raise ClusterError(f"{name} already runs (pid {self.pid(name)})")
        log = self.log_path(name)
        with open(log, "ab") as fh:
            fh.write(f"=== {time.strftime('%F %T')} starting: {' '.join(argv)}\n".encode())
            fh.flush()
            try:
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=cwd,
                                        env={**os.environ, **(env or {})},
                                        start_new_session=True)
            except FileNotFoundError:
                raise ClusterError(f"{name}: {argv[0]} is not installed") from None
        self._popen[name] = proc
        self.pid_path(name).write_text(f"{proc.pid}\n")
        self.state["procs"][name] = {"pid": proc.pid, "argv": argv, "started": time.time()}
        self._save()
        return proc

    def alive(self, name: str) -> bool:
        record = self.state["procs"].get(name)
        if not record:
            return False
        proc = self._popen.get(name)
        if proc is not None:
            return proc.poll() is None  # also reaps our own dead child
        return pid_alive(record["pid"], record["argv"][0])

    def names(self) -> list[str]:
        """Processes this cluster started, oldest first."""
        procs = self.state["procs"]
        return sorted(procs, key=lambda name: procs[name]["started"])

    def _signal(self, name: str, sig: int) -> None:
        pid = self.pid(name)
        try:
            os.killpg(pid, sig)  # pid == pgid: each runs in its own session
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Signal `name`'s process group, wait, then SIGKILL what is left."""
        if name not in self.state["procs"]:
            return
        if self.alive(name):
            self._signal(name, sig)
            if not wait_until(lambda: not self.alive(name), timeout, 0.05):
                self._signal(name, signal.SIGKILL)
                wait_until(lambda: not self.alive(name), 10, 0.05)
        self._forget(name)

    def kill(self, name: str) -> None:
        """SIGKILL, no grace: a crash, for fault tests."""
        self.stop(name, signal.SIGKILL, timeout=10)

    def _forget(self, name: str) -> None:
        self._popen.pop(name, None)
        self.state["procs"].pop(name, None)
        self.pid_path(name).unlink(missing_ok=True)
        self._save()

    def down(self) -> None:
        """Stop everything this cluster started, newest first, nothing else."""
        for name in reversed(self.names()):
            self.stop(name)
        remove_task_containers(PREFIX)

    def _wait_ready(self, name: str, check, timeout: float = START_TIMEOUT) -> None:
        if not wait_until(lambda: self.alive(name) and check(), timeout):
            state = "answering" if self.alive(name) else "running (it exited)"
            raise ClusterError(f"{name} is not {state} after {timeout:.0f}s; "
                               f"{self.log_path(name)}:\n{log_tail(self.log_path(name))}")

    def _reuse(self, name: str, check) -> bool:
        """True when `name` runs and answers; a live one that does not answer
        within a few seconds is stopped so the caller starts it afresh."""
        if not self.alive(name):
            self._forget(name)
            return False
        if wait_until(check, 5.0):
            return True
        self.stop(name)
        return False

    # -------------------------------------------------------- dockerd

    def ensure_dockerd(self) -> None:
        """Make sure a Docker engine answers; one we start is ours to stop."""
        if self._reuse("dockerd", docker_answers) or docker_answers():
            return
        self.start_process("dockerd", ["dockerd"])
        self._wait_ready("dockerd", docker_answers)

    # -------------------------------------------------------- etcd

    @property
    def etcd_endpoint(self) -> str:
        return f"127.0.0.1:{self.state['ports']['etcd']}"

    def etcd(self, method: str, body: dict) -> dict:
        """One etcd v3 call through its HTTP/JSON gateway, e.g. ("kv/put",
        {"key": b64(k), "value": b64(v)}): no gRPC client needed."""
        req = urllib.request.Request(f"http://{self.etcd_endpoint}/v3/{method}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.load(resp)

    def etcd_delete_prefix(self, prefix: str) -> None:
        """Remove a test's whole etcd namespace."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        self.etcd("kv/deleterange", {"key": b64(prefix), "range_end": b64(end)})

    def _etcd_answers(self) -> bool:
        url = f"http://{self.etcd_endpoint}/health"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.load(resp).get("health") == "true"

    def etcd_status(self) -> dict:
        """The member's maintenance status: dbSize (bytes of its database
        file), dbSizeInUse (bytes holding live data) and the revision."""
        status = self.etcd("maintenance/status", {})
        return {"db_size": int(status["dbSize"]), "db_size_in_use": int(status.get("dbSizeInUse", 0)),
                "revision": int(status["header"]["revision"])}

    def etcd_count(self, prefix: str) -> int:
        """How many keys start with `prefix` (counted by etcd, nothing transferred)."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        got = self.etcd("kv/range", {"key": b64(prefix), "range_end": b64(end), "count_only": True})
        return int(got.get("count", 0))

    def start_etcd(self, compaction_retention: str = ETCD_COMPACTION_RETENTION) -> str:
        """A single-member etcd on loopback; returns its endpoint host:port.

        Auto-compaction is periodic (`compaction_retention` of history kept);
        the backend quota stays etcd's default (2 GiB), which compaction keeps
        the database far below.
        """
        compaction = ["--auto-compaction-mode=periodic",
                      f"--auto-compaction-retention={compaction_retention}"]
        record = self.state["procs"].get("etcd")
        if record and self.alive("etcd") and not set(compaction) <= set(record["argv"]):
            self.stop("etcd")  # started by an older PINK without compaction: its data stays
        if self._reuse("etcd", self._etcd_answers):
            return self.etcd_endpoint
        client, peer = self.port("etcd"), self.port("etcd-peer")
        data = self.base / "etcd"
        self.start_process("etcd", [
            "etcd", "--name", "pink", "--data-dir", str(data),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"pink=http://127.0.0.1:{peer}",
            "--initial-cluster-state", "existing" if (data / "member").exists() else "new",
            *compaction,
        ])
        self._wait_ready("etcd", self._etcd_answers)
        return self.etcd_endpoint

    # -------------------------------------------------------- redis

    @property
    def redis_port(self) -> int:
        return self.state["ports"]["redis"]

    def redis_url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/{db}"

    def _redis_answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def start_redis(self) -> str:
        """Redis without persistence (RQ is a mirror of etcd, rebuildable).

        No password: it listens on loopback only, and everything on this one
        machine that could reach it runs as root anyway. A multi-machine
        deployment sets requirepass (see ansible/).
        """
        if self._reuse("redis", self._redis_answers):
            return self.redis_url()
        port = self.port("redis")
        data = self.base / "redis"
        data.mkdir(exist_ok=True)
        self.start_process("redis", [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(data),
            "--databases", "128",  # one per concurrent test namespace
        ])
        self._wait_ready("redis", self._redis_answers)
        return self.redis_url()

    # -------------------------------------------------------- mariadb

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

    # -------------------------------------------------------- sshd (runner transfer account)

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

    # -------------------------------------------------------- the PINK config

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

    # -------------------------------------------------------- PINK's processes

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

    # -------------------------------------------------------- whole cluster

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
            self.start_leader()
            for runner in runners:
                cfg = config if runner == runners[0] else self.write_config(
                    runner_name=runner, path=self.base / f"pink-{runner}.toml")
                self.start_runner(runner, cfg)
        return config

    def status(self) -> list[tuple[str, int, bool]]:
        return [(name, self.pid(name), self.alive(name)) for name in self.names()]


# ---------------------------------------------------------------- system setup

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


# ---------------------------------------------------------------- the demo

DEMO_IMAGE = "pink/demo:latest"
DEMO_DOCKERFILE = """\
FROM pink/busybox:demo
CMD ["/bin/sh", "-c", "mkdir -p /result && echo \\"hello from PINK on $(hostname) at $(date)\\" > /result/hello.txt && cat /result/hello.txt"]
"""


def build_busybox_image(tag: str, workdir: Path) -> None:
    """A tiny image from busybox-static (no registry is reachable here)."""
    rootfs = workdir / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    for sub in ("bin", "etc", "tmp", "result"):
        (rootfs / sub).mkdir(parents=True)
    for sub in ("tmp", "result"):  # writable whatever user the runner picks
        os.chmod(rootfs / sub, 0o1777)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True,
                             text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    tar = workdir / "busybox.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    subprocess.run(["docker", "import", "--change", 'CMD ["/bin/sh"]', str(tar), tag],
                   check=True, stdout=subprocess.DEVNULL)


def build_demo_image(workdir: Path) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    build_busybox_image("pink/busybox:demo", workdir)
    ctx = workdir / "context"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(DEMO_DOCKERFILE)
    # The legacy builder needs no buildx plugin and no network for FROM a local image.
    subprocess.run(["docker", "build", "-q", "-t", DEMO_IMAGE, str(ctx)], check=True,
                   env={**os.environ, "DOCKER_BUILDKIT": "0"}, stdout=subprocess.DEVNULL)
    return DEMO_IMAGE


def pink_cli(cluster: Cluster, *args: str, capture: bool = False) -> str:
    out = subprocess.run([cluster.executable("pink"), *args], check=True, text=True,
                         stdout=subprocess.PIPE if capture else None)
    return out.stdout or ""


def run_demo(base: Path | str) -> None:
    """`make demo`: a whole cluster, an admin, and one task end to end; then how to use it."""
    cluster = Cluster(base)
    config = cluster.up(with_pink=True)
    url = tomllib.loads(config.read_text())["web"]["url"]
    password = None
    if "admin_token" not in cluster.state:
        created = json.loads(pink_cli(cluster, "admin", "user", "create", "admin", "--admin",
                                      "--json", "--config", str(config), capture=True))
        password = created["password"]
        cluster.state["admin_token"] = created["token"]  # cluster.json is mode 0600
        cluster._save()
    pink_cli(cluster, "login", "--url", url, "--token", cluster.state["admin_token"],
             "--ca", str(cluster.ssl_dir / "ca.pem"))
    image = build_demo_image(cluster.base / "demo")
    download = cluster.base / "demo-output"
    shutil.rmtree(download, ignore_errors=True)
    pink_cli(cluster, "submit", image, "--wait", "--download", str(download))
    print(read_demo_result(download, cluster.base / "demo" / "fs"))
    print(demo_welcome(cluster, config, password), file=sys.stderr)


def demo_welcome(cluster: Cluster, config: Path, password: str | None) -> str:
    """What a person needs after `make demo`, last on the screen where it is not lost."""
    port = int(tomllib.loads(config.read_text())["web"]["bind"].rsplit(":", 1)[1])
    pink = cluster.executable("pink")
    moved = "" if port == WEB_PORT else f"  (port {WEB_PORT} is taken, so the demo chose {port})"
    login = (f"Log in as admin with password {password}\n  (shown once: it is stored nowhere)" if password else
             "Log in as admin with the password the first `make demo` showed.")
    return "\n".join([
        "",
        f"PINK runs at https://localhost:{port}{moved}",
        f"  its certificate is signed by {cluster.ssl_dir / 'ca.pem'}: import that CA into the browser,",
        "  or accept the warning once.",
        login,
        f"  Lost it? {pink} admin user reset-password admin --config {config}",
        f"The CLI is logged in as admin: try `{pink} status`.",
        "Stop everything with `make down`.",
    ])


def read_demo_result(download: Path, into: Path) -> str:
    """Unpack the task's exported filesystem and return what it wrote."""
    archives = [download] if download.is_file() else sorted(download.rglob("*.tar.zst"))
    if not archives:
        raise ClusterError(f"no .tar.zst output under {download}")
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    subprocess.run(["tar", "--zstd", "-xf", str(archives[0]), "-C", str(into)], check=True)
    found = sorted(into.rglob("hello.txt"))
    if not found:
        raise ClusterError(f"the demo task's /result/hello.txt is not in {archives[0]}")
    return found[0].read_text().strip()


# ---------------------------------------------------------------- command line

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
