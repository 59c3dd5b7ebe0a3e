"""Slurm beside PINK: the same trivial task run the way a lab without PINK would.

A GPU user who does not use PINK submits `sbatch --wrap 'docker run ...'` to
a Slurm cluster. This module starts a one-node Slurm on this machine
(Debian's slurm-wlm 22.05: munged, slurmctld and slurmd, with a config of
its own under the benchmark's directory, as the benchmark starts sshd and
etcd) and measures, on the image PINK runs:

- warm: one job at a time, from `sbatch` to the end of `docker run`, as the
  job itself stamps it (`sbatch --wait` polls every 2 s and the job-completion
  log has whole seconds, so neither can time a one-second job);
- burst: jobs submitted from 8 threads at once, jobs per second from the
  first submit to the last end.

Slurm gets `slots` one-CPU slots (config_overrides lets a node declare more
CPUs than it has), so it can be compared at PINK's slots and at its own
default (the machine's cores). `compare` runs PINK's side in the same run
(`make bench`, figure 12); `python -m bench.slurm IMAGE` runs Slurm alone.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
READY_TIMEOUT = 60.0  # seconds for slurmctld and slurmd to show the node idle
JOB_TIMEOUT = 300.0  # seconds a measured job may take before the measurement gives up
POLL = 0.01  # seconds between looks for a job's end stamp
SUBMIT_THREADS = 8


@dataclass
class SlurmResult:
    slots: int
    warm_seconds: list[float]
    warm_median: float
    burst_jobs: int
    burst_seconds: float
    burst_per_second: float


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] slurm: {msg}", file=sys.stderr, flush=True)


def ensure_installed() -> None:
    """Debian's slurm-wlm and munge, installed once (apt does not start them here)."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    log("installing slurm-wlm and munge (apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"],
                   check=True, env=env, stdout=subprocess.DEVNULL)


class Slurm:
    """A one-node Slurm under `base`, started and stopped by this process."""

    def __init__(self, base: Path, slots: int):
        self.base = base
        self.slots = slots
        self.conf = base / "slurm.conf"
        self.stamps = base / "stamps"
        self.procs: list[subprocess.Popen] = []
        self.node = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> "Slurm":
        ensure_installed()
        for sub in ("state", "spool", "stamps", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self._munge()
        self.conf.write_text(self._config())
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait_idle()
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _munge(self) -> None:
        """munged with a key of its own; one already running is reused (it serves every local client)."""
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        user = pwd.getpwnam("munge")
        if not MUNGE_KEY.exists():
            MUNGE_KEY.write_bytes(os.urandom(1024))
        os.chown(MUNGE_KEY, user.pw_uid, user.pw_gid)
        MUNGE_KEY.chmod(0o400)
        MUNGE_RUN.mkdir(mode=0o755, exist_ok=True)
        os.chown(MUNGE_RUN, user.pw_uid, user.pw_gid)
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)

    def _config(self) -> str:
        b = self.base
        return "\n".join([
            "ClusterName=pinkbench", f"SlurmctldHost={self.node}", "SlurmUser=root", "AuthType=auth/munge",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={b}/log/jobcomp.txt", "SlurmdParameters=config_overrides", "MinJobAge=5",
            # Schedule a batch job when it arrives, not up to 3 s later (22.05's
            # default): a warm job then takes ~1 s instead of ~3 s here.
            "SchedulerParameters=batch_sched_delay=0",
            "ReturnToService=2", f"StateSaveLocation={b}/state", f"SlurmdSpoolDir={b}/spool",
            f"SlurmctldPidFile={b}/slurmctld.pid", f"SlurmdPidFile={b}/slurmd.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log", f"SlurmdLogFile={b}/log/slurmd.log",
            f"NodeName={self.node} CPUs={self.slots} State=UNKNOWN",
            "PartitionName=bench Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])

    def _start(self, name: str, argv: list[str]) -> None:
        out = open(self.base / "log" / f"{name}.out", "ab")
        self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env))

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm's node never became idle; see {self.base}/log")

    def submit(self, image: str) -> tuple[str, float]:
        """One `sbatch --wrap 'docker run ...'`; (job id, when it was submitted)."""
        stamp = f"{self.stamps}/end.$SLURM_JOB_ID"
        wrap = f"docker run --rm --network none {image} true && date +%s.%N > {stamp}"
        submitted = time.time()
        out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "-o", "/dev/null",
                              "-e", f"{self.base}/log/job-%j.err", "--wrap", wrap],
                             env=self.env, capture_output=True, text=True, check=True)
        return out.stdout.strip().split(";")[0], submitted

    def ended(self, job: str) -> float:
        """When job `job`'s `docker run` ended, waiting for its stamp."""
        path = self.stamps / f"end.{job}"
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            try:
                text = path.read_text().strip()
                if text:
                    return float(text)
            except FileNotFoundError:
                pass
            time.sleep(POLL)
        raise RuntimeError(f"Slurm job {job} did not end in {JOB_TIMEOUT:.0f}s; see {self.base}/log")


def warm(slurm: Slurm, image: str, repeats: int) -> list[float]:
    """Seconds from sbatch to the end of `docker run`, one job at a time, after one unmeasured job."""
    slurm.ended(slurm.submit(image)[0])
    times = []
    for _ in range(repeats):
        job, submitted = slurm.submit(image)
        times.append(slurm.ended(job) - submitted)
    return times


def burst(slurm: Slurm, image: str, jobs: int) -> float:
    """Seconds from the first of `jobs` submits (from SUBMIT_THREADS threads) to the last job's end."""
    ids: list[str] = []
    lock = threading.Lock()
    counter = iter(range(jobs))

    def submitter() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            job = slurm.submit(image)[0]
            with lock:
                ids.append(job)

    started = time.time()
    threads = [threading.Thread(target=submitter) for _ in range(SUBMIT_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(slurm.ended(job) for job in ids) - started


def measure(base: Path, image: str, slots: int, repeats: int, jobs: int) -> SlurmResult:
    """Start Slurm with `slots` slots, measure warm and burst, stop it."""
    shutil.rmtree(base, ignore_errors=True)
    with Slurm(base, slots) as slurm:
        log(f"up with {slots} slots; warm x{repeats}")
        times = warm(slurm, image, repeats)
        log(f"burst of {jobs} jobs")
        seconds = burst(slurm, image, jobs)
    return SlurmResult(slots=slots, warm_seconds=[round(t, 3) for t in times],
                       warm_median=round(statistics.median(times), 3), burst_jobs=jobs,
                       burst_seconds=round(seconds, 3), burst_per_second=round(jobs / seconds, 2))


def compare(api, client, workdir: Path, config, slots: int, repeats: int, jobs: int, log) -> dict:
    """PINK and Slurm on one image, back to back: warm (`repeats` one at a
    time) and a burst of `jobs` from SUBMIT_THREADS threads; Slurm with
    PINK's `slots` and with its own default (the machine's cores)."""
    from bench.drain import batch
    from bench.measure import forget_image, hello_image, median, pink_once

    tag, archive = hello_image(client, workdir)
    try:
        pink_once(api, archive)  # cold: the runner loads the image once
        warm_pink = [pink_once(api, archive)["total"] for _ in range(repeats)]
        log(f"PINK warm: median {median(warm_pink):.3f}s of {repeats}")
        burst_pink = batch(api, config, archive, jobs, log, threads=SUBMIT_THREADS)["rate"]
        log(f"PINK burst of {jobs}: {burst_pink:.2f} tasks/s")
        contenders = {}
        for label, n in (("equal", slots), ("default", os.cpu_count() or 1)):
            result = measure(workdir / "slurm", tag, n, repeats, jobs)
            log(f"Slurm with {n} slots: warm median {result.warm_median:.3f}s, burst {result.burst_per_second} jobs/s")
            contenders[label] = asdict(result)
    finally:
        forget_image(client, tag, archive)
    return {"slots": slots, "jobs": jobs, "pink_warm": warm_pink, "pink_burst_per_second": round(burst_pink, 2),
            "slurm": contenders,
            "warm_ratio": round(median(warm_pink) / contenders["equal"]["warm_median"], 2),
            "burst_ratio": round(burst_pink / contenders["equal"]["burst_per_second"], 2),
            "burst_ratio_default": round(burst_pink / contenders["default"]["burst_per_second"], 2)}


WARM_TARGET = 1.0  # PINK's warm task x Slurm's, below: faster than the alternative (issue 22)
BURST_TARGET = 1.2  # PINK's burst x Slurm's, at least


def rows(c: dict) -> list[tuple[str, str, str]]:
    """The summary rows of `compare`'s result."""
    return [(f"12. warm trivial task, PINK x Slurm (`sbatch --wrap 'docker run'`, {c['slots']} slots)",
             f"{c['warm_ratio']:.2f}", f"< {WARM_TARGET}"),
            (f"12. burst of {c['jobs']} from {SUBMIT_THREADS} threads, PINK x Slurm at equal slots",
             f"{c['burst_ratio']:.2f}", f">= {BURST_TARGET}"),
            (f"12. the same burst, PINK x Slurm at its default ({c['slurm']['default']['slots']} slots)",
             f"{c['burst_ratio_default']:.2f}", "")]


def report(c: dict) -> list[str]:
    """`compare`'s section of the report."""
    from bench.measure import median

    out = ["### 12. Slurm beside PINK: `sbatch --wrap 'docker run --rm --network none IMAGE true'`", "",
           "Slurm 22.05 (one node, one-CPU slots, `batch_sched_delay=0`), timed from `sbatch` to the job's "
           "own stamp after `docker run`; PINK from the submit to the task seen finished (warm) or archived "
           "(burst).", "", "| what | warm median s | burst jobs/s |", "|---|---|---|",
           f"| PINK ({c['slots']} slots) | {median(c['pink_warm']):.3f} | {c['pink_burst_per_second']:.2f} |"]
    for label, res in c["slurm"].items():
        out.append(f"| Slurm, {label} ({res['slots']} slots) | {res['warm_median']:.3f} | "
                   f"{res['burst_per_second']:.2f} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="a local Docker image to run (`docker run IMAGE true`)")
    parser.add_argument("--slots", type=int, default=os.cpu_count(), help="one-CPU slots (default: the cores)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=200, help="jobs in the burst")
    parser.add_argument("--base", default="/var/lib/pink-bench/slurm")
    args = parser.parse_args(argv)
    result = measure(Path(args.base), args.image, args.slots, args.repeats, args.jobs)
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
