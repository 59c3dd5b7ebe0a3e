"""Trivial tasks per second through PINK with two runners, against a loop of
raw `docker run --rm` at the same concurrency, in the same run (issue 3),
and where the CPU goes in each.

Both sides run the same one-line busybox image with no network (PINK's
default: a bridge would cost the raw loop 0.07 CPU-s and 0.3 s a task more
here, flattering PINK); PINK's concurrency is two
runners times their container slots, the raw loop uses that many threads.
PINK's tasks are submitted and timed as 7. times its batches (to the last
task archived, read from MariaDB once a second): polling each task over
HTTPS would load the web node being measured.

CPU: the machine's busy time (/proc/stat) over each phase, divided by the
tasks, and PINK's share by process (utime + stime from /proc/<pid>/stat of
the processes alive at both ends); what no long-lived process accounts for
is the containers' short-lived ones (runc, shims, the docker CLI) and the
benchmark's own client. Both sides share the machine's cores, so CPU per
task is what bounds tasks per second here.

Each side is measured twice: sharing all cores, and with the runner host
apart: dockerd, containerd (so the containers), the runners and their sshd
on half the cores, PINK's control plane (web, workers, leader, etcd, Redis,
MariaDB) and the benchmark on the other half, as a deployment has them on
other machines. The raw loop's `docker` CLI then runs on the runner host's
cores: a user without PINK runs it on the GPU server.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import statistics
import subprocess
import time
import uuid

from bench.drain import batch
from bench.measure import hello_image

TARGET = 0.8  # PINK's tasks per second as a fraction of raw docker run's
GROUPS = {  # process groups by the start of their command line
    "pink-web": "pink-web", "pink-worker": "pink-worker", "pink-leader": "pink-leader",
    "pink-runner": "pink-runner", "etcd": "etcd", "mariadbd": "mariadb", "redis-server": "redis",
    "dockerd": "dockerd", "containerd-shim": None, "containerd": "containerd", "sshd": "sshd",
}
RUNNER_HOST = {"pink-runner", "dockerd", "containerd", None, "sshd"}  # None: the shims
TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return (sum(fields) - fields[3] - fields[4]) / TICK  # all but idle and iowait


def _group(pid: str) -> tuple[bool, str | None]:
    """(whether `pid` is in GROUPS, its group: None for the shims). Kernel
    threads (no command line) raise ProcessLookupError: theirs is not ours to set."""
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    if not argv[0]:
        raise ProcessLookupError(pid)
    words = [os.path.basename(a.decode(errors="replace")) for a in argv[:2] if a]
    return next(((True, g) for w in words for prefix, g in GROUPS.items() if w.startswith(prefix)), (False, None))


def _by_pid() -> dict[str, tuple[str, float]]:
    """CPU seconds so far of each process of a group: pid -> (group, seconds)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            _, group = _group(pid)
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if group:
            out[pid] = (group, (int(stat[11]) + int(stat[12])) / TICK)
    return out


def _pin_threads(pid: str, cpus: set[int], saved: dict[int, set[int]]) -> None:
    """Every thread of `pid` on `cpus` (a thread's affinity is its own; new
    ones inherit their creator's), each one's own first saved in `saved`."""
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            saved.setdefault(tid, os.sched_getaffinity(tid))
            os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def _runner_host_apart():
    """The runner host's processes (RUNNER_HOST) on the upper half of the
    cores, the rest of GROUPS and this benchmark on the lower half; yields
    the runner host's cores. Each thread's own affinity comes back on the
    way out (if the benchmark is killed meanwhile, `taskset -a -p` undoes it)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise RuntimeError("the runner host apart needs at least two cores")
    control, runner = set(cores[:len(cores) // 2]), set(cores[len(cores) // 2:])
    saved: dict[int, set[int]] = {}
    try:
        for _ in range(2):  # the second pass catches threads created during the first
            for pid in filter(str.isdigit, os.listdir("/proc")):
                with contextlib.suppress(OSError):
                    known, group = _group(pid)
                    if known or int(pid) == os.getpid():
                        _pin_threads(pid, runner if known and group in RUNNER_HOST else control, saved)
        dockerd = next(pid for pid in filter(str.isdigit, os.listdir("/proc"))
                       if _quiet_group(pid) == (True, "dockerd"))
        if os.sched_getaffinity(int(dockerd)) != runner:
            raise RuntimeError(f"dockerd ({dockerd}) could not be pinned to cores {sorted(runner)}")
        yield runner
    finally:
        for tid, cpus in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def _quiet_group(pid: str) -> tuple[bool, str | None]:
    try:
        return _group(pid)
    except OSError:
        return False, None


def _cpu(run) -> tuple[float, float, dict[str, float]]:
    """Run `run`; returns its result, the machine's busy CPU seconds and each
    group's, counting the processes alive at both ends."""
    busy, before = _machine_busy(), _by_pid()
    result = run()
    after, groups = _by_pid(), collections.Counter()
    for pid, (group, seconds) in after.items():
        if pid in before and before[pid][0] == group:
            groups[group] += seconds - before[pid][1]
    return result, _machine_busy() - busy, dict(groups)


def _raw_loop(tag: str, tasks: int, concurrency: int, cpus: set[int] | None = None,
              export: bool = False) -> float:
    """Tasks per second of `docker run --rm` in `concurrency` threads (the CLI on
    `cpus`: a child inherits its thread's affinity); with `export`, of `docker
    run`, `docker export` and `docker rm`: the container's filesystem, which
    is what a PINK task delivers."""

    def one(n: int) -> None:
        name = f"pink-bench-raw-{uuid.uuid4().hex[:12]}-{n}"
        argv = ["docker", "run", "--rm", "--network", "none", tag] if not export else [
            "sh", "-c", f"docker run --network none --name {name} {tag} >/dev/null && "
                        f"docker export {name} >/dev/null; s=$?; docker rm -f {name} >/dev/null; exit $s"]
        subprocess.run(argv, check=True, capture_output=True)

    started = time.perf_counter()
    pin = dict(initializer=os.sched_setaffinity, initargs=(0, cpus)) if cpus else {}
    with concurrent.futures.ThreadPoolExecutor(concurrency, **pin) as pool:
        list(pool.map(one, range(tasks)))
    return tasks / (time.perf_counter() - started)


def measure(api, client, workdir, config, tasks: int, concurrency: int, rounds: int, log) -> dict:
    """`rounds` rounds of raw then PINK, shared and then apart: this machine's
    speed swings between minutes, so each ratio is of two phases run back to
    back, and the figure is their median."""
    tag, archive = hello_image(client, workdir)
    shared, apart, cpu = [], [], {"raw": [0.0, collections.Counter()], "pink": [0.0, collections.Counter()]}

    def timed(side: str, run) -> float:
        rate, busy, groups = _cpu(run)
        cpu[side][0] += busy
        cpu[side][1].update(groups)
        return rate

    try:
        api.wait(api.submit(archive).json()["task"]["id"])  # one task first: the image is then cached
        for n in range(1, rounds + 1):
            raw = timed("raw", lambda: _raw_loop(tag, tasks, concurrency))
            pink = timed("pink", lambda: batch(api, config, archive, tasks, log)["rate"])
            shared.append((raw, pink, _raw_loop(tag, tasks, concurrency, export=True)))
            log(f"round {n}, shared: raw docker run x{concurrency} {raw:.2f} tasks/s, PINK {pink:.2f}, "
                f"raw with export {shared[-1][2]:.2f}")
            with _runner_host_apart() as cpus:
                apart.append((_raw_loop(tag, tasks, concurrency, cpus),
                              batch(api, config, archive, tasks, log)["rate"],
                              _raw_loop(tag, tasks, concurrency, cpus, export=True)))
            log(f"round {n}, runner host on cores {sorted(cpus)}: raw {apart[-1][0]:.2f} tasks/s, "
                f"PINK {apart[-1][1]:.2f}, raw with export {apart[-1][2]:.2f}")
    finally:
        client.images.remove(tag, force=True)
    done = tasks * rounds
    return {"tasks": tasks, "concurrency": concurrency, "rounds": rounds, "shared": shared, "apart": apart,
            "apart_cores": len(cpus), "cores": len(os.sched_getaffinity(0)),
            "ratio": _median_ratio(shared), "apart_ratio": _median_ratio(apart),
            "export_ratio": _median_ratio(shared, 2), "apart_export_ratio": _median_ratio(apart, 2),
            "raw_cpu": cpu["raw"][0] / done, "pink_cpu": cpu["pink"][0] / done,
            "groups": {g: s / done for g, s in cpu["pink"][1].most_common()},
            "raw_groups": {g: s / done for g, s in cpu["raw"][1].items()}}


def _median_ratio(rounds: list[tuple[float, float, float]], baseline: int = 0) -> float:
    """The median over rounds of PINK's rate over the baseline's (0: raw, 2: raw with export)."""
    return statistics.median(r[1] / r[baseline] for r in rounds)


def report(r: dict) -> list[str]:
    out = [f"### 5. Throughput: {r['tasks']} trivial tasks a phase, concurrency {r['concurrency']}, "
           f"{r['rounds']} rounds", "",
           f"Tasks per second in each round: raw `docker run --rm --network none` in {r['concurrency']} "
           "threads, PINK's two runners, and raw with the export (`docker run`, `docker export`, "
           "`docker rm`: the filesystem a PINK task delivers); each ratio is the median of the "
           f"rounds' (target {TARGET}, against the first).", "",
           "| round | where | raw | PINK | raw + export | PINK x raw | PINK x raw + export |",
           "|---|---|---|---|---|---|---|"]
    for n, rounds in enumerate(zip(r["shared"], r["apart"]), 1):
        for where, (raw, pink, raw_export) in zip(("shared", "runner host apart"), rounds):
            out.append(f"| {n} | {where} | {raw:.2f} | {pink:.2f} | {raw_export:.2f} | {pink / raw:.2f} | "
                       f"{pink / raw_export:.2f} |")
    out += [f"| median | shared | | | | **{r['ratio']:.2f}** | {r['export_ratio']:.2f} |",
            f"| median | runner host apart | | | | **{r['apart_ratio']:.2f}** | {r['apart_export_ratio']:.2f} |",
            "", f"Runner host apart: {r['apart_cores']} of the {r['cores']} cores for dockerd, "
            "containerd, the runners and their sshd; the rest for the control plane and the benchmark.", "",
            "Machine CPU seconds per task in the shared phases of raw and PINK, by process (the rest: "
            "containers' short-lived processes, dockerd's re-executions (network setup, the export's "
            "tar), the docker CLI, kernel threads, the benchmark's client):", "",
            "| process | raw loop | PINK |", "|---|---|---|"]
    raw_groups = r["raw_groups"]
    out += [f"| {g} | {raw_groups.get(g, 0.0):.3f} | {s:.3f} |" for g, s in r["groups"].items()]
    out += [f"| the rest | {r['raw_cpu'] - sum(raw_groups.values()):.3f} | "
            f"{r['pink_cpu'] - sum(r['groups'].values()):.3f} |",
            f"| all | {r['raw_cpu']:.3f} | {r['pink_cpu']:.3f} |", ""]
    return out
