"""The processes a local cluster starts, and how it waits for and stops them.

Each service runs in its own session, with a pid file in base/run/ and a log
in base/log/, and is recorded in cluster.json: `down` stops exactly what this
cluster started (a dockerd or etcd someone else runs is never touched), and a
later command can still tell whether a recorded pid is the same program.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from devcluster.state import ClusterState

START_TIMEOUT = 60.0  # seconds a service may take to answer after its start
STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL when stopping
LOG_TAIL = 40  # lines of a service's log quoted when it fails to start


class ClusterError(RuntimeError):
    """A service of the local cluster did not start or answer."""


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


class ProcessTable(ClusterState):
    """Start, check, reuse and stop the cluster's named processes.

    Every service (etcd, Redis, ..., pink-web) goes through here, so that all
    of them are found, reused and stopped the same way, by name.
    """

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
